"""The compiled kernels: parity with eager, and no recompilation as lengths change."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from eaopd_mp import EntropyAwareOPDLoss, core, entropy_aware_opd_loss, fused_linear_eaopd_loss
from formulas import close


def _step(n, reduction, chunk):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    loss = fused_linear_eaopd_loss(h, w, teacher_hidden=torch.randn(n, 12, generator=g),
                                   teacher_weight=torch.randn(300, 12, generator=g),
                                   temperature=0.9, reduction=reduction, chunk_size=chunk)
    loss.sum().backward()
    return loss.detach(), h.grad, w.grad


def test_no_recompilation_as_lengths_change(monkeypatch):
    monkeypatch.setenv("EAOPD_COMPILE", "1")
    torch._dynamo.reset()
    for reduction in ("sum", "none"):
        _step(40, reduction, 16)  # warm-up: one graph per kernel
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager would warn
        for n in (1, 2, 3, 17, 33, 64, 100, 129):
            for reduction in ("sum", "none"):
                _step(n, reduction, 16 if n % 2 else 32)
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    assert counters["frames"]["ok"] == 0 or counters["stats"]["unique_graphs"] == 0


@pytest.mark.parametrize("gate_kw", [dict(gate="linear", h_max=3.0),
                                     dict(gate="threshold", gate_threshold=4.0),
                                     dict(gate="fixed", fkl_weight=0.3)])
def test_every_gate_compiles_and_matches_eager(monkeypatch, gate_kw):
    """No silent fallback: compilation warnings are errors here."""
    z, y = torch.randn(9, 70), torch.randn(9, 70) * 3
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("EAOPD_COMPILE", flag)
        zg = z.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            loss = entropy_aware_opd_loss(zg, y, temperature=0.8, chunk_size=4, **gate_kw)
            loss.backward()
        out.append((loss.detach(), zg.grad))
    for a, b in zip(*out, strict=True):
        close(a, b)


def test_compiled_equals_eager(monkeypatch):
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("EAOPD_COMPILE", flag)
        results.append(_step(37, "sum", 8) + _step(21, "none", 8))
    for a, b in zip(*results, strict=True):
        close(a, b)


@pytest.mark.parametrize("error", [torch._dynamo.exc.InternalTorchDynamoError,
                                   torch._inductor.exc.CppCompileError])
def test_compile_failure_falls_back_with_one_warning(monkeypatch, error):
    monkeypatch.setenv("EAOPD_COMPILE", "1")
    kernel = core.Kernel(core.single_stats, {0: 0, 1: 0})

    def broken(*a, **k):
        def fail(*args):
            if error is torch._inductor.exc.CppCompileError:
                raise error(["cc"], "no compiler here")
            raise error("no compiler here")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    z, y = torch.randn(4, 9), torch.randn(4, 9)
    params = torch.tensor([1.0, 0.5, 0.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kernel(z, y, params, "linear", True)
        second = kernel(z, y, params, "linear", True)
    assert sum("falling back to eager" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(first, core.single_stats(z, y, params, "linear", True))
    torch.testing.assert_close(second, first)


def _fallback_flags():
    from eaopd_mp import topk
    kernels = [k for mod in (core, topk) for k in vars(mod).values() if isinstance(k, core.Kernel)]
    return {id(k): k._failed for k in kernels}


def test_a_user_error_never_switches_the_process_to_eager(monkeypatch):
    """Issue 18: bad shapes raise a ValueError, and the next valid call still runs the
    compiled kernels (no fallback flag flipped, no fallback warning)."""
    monkeypatch.setenv("EAOPD_COMPILE", "1")
    before = _fallback_flags()
    h, th = torch.randn(4, 8), torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
        with pytest.raises(ValueError, match=r"student_weight has an empty vocabulary dim "
                           r"\(shape \(0, 8\)\)"):
            fused_linear_eaopd_loss(h, torch.randn(0, 8), teacher_hidden=th,
                                    teacher_weight=torch.randn(0, 6))
        with pytest.raises(ValueError, match="student_logits has an empty vocabulary dim"):
            entropy_aware_opd_loss(torch.randn(4, 0), torch.randn(4, 0))
        assert _fallback_flags() == before
        w = torch.randn(50, 8, requires_grad=True)
        fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=torch.randn(50, 6),
                                temperature=0.9).backward()  # _step's kernel: shared
    # No kernel fell back: with the flag down, Kernel.__call__ runs the compiled function.
    assert _fallback_flags() == before and not any(before.values())


def test_an_input_error_met_while_compiling_propagates_without_fallback(monkeypatch):
    """An error dynamo meets while tracing a bad input is the input's, not the
    compiler's: the eager run raises it too, it propagates, and the kernel stays compiled."""
    monkeypatch.setenv("EAOPD_COMPILE", "1")
    kernel = core.Kernel(core.single_stats, {0: 0, 1: 0})
    params = torch.tensor([1.0, 0.5, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises((IndexError, RuntimeError)):
            kernel(torch.randn(4, 0), torch.randn(4, 0), params, "linear", True)
    assert not kernel._failed
    z, y = torch.randn(4, 9), torch.randn(4, 9)
    torch.testing.assert_close(kernel(z, y, params, "linear", True),
                               core.single_stats(z, y, params, "linear", True))
    assert not kernel._failed and kernel._compiled is not None


@pytest.mark.parametrize("kind", ["linear", "threshold", "fixed"])
@pytest.mark.parametrize("inv_tau", [1.0, 0.5])
def test_split_kernels_agree_with_the_one_pass_statistics(monkeypatch, kind, inv_tau):
    """The one-device kernels return raw row sums and a second kernel makes the statistics
    (core.single_sums / single_grad_, then stats_from_sums): those statistics equal the
    one-pass ones (eager core.single_stats), and the gradient written by the fused kernel
    is the closed form of exactly the statistics returned (loss and gradient agree), on
    rows with -inf columns, a NaN and an all -inf teacher."""
    monkeypatch.setenv("EAOPD_COMPILE", "1")
    gen = torch.Generator().manual_seed(3)
    z, y = torch.randn(9, 40, generator=gen) * 3, torch.randn(9, 40, generator=gen) * 3
    z[1, :7] = y[2, 5:20] = float("-inf")
    z[3, 4] = float("nan")
    y[4] = float("-inf")
    scale = torch.rand(9, generator=gen)
    params = torch.tensor([inv_tau, 0.3, 0.6])
    untempered = inv_tau == 1.0
    expected = core.single_stats(z, y, params, kind, untempered)
    stats = core.sums_stats_kernel(core.sums_kernel(z, y, params, untempered), params, kind)
    torch.testing.assert_close(stats, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    grad = z.clone()
    fused = core.sums_stats_kernel(
        core.fwd_grad_kernel_(grad, y, scale, params, kind, untempered), params, kind)
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(grad, core.grad_logits(z, y, fused, scale, params),
                               rtol=1e-6, atol=1e-7, equal_nan=True)
    assert torch.isnan(fused[3, :core.A]).all() and torch.isnan(core.token_loss(fused)[3:5]).all()
    assert torch.isfinite(fused[[0, 5, 6, 7, 8]]).all()
    assert fused[1, core.KL_FWD] == float("inf") and fused[2, core.KL_REV] == float("inf")


BAD_ARGUMENTS = [
    # (call, exception type, the start of its message)
    (lambda n: entropy_aware_opd_loss(torch.randn(n, 10), torch.randn(n, 10),
                                      labels=torch.ones(n - 1)),
     ValueError, "labels shape ({m},) != token shape ({n},)"),
    (lambda n: fused_linear_eaopd_loss(torch.randn(n, 8), torch.randn(10, 8),
                                       teacher_hidden=torch.randn(n, 6),
                                       teacher_weight=torch.randn(10, 7)),
     ValueError, "teacher_hidden width 6 (shape ({n}, 6)) != teacher_weight width 7"),
    (lambda n: entropy_aware_opd_loss(torch.randn(n, 10), torch.randn(n, 10),
                                      temperature=-1.0),
     ValueError, "temperature must be finite and > 0, got -1.0"),
    (lambda n: EntropyAwareOPDLoss()(torch.randn(n, 10), [torch.randn(n, 10)]),
     TypeError, "teacher_logits must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)))
def test_bad_argument_under_fullgraph_compile_is_readable(dynamic, case):
    """A bad argument inside torch.compile(fullgraph=True) is a TorchRuntimeError (what
    PyTorch's own ops give) whose message starts with the eager error's type and text, with
    this call's concrete sizes also under dynamic=True; the eager error is its cause."""
    call, kind, start = BAD_ARGUMENTS[case]
    torch._dynamo.reset()
    step = torch.compile(call, fullgraph=True, dynamic=dynamic)
    with pytest.raises(kind) as eager:
        call(5)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError) as err:
        step(5)
    message = str(err.value)
    assert message.startswith(f"{kind.__name__}: {start.format(n=5, m=4)}"), message
    assert type(err.value.__cause__) is kind
    assert str(err.value.__cause__) == str(eager.value)
