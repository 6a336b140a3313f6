"""The loss inside a user's training step: torch.compile around it, autocast, autograd's
contract (retain_graph, accumulation, version counters, double backward), threads, and
non-finite inputs (NaN in, NaN out)."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from eaopd_mp import (
    EntropyAwareOPDLoss,
    FusedLinearEAOPDLoss,
    entropy_aware_opd_loss,
    fused_linear_eaopd_loss,
    reference_eaopd_loss,
)
from formulas import close

V, H, HT = 97, 16, 12


def _inputs(seed=0, shape=(3, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5 * 3
    th = torch.randn(*shape, HT, generator=g)
    tw = torch.randn(V, HT, generator=g) / HT**0.5 * 3
    labels = (torch.rand(shape, generator=g) > 0.3).float()
    return x, w, th, tw, labels


# One config per row: every reduction, every gate, labels of each kind, stats on and off.
CONFIGS = [
    dict(reduction="batchmean", gate="linear", labels="binary", return_stats=True),
    dict(reduction="sum", gate="threshold", gate_threshold=4.0, labels=None),
    dict(reduction="mean", gate="fixed", fkl_weight=0.3, labels="float", temperature=0.8),
    dict(reduction="none", gate="linear", h_max=2.0, labels="binary", return_stats=True),
]


def _labels(kind, base):
    if kind is None:
        return None
    return base if kind == "binary" else base * torch.linspace(0.2, 1.0, base.shape[-1])


def _entry_points():
    """name -> fn(model, x, w, th, tw, labels, **opts): a training step's loss."""
    def logits_fn(model, x, w, th, tw, labels, **o):
        return entropy_aware_opd_loss(model(x) @ w.T, th @ tw.T, labels=labels, **o)

    def fused_fn(model, x, w, th, tw, labels, **o):
        return fused_linear_eaopd_loss(model(x), w, teacher_hidden=th, teacher_weight=tw,
                                       labels=labels, **o)

    def logits_mod(model, x, w, th, tw, labels, **o):
        return EntropyAwareOPDLoss(**o)(model(x) @ w.T, th @ tw.T, labels)

    def fused_mod(model, x, w, th, tw, labels, **o):
        return FusedLinearEAOPDLoss(**o)(model(x), w, teacher_logits=th @ tw.T, labels=labels)

    def topk_fn(model, x, w, th, tw, labels, **o):  # a served teacher's top-k, fused student
        lp, ids = torch.log_softmax(th @ tw.T, dim=-1).topk(TOPK, dim=-1)
        return fused_linear_eaopd_loss(model(x), w, teacher_topk_logprobs=lp,
                                       teacher_topk_indices=ids, labels=labels, **o)

    return {"logits": logits_fn, "fused": fused_fn, "logits_module": logits_mod,
            "fused_module": fused_mod, "topk": topk_fn}


TOPK = 5


def _step(fn, cfg):
    """``(step, model, labels kind)``: a training step with the loss, its options bound."""
    cfg = dict(cfg)
    kind = cfg.pop("labels")
    torch.manual_seed(1)
    model = torch.nn.Linear(H, H)

    def step(x, w, th, tw, labels):
        out = fn(model, x, w, th, tw, labels, **cfg)
        return out if isinstance(out, tuple) else (out, None)

    return step, model, kind


def _call(step, model, kind, seed=0, shape=(3, 8), mark=False):
    """Run ``step`` on fresh inputs and backward; the loss, the gradients and the stats.
    ``mark``: mark the token dims dynamic (``torch._dynamo.mark_dynamic``) first."""
    x, w0, th, tw, base = _inputs(seed, shape)
    labels = _labels(kind, base)
    w = w0.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    if mark:
        for t in (x, th, labels):
            if t is not None:
                torch._dynamo.mark_dynamic(t, 1)
    loss, stats = step(x, w, th, tw, labels)
    loss.backward(torch.linspace(-1, 1, loss.numel()).view(loss.shape) if loss.dim() else None)
    grads = [loss.detach(), w.grad, model.weight.grad, model.bias.grad]
    if stats is not None:
        # the gate's parameters (Python floats, such as h_max = log V) compared too
        grads += [v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                  for k, v in stats.items() if k != "gate"]
    return grads


def _run(fn, cfg, compiled, fullgraph=False, seed=0):
    step, model, kind = _step(fn, cfg)
    if compiled:
        step = torch.compile(step, fullgraph=fullgraph)
    return _call(step, model, kind, seed)


@pytest.mark.parametrize("name", [n for n in _entry_points() if n != "topk"])
@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_step_equals_eager(name, fullgraph):
    """Issue 9's repro generalised: the loss inside a compiled step, every config (the
    top-k teacher's static compiled step: tests/test_topk.py; dynamic: below)."""
    fn = _entry_points()[name]
    with torch._dynamo.config.patch(recompile_limit=64):
        for cfg in CONFIGS:
            want = _run(fn, cfg, compiled=False)
            got = _run(fn, cfg, compiled=True, fullgraph=fullgraph)
            for a, b in zip(got, want, strict=True):
                close(a, b, msg=f"{name} {cfg}: ")


DYNAMIC_CASES = [(name, mode, i + j) for i, name in enumerate(_entry_points())
                 for j, mode in enumerate(["dynamic", "mark_dynamic"])]


@pytest.mark.parametrize("name,mode,row", DYNAMIC_CASES)
def test_dynamic_compiled_step_equals_eager(name, mode, row):
    """Issue 18: the loss in a step compiled with ``dynamic=True`` (the vocabulary width is
    then symbolic too) or with ``mark_dynamic`` on the token dim, fullgraph (no graph
    break), equals eager at two sequence lengths with one graph. Every entry point in both
    modes; the configs rotate, so each mode meets every reduction, gate and label kind."""
    fn = _entry_points()[name]
    cfg = CONFIGS[row % len(CONFIGS)]
    step, model, kind = _step(fn, cfg)
    compiled = torch.compile(step, fullgraph=True, dynamic=True if mode == "dynamic" else None)
    with torch._dynamo.config.patch(recompile_limit=64):  # `step` is compiled per test
        for i, shape in enumerate([(3, 8), (3, 13)]):
            want = _call(step, model, kind, i, shape)
            if i == 1:
                counters.clear()
            got = _call(compiled, model, kind, i, shape, mark=mode == "mark_dynamic")
            for a, b in zip(got, want, strict=True):
                close(a, b, msg=f"{name} {cfg} {shape}: ")
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])


def test_dynamic_step_traces_without_graph_breaks():
    """Without fullgraph, ``dynamic=True`` traces each entry point (statistics on) as one
    frame, with no warning from dynamo (main had 5 graph breaks and an lru_cache warning)."""
    from torch._dynamo.testing import CompileCounter
    for name, fn in _entry_points().items():
        step, model, kind = _step(fn, CONFIGS[0])
        counter = CompileCounter()
        compiled = torch.compile(step, dynamic=True, backend=counter)
        with warnings.catch_warnings(record=True) as caught, \
                torch._dynamo.config.patch(recompile_limit=64):
            warnings.simplefilter("always")
            _call(compiled, model, kind)
        assert counter.frame_count == 1, (name, counter.frame_count)
        dynamo = [str(w.message) for w in caught if "Dynamo" in str(w.message)]
        assert not dynamo, (name, dynamo)


def test_compiled_step_with_eager_kernels(eager):
    fn = _entry_points()["fused"]
    for cfg in (CONFIGS[0], CONFIGS[3]):
        want = _run(fn, cfg, compiled=False)
        got = _run(fn, cfg, compiled=True, fullgraph=True)
        for a, b in zip(got, want, strict=True):
            close(a, b)


def test_issue_repro_compiled_step():
    model, head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 1000, bias=False)
    th, tw = torch.randn(4, 32, 64), torch.randn(1000, 64)

    def step(x):
        h = model(x)
        return fused_linear_eaopd_loss(h, head.weight, teacher_hidden=th, teacher_weight=tw,
                                       labels=torch.ones(4, 32))

    x = torch.randn(4, 32, 64)
    torch.compile(step)(x).backward()
    got = head.weight.grad.clone()
    head.weight.grad = None
    step(x).backward()
    close(got, head.weight.grad)


def test_no_recompile_storm_in_a_compiled_step():
    """5 sequence lengths: at most 2 graphs of the user's step, none of the kernels."""
    model = torch.nn.Linear(H, H)
    w = torch.randn(V, H, requires_grad=True)
    tw = torch.randn(V, HT)

    def step(x, th, labels):
        return fused_linear_eaopd_loss(model(x), w, teacher_hidden=th, teacher_weight=tw,
                                       labels=labels, chunk_size=8)

    compiled = torch.compile(step)

    def call(t):
        x, th = torch.randn(2, t, H), torch.randn(2, t, HT)
        compiled(x, th, (torch.rand(2, t) > 0.2).float()).backward()

    torch._dynamo.reset()
    call(11)  # warm-up: the step's static graph and one graph per kernel
    counters.clear()
    for t in (13, 17, 24, 31):
        call(t)
    # Only the step itself may recompile once, as dynamic; no kernel compiles again.
    assert counters["stats"]["unique_graphs"] <= 1, dict(counters["stats"])


def test_threads_get_their_own_answers():
    inputs = [_inputs(seed) for seed in range(4)]

    def one(i):
        x, w, th, tw, labels = inputs[i]
        w = w.clone().requires_grad_()
        loss = fused_linear_eaopd_loss(x, w, teacher_hidden=th, teacher_weight=tw,
                                       labels=labels, chunk_size=5, reduction="sum")
        loss.backward()
        return loss.detach(), w.grad

    want = [one(i) for i in range(4)]
    got: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def worker(i):
        try:
            for _ in range(3):
                got[i] = one(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        for a, b in zip(got[i], want[i], strict=True):
            close(a, b)


# --------------------------------------------------------------------- autograd contract


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("path", ["fused", "logits", "logits_leaf"])
def test_retained_graph_grads_accumulate_and_do_not_alias(reduction, path):
    x, w0, th, tw, labels = _inputs()
    h = x.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    if path == "logits_leaf":  # the logits themselves are the leaf; w is not used
        h = (x @ w0.T).requires_grad_()
        w = torch.zeros(1, requires_grad=True)
        loss = entropy_aware_opd_loss(h, th @ tw.T, labels=labels, reduction=reduction).sum()
        loss = loss + 0 * w.sum()
    elif path == "fused":
        loss = fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw,
                                       labels=labels, reduction=reduction).sum()
    else:
        loss = entropy_aware_opd_loss(h @ w.T, th @ tw.T, labels=labels,
                                      reduction=reduction).sum()
    loss.backward(retain_graph=True)
    one_h, one_w = h.grad.clone(), w.grad.clone()
    h.grad.zero_()  # what zero_grad(set_to_none=False) does
    w.grad.zero_()
    loss.backward(retain_graph=True)
    close(h.grad, one_h)
    close(w.grad, one_w)
    loss.backward(retain_graph=True)
    loss.backward()
    close(h.grad, 3 * one_h)
    close(w.grad, 3 * one_w)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_inplace_change_before_backward_raises(reduction):
    x, w0, th, tw, _ = _inputs()
    h, w = x.clone().requires_grad_(), w0.clone().requires_grad_()
    loss = fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw,
                                   reduction=reduction).sum()
    with torch.no_grad():
        w.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_double_backward_says_once_differentiable():
    x, w, th, tw, _ = _inputs()
    h = x.clone().requires_grad_()
    loss = fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_labels_requiring_grad_are_refused():
    x, w, th, tw, labels = _inputs()
    with pytest.raises(ValueError, match="labels is a constant mask"):
        fused_linear_eaopd_loss(x, w, teacher_hidden=th, teacher_weight=tw,
                                labels=labels.requires_grad_())


def test_bias_dtype_must_match_weight():
    x, w, th, tw, _ = _inputs()
    with pytest.raises(ValueError, match="student_bias dtype torch.float64 != student_weight"):
        fused_linear_eaopd_loss(x, w, student_bias=torch.zeros(V, dtype=torch.float64),
                                teacher_hidden=th, teacher_weight=tw)


@pytest.mark.parametrize("bad", [dict(reduction="avg"), dict(temperature=0.0),
                                 dict(gate="fixed", h_max=2.0), dict(chunk_size=0),
                                 dict(nonsense=1)])
def test_modules_validate_at_construction(bad):
    for cls in (EntropyAwareOPDLoss, FusedLinearEAOPDLoss):
        with pytest.raises((ValueError, TypeError)):
            cls(**bad)


# --------------------------------------------------------------------- autocast


@pytest.mark.parametrize("labels_kind", [None, "binary"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("native", [True, False], ids=["bf16-gemm", "fp32-gemm"])
def test_autocast_bf16_gemms(monkeypatch, labels_kind, reduction, native):
    """Under autocast the GEMMs see bf16-rounded operands (as nn.Linear's would), the
    softmax maths stays fp32, and gradients come back in the fp32 parameters' dtype.
    Both CPU policies: bf16 GEMMs (CPUs with bf16 instructions) and float32 GEMMs on the
    rounded operands (CPUs without), whichever this machine has."""
    from eaopd_mp import driver
    monkeypatch.setattr(driver, "cpu_has_half_gemm", lambda dtype: native)
    x, w0, th, tw, base = _inputs()
    labels = _labels(labels_kind, base)
    h, w = x.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw,
                                       labels=labels, reduction=reduction)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32

    def rounded(t):
        return t.bfloat16().float()

    hr, wr = rounded(x).requires_grad_(), rounded(w0).requires_grad_()
    ref = reference_eaopd_loss(hr @ wr.T, rounded(th) @ rounded(tw).T, labels=labels,
                               reduction=reduction)
    ref_fp32 = reference_eaopd_loss(x @ w0.T, th @ tw.T, labels=labels, reduction=reduction)
    if not native:  # float32 GEMMs on the rounded operands: float32 agreement
        close(loss, ref)
        assert not torch.allclose(loss, ref_fp32, rtol=1e-5, atol=1e-6), "autocast ignored"
    torch.testing.assert_close(loss, ref_fp32, rtol=3e-2, atol=3e-2)
    ref.sum().backward()
    for got, want in ((h.grad, hr.grad), (w.grad, wr.grad)):
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0)
        assert cos > 0.999, cos
        assert (got - want).norm() <= 0.02 * want.norm()


def test_autocast_bf16_hidden_with_fp32_weight():
    """A model run under autocast hands over bf16 hidden states; the head stays fp32."""
    x, w0, th, tw, labels = _inputs()
    h = x.bfloat16().requires_grad_()
    w = w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_eaopd_loss(h, w, teacher_hidden=th.bfloat16(), teacher_weight=tw,
                                       labels=labels)
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    hr, wr = x.bfloat16().float().requires_grad_(), w0.bfloat16().float().requires_grad_()
    ref = reference_eaopd_loss(hr @ wr.T, th.bfloat16().float() @ tw.bfloat16().float().T,
                               labels=labels)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    for got, want in ((h.grad.float(), hr.grad), (w.grad, wr.grad)):
        assert (got - want).norm() <= 0.02 * want.norm()
    with pytest.raises(TypeError, match="outside torch.autocast they must match"):
        fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw)


def test_bf16_weight_grad_without_a_16bit_temporary(monkeypatch):
    """bf16 parameters, both CPU GEMM policies: gradients match an fp32 reference."""
    from eaopd_mp import driver
    x, w0, th, tw, labels = _inputs()
    for native in (True, False):
        monkeypatch.setattr(driver, "cpu_has_half_gemm", lambda dtype, n=native: n)
        h, w = x.bfloat16().requires_grad_(), w0.bfloat16().requires_grad_()
        loss = fused_linear_eaopd_loss(h, w, teacher_hidden=th.bfloat16(),
                                       teacher_weight=tw.bfloat16(), labels=labels,
                                       reduction="sum", chunk_size=5)
        loss.backward()
        hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        ref = reference_eaopd_loss(hr @ wr.T, th.bfloat16().float() @ tw.bfloat16().float().T,
                                   labels=labels, reduction="sum")
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
        for got, want in ((h.grad, hr.grad), (w.grad, wr.grad)):
            assert got.dtype == torch.bfloat16
            assert (got.float() - want).norm() <= 0.02 * want.norm(), native


# --------------------------------------------------------------------- non-finite inputs

NAN, INF = float("nan"), float("inf")


def _broken_logits():
    """Student/teacher logits (2, 6, 11) with one broken token per case, and the cases."""
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(2, 6, 11, generator=g) * 2, torch.randn(2, 6, 11, generator=g) * 2
    z[0, 0, 3] = NAN          # student NaN
    y[0, 1, 5] = NAN          # teacher NaN
    y[0, 2, 2] = INF          # teacher +inf
    z[0, 3, 7] = INF          # student +inf
    y[0, 4] = -INF            # teacher row with no finite entry
    z[0, 5] = -INF            # student row with no finite entry
    y[1, 0, 4] = -INF         # teacher -inf where the student has mass: KL_rev = +inf
    z[1, 1, 6] = -INF         # student -inf where the teacher has mass: KL_fwd = +inf
    z[1, 2, 8:] = -INF        # -inf in both: excluded, finite
    y[1, 2, 8:] = -INF
    return z, y


def _expected_kinds():
    nan = torch.zeros(2, 6, dtype=torch.bool)
    nan[0, :] = True
    inf = torch.zeros(2, 6, dtype=torch.bool)
    inf[1, 0] = inf[1, 1] = True
    return nan, inf


@pytest.mark.parametrize("gate", [{}, {"gate": "threshold", "gate_threshold": 1.0},
                                  {"gate": "fixed", "fkl_weight": 0.0}])
def test_nan_in_nan_out_logits(gate):
    z, y = _broken_logits()
    got = entropy_aware_opd_loss(z, y, reduction="none", temperature=0.9, **gate)
    ref = reference_eaopd_loss(z, y, reduction="none", temperature=0.9, **gate)
    nan, inf = _expected_kinds()
    assert torch.isnan(got[nan]).all(), got
    assert torch.isnan(ref[nan]).all()  # the specification agrees
    # Genuinely infinite KLs stay +inf when the gate weighs them (NaN-free elsewhere).
    finite = ~nan & ~inf
    close(got[finite], ref[finite])
    assert not torch.isnan(got[~nan]).any()
    assert torch.equal(torch.isinf(got[inf]), torch.isinf(ref[inf]))
    for reduction in ("sum", "mean", "batchmean"):
        assert torch.isnan(entropy_aware_opd_loss(z, y, reduction=reduction, **gate))


def test_nan_in_nan_out_fused():
    """Broken hidden states or teacher logits reach the fused path as broken logits."""
    x, w, th, tw, _ = _inputs(shape=(2, 6))
    _, y_t = _broken_logits()
    y = th @ tw.T
    y[:, :, :11] = y_t  # the teacher's broken rows, as given logits
    h = x.clone()
    h[1, 3, 0] = NAN
    h[1, 4, 1] = INF
    got = fused_linear_eaopd_loss(h, w, teacher_logits=y, reduction="none")
    ref = reference_eaopd_loss(h @ w.T, y, reduction="none")
    want_nan = torch.isnan(ref)
    assert want_nan[1, 3] and want_nan[1, 4] and want_nan[0, 1]
    assert torch.equal(torch.isnan(got), want_nan)
    close(got[~want_nan], ref[~want_nan])


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_masked_broken_token_does_not_leak(reduction):
    z, y = _broken_logits()
    labels = torch.zeros(2, 6)
    labels[1, 2:] = 1.0  # only healthy tokens kept
    zg = z.clone().requires_grad_()
    loss = entropy_aware_opd_loss(zg, y, labels=labels, reduction=reduction)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(zg.grad).all()
    keep = labels.bool()
    ref = reference_eaopd_loss(z[keep], y[keep], reduction="sum")
    close(loss.sum(), ref)


def test_runtime_errors_propagate_and_keep_compiling(monkeypatch):
    """Only a compilation failure falls back to eager; an error of the computation (here
    an out-of-memory) propagates and the kernel stays compiled."""
    from eaopd_mp import core
    kernel = core.Kernel(core.single_stats, {0: 0, 1: 0})
    z, y = torch.randn(4, 9), torch.randn(4, 9)
    params = torch.tensor([1.0, 0.5, 0.0])
    kernel(z, y, params, "linear", True)
    compiled = kernel._compiled

    def oom(*args):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    kernel._compiled = oom
    with pytest.raises(torch.OutOfMemoryError):
        kernel(z, y, params, "linear", True)
    assert not kernel._failed
    kernel._compiled = compiled
    torch.testing.assert_close(kernel(z, y, params, "linear", True),
                               core.single_stats(z, y, params, "linear", True))
