"""Several teachers in one call, each token scored by its own teacher (``teacher_index``).

The reference is written here in float64 without eaopd_mp code: for each token, take its
own teacher's distribution (a dense head's logits, given logits, or a served top-k), then
the seed's per-token loss (:mod:`formulas`, the top-k formula of ``test_topk``), then the
seed's reduction over all tokens; gradients by autograd.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_topk import formula as topk_formula
from test_topk import served
from torch._dynamo.utils import counters

import formulas
from eaopd_mp import (
    EntropyAwareOPDLoss,
    FusedLinearEAOPDLoss,
    entropy_aware_opd_loss,
    fused_linear_eaopd_loss,
    ops,
)
from formulas import close, reduce

SHAPE, VOCAB, HID = (3, 7), 37, 8  # 21 tokens, real vocabulary 37 (heads padded apart)


def _gated(ent, fwd, rev, gate="linear", h_max=None, gate_threshold=0.8, fkl_coef=1.0,
           fkl_weight=0.5):
    if gate == "linear":
        w = (ent / (math.log(VOCAB) if h_max is None else h_max)).clamp(0, 1)
        return w * fwd + (1 - w) * rev
    if gate == "threshold":
        return rev + fkl_coef * (ent >= gate_threshold).double() * fwd
    return fkl_weight * fwd + (1 - fkl_weight) * rev


def _dense(z, y, ent, tau, gate):
    """Seed's per-token loss of a dense teacher (``ent``: the gate entropy, or None)."""
    if ent is None:
        return formulas.per_token(z, y, temperature=tau, **gate)
    s, t = F.log_softmax(z / tau, -1), F.log_softmax(y.double() / tau, -1)
    fwd = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    rev = F.kl_div(t, s, log_target=True, reduction="none").sum(-1)
    return _gated(ent.double(), fwd, rev, **gate)


def formula(z, teachers, index, *, tau=1.0, tail="bucket", **gate):
    """``(N,)`` float64 per-token loss: token i scored by teacher ``index[i]``.

    ``teachers[j]``: dict with ``y`` (dense logits, ``(N_j, >= VOCAB)``) or ``lp``/``ids``,
    and ``ent`` (``(N_j,)`` or None), rows in token order of teacher j's tokens."""
    out = torch.zeros(z.shape[0], dtype=torch.float64)
    for j, t in enumerate(teachers):
        rows = (index == j).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        zj = z[rows]
        if "y" in t:
            per = _dense(zj, t["y"].double()[:, :VOCAB], t.get("ent"), tau, gate)
        else:
            per = topk_formula(zj, t["ids"], t["lp"].double(), temperature=tau,
                               topk_tail=tail, entropy=t.get("ent"), **_topk_gate(gate))
        out = out.index_put((rows,), per)
    return out


def _topk_gate(gate):
    g = dict(gate)
    g.setdefault("gate", "linear")
    if g["gate"] == "threshold":
        g.setdefault("gate_threshold", 0.8)
        g.setdefault("fkl_coef", 1.0)
    if g["gate"] == "fixed":
        g.setdefault("fkl_weight", 0.5)
    return g


def _teachers(index, forms, seed=0, dtype=torch.float32, entropy=()):
    """Teachers of the given forms over their routed tokens.

    Returns ``(kwargs for the fused call, kwargs for the logits-in call, reference
    teachers)``; dense heads differ in hidden width and padded head width."""
    g = torch.Generator().manual_seed(seed)
    fused = {k: [] for k in ("teacher_hidden", "teacher_weight", "teacher_bias",
                             "teacher_logits", "teacher_topk_logprobs",
                             "teacher_topk_indices", "teacher_entropy")}
    logits = {k: [] for k in ("teacher_logits", "teacher_topk_logprobs",
                              "teacher_topk_indices", "teacher_entropy")}
    ref = []
    for j, form in enumerate(forms):
        n = int((index == j).sum())
        for d in (fused, logits):
            for v in d.values():
                v.append(None)
        ent = torch.rand(n, generator=g, dtype=torch.float64).to(dtype) * 3 \
            if j in entropy else None
        if form == "linear":
            hid, width = 5 + j, VOCAB + 2 + j
            th = torch.randn(n, hid, generator=g, dtype=torch.float64).to(dtype)
            tw = (torch.randn(width, hid, generator=g, dtype=torch.float64) * 1.3).to(dtype)
            tb = (torch.randn(width, generator=g, dtype=torch.float64) * 0.5).to(dtype)
            y = th.double() @ tw.double().T + tb.double()
            fused["teacher_hidden"][j], fused["teacher_weight"][j] = th, tw
            fused["teacher_bias"][j] = tb
            logits["teacher_logits"][j] = y.to(dtype)
            ref.append(dict(y=y, ent=ent))
        elif form == "logits":
            y = (torch.randn(n, VOCAB + 4, generator=g, dtype=torch.float64) * 2).to(dtype)
            fused["teacher_logits"][j] = logits["teacher_logits"][j] = y
            ref.append(dict(y=y, ent=ent))
        else:
            y = torch.randn(n, VOCAB, generator=g, dtype=torch.float64) * 2.5
            lp, ids = served(y, 4 + j, g)
            lp = lp.to(dtype)
            fused["teacher_topk_logprobs"][j] = logits["teacher_topk_logprobs"][j] = lp
            fused["teacher_topk_indices"][j] = logits["teacher_topk_indices"][j] = ids
            ref.append(dict(lp=lp, ids=ids, ent=ent))
        fused["teacher_entropy"][j] = logits["teacher_entropy"][j] = ent
        ref[-1]["ent"] = ent
    return _prune(fused), _prune(logits), ref


def _prune(d):
    """Drop the arguments no teacher uses."""
    return {k: v for k, v in d.items() if any(x is not None for x in v)}


def _student(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*SHAPE, HID, generator=g, dtype=torch.float64)
    w = torch.randn(VOCAB + 3, HID, generator=g, dtype=torch.float64) * 0.8
    b = torch.randn(VOCAB + 3, generator=g, dtype=torch.float64) * 0.3
    return h.to(dtype), w.to(dtype), b.to(dtype)


def _grad_out(loss):
    if loss.dim() == 0:
        return torch.full((), 0.7, dtype=loss.dtype)
    return torch.linspace(-1, 1, loss.numel(), dtype=loss.dtype).view(loss.shape)


def _want(h, w, b, ref, index, labels, reduction, opts):
    """The formula's loss and gradients ``(h, W, b)`` in float64."""
    hd, wd, bd = (x.detach().double().clone().requires_grad_() for x in (h, w, b))
    z = (hd @ wd.T + bd)[..., :VOCAB].reshape(-1, VOCAB)
    per = formula(z, ref, index.reshape(-1), **opts).reshape(SHAPE)
    loss = reduce(per, labels, reduction)
    loss.backward(_grad_out(loss))
    return loss.detach(), hd.grad, wd.grad, bd.grad


def _routing(kind, seed=0, n_teachers=3):
    g = torch.Generator().manual_seed(100 + seed)
    if kind == "random":
        return torch.randint(0, n_teachers, SHAPE, generator=g)
    if kind == "per sequence":  # one teacher per row (hf's routing)
        return (torch.arange(SHAPE[0]) % n_teachers)[:, None].expand(SHAPE).contiguous()
    if kind == "empty teacher":  # teacher 1 gets no token
        return torch.where(torch.rand(SHAPE, generator=g) > 0.5, 0, n_teachers - 1)
    return torch.zeros(SHAPE, dtype=torch.int64)  # "all to one"


def _call(path, h, w, b, fused, logits, index, labels, gopts):
    """The loss through ``path``; the leaves that get gradients."""
    hg, wg, bg = (x.detach().clone().requires_grad_() for x in (h, w, b))
    kw = dict(teacher_index=index, labels=labels)
    if path == "fused":
        loss = fused_linear_eaopd_loss(hg, wg, student_bias=bg, **fused, **kw, **gopts)
    elif path == "module fused":
        loss = FusedLinearEAOPDLoss(**gopts)(hg, wg, student_bias=bg, **fused, **kw)
    else:
        z = hg @ wg.T + bg
        if path == "logits":
            loss = entropy_aware_opd_loss(z, **logits, **kw, **gopts)
        else:
            loss = EntropyAwareOPDLoss(**gopts)(z, **logits, **kw)
    return loss, (hg, wg, bg)


FORMS = {1: ("linear",), 2: ("linear", "topk"), 3: ("linear", "logits", "topk")}
GATES = [{}, {"h_max": 1.3}, {"gate": "threshold", "gate_threshold": 1.2},
         {"gate": "fixed", "fkl_weight": 0.3}]
GRID = list(itertools.product(["batchmean", "sum", "mean", "none"], [1, 2, 3]))


@pytest.mark.parametrize("reduction,n", GRID)
def test_every_path_equals_the_formula(eager, reduction, n):
    """Logits-in, fused and both modules, 1-3 teachers of mixed forms (own hidden widths,
    padded heads, a given entropy), masks, gates and temperatures vary over the grid;
    fp32 against the float64 formula at rtol 1e-5, loss and gradients."""
    i = GRID.index((reduction, n))
    gate = GATES[i % len(GATES)]
    tau = 1.0 if i % 3 else 1.4
    tail = "bucket" if i % 2 else "renormalize"
    index = _routing("random" if i % 4 else "per sequence", i, n)
    fused, logits, ref = _teachers(index, FORMS[n], seed=i, entropy=(1,) if i % 2 else ())
    h, w, b = _student(i)
    labels = (torch.rand(SHAPE) > 0.3).float() if i % 2 else None
    want, *want_g = _want(h, w, b, ref, index, labels, reduction,
                          dict(tau=tau, tail=tail, **gate))
    gopts = dict(reduction=reduction, chunk_size=4, temperature=tau, topk_tail=tail,
                 vocab_size=VOCAB, **gate)
    for path in ("fused", "logits", "module fused", "module logits"):
        loss, leaves = _call(path, h, w, b, fused, logits, index, labels, gopts)
        loss.backward(_grad_out(loss))
        tag = f"{path} {reduction} n={n} tau={tau} {tail} {gate}: "
        close(loss.double(), want, msg=tag)
        for name, x, g in zip("hWb", leaves, want_g, strict=True):
            close(x.grad.double(), g, msg=tag + f"grad {name} ")


@pytest.mark.parametrize("kind", ["empty teacher", "all to one"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_teacher_without_tokens(eager, kind, reduction):
    """A teacher with no routed token (0-row tensors), and every token to one teacher."""
    index = _routing(kind, 0)
    fused, logits, ref = _teachers(index, FORMS[3], entropy=(2,))
    h, w, b = _student()
    want, *want_g = _want(h, w, b, ref, index, None, reduction, dict(tau=1.2))
    for path in ("fused", "logits"):
        loss, leaves = _call(path, h, w, b, fused, logits, index, None,
                             dict(reduction=reduction, chunk_size=5, temperature=1.2,
                                  vocab_size=VOCAB))
        loss.backward(_grad_out(loss))
        close(loss.double(), want, msg=f"{path} {kind}: ")
        for x, g in zip(leaves, want_g, strict=True):
            close(x.grad.double(), g, msg=f"{path} {kind} grad: ")


def test_float64_is_exact(eager):
    """float64 inputs: agreement with the formula to 1e-10 (maths, not rounding)."""
    index = _routing("random", 3)
    fused, _, ref = _teachers(index, FORMS[3], seed=3, dtype=torch.float64, entropy=(0,))
    h, w, b = _student(3, torch.float64)
    labels = (torch.rand(SHAPE) > 0.4).double()
    for reduction in ("mean", "none"):
        want, *want_g = _want(h, w, b, ref, index, labels, reduction, dict(tau=0.8))
        loss, leaves = _call("fused", h, w, b, fused, None, index, labels,
                             dict(reduction=reduction, chunk_size=3, temperature=0.8,
                                  vocab_size=VOCAB))
        loss.backward(_grad_out(loss))
        close(loss, want, rtol=1e-10, atol=1e-12)
        for x, g in zip(leaves, want_g, strict=True):
            close(x.grad, g, rtol=1e-10, atol=1e-12)


def test_bf16_against_fp32(eager):
    """bf16 student and teachers against the fp32 call on the same (rounded) values."""
    index = _routing("random", 4)
    fused, _, _ = _teachers(index, FORMS[3], seed=4, dtype=torch.bfloat16)
    h, w, b = _student(4, torch.bfloat16)
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        cast = {k: [None if x is None else x.to(dtype) if x.is_floating_point() else x
                    for x in v] for k, v in fused.items()}
        loss, leaves = _call("fused", *(x.to(dtype) for x in (h, w, b)), cast, None, index,
                             None, dict(reduction="sum", chunk_size=5, vocab_size=VOCAB))
        loss.backward()
        out.append((loss.float(), *(x.grad.float() for x in leaves)))
    close(out[0][0], out[1][0], rtol=2e-2)
    for a, b_ in zip(out[0][1:], out[1][1:], strict=True):
        assert (a - b_).norm() <= 0.05 * b_.norm()


def test_equals_sum_of_single_teacher_calls(eager):
    """The routed call is the sum over teachers of the single-teacher loss on each
    teacher's tokens, with the divisor of one call over all tokens ("batchmean": B)."""
    index = _routing("random", 5)
    fused, _, _ = _teachers(index, FORMS[3], seed=5)
    h, w, b = _student(5)
    loss, leaves = _call("fused", h, w, b, fused, None, index, None,
                         dict(reduction="batchmean", vocab_size=VOCAB))
    loss.backward()
    total, single = 0.0, [x.clone().requires_grad_() for x in (h, w, b)]
    for j in range(3):
        rows = index.reshape(-1) == j
        one = {k: v[j] for k, v in fused.items() if v[j] is not None}
        part = fused_linear_eaopd_loss(single[0].reshape(-1, HID)[rows], single[1],
                                       student_bias=single[2], reduction="sum",
                                       vocab_size=VOCAB, **one)
        total = total + part / SHAPE[0]
    total.backward()
    close(loss, total.detach())
    for x, y in zip(leaves, single, strict=True):
        close(x.grad, y.grad)


def test_stats_per_teacher(eager):
    """``stats["per_teacher"][j]`` are teacher j's own (masked) statistics: those of a
    single-teacher call on its tokens; the overall ones cover every kept token."""
    index = _routing("random", 6)
    fused, _, _ = _teachers(index, FORMS[3], seed=6, entropy=(0,))
    h, w, b = _student(6)
    labels = (torch.rand(SHAPE) > 0.3).float()
    _, stats = fused_linear_eaopd_loss(h, w, student_bias=b, teacher_index=index,
                                       labels=labels, return_stats=True, vocab_size=VOCAB,
                                       **fused)
    assert len(stats["per_teacher"]) == 3
    flat_idx, flat_lab = index.reshape(-1), labels.reshape(-1)
    for j, mine in enumerate(stats["per_teacher"]):
        rows = flat_idx == j
        one = {k: v[j] for k, v in fused.items() if v[j] is not None}
        _, want = fused_linear_eaopd_loss(h.reshape(-1, HID)[rows], w, student_bias=b,
                                          labels=flat_lab[rows], return_stats=True,
                                          vocab_size=VOCAB, **one)
        assert set(mine) == {"teacher_entropy", "fkl_weight", "rkl_weight", "kl_fwd",
                             "kl_rev", "tokens"}
        for k, v in mine.items():
            close(v, want[k], msg=f"teacher {j} {k}: ")
    assert float(stats["tokens"]) == float(labels.sum())
    assert sum(float(s["tokens"]) for s in stats["per_teacher"]) == float(labels.sum())


def test_each_token_gates_on_its_own_teacher(eager):
    """Two teachers with the same logits but different given entropies: each token's
    gate weight is its teacher's entropy / h_max (per-token statistics through
    reduction="none" and return_stats)."""
    index = torch.tensor([[0, 1, 1, 0, 1]])
    z = torch.randn(1, 5, 11)
    y = torch.randn(1, 5, 11)
    ent0, ent1 = torch.tensor([0.5, 0.6]), torch.tensor([2.0, 2.1, 2.2])
    per = entropy_aware_opd_loss(z, [y[index == 0], y[index == 1]], teacher_index=index,
                                 teacher_entropy=[ent0, ent1], reduction="none", h_max=4.0)
    ent = torch.empty(5)
    ent[index[0] == 0], ent[index[0] == 1] = ent0, ent1
    want = _dense(z[0].double(), y[0].double(), ent, 1.0, {"h_max": 4.0})
    close(per[0].double(), want)


BAD = [
    (lambda k: k.update(teacher_index=k["teacher_index"] + 1), ValueError,
     r"teacher_index values must be in \[0, 2\)"),
    (lambda k: k.update(teacher_index=k["teacher_index"].float()), TypeError,
     "teacher_index must hold integer"),
    (lambda k: k.update(teacher_index=k["teacher_index"][:, :3]), ValueError,
     r"teacher_index shape \(2, 3\) != token shape \(2, 5\)"),
    (lambda k: k.update(teacher_logits=[k["teacher_logits"][0][1:],
                                        k["teacher_logits"][1]]), ValueError,
     "teacher 0: teacher_logits has 5 token rows but teacher_index routes 6"),
    (lambda k: k.update(teacher_logits=k["teacher_logits"][:1]), ValueError,
     r"teacher_index values must be in \[0, 1\) \(the teacher lists have 1 entries\)"),
    (lambda k: k.update(teacher_entropy=[torch.ones(6), torch.ones(4), None]), ValueError,
     "teacher lists differ in length: teacher_logits has 2 entries, teacher_entropy has 3"),
    (lambda k: k.update(teacher_logits=k["teacher_logits"] + [None]), ValueError,
     "teacher 2: the teacher is missing"),
    (lambda k: k.pop("teacher_index"), TypeError,
     "teacher_logits must be a torch.Tensor, got list"),
    (lambda k: k.update(teacher_entropy=torch.ones(2, 5)), TypeError,
     "teacher_entropy must be a list with one entry per teacher"),
    (lambda k: k.update(teacher_entropy=[torch.ones(6), torch.ones(3)]), ValueError,
     r"teacher 1: teacher_entropy shape \(3,\) != token shape \(4,\)"),
    (lambda k: k.update(teacher_logits=[k["teacher_logits"][0], torch.randn(4, 12)]),
     ValueError, "teacher 1: teacher_logits width 12"),
    (lambda k: k.update(teacher_logits=[k["teacher_logits"][0], None]), ValueError,
     "teacher 1: the teacher is missing"),
]


@pytest.mark.parametrize("change,exc,match", BAD)
def test_bad_input_raises_before_work(monkeypatch, change, exc, match):
    """Routing errors name the teacher and the counts; no chunk has run."""
    def boom(*a, **k):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(ops, "run_forward", boom)
    index = torch.tensor([[0, 1, 0, 0, 1], [0, 0, 1, 0, 1]])
    y = torch.randn(2, 5, 11)
    kw = dict(teacher_index=index, teacher_logits=[y[index == 0], y[index == 1]])
    change(kw)
    with pytest.raises(exc, match=match):
        entropy_aware_opd_loss(torch.randn(2, 5, 11, requires_grad=True), **kw)


def test_topk_teacher_bad_ids_named(monkeypatch):
    index = torch.tensor([0, 1, 1])
    lp = torch.log_softmax(torch.randn(2, 3), -1)
    ids = torch.tensor([[0, 1, 2], [3, 4, 99]])
    with pytest.raises(ValueError, match=r"teacher 1: teacher_topk_indices must be vocab"):
        entropy_aware_opd_loss(torch.randn(3, 11), [torch.randn(1, 11), None],
                               teacher_topk_logprobs=[None, lp],
                               teacher_topk_indices=[None, ids], teacher_index=index)


def _compiled_step(index, forms, reduction):
    fused, _, _ = _teachers(index, forms, seed=int(index.sum()))
    h, w, b = _student(int(index.sum()))
    loss, leaves = _call("fused", h, w, b, fused, None, index, None,
                         dict(reduction=reduction, chunk_size=4, temperature=1.3,
                              vocab_size=VOCAB))
    loss.sum().backward()
    return (loss.detach(), *(x.grad for x in leaves))


def test_compiled_no_recompiles_as_routing_changes(monkeypatch):
    """Mixed forms through the compiled kernels: no graph added as the routing (so every
    teacher's chunk lengths) changes; the same values as eager."""
    monkeypatch.setenv("EAOPD_COMPILE", "1")
    forms = ("linear", "topk", "linear")  # both kernel families (given logits share the dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        for reduction in ("sum", "none"):
            _compiled_step(_routing("random", 0), forms, reduction)
        counters.clear()
        for seed, kind in enumerate(["per sequence", "empty teacher"]):
            index = _routing(kind, seed + 1)
            for reduction in ("sum", "none"):
                got = _compiled_step(index, forms, reduction)
                monkeypatch.setenv("EAOPD_COMPILE", "0")
                want = _compiled_step(index, forms, reduction)
                monkeypatch.setenv("EAOPD_COMPILE", "1")
                for a, b in zip(got, want, strict=True):
                    close(a, b)
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])


def test_inside_a_compiled_step(eager):
    """A user's torch.compile'd step around the routed fused loss: the same loss and
    gradients as eager, with two routings."""
    lin = torch.nn.Linear(HID, HID)
    for seed in (0, 1):
        index = _routing("random", seed, 2)
        fused, _, _ = _teachers(index, FORMS[2], seed=seed)
        h, w, b = _student(seed)

        def step(x, wl, index=index, fused=fused):
            return fused_linear_eaopd_loss(lin(x), wl, teacher_index=index,
                                           reduction="mean", chunk_size=5,
                                           vocab_size=VOCAB, **fused)

        out = []
        for fn in (step, torch.compile(step)):
            wl = w.clone().requires_grad_()
            lin.zero_grad(set_to_none=True)
            loss = fn(h, wl)
            loss.backward()
            out.append((loss.detach(), wl.grad, lin.weight.grad))
        for a, b_ in zip(*out, strict=True):
            close(a, b_)


def test_example_runs_and_routing_helps(eager, monkeypatch, capsys):
    """examples/multi_teacher.py with few steps: the routed student is closer to each
    kind's expert than the student of the averaged teacher."""
    import os

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "examples"))
    import multi_teacher

    results = multi_teacher.main(["--steps", "60"])
    for kind in multi_teacher.KINDS:
        routed, averaged = results["routed"][kind], results["averaged"][kind]
        assert routed["KL(expert||student)"] < averaged["KL(expert||student)"]
    assert "teacher 1 (code), last step: tokens 96" in capsys.readouterr().out


def test_one_teacher_chunk_is_live_at_a_time(eager, monkeypatch):
    """Working memory: when a teacher allocates its (chunk, V) logits buffer, no other
    teacher's buffer is still alive (each is freed after that teacher's last chunk)."""
    import weakref

    from eaopd_mp import driver

    live: dict[int, list] = {}
    real = driver._buffer

    def tracked(head, n, dtype):
        out = real(head, n, dtype)
        student = any(getattr(head, "need", ())) or getattr(head, "need_grad", False)
        if not student:  # a teacher head
            others = [r for k, refs in live.items() if k != id(head) for r in refs]
            assert all(r() is None for r in others), "another teacher's buffer is alive"
            live.setdefault(id(head), []).append(weakref.ref(out))  # the chunk's logits
        return out

    monkeypatch.setattr(driver, "_buffer", tracked)
    index = _routing("random", 7)
    fused, _, _ = _teachers(index, ("linear", "logits", "linear"), seed=7)
    h, w, b = _student(7)
    for reduction in ("sum", "none"):
        live.clear()
        loss, _ = _call("fused", h, w, b, fused, None, index, None,
                        dict(reduction=reduction, chunk_size=4, vocab_size=VOCAB))
        loss.sum().backward()
        assert len(live) >= 3  # every teacher allocated (ids may repeat across calls)
