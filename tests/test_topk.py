"""Top-k (served) teacher: every single-device path against a float64 formula written here.

The formula builds the bucketed distributions with ``torch.gather`` and
``torch.logsumexp`` and takes its gradient from autograd; the code under test uses its
own closed-form gradient and chunked kernels.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from eaopd_mp import (
    EntropyAwareOPDLoss,
    FusedLinearEAOPDLoss,
    entropy_aware_opd_loss,
    fused_linear_eaopd_loss,
)
from formulas import close, gate_weights, gated_kl, reduce

FLOOR = 1e-6  # the documented floor of Q_tail inside log(Q_tail) (reverse KL)


def _gate(ent, fwd, rev, vocab, **gate):
    """``a * KL_fwd + b * KL_rev`` with the gate's weights (finite KLs only)."""
    a, b = gate_weights(ent, vocab, **gate)
    return a * fwd + b * rev


def formula(z, ids, lp, *, temperature=1.0, topk_tail="bucket", entropy=None, **gate):
    """Per-token loss, float64, from the definitions (autograd gives the gradient): the
    KLs between the bucketed (or renormalised) teacher and student, with ``F.kl_div``
    (:func:`formulas.gated_kl`: a KL of gate weight 0 is 0, even where it is infinite)."""
    z, lp = z.double(), lp.double()
    vocab, k = z.shape[-1], ids.shape[-1]
    s = F.log_softmax(z / temperature, dim=-1)
    q = lp.exp()
    rest = 1 - q.sum(-1)
    q_tail = rest.clamp_min(0) if k < vocab else torch.zeros_like(rest)
    xlogx = torch.where(q_tail > 0, q_tail * q_tail.clamp_min(1e-300).log(),
                        torch.zeros_like(q_tail))
    ent = -torch.where(q > 0, q * lp, torch.zeros_like(q)).sum(-1) - xlogx \
        if entropy is None else entropy.double()
    a, b = gate_weights(ent, vocab, **gate)
    if topk_tail == "bucket":
        student, teacher_fwd, teacher_rev = torch.gather(s, -1, ids), lp, lp
        if k < vocab:  # the tail bucket: Q_tail as served (floored inside the reverse KL)
            in_topk = torch.zeros_like(s, dtype=torch.bool).scatter(-1, ids, True)
            log_pt = torch.logsumexp(s.masked_fill(in_topk, float("-inf")), -1, keepdim=True)
            student = torch.cat([student, log_pt], -1)
            teacher_fwd = torch.cat([lp, q_tail.log()[..., None]], -1)
            teacher_rev = torch.cat([lp, rest.clamp_min(FLOOR).log()[..., None]], -1)
    elif topk_tail == "truncate":  # verl's forward KL; the reverse over the same ids
        student = torch.gather(s, -1, ids)
        teacher_fwd = teacher_rev = lp
    else:
        student = torch.log_softmax(torch.gather(z / temperature, -1, ids), dim=-1)
        teacher_fwd = teacher_rev = torch.log_softmax(lp, dim=-1)
    return gated_kl(a, teacher_fwd, student) + gated_kl(b, student, teacher_rev)


def served(y, k, generator=None):
    """A served teacher from logits ``y``: top-k log-probs and ids, in random order."""
    lp, ids = torch.log_softmax(y.double(), -1).topk(k, dim=-1)
    perm = torch.argsort(torch.rand(ids.shape, generator=generator), dim=-1)
    return lp.gather(-1, perm).to(y.dtype), ids.gather(-1, perm)


def _data(n=(3, 4), vocab=29, k=5, seed=0, hid=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n, hid, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hid, generator=g, dtype=torch.float64) * 0.7
    y = torch.randn(*n, vocab, generator=g, dtype=torch.float64) * 2.5
    lp, ids = served(y, k, g)
    labels = (torch.rand(n, generator=g) > 0.3).float()
    return h.to(dtype), w.to(dtype), lp.to(dtype), ids, labels


def _grad_out(loss):
    if loss.dim() == 0:
        return torch.full((), 0.7, dtype=loss.dtype)
    return torch.linspace(-1, 1, loss.numel(), dtype=loss.dtype).view(loss.shape)


def _want(h, w, lp, ids, labels, reduction, opts):
    """The formula's loss and gradients (h, w) in float64."""
    hd = h.double().requires_grad_()
    wd = w.double().requires_grad_()
    per_tok = formula(hd @ wd.T, ids, lp, **opts)
    loss = reduce(per_tok, labels, reduction)
    loss.backward(_grad_out(loss))
    return loss.detach(), hd.grad, wd.grad


GATES = [{}, {"h_max": 1.3}, {"gate": "threshold", "gate_threshold": 1.2},
         {"gate": "fixed", "fkl_weight": 0.3}]
TAILS = ["bucket", "renormalize", "truncate"]
GRID = list(itertools.product(["batchmean", "sum", "mean", "none"], [1.0, 1.5], TAILS))


@pytest.mark.parametrize("reduction,tau,tail", GRID)
def test_every_path_equals_the_formula(eager, reduction, tau, tail):
    """Logits-in, fused, both modules; masks and gates vary over the grid; fp32 inputs
    vs the float64 formula at rtol 1e-5."""
    i = GRID.index((reduction, tau, tail))
    gate = GATES[i % len(GATES)]
    h, w, lp, ids, labels = _data(seed=i)
    labels = labels if i % 2 else None
    opts = dict(temperature=tau, topk_tail=tail, **gate)
    want, want_h, want_w = _want(h, w, lp, ids, labels, reduction, opts)
    kw = dict(teacher_topk_logprobs=lp, teacher_topk_indices=ids, labels=labels)
    gopts = dict(reduction=reduction, chunk_size=5, **opts)
    for path in ("logits", "fused", "module logits", "module fused"):
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
        if path == "logits":
            loss = entropy_aware_opd_loss(hg @ wg.T, **kw, **gopts)
        elif path == "fused":
            loss = fused_linear_eaopd_loss(hg, wg, **kw, **gopts)
        elif path == "module logits":
            loss = EntropyAwareOPDLoss(**gopts)(hg @ wg.T, **kw)
        else:
            loss = FusedLinearEAOPDLoss(**gopts)(hg, wg, **kw)
        loss.backward(_grad_out(loss))
        tag = f"{path} {reduction} tau={tau} {tail} {gate}: "
        assert loss.dtype == torch.float32
        close(loss.double(), want, msg=tag)
        close(hg.grad.double(), want_h, msg=tag + "grad h ")
        close(wg.grad.double(), want_w, msg=tag + "grad W ")


def test_float64_is_exact_and_gradcheck(eager):
    """float64: the closed form matches autograd of the formula to 1e-12, and
    torch.autograd.gradcheck passes on the op itself (both tails, tempered)."""
    h, w, lp, ids, labels = _data(n=(2, 3), vocab=13, k=4, dtype=torch.float64)
    z = (h @ w.T).requires_grad_()
    for tail, reduction in (("bucket", "sum"), ("renormalize", "none"), ("bucket", "none"),
                            ("truncate", "sum"), ("truncate", "none")):
        opts = dict(temperature=1.5, topk_tail=tail)
        zf = z.detach().clone().requires_grad_()
        want = reduce(formula(zf, ids, lp, **opts), labels, reduction)
        want.backward(_grad_out(want))
        zg = z.detach().clone().requires_grad_()
        got = entropy_aware_opd_loss(zg, teacher_topk_logprobs=lp, teacher_topk_indices=ids,
                                     labels=labels, reduction=reduction, **opts)
        got.backward(_grad_out(got))
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(zg.grad, zf.grad, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(
            lambda x, opts=opts, reduction=reduction: entropy_aware_opd_loss(
                x, teacher_topk_logprobs=lp, teacher_topk_indices=ids, labels=labels,
                reduction=reduction, chunk_size=4, **opts), (z,))


@pytest.mark.parametrize("tail", TAILS)
def test_k_equals_v_is_the_dense_loss(eager, tail):
    """All V ids (any order): the dense loss (no phantom tail bucket; renormalising over
    everything changes nothing), logits-in and fused, with gradients. Served log-probs are
    the tempered teacher ``log_softmax(y / tau)``; at tau != 1 the dense gate's entropy (of
    the untempered ``y``) is passed as ``teacher_entropy``."""
    h, w, _, _, labels = _data(vocab=17)
    y = torch.randn(3, 4, 17, dtype=torch.float64) * 2
    for tau in (1.0, 1.5):
        lp, ids = served(y / tau, 17)
        ent = torch.distributions.Categorical(logits=y).entropy().float() if tau != 1 \
            else None
        opts = dict(temperature=tau, labels=labels, reduction="sum")
        topk = dict(teacher_topk_logprobs=lp.float(), teacher_topk_indices=ids,
                    teacher_entropy=ent, topk_tail=tail)
        for fused in (False, True):
            out = []
            for t_kw in (dict(teacher_logits=y.float()), topk):
                hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
                loss = fused_linear_eaopd_loss(hg, wg, **t_kw, **opts) if fused else \
                    entropy_aware_opd_loss(hg @ wg.T, **t_kw, **opts)
                loss.backward()
                out.append((loss.detach(), hg.grad, wg.grad))
            for a, b in zip(out[1], out[0], strict=True):
                close(a, b, msg=f"tau={tau} fused={fused}: ")


def test_rounding_case_is_finite(eager):
    """sum_k Q_k >= 1 (rounding): Q_tail is 0 as a weight, floored inside log for the
    reverse KL; loss and gradients finite and equal to the formula, both tails."""
    z = torch.randn(4, 10, dtype=torch.float64)
    ids = torch.tensor([[0, 1, 2]] * 4)
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    lp = (q.log() + torch.tensor([0.0, 1e-7, 3e-7, -1e-9], dtype=torch.float64)[:, None])
    assert (lp.exp().sum(-1)[:3] >= 1).all()
    for tail in TAILS:
        for gate in ({}, {"gate": "fixed", "fkl_weight": 0.0}):
            zg = z.clone().requires_grad_()
            loss = entropy_aware_opd_loss(zg, teacher_topk_logprobs=lp, teacher_topk_indices=ids,
                                          topk_tail=tail, reduction="none", **gate)
            loss.sum().backward()
            zf = z.clone().requires_grad_()
            want = formula(zf, ids, lp, topk_tail=tail, **gate)
            want.sum().backward()
            assert torch.isfinite(loss).all() and torch.isfinite(zg.grad).all()
            close(loss, want.detach())
            close(zg.grad, zf.grad)
    # The reverse tail term is bounded by log(1 / FLOOR) per unit of student tail mass.
    assert loss.max() < math.log(1 / FLOOR)


def test_entropy_override_and_default(eager):
    """teacher_entropy replaces the gate's entropy; the default is the bucketed entropy,
    returned in the statistics."""
    h, w, lp, ids, _ = _data()
    z = h @ w.T
    ent = torch.rand(3, 4) * 3
    for e in (None, ent):
        loss, stats = entropy_aware_opd_loss(z, teacher_topk_logprobs=lp,
                                             teacher_topk_indices=ids, teacher_entropy=e,
                                             return_stats=True)
        want = formula(z, ids, lp, entropy=e)
        close(loss.double(), want.sum() / 3)
        q = lp.double().exp()
        bucket = -(q * lp.double()).sum(-1) - (1 - q.sum(-1)) * (1 - q.sum(-1)).log()
        close(stats["teacher_entropy"].double(), (bucket if e is None else e.double()).mean())


def test_nan_in_nan_out(eager):
    """NaN in the served log-probs, the entropy or the student: that token's loss is
    NaN, the others are not."""
    h, w, lp, ids, _ = _data(n=(5,))
    z = h @ w.T
    lp, z, ent = lp.clone(), z.clone(), torch.ones(5)
    lp[0, 1] = float("nan")
    z[1, 3] = float("nan")
    ent[2] = float("nan")
    loss = entropy_aware_opd_loss(z, teacher_topk_logprobs=lp, teacher_topk_indices=ids,
                                  teacher_entropy=ent, reduction="none")
    assert torch.isnan(loss[:3]).all() and torch.isfinite(loss[3:]).all()


BAD = [
    (dict(ids=lambda i: torch.cat([i[..., :1], i[..., :-1]], -1)), "repeats an id"),
    (dict(ids=lambda i: i.clone().index_fill_(-1, torch.tensor([0]), 29)), r"in \[0, 29\)"),
    (dict(ids=lambda i: i.clone().index_fill_(-1, torch.tensor([0]), -1)), r"in \[0, 29\)"),
    (dict(ids=lambda i: i.float()), "integer vocabulary ids"),
    (dict(ids=lambda i: i[..., :4]), "teacher_topk_indices shape"),
    (dict(lp=lambda x: x[:2]), "teacher_topk_logprobs shape"),
    (dict(ids=lambda i: torch.zeros(3, 4, 30, dtype=torch.long),
          lp=lambda x: torch.zeros(3, 4, 30)), "k <= vocabulary size 29"),
    (dict(ids=lambda i: None), "must be given together"),
    (dict(ent=lambda e: torch.ones(3)), "teacher_entropy shape"),
]


@pytest.mark.parametrize("change,match", BAD)
@pytest.mark.parametrize("fused", [False, True])
def test_bad_input_raises_before_work(change, match, fused):
    h, w, lp, ids, _ = _data()
    lp = change.get("lp", lambda x: x)(lp)
    ids = change.get("ids", lambda x: x)(ids)
    ent = change.get("ent", lambda x: None)(None)
    hg = h.clone().requires_grad_()
    with pytest.raises(ValueError, match=match):
        if fused:
            fused_linear_eaopd_loss(hg, w, teacher_topk_logprobs=lp, teacher_topk_indices=ids,
                                    teacher_entropy=ent)
        else:
            entropy_aware_opd_loss(hg @ w.T, teacher_topk_logprobs=lp, teacher_topk_indices=ids,
                                   teacher_entropy=ent)
    assert hg.grad is None


# One block; blocks of 3 tokens; a scratch smaller than one vocabulary row (one token a block).
@pytest.mark.parametrize("scratch", [2**22, 3 * 50, 30])
def test_repeats_finds_every_repeated_id(monkeypatch, scratch):
    """The O(k) repeated-id check (CPU) and the sort (other devices) agree with a sort
    written here on tokens with none, one or several repeats anywhere in the row (first,
    last, adjacent, far apart, all equal), also when the tokens are checked a few at a
    time."""
    from eaopd_mp import topk

    monkeypatch.setattr(topk, "_SCRATCH", scratch)
    gen = torch.Generator().manual_seed(0)
    vocab, k = 50, 8
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(40)])
    ids[1, 7] = ids[1, 0]
    ids[2, 4] = ids[2, 3]
    ids[3, 2] = ids[3, 6]
    ids[4] = ids[4, 5]
    ids[5, 1], ids[5, 6] = ids[5, 0], ids[5, 3]
    for row in range(10, 40, 3):
        a, b = torch.randint(k, (2,), generator=gen).tolist()
        if a != b:
            ids[row, a] = ids[row, b]
    srt = ids.sort(dim=1).values
    expected = (srt[:, 1:] == srt[:, :-1]).any(1)
    assert expected[1:6].all() and not expected[0] and expected.sum() < 40
    every = torch.randperm(vocab, generator=gen)[None]  # k = V: a permutation, no repeat
    for check in (lambda i: topk.repeats(i, vocab), topk._repeats_sorted):
        assert torch.equal(check(ids), expected)
        assert not check(torch.cat([every, every.flip(1)])).any()
        assert check(torch.zeros(1, 2, dtype=torch.long)).all()


def test_masked_tokens_ids_are_not_read(eager):
    """A masked token may carry padding ids (-1) and NaN log-probs: not checked, not read."""
    h, w, lp, ids, labels = _data()
    labels[0, 0] = 0.0
    lp_pad, ids_pad = lp.clone(), ids.clone()
    lp_pad[0, 0], ids_pad[0, 0] = float("nan"), -1
    kw = dict(labels=labels, reduction="sum")
    got = entropy_aware_opd_loss(h @ w.T, teacher_topk_logprobs=lp_pad,
                                 teacher_topk_indices=ids_pad, **kw)
    close(got, entropy_aware_opd_loss(h @ w.T, teacher_topk_logprobs=lp,
                                      teacher_topk_indices=ids, **kw))


def test_one_teacher_form_and_options():
    h, w, lp, ids, _ = _data()
    z = h @ w.T
    with pytest.raises(ValueError, match="not both"):
        entropy_aware_opd_loss(z, z, teacher_topk_logprobs=lp, teacher_topk_indices=ids)
    with pytest.raises(ValueError, match="teacher is missing"):
        entropy_aware_opd_loss(z)
    with pytest.raises(ValueError, match="one form"):
        fused_linear_eaopd_loss(h, w, teacher_logits=z, teacher_topk_logprobs=lp,
                                teacher_topk_indices=ids)
    with pytest.raises(ValueError, match="topk_tail"):
        entropy_aware_opd_loss(z, teacher_topk_logprobs=lp, teacher_topk_indices=ids,
                               topk_tail="drop")


def _compiled_step(n, reduction, tail):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, 8, generator=g, requires_grad=True)
    w = torch.randn(40, 8, generator=g, requires_grad=True)
    lp, ids = served(torch.randn(n, 40, generator=g) * 2, 6, g)
    loss = fused_linear_eaopd_loss(h, w, teacher_topk_logprobs=lp, teacher_topk_indices=ids,
                                   temperature=1.5, reduction=reduction, chunk_size=16,
                                   topk_tail=tail)
    loss.sum().backward()
    return loss.detach(), h.grad, w.grad


def test_compiled_no_recompiles_and_equals_eager(monkeypatch):
    """The compiled kernels: one graph per variant, none added as lengths change; the
    same values as eager."""
    monkeypatch.setenv("EAOPD_COMPILE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        cases = (("sum", "bucket"), ("none", "renormalize"), ("mean", "truncate"),
                 ("none", "truncate"))
        for reduction, tail in cases:
            _compiled_step(40, reduction, tail)
        counters.clear()
        for n in (1, 3, 17, 33):
            for reduction, tail in cases:
                got = _compiled_step(n, reduction, tail)
                monkeypatch.setenv("EAOPD_COMPILE", "0")
                want = _compiled_step(n, reduction, tail)
                monkeypatch.setenv("EAOPD_COMPILE", "1")
                for a, b in zip(got, want, strict=True):
                    close(a, b)
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])


def test_inside_a_compiled_step(monkeypatch):
    """A user's torch.compile'd step around the fused top-k loss: same loss and grads."""
    h, w, lp, ids, labels = _data()
    lin = torch.nn.Linear(8, 8)

    def step(x, wl):
        return fused_linear_eaopd_loss(lin(x), wl, teacher_topk_logprobs=lp,
                                       teacher_topk_indices=ids, labels=labels,
                                       reduction="mean", chunk_size=5)

    out = []
    for fn in (step, torch.compile(step)):
        wl = w.clone().requires_grad_()
        lin.zero_grad(set_to_none=True)
        loss = fn(h, wl)
        loss.backward()
        out.append((loss.detach(), wl.grad, lin.weight.grad))
    for a, b in zip(*out, strict=True):
        close(a, b)


def _dense_given(z, y, ent, tau, **gate):
    """Dense per-token loss with the gate's entropy given (float64)."""
    s = F.log_softmax(z.double() / tau, -1)
    t = F.log_softmax(y.double() / tau, -1)
    fwd = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    rev = F.kl_div(t, s, log_target=True, reduction="none").sum(-1)
    return _gate(ent.double(), fwd, rev, z.shape[-1], **gate)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_entropy_override_dense_teachers(eager, reduction):
    """teacher_entropy with teacher logits and a teacher linear head (both gradient
    modes): the dense KLs gated by the given entropy; NaN entropy -> NaN token."""
    h, w, _, _, labels = _data()
    th, tw = torch.randn(3, 4, 6), torch.randn(29, 6) * 1.5
    y = th @ tw.T
    ent = torch.rand(3, 4) * 3
    opts = dict(temperature=1.5, labels=labels, reduction=reduction, chunk_size=5)
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    want = reduce(_dense_given(hd @ wd.T, y, ent, 1.5), labels, reduction)
    want.backward(_grad_out(want))
    for t_kw in (dict(teacher_logits=y), dict(teacher_hidden=th, teacher_weight=tw)):
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fused_linear_eaopd_loss(hg, wg, teacher_entropy=ent, **t_kw, **opts)
        loss.backward(_grad_out(loss))
        close(loss.double(), want.detach())
        close(hg.grad.double(), hd.grad)
        close(wg.grad.double(), wd.grad)
    zg = (h @ w.T).requires_grad_()
    loss = entropy_aware_opd_loss(zg, y, teacher_entropy=ent, **opts)
    close(loss.double(), want.detach())
    bad = ent.clone()
    bad[0, 0] = float("nan")
    per_tok = entropy_aware_opd_loss(h @ w.T, y, teacher_entropy=bad, reduction="none")
    assert torch.isnan(per_tok[0, 0]) and torch.isfinite(per_tok.flatten()[1:]).all()


@pytest.mark.parametrize("gate_kw", [dict(gate="threshold", gate_threshold=1.0),
                                     dict(gate="fixed", fkl_weight=0.3)])
def test_other_gates_compile_and_match_eager(monkeypatch, gate_kw):
    """The threshold and fixed gates through the compiled top-k kernels (the linear one is
    compiled above): no fallback to eager, eager's values."""
    h, w, lp, ids, labels = _data()
    z = h @ w.T
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("EAOPD_COMPILE", flag)
        zg = z.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            loss = entropy_aware_opd_loss(zg, teacher_topk_logprobs=lp,
                                          teacher_topk_indices=ids, labels=labels,
                                          temperature=1.5, chunk_size=5, **gate_kw)
            loss.backward()
        out.append((loss.detach(), zg.grad))
    for a, b in zip(*out, strict=True):
        close(a, b)


@pytest.mark.parametrize("tail", TAILS)
def test_peaked_teacher_float32_matches_float64_formula(eager, tail):
    """float32 inputs of a peaked teacher (tail mass 1e-7 to 0.5): per-token losses and
    the gradient equal the float64 formula on the same float32 numbers at rtol 1e-5
    (Q_tail = 1 - sum exp(l) formed in float32 was off by ~1e-2 nats; issue 18)."""
    g = torch.Generator().manual_seed(0)
    n, vocab, k = 64, 500, 8
    scale = torch.linspace(3, 9, n, dtype=torch.float64)[:, None]
    lp, ids = served(torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale, k, g)
    lp = lp.float()
    z = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2).float()
    q_tail = 1 - lp.double().exp().sum(-1)
    assert q_tail.min() < 1e-6 and q_tail.max() > 0.1
    zf = z.double().requires_grad_()
    want = formula(zf, ids, lp.double(), topk_tail=tail)
    want.backward(_grad_out(want))
    for fused in (False, True):
        zg = z.clone().requires_grad_()
        eye = torch.eye(vocab)
        kw = dict(teacher_topk_logprobs=lp, teacher_topk_indices=ids, topk_tail=tail,
                  reduction="none", chunk_size=16)
        loss = fused_linear_eaopd_loss(zg, eye, **kw) if fused else \
            entropy_aware_opd_loss(zg, **kw)
        loss.backward(_grad_out(loss))
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
        close(zg.grad.double(), zf.grad, msg=f"fused={fused} grad: ")


def _lp_kw(lp, ids, **kw):
    return dict(teacher_topk_logprobs=lp, teacher_topk_indices=ids, **kw)


@pytest.mark.parametrize("fused", [False, True])
def test_served_logprobs_are_validated(eager, fused):
    """Log-probs > 0 (logits by mistake) or probabilities summing clearly above 1 raise a
    ValueError naming teacher_topk_logprobs, before any work; within the documented
    tolerance (rounding, also of bfloat16 storage) they pass; a masked token is not read."""
    h, w, lp, ids, _ = _data()
    z = h @ w.T

    def call(lp_, **kw):
        hg = h.clone().requires_grad_()
        if fused:
            out = fused_linear_eaopd_loss(hg, w, **_lp_kw(lp_, ids, **kw))
        else:
            out = entropy_aware_opd_loss(hg @ w.T, **_lp_kw(lp_, ids, **kw))
        return out, hg

    logits = torch.gather(z, -1, ids) + 3.0  # logits passed instead of log-probs
    one_and_half = lp.clone()
    one_and_half[1, 2] = torch.log_softmax(lp[1, 2], -1) + math.log(1.5)
    for bad, match in ((logits, "token 0 has max"), (one_and_half, "token 6 has .*1.5")):
        hg = None
        with pytest.raises(ValueError, match="teacher_topk_logprobs must be log-prob.*" + match):
            _, hg = call(bad)
        assert hg is None
    from eaopd_mp.topk import logprob_tolerance
    tol = logprob_tolerance(torch.float32, lp.shape[-1])
    # Rounding: a full-mass token whose sum lands just above 1, within the tolerance.
    near = lp.clone()
    near[0, 0] = torch.log_softmax(lp[0, 0], -1) + 0.5 * tol
    near[0, 1] = torch.log_softmax(lp[0, 1], -1).clamp_max(-1e-3)
    loss, _ = call(near)
    assert torch.isfinite(loss)
    over = near.clone()
    over[0, 0] = torch.log_softmax(lp[0, 0], -1) + 2 * tol
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        call(over)
    # bfloat16 storage of normalised log-probs (k = V: no tail) passes; its tolerance is
    # u (log k + 1) above float32's.
    lp_full, ids_full = served(z.double(), z.shape[-1])
    loss = entropy_aware_opd_loss(z, **_lp_kw(lp_full.bfloat16(), ids_full))
    assert torch.isfinite(loss)
    assert logprob_tolerance(torch.bfloat16, 64) == pytest.approx(1e-4 + 2**-8 * 5.1589, 1e-3)
    # A masked token's log-probs are never read.
    labels = torch.ones(3, 4)
    labels[0, 0] = 0.0
    loss, _ = call(torch.where(labels[..., None] == 1, lp, logits), labels=labels)
    assert torch.isfinite(loss)


def _lm_like_logits(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """``(n, vocab)`` float64 logits shaped like a language model's: a Zipfian base over a
    shuffled vocabulary, per-token noise, and sharpness varying over the tokens (teacher
    entropies from ~0 to ~11 nats), offset like raw logits (max around 10-30)."""
    g = torch.Generator().manual_seed(seed)
    base = -1.1 * torch.arange(1, vocab + 1, dtype=torch.float64).log()
    logits = base[torch.randperm(vocab, generator=g)] + \
        torch.randn(n, vocab, generator=g, dtype=torch.float64) * 1.5
    return logits * torch.linspace(0.5, 3.0, n, dtype=torch.float64)[:, None] + 12.0


@pytest.mark.parametrize("server_dtype", [torch.bfloat16, torch.float16])
def test_16bit_served_logprobs_as_float32_are_accepted(eager, server_dtype):
    """A server whose log_softmax ran in bfloat16 / float16 sends JSON floats that a client
    turns into a float32 tensor: at V = 128,256 their top-k sums exceed 1 by up to 7.7e-3
    (bf16) / 6.6e-4 (fp16), far above float32 rounding. They are accepted as float32 (the
    tolerance follows the coarsest precision a server computes in, bfloat16; here the worst
    token exceeds 1 by 4.4e-3 / 6.0e-4), while logits
    (log sum exp >= 10 here) and probabilities (>= log k for k >= 2) are still refused."""
    vocab, n = 128256, 48
    logits = _lm_like_logits(n, vocab)
    z = torch.randn(n, vocab) * 0.1
    for k in (20, 64, 256):
        lp, ids = torch.log_softmax(logits.to(server_dtype), -1).topk(k)
        lp = lp.float()  # what json -> torch.tensor gives
        assert torch.logsumexp(lp.double(), -1).max() > 3e-4  # far above float32 rounding
        loss = entropy_aware_opd_loss(z, **_lp_kw(lp, ids))
        assert torch.isfinite(loss)
        lse = torch.logsumexp(logits.float().gather(-1, ids).double(), -1)
        with pytest.raises(ValueError, match="teacher_topk_logprobs must be log-prob"):
            entropy_aware_opd_loss(z, **_lp_kw(logits.float().gather(-1, ids), ids))
        assert lse.min() > 10.0
        with pytest.raises(ValueError, match="teacher_topk_logprobs must be log-prob"):
            entropy_aware_opd_loss(z, **_lp_kw(lp.exp(), ids))  # probabilities, k >= 2


@pytest.mark.parametrize("tail", TAILS)
def test_infinite_logprob_gives_nan(eager, tail):
    """+inf (or NaN) in a kept token's served log-probs: that token's loss is NaN on the
    logits-in and fused paths (it was -inf in bucket mode), the others are finite."""
    h, w, lp, ids, _ = _data(n=(5,))
    lp = lp.clone()
    lp[0, 1] = float("inf")
    lp[1, 0] = float("nan")
    for fused in (False, True):
        kw = _lp_kw(lp, ids, topk_tail=tail, reduction="none")
        loss = fused_linear_eaopd_loss(h, w, **kw) if fused else \
            entropy_aware_opd_loss(h @ w.T, **kw)
        assert torch.isnan(loss[:2]).all() and torch.isfinite(loss[2:]).all(), loss
