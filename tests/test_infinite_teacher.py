"""A teacher with ``-inf`` logits (one-hot, masked vocabulary, a served log-prob of ``-inf``)
under a gate that gives the infinite KL a weight of exactly 0 (issue 22).

The loss is then finite and so must be its gradient: the gradient of the finite term
alone (``p - q`` over the kept columns, ``q = 0`` where the teacher is ``-inf``, for a
forward-KL-only token). Expected values come from ``F.cross_entropy`` and from
``F.kl_div`` restricted to the kept columns (boolean indexing), with autograd.
Tensor-parallel cases live in test_parallel.py (its existing spawns).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_topk import formula as topk_formula

import formulas
from eaopd_mp import entropy_aware_opd_loss, fused_linear_eaopd_loss, reference_eaopd_loss
from formulas import close

INF = float("-inf")
# Gates under which the teacher's -inf columns (reverse KL = +inf) get weight exactly 0.
FORWARD_ONLY = [{"gate": "fixed", "fkl_weight": 1.0}, {"h_max": 0.05}]
# Gates under which the student's -inf columns (forward KL = +inf) get weight exactly 0.
REVERSE_ONLY = [{"gate": "fixed", "fkl_weight": 0.0},
                {"gate": "threshold", "gate_threshold": 0.5, "fkl_coef": 0.0}]


def _kl_kept(log_a: torch.Tensor, log_b: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(a || b)`` summed over the ``kept`` columns only (boolean indexing)."""
    rows = kept.nonzero()[:, 0]
    terms = F.kl_div(log_b[kept], log_a[kept], log_target=True, reduction="none")
    return torch.zeros(kept.shape[0], dtype=terms.dtype).index_add(0, rows, terms)


def _reduce(per_tok, reduction):
    if reduction == "none":
        return per_tok
    return per_tok.sum() / (per_tok.shape[0] if reduction == "batchmean" else 1)


def _grad_out(loss):
    return torch.linspace(-1.0, 1.0, loss.numel()).view(loss.shape) if loss.dim() \
        else torch.tensor(0.7)


def _inputs(n=6, hid=8, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hid, generator=g)
    w = torch.randn(vocab, hid, generator=g) * 0.6
    y = torch.randn(n, vocab, generator=g) * 2
    return h, w, y


def _masked(y: torch.Tensor) -> torch.Tensor:
    """Teacher logits with ``-inf`` on some columns of every token, a different set each
    (column 0 always, the last column on even tokens), keeping at least 3 columns."""
    y = y.clone()
    drop = torch.rand(y.shape, generator=torch.Generator().manual_seed(1)) < 0.4
    drop[:, 0] = True
    drop[::2, -1] = True
    drop[:, 1:4] = False
    return y.masked_fill(drop, INF)


def _paths(h, w, y, opts):
    """``(name, loss, grad_z)`` of each path on ``z = h W^T``: logits-in, fused with the
    teacher's logits; the fused gradient with respect to ``z`` is recovered from those of
    ``h`` and ``W`` (``W`` of full column rank here) by least squares."""
    out = []
    z = (h @ w.T).requires_grad_()
    loss = entropy_aware_opd_loss(z, y, chunk_size=4, **opts)
    loss.backward(_grad_out(loss))
    out.append(("logits", loss.detach(), z.grad))
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_eaopd_loss(hg, wg, teacher_logits=y, chunk_size=4, **opts)
    loss.backward(_grad_out(loss))
    out.append(("fused", loss.detach(), (hg.grad, wg.grad)))
    zr = (h @ w.T).requires_grad_()
    loss = reference_eaopd_loss(zr, y, **opts)
    loss.backward(_grad_out(loss))
    out.append(("reference", loss.detach(), zr.grad))
    return out


def _check(h, w, y, opts, want_fn, rtol=1e-5):
    """Every path against ``want_fn(z) -> per-token loss`` (float64, autograd)."""
    zd = (h @ w.T).double().requires_grad_()
    want = _reduce(want_fn(zd), opts["reduction"])
    want.backward(_grad_out(want).double())
    g = zd.grad
    for name, loss, grad in _paths(h, w, y, opts):
        tag = f"{name} {opts}: "
        assert torch.isfinite(loss).all(), tag
        close(loss.double(), want.detach(), rtol=rtol, msg=tag)
        if name == "fused":
            gh, gw = grad
            assert torch.isfinite(gh).all() and torch.isfinite(gw).all(), tag
            close(gh.double(), g @ w.double(), rtol=rtol, msg=tag + "grad h ")
            close(gw.double(), g.T @ h.double(), rtol=rtol, msg=tag + "grad W ")
        else:
            assert torch.isfinite(grad).all(), tag
            close(grad.double(), g, rtol=rtol, msg=tag + "grad z ")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_one_hot_teacher_is_cross_entropy(eager, reduction):
    """The issue's example: one-hot teacher, fkl_weight=1 -> F.cross_entropy, loss and
    gradient, logits-in, fused (both gradient modes), the reference and the formulas."""
    h, w, _ = _inputs()
    tgt = torch.tensor([1, 3, 5, 7, 0, 10])
    y = torch.full((6, 11), INF)
    y[torch.arange(6), tgt] = 0.0
    opts = dict(reduction=reduction, gate="fixed", fkl_weight=1.0)
    _check(h, w, y, opts, lambda z: F.cross_entropy(z, tgt, reduction="none"))
    zd = (h @ w.T).double()
    close(formulas.per_token(zd, y, gate="fixed", fkl_weight=1.0),
          F.cross_entropy(zd, tgt, reduction="none"), rtol=1e-12)


@pytest.mark.parametrize("gate", FORWARD_ONLY, ids=["fixed1", "linear-clamped"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_masked_teacher_is_forward_kl_over_kept_columns(eager, gate, reduction, tau):
    """Teacher -inf on some columns, student finite: reverse KL +inf at weight 0; the
    loss and gradient are F.kl_div(teacher || student) over the teacher's kept columns."""
    h, w, y0 = _inputs()
    y = _masked(y0)
    opts = dict(reduction=reduction, temperature=tau, **gate)

    def want(z):
        s = F.log_softmax(z / tau, -1)
        return _kl_kept(F.log_softmax(y.double() / tau, -1), s, y > INF)

    _check(h, w, y, opts, want)
    zd = (h @ w.T).double()
    close(formulas.per_token(zd, y, temperature=tau, **gate), want(zd), rtol=1e-12)


@pytest.mark.parametrize("gate", REVERSE_ONLY, ids=["fixed0", "threshold-coef0"])
def test_masked_student_is_reverse_kl_over_kept_columns(eager, gate):
    """The mirror: student -inf where the teacher has mass (forward KL +inf at weight 0),
    teacher -inf only where the student is too: F.kl_div(student || teacher) over the
    student's kept columns; the masked student columns get gradient exactly 0."""
    h, w, y = _inputs()
    b = torch.zeros(11)
    b[[0, 4, 9, 10]] = INF  # the student's masked vocabulary (a bias of -inf)
    y[:, 0] = INF  # the teacher masks column 0 everywhere, 10 on even tokens; it has
    y[::2, 10] = INF  # mass on 4, 9 (and 10 on odd tokens)
    opts = dict(reduction="sum", **gate)

    def want(z):
        s = F.log_softmax(z + b.double(), -1)
        return _kl_kept(s, F.log_softmax(y.double(), -1), (b > INF).expand(6, 11))

    zd = (h @ w.T).double().requires_grad_()
    want_loss = want(zd).sum()
    want_loss.backward(torch.tensor(0.7, dtype=torch.float64))
    z = (h @ w.T + b).requires_grad_()
    loss = entropy_aware_opd_loss(z, y, chunk_size=4, **opts)
    loss.backward(torch.tensor(0.7))
    close(loss.double(), want_loss.detach())
    close(z.grad.double(), zd.grad)
    assert (z.grad[:, b == INF] == 0).all()
    zr = (h @ w.T + b).requires_grad_()
    ref = reference_eaopd_loss(zr, y, **opts)
    ref.backward(torch.tensor(0.7))
    close(ref.double(), want_loss.detach(), msg="reference: ")
    close(zr.grad.double(), zd.grad, msg="reference: ")
    hg, wg, bg = h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone()
    loss = fused_linear_eaopd_loss(hg, wg, student_bias=bg.requires_grad_(), teacher_logits=y,
                                   chunk_size=4, **opts)
    loss.backward(torch.tensor(0.7))
    close(loss.double(), want_loss.detach())
    close(hg.grad.double(), zd.grad @ w.double())
    close(wg.grad.double(), zd.grad.T @ h.double())


def test_masked_teacher_head_fused_and_bf16(eager):
    """A teacher head whose vocabulary is masked (teacher_bias -inf): fused, both gradient
    modes, fp32 at rtol 1e-5 and bf16 against the fp32 expectation."""
    h, w, _ = _inputs(n=8, vocab=13)
    g = torch.Generator().manual_seed(3)
    th, tw = torch.randn(8, 5, generator=g), torch.randn(13, 5, generator=g)
    tb = torch.zeros(13)
    tb[[2, 7, 12]] = INF
    y = th @ tw.T + tb
    zd = (h @ w.T).double().requires_grad_()
    kept = (y > INF)
    want = _kl_kept(F.log_softmax(y.double(), -1), F.log_softmax(zd, -1), kept)
    want.sum().backward()
    for dtype, reduction in ((torch.float32, "sum"), (torch.float32, "none"),
                             (torch.bfloat16, "sum"), (torch.bfloat16, "none")):
        hg, wg = (x.to(dtype).clone().requires_grad_() for x in (h, w))
        loss = fused_linear_eaopd_loss(hg, wg, teacher_hidden=th.to(dtype),
                                       teacher_weight=tw.to(dtype), teacher_bias=tb.to(dtype),
                                       reduction=reduction, gate="fixed", fkl_weight=1.0,
                                       chunk_size=3)
        loss.sum().backward()
        tag = f"{dtype} {reduction}: "
        assert torch.isfinite(hg.grad).all() and torch.isfinite(wg.grad).all(), tag
        want_h, want_w = zd.grad @ w.double(), zd.grad.T @ h.double()
        if dtype == torch.float32:
            close(loss.sum().double(), want.sum().detach(), msg=tag)
            close(hg.grad.double(), want_h, msg=tag)
            close(wg.grad.double(), want_w, msg=tag)
            continue
        torch.testing.assert_close(loss.sum().double(), want.sum().detach(), rtol=3e-2,
                                   atol=3e-2)
        for got, ref in ((hg.grad, want_h), (wg.grad, want_w)):
            assert got.dtype == torch.bfloat16
            cos = F.cosine_similarity(got.double().flatten(), ref.flatten(), 0)
            assert cos > 0.995, (tag, cos)
            assert (got.double() - ref).norm() <= 0.05 * ref.norm(), tag


def test_infinite_loss_and_nan_input_are_not_hidden(eager):
    """A positive weight on the infinite KL keeps the loss +inf; NaN in a token's student
    logits still gives that token a NaN loss and NaN gradient; the others stay finite."""
    h, w, y0 = _inputs()
    y = _masked(y0)
    loss = entropy_aware_opd_loss(h @ w.T, y, reduction="none", gate="fixed", fkl_weight=0.5)
    assert (loss == float("inf")).all()
    z0 = h @ w.T
    z0[2, 5] = float("nan")
    z = z0.clone().requires_grad_()
    loss = entropy_aware_opd_loss(z, y, reduction="none", gate="fixed", fkl_weight=1.0)
    loss.sum().backward()
    assert torch.isnan(loss[2]) and torch.isnan(z.grad[2]).all()
    rest = torch.arange(6) != 2
    assert torch.isfinite(loss[rest]).all() and torch.isfinite(z.grad[rest]).all()


def test_compiled_kernels_keep_the_zero_weight(monkeypatch):
    """The compiled kernels, both gradient modes, against the same kl_div expectation.
    gate="linear", tau=1 and V=53 as in test_loss's compiled cases, so that in a full run
    the graphs exist already (no compilation for this test)."""
    monkeypatch.setenv("EAOPD_COMPILE", "1")
    h, w, y0 = _inputs(vocab=53)
    y = _masked(y0)
    zd = (h @ w.T).double().requires_grad_()
    want = _kl_kept(F.log_softmax(y.double(), -1), F.log_softmax(zd, -1), y > INF)
    want.sum().backward()
    for reduction in ("sum", "none"):
        z = (h @ w.T).requires_grad_()
        loss = entropy_aware_opd_loss(z, y, reduction=reduction, h_max=0.05, chunk_size=4)
        loss.sum().backward()
        close(loss.sum().double(), want.sum().detach())
        close(z.grad.double(), zd.grad)


# ----------------------------------------------------------------------- top-k teacher


def _served(n=6, vocab=13, k=4, seed=0):
    """Student logits and a served teacher whose log-probs include -inf (slot 0 on even
    tokens, slot 2 on token 1)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    y = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    lp = torch.log_softmax(y, -1).gather(1, ids)
    lp[::2, 0] = INF
    lp[1, 2] = INF
    return z, ids, lp


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "truncate"])
@pytest.mark.parametrize("gate", FORWARD_ONLY, ids=["fixed1", "linear-clamped"])
def test_topk_minus_inf_logprob(eager, tail, gate):
    """Served log-probs of -inf, each tail mode, reductions sum and none, logits-in and
    fused, fp32 against the float64 formula (kl_div over the buckets with mass)."""
    z64, ids, lp = _served()
    w = torch.eye(13, dtype=torch.float64)  # fused with W = I: h = z, grad h = grad z
    for reduction in ("sum", "none"):
        zd = z64.clone().requires_grad_()
        want = _reduce(topk_formula(zd, ids, lp, topk_tail=tail, **gate), reduction)
        want.backward(_grad_out(want).double())
        kw = dict(teacher_topk_logprobs=lp.float(), teacher_topk_indices=ids, topk_tail=tail,
                  reduction=reduction, chunk_size=4, **gate)
        z = z64.float().requires_grad_()
        loss_z = entropy_aware_opd_loss(z, **kw)
        loss_z.backward(_grad_out(loss_z))
        hg = z64.float().requires_grad_()
        loss_h = fused_linear_eaopd_loss(hg, w.float(), **kw)
        loss_h.backward(_grad_out(loss_h))
        for name, loss, grad in (("logits", loss_z, z.grad), ("fused", loss_h, hg.grad)):
            tag = f"{name} {tail} {gate} {reduction}: "
            assert torch.isfinite(grad).all(), tag
            close(loss.double(), want.detach(), msg=tag)
            close(grad.double(), zd.grad, msg=tag + "grad ")


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "truncate"])
def test_topk_one_hot_is_cross_entropy(eager, tail):
    """A served one-hot teacher ([0, -inf, -inf]), fkl_weight=1: cross-entropy on the
    full vocabulary (bucket: Q_tail = 0; truncate) or over the k ids (renormalize); fp32
    and bf16."""
    z64, ids, _ = _served(k=3)
    lp = torch.tensor([0.0, INF, INF]).expand(6, 3)
    tgt = ids[:, 0]
    for dtype in (torch.float32, torch.bfloat16):
        # bf16: the expectation on the bf16 logits, as the loss computes in fp32
        zd = z64.to(dtype).double().requires_grad_()
        if tail != "renormalize":  # bucket and truncate: the full vocabulary
            want = F.cross_entropy(zd, tgt, reduction="sum")
        else:
            want = F.cross_entropy(zd.gather(1, ids), torch.zeros(6, dtype=torch.long),
                                   reduction="sum")
        want.backward()
        z = z64.to(dtype).requires_grad_()
        loss = entropy_aware_opd_loss(z, teacher_topk_logprobs=lp.to(dtype),
                                      teacher_topk_indices=ids, topk_tail=tail,
                                      reduction="sum", gate="fixed", fkl_weight=1.0)
        loss.backward()
        assert torch.isfinite(z.grad).all() and z.grad.dtype == dtype
        close(loss.double(), want.detach())
        # the bf16 gradient is rounded once to bf16 (8 bits of mantissa)
        close(z.grad.double(), zd.grad, rtol=1e-5 if dtype == torch.float32 else 8e-3)


def test_topk_threshold_coef0_student_masked(eager):
    """threshold with fkl_coef=0 (reverse KL only): a served -inf id where the student is
    also -inf contributes nothing, a finite id where the student is -inf gives forward
    KL +inf at weight 0; loss and gradient equal the formula and are finite."""
    z64, ids, lp = _served()
    z64 = z64.clone()
    z64[0].scatter_(0, ids[0, :1], INF)  # token 0: student -inf at its -inf id
    z64[1].scatter_(0, ids[1, 1:3], INF)  # token 1: and at a finite id (slot 1)
    z64[2].scatter_(0, ids[2, :1], INF)
    z64[3].scatter_(0, ids[3, 3:], INF)
    z64[4].scatter_(0, ids[4, :1], INF)
    z64[5].scatter_(0, ids[5, :2], INF)  # slot 0 finite here (odd token)
    gate = dict(gate="threshold", gate_threshold=0.0, fkl_coef=0.0)
    for tail in ("bucket", "renormalize", "truncate"):
        zd = z64.clone().requires_grad_()
        want = topk_formula(zd, ids, lp, topk_tail=tail, **gate).sum()
        want.backward()
        z = z64.float().requires_grad_()
        loss = entropy_aware_opd_loss(z, teacher_topk_logprobs=lp.float(),
                                      teacher_topk_indices=ids, topk_tail=tail,
                                      reduction="sum", **gate)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), tail
        close(loss.double(), want.detach(), msg=tail)
        close(z.grad.double(), zd.grad, msg=tail)
