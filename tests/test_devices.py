"""Parity on every available device: ``cpu`` always, ``cuda`` when torch sees a GPU.

The inputs are made on the CPU from a seeded generator and moved to the device; the
expected values are the eager reference (``reference_eaopd_loss``, float32) computed
on the CPU from the same inputs, so a CUDA case checks the compiled (Triton) kernels,
the in-place gradient writes and the GEMMs on the GPU against a result that owes
nothing to CUDA. float32 comparisons use rtol 1e-5 (``formulas.close``), with TF32 off.

The grids are small on purpose: ``tests/test_loss.py``, ``test_gates.py`` and
``test_compile.py`` cover the CPU in depth; here each device gets one representative
grid (every gate, every reduction, masks, both gradient modes, head transforms, ``-inf``
columns, bf16, lengths without recompilation) and the vocab-parallel path on NCCL with two
GPUs.

Without CUDA the ``cuda`` cases are skipped with a reason. ``make gpu-check`` sets
``EAOPD_REQUIRE_CUDA=1``, which turns that skip into a failure, so a GPU check on a
machine where torch sees no GPU cannot pass silently.
"""

from __future__ import annotations

import itertools
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_topk import formula, served
from torch._dynamo.utils import counters

from dist_utils import _free_port
from eaopd_mp import core, entropy_aware_opd_loss, fused_linear_eaopd_loss, reference_eaopd_loss
from eaopd_mp.parallel import fused_linear_vocab_parallel_eaopd_loss, vocab_parallel_eaopd_loss
from eaopd_mp.tp import mask_fingerprint, position_hashes
from formulas import close

REQUIRE_CUDA = os.environ.get("EAOPD_REQUIRE_CUDA", "") == "1"
NO_CUDA = ("torch.cuda.is_available() is False here: the cuda cases run under "
           "`make gpu-check` on a GPU machine")
REDUCTIONS = ("batchmean", "sum", "mean", "none")
GATES = (
    {},  # linear, h_max = log(V)
    {"gate": "linear", "h_max": 1.7},
    {"gate": "threshold", "gate_threshold": 2.5},
    {"gate": "fixed", "fkl_weight": 0.3},
)
# > 2048 columns: Triton reduces such rows in a loop of blocks, not in one block.
WIDE_V = 2053


def _require(device: str) -> None:
    """Skip (or, under ``EAOPD_REQUIRE_CUDA=1``, fail) a cuda case without CUDA."""
    if device == "cuda" and not torch.cuda.is_available():
        if REQUIRE_CUDA:
            pytest.fail("EAOPD_REQUIRE_CUDA=1 but torch.cuda.is_available() is False "
                        f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        pytest.skip(NO_CUDA)


# The compiled kernels (objects with a ``_failed`` flag, set when they fell back to eager).
KERNELS = [k for k in vars(core).values() if hasattr(k, "_failed")]


@pytest.fixture(autouse=True)
def compiled_kernels_only(monkeypatch):
    """These tests are about the compiled kernels (Triton ones on CUDA): compile on, and
    a compilation failure, which would otherwise fall back to eager with one warning and
    let every later case pass on eager kernels, fails the test that hits it and every
    test after it."""
    monkeypatch.setenv("EAOPD_COMPILE", "1")
    failed = [getattr(k, "fn", k) for k in KERNELS if k._failed]
    assert not failed, f"kernels fell back to eager earlier in this process: {failed}"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="eaopd_mp: torch.compile failed",
                                category=RuntimeWarning)
        yield


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """The device under test, with exact float32 matmuls (no TF32) while the test runs."""
    _require(request.param)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the default; a caller may have changed it
    try:
        yield torch.device(request.param)
    finally:
        torch.set_float32_matmul_precision(saved)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels(kind: str | None, shape, seed: int) -> torch.Tensor | None:
    """None, a 0/1 mask, or float weights with some zeros; ``(...)`` float32 on the CPU."""
    if kind is None:
        return None
    g = _gen(seed)
    keep = torch.rand(shape, generator=g) > 0.35
    keep.view(-1)[0] = True
    if kind == "binary":
        return keep.float()
    return torch.rand(shape, generator=g) * keep


def _grad_out(loss: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """The upstream gradient: random for ``reduction="none"``, 0.7 for a scalar."""
    if loss.dim() == 0:
        return torch.tensor(0.7)
    return torch.randn(loss.shape, generator=_gen(seed))


def _on(device, *tensors, grad=False):
    """Fresh copies on ``device`` (leaves; requiring grad if ``grad``); None stays None."""
    return tuple(None if t is None else t.detach().to(device, copy=True).requires_grad_(grad)
                 for t in tensors)


def _leaf(*tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu()


# ----------------------------------------------------------------------- logits in

# (gate, reduction, mask, temperature, chunk, vocab): every gate with every reduction
# once, each mask kind, chunks that divide the 21 tokens, that do not, and the default.
LOGITS_CASES = [
    (GATES[0], "batchmean", None, 1.0, 1, 53),
    (GATES[1], "sum", "binary", 0.7, 5, 53),
    (GATES[2], "mean", "float", 1.0, None, 53),
    (GATES[3], "none", None, 0.7, 7, 53),
    (GATES[0], "none", "binary", 1.0, 5, WIDE_V),
    (GATES[1], "mean", "float", 0.7, None, WIDE_V),
    (GATES[2], "sum", None, 1.3, 4, WIDE_V),
    (GATES[3], "batchmean", "binary", 0.8, 7, WIDE_V),
]


def _logits(shape, vocab: int, seed: int):
    """Student and teacher logits ``(*shape, V)`` float32 on the CPU. Each teacher token
    is scaled by a factor in [0.1, 2.5], so its entropy, and the gate with it, spreads
    over a wide range (both sides of the threshold gate's 2.5 nats)."""
    g = _gen(seed)
    z = torch.randn(*shape, vocab, generator=g) * 3
    y = torch.randn(*shape, vocab, generator=g) * 3
    return z, y * (0.1 + 2.4 * torch.rand(*shape, 1, generator=g))


@pytest.mark.parametrize("gate,reduction,mask,tau,chunk,vocab", LOGITS_CASES)
def test_logits_in_matches_reference(device, gate, reduction, mask, tau, chunk, vocab):
    """``entropy_aware_opd_loss`` on ``(3, 7, V)`` float32 logits: loss and gradient."""
    z0, y = _logits((3, 7), vocab, seed=vocab)
    labels = _labels(mask, (3, 7), seed=vocab)
    kw = dict(temperature=tau, reduction=reduction, **gate)

    (z,) = _on(device, z0, grad=True)
    yd, ld = _on(device, y, labels)
    loss = entropy_aware_opd_loss(z, yd, labels=ld, chunk_size=chunk, **kw)
    loss.backward(_grad_out(loss).to(device))

    (zr,) = _leaf(z0)
    ref = reference_eaopd_loss(zr, y, labels=labels, **kw)
    ref.backward(_grad_out(ref))
    assert loss.device.type == device.type and loss.dtype == torch.float32
    close(_cpu(loss), _cpu(ref))
    close(_cpu(z.grad), zr.grad)


# ----------------------------------------------------------------------- fused


def _fused_inputs(n_shape=(3, 5), hid=24, t_hid=16, vocab=WIDE_V, dtype=torch.float32, seed=7):
    """Student ``h (*n_shape, hid)``, ``w (V, hid)``, ``b (V,)``; teacher ``th (*n_shape,
    t_hid)``, ``tw (V, t_hid)``, ``tb (V,)``; CPU tensors in ``dtype``, logits of std ~3."""
    g = _gen(seed)
    h = torch.randn(*n_shape, hid, generator=g)
    w = torch.randn(vocab, hid, generator=g) / hid**0.5 * 3
    b = torch.randn(vocab, generator=g)
    th = torch.randn(*n_shape, t_hid, generator=g)
    tw = torch.randn(vocab, t_hid, generator=g) / t_hid**0.5 * 3
    tb = torch.randn(vocab, generator=g)
    return tuple(t.to(dtype) for t in (h, w, b, th, tw, tb))


# (reduction, bias, teacher form, mask, temperature, gate, chunk)
FUSED_CASES = [
    ("batchmean", False, "linear", None, 1.0, GATES[0], 4),
    ("sum", True, "logits", "binary", 0.8, GATES[1], 7),
    ("mean", True, "linear", "float", 1.0, GATES[2], None),
    ("none", False, "logits", "binary", 0.8, GATES[3], 4),
    ("none", True, "linear", "float", 1.3, GATES[0], 16),
]


@pytest.mark.parametrize("reduction,bias,teacher,mask,tau,gate,chunk", FUSED_CASES)
def test_fused_matches_reference(device, reduction, bias, teacher, mask, tau, gate, chunk):
    """``fused_linear_eaopd_loss`` on ``(3, 5, 24)`` float32 hidden states, V = 2053."""
    h0, w0, b0, th, tw, tb = _fused_inputs()
    labels = _labels(mask, h0.shape[:-1], seed=3)
    t_logits = th @ tw.T + tb
    kw = dict(labels=labels, temperature=tau, reduction=reduction, **gate)

    h, w, b = _on(device, h0, w0, b0, grad=True)
    thd, twd, tbd, tld, ld = _on(device, th, tw, tb, t_logits, labels)
    t_kw = dict(teacher_hidden=thd, teacher_weight=twd, teacher_bias=tbd) \
        if teacher == "linear" else dict(teacher_logits=tld)
    loss = fused_linear_eaopd_loss(h, w, student_bias=b if bias else None, chunk_size=chunk,
                                   **t_kw, **{**kw, "labels": ld})
    loss.backward(_grad_out(loss).to(device))

    hr, wr, br = _leaf(h0, w0, b0)
    ref = reference_eaopd_loss(hr @ wr.T + (br if bias else 0), t_logits, **kw)
    ref.backward(_grad_out(ref))
    close(_cpu(loss), _cpu(ref))
    close(_cpu(h.grad), hr.grad)
    close(_cpu(w.grad), wr.grad)
    if bias:
        close(_cpu(b.grad), br.grad)
    else:
        assert b.grad is None


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_head_transforms_match_reference(device, reduction):
    """Soft-cap and logit scale (Gemma, Cohere) in the compiled kernels, both gradient
    modes, against the reference on logits transformed with plain torch ops on the CPU."""
    h0, w0, b0, th, tw, tb = _fused_inputs()
    labels = _labels("binary", h0.shape[:-1], seed=3)
    caps = dict(student_logit_scale=0.7, student_softcap=2.5, teacher_logit_scale=1.3,
                teacher_softcap=5.0)
    h, w, b = _on(device, h0, w0, b0, grad=True)
    thd, twd, tbd, ld = _on(device, th, tw, tb, labels)
    loss = fused_linear_eaopd_loss(h, w, student_bias=b, teacher_hidden=thd, teacher_weight=twd,
                                   teacher_bias=tbd, labels=ld, reduction=reduction,
                                   chunk_size=8, **caps)
    loss.backward(_grad_out(loss).to(device))

    hr, wr, br = _leaf(h0, w0, b0)
    z = torch.tanh((hr @ wr.T + br) * 0.7 / 2.5) * 2.5
    y = torch.tanh((th @ tw.T + tb) * 1.3 / 5.0) * 5.0
    ref = reference_eaopd_loss(z, y, labels=labels, reduction=reduction)
    ref.backward(_grad_out(ref))
    close(_cpu(loss), _cpu(ref))
    for got, want in ((h, hr), (w, wr), (b, br)):
        close(_cpu(got.grad), want.grad)


@pytest.mark.parametrize("path", ["fused", "logits"])
def test_both_gradient_modes_agree(device, path):
    """Scalar reduction (gradient made in the forward) == ``"none"`` summed (recomputed in
    the backward), float weights as labels; and both equal the reference."""
    h0, w0, _, th, tw, _ = _fused_inputs((4, 6))
    labels = _labels("float", (4, 6), seed=5)
    z0 = h0 @ w0.T
    got = []
    for reduction in ("sum", "none"):
        if path == "fused":
            h, w = _on(device, h0, w0, grad=True)
            thd, twd, ld = _on(device, th, tw, labels)
            loss = fused_linear_eaopd_loss(h, w, teacher_hidden=thd, teacher_weight=twd,
                                           labels=ld, reduction=reduction, chunk_size=5)
            grads = (h, w)
        else:
            (z,) = _on(device, z0, grad=True)
            yd, ld = _on(device, th @ tw.T, labels)
            loss = entropy_aware_opd_loss(z, yd, labels=ld, reduction=reduction, chunk_size=5)
            grads = (z,)
        loss = loss.sum() if reduction == "none" else loss
        loss.backward()
        got.append((_cpu(loss), *(_cpu(t.grad) for t in grads)))
    for a, b in zip(*got, strict=True):
        close(a, b)
    if path == "fused":
        hr, wr = _leaf(h0, w0)
        ref = reference_eaopd_loss(hr @ wr.T, th @ tw.T, labels=labels, reduction="sum")
        want = (hr, wr)
    else:
        (zr,) = _leaf(z0)
        ref = reference_eaopd_loss(zr, th @ tw.T, labels=labels, reduction="sum")
        want = (zr,)
    ref.backward()
    close(got[0][0], _cpu(ref))
    for g, t in zip(got[0][1:], want, strict=True):
        close(g, t.grad)


def test_neg_inf_columns(device):
    """Columns ``-inf`` in student and teacher (a padded vocabulary) contribute nothing:
    loss and gradients equal the reference on the finite columns; zero gradient on the
    padding. Logits in, and fused with a ``-inf`` student bias and teacher logits."""
    real = WIDE_V - 5
    z0, y = _logits((2, 4), WIDE_V, seed=11)
    z0[..., real:] = float("-inf")
    y[..., real:] = float("-inf")
    kw = dict(temperature=0.9, h_max=2.0)  # h_max fixed: its default log(V) counts columns

    (z,) = _on(device, z0, grad=True)
    (yd,) = _on(device, y)
    loss = entropy_aware_opd_loss(z, yd, chunk_size=3, **kw)
    loss.backward()
    (zr,) = _leaf(z0[..., :real])
    ref = reference_eaopd_loss(zr, y[..., :real], **kw)
    ref.backward()
    close(_cpu(loss), _cpu(ref))
    close(_cpu(z.grad)[..., :real], zr.grad)
    assert (_cpu(z.grad)[..., real:] == 0).all()

    h0, w0, b0, th, tw, _ = _fused_inputs((2, 4))
    b0[real:] = float("-inf")
    t_logits = th @ tw.T
    t_logits[..., real:] = float("-inf")
    h, w, b = _on(device, h0, w0, b0, grad=True)
    (tld,) = _on(device, t_logits)
    loss = fused_linear_eaopd_loss(h, w, student_bias=b, teacher_logits=tld, chunk_size=3,
                                   reduction="sum", **kw)
    loss.backward()
    hr, wr, br = _leaf(h0, w0[:real], b0[:real])
    ref = reference_eaopd_loss(hr @ wr.T + br, t_logits[..., :real], reduction="sum", **kw)
    ref.backward()
    close(_cpu(loss), _cpu(ref))
    close(_cpu(h.grad), hr.grad)
    close(_cpu(w.grad)[:real], wr.grad)
    close(_cpu(b.grad)[:real], br.grad)
    assert (_cpu(w.grad)[real:] == 0).all() and (_cpu(b.grad)[real:] == 0).all()


# ----------------------------------------------------------------------- bf16


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_bf16_fused_against_fp32_reference(device, reduction):
    """bf16 student and teacher (hidden, weight, bias) ``(4, 16, 32)``, V = 2053, against
    the float32 reference on the same bf16 values: bf16 rounding of the logits allows a
    few per cent; the gradients come back in bf16."""
    h0, w0, b0, th, tw, tb = _fused_inputs((4, 16), hid=32, t_hid=24, dtype=torch.bfloat16)
    h, w, b = _on(device, h0, w0, b0, grad=True)
    thd, twd, tbd = _on(device, th, tw, tb)
    loss = fused_linear_eaopd_loss(h, w, student_bias=b, teacher_hidden=thd,
                                   teacher_weight=twd, teacher_bias=tbd, reduction=reduction,
                                   chunk_size=8)
    hr, wr, br = _leaf(h0.float(), w0.float(), b0.float())
    ref = reference_eaopd_loss(hr @ wr.T + br, th.float() @ tw.float().T + tb.float(),
                               reduction=reduction)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(_cpu(loss), _cpu(ref), rtol=3e-2, atol=3e-2)
    loss.backward(_grad_out(loss).to(device))
    ref.backward(_grad_out(ref))
    for got, want in ((h.grad, hr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert got.dtype == torch.bfloat16 and got.device.type == device.type
        got = _cpu(got).float()
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0)
        assert cos > 0.995, cos
        assert (got - want).norm() <= 0.05 * want.norm()


def test_bf16_logits_against_fp32_reference(device):
    """bf16 logits ``(3, 7, 2053)``: the loss is computed in float32, so it matches the
    float32 reference on the upcast logits at float32 tolerance; the gradient is that
    float32 gradient rounded to bf16."""
    z0, y = (t.bfloat16() for t in _logits((3, 7), WIDE_V, seed=13))
    (z,) = _on(device, z0, grad=True)
    (yd,) = _on(device, y)
    loss = entropy_aware_opd_loss(z, yd, temperature=0.8, chunk_size=4)
    loss.backward()
    (zr,) = _leaf(z0.float())
    ref = reference_eaopd_loss(zr, y.float(), temperature=0.8)
    ref.backward()
    assert z.grad.dtype == torch.bfloat16
    close(_cpu(loss), _cpu(ref), rtol=1e-4)
    close(_cpu(z.grad).float(), zr.grad, rtol=1e-2)


# ----------------------------------------------------------------------- compile


def _compile_step(device, n: int, reduction: str, chunk: int, path: str) -> None:
    g = _gen(n)
    if path == "fused":
        h, w = _on(device, torch.randn(n, 16, generator=g), torch.randn(300, 16, generator=g),
                   grad=True)
        th, tw = _on(device, torch.randn(n, 12, generator=g), torch.randn(300, 12, generator=g))
        loss = fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw,
                                       temperature=0.9, reduction=reduction, chunk_size=chunk)
    else:
        (z,) = _on(device, torch.randn(n, 300, generator=g), grad=True)
        (y,) = _on(device, torch.randn(n, 300, generator=g))
        loss = entropy_aware_opd_loss(z, y, temperature=0.9, reduction=reduction,
                                      chunk_size=chunk)
    loss.sum().backward()


def test_no_recompilation_as_lengths_change(device):
    """After one warm-up length, 5 more lengths (and chunk sizes) make no new graph of
    the loss's kernels, on either path and in either gradient mode; no warning at all."""
    torch._dynamo.reset()
    modes = list(itertools.product(("fused", "logits"), ("sum", "none")))
    for path, reduction in modes:
        _compile_step(device, 40, reduction, 16, path)
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (1, 3, 17, 64, 129):
            for path, reduction in modes:
                _compile_step(device, n, reduction, 16 if n % 2 else 32, path)
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])


@pytest.mark.parametrize("device", ["cuda"], indirect=True)
def test_topk_float32_peaked_teacher_and_mask_fingerprint(device):
    """CUDA only (the CPU runs these in test_topk.py / test_parallel.py): the compiled
    top-k kernels, whose per-token sums run in float64, on float32 inputs of a peaked
    teacher in every topk_tail mode against the float64 formula computed on the CPU (loss
    and gradient, rtol 1e-5); and the TP mask fingerprint's hashes (int64 arithmetic) bit
    for bit as on the CPU."""
    assert torch.equal(position_hashes(1000, device).cpu(), position_hashes(1000))
    w = (torch.rand(1000, generator=_gen(1)) > 0.5).float()
    assert mask_fingerprint(w.to(device), 1000) == mask_fingerprint(w, 1000)
    g = _gen(2)
    n, vocab, k = 64, WIDE_V, 8
    scale = torch.linspace(3, 9, n, dtype=torch.float64)[:, None]
    lp, ids = served(torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale, k, g)
    lp = lp.float()
    z = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2).float()
    for tail in ("bucket", "renormalize", "truncate"):
        zf = z.double().requires_grad_()
        want = formula(zf, ids, lp.double(), topk_tail=tail)
        want.sum().backward()
        zg = z.to(device, copy=True).requires_grad_()
        loss = entropy_aware_opd_loss(zg, teacher_topk_logprobs=lp.to(device),
                                      teacher_topk_indices=ids.to(device), topk_tail=tail,
                                      reduction="none", chunk_size=16)
        loss.sum().backward()
        close(loss.double().cpu(), want.detach(), msg=f"{tail}: ")
        close(zg.grad.double().cpu(), zf.grad, msg=f"{tail} grad: ")


# ----------------------------------------------------------------------- vocab parallel

TP_WORLD = 2
TP_WIDTH = 1031  # columns per rank; the real vocabulary may end inside the last shard


def _tp_data(seed: int):
    """Full-size CPU tensors, the same on every rank: ``h (3, 4, 16)``, ``w (2 * 1031,
    16)``, ``b``, teacher ``th (3, 4, 12)``, ``tw``, labels ``(3, 4)``."""
    g = _gen(seed)
    v = TP_WORLD * TP_WIDTH
    h = torch.randn(3, 4, 16, generator=g)
    w = torch.randn(v, 16, generator=g) * 0.75
    b = torch.randn(v, generator=g)
    th = torch.randn(3, 4, 12, generator=g)
    tw = torch.randn(v, 12, generator=g)
    labels = (torch.rand(3, 4, generator=g) > 0.3).float()
    return h, w, b, th, tw, labels


# (reduction, vocab_size (None: all columns), bias, teacher form, mask, gate)
TP_CASES = [
    ("batchmean", None, False, "linear", False, GATES[0]),
    ("none", 2 * TP_WIDTH - 7, True, "linear", True, GATES[1]),
    ("sum", None, True, "logits", True, GATES[2]),
    ("mean", 2 * TP_WIDTH - 3, False, "logits", False, GATES[3]),
]


def _tp_fused_case(rank, device, group, reduction, vocab_size, bias, teacher, mask, gate):
    h0, w0, b0, th, tw, labels = _tp_data(seed=len(reduction))
    real = vocab_size or w0.shape[0]
    cols = slice(rank * TP_WIDTH, (rank + 1) * TP_WIDTH)
    labels = labels if mask else None
    kw = dict(labels=labels, temperature=0.9, reduction=reduction, **gate)
    h, w, b = _on(device, h0, w0[cols], b0[cols], grad=True)
    thd, twd, ld = _on(device, th, tw[cols], labels)
    t_kw = dict(teacher_hidden=thd, teacher_weight=twd) if teacher == "linear" else \
        dict(teacher_logits=_on(device, (th @ tw.T)[..., cols])[0])
    loss = fused_linear_vocab_parallel_eaopd_loss(
        h, w, student_bias=b if bias else None, tp_group=group, vocab_size=vocab_size,
        chunk_size=5, **t_kw, **{**kw, "labels": ld})
    loss.backward(_grad_out(loss).to(device))

    hr, wr, br = _leaf(h0, w0[:real], b0[:real])
    ref = reference_eaopd_loss(hr @ wr.T + (br if bias else 0), (th @ tw.T)[..., :real], **kw)
    ref.backward(_grad_out(ref))
    tag = f"[rank {rank} fused {reduction} V={vocab_size} bias={bias} {teacher} {gate}] "
    close(_cpu(loss), _cpu(ref), msg=tag)
    close(_cpu(h.grad), hr.grad, msg=tag + "grad h ")
    want_w = torch.zeros_like(w0)
    want_w[:real] = wr.grad
    close(_cpu(w.grad), want_w[cols], msg=tag + "grad W ")
    if bias:
        want_b = torch.zeros_like(b0)
        want_b[:real] = br.grad
        close(_cpu(b.grad), want_b[cols], msg=tag + "grad b ")


def _tp_logits_case(rank, device, group, reduction, vocab_size, mask, gate):
    h0, w0, _, th, tw, labels = _tp_data(seed=10 + len(reduction))
    real = vocab_size or w0.shape[0]
    cols = slice(rank * TP_WIDTH, (rank + 1) * TP_WIDTH)
    z_full, y_full = h0 @ w0.T, th @ tw.T
    labels = labels if mask else None
    kw = dict(labels=labels, temperature=1.1, reduction=reduction, **gate)
    (z,) = _on(device, z_full[..., cols], grad=True)
    yd, ld = _on(device, y_full[..., cols], labels)
    loss = vocab_parallel_eaopd_loss(z, yd, tp_group=group, vocab_size=vocab_size,
                                     chunk_size=3, **{**kw, "labels": ld})
    loss.backward(_grad_out(loss).to(device))
    (zr,) = _leaf(z_full[..., :real])
    ref = reference_eaopd_loss(zr, y_full[..., :real], **kw)
    ref.backward(_grad_out(ref))
    tag = f"[rank {rank} logits {reduction} V={vocab_size} {gate}] "
    close(_cpu(loss), _cpu(ref), msg=tag)
    want = torch.zeros_like(z_full)
    want[..., :real] = zr.grad
    close(_cpu(z.grad), want[..., cols], msg=tag + "grad z ")


def _tp_worker(rank: int, world: int, backend: str, port: int, compile_: bool) -> None:
    os.environ["EAOPD_COMPILE"] = "1" if compile_ else "0"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        torch.set_float32_matmul_precision("highest")
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        for reduction, vocab_size, bias, teacher, mask, gate in TP_CASES:
            _tp_fused_case(rank, device, group, reduction, vocab_size, bias, teacher, mask,
                           gate)
            _tp_logits_case(rank, device, group, reduction, vocab_size, mask, gate)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_vocab_parallel_parity(backend):
    """TP=2 on two processes: the fused and logits-in vocab-parallel losses against the
    single-device reference, every gate and reduction, a real vocabulary ending inside
    the last shard. ``nccl``: one GPU per rank, compiled kernels; ``gloo``: CPU, eager
    kernels (the compiled CPU kernels under TP are tests/test_parallel.py's)."""
    if backend == "nccl":
        _require("cuda")
        if torch.cuda.device_count() < TP_WORLD:
            pytest.skip(f"NCCL parity needs {TP_WORLD} GPUs; "
                        f"torch.cuda.device_count() = {torch.cuda.device_count()}")
        if not dist.is_nccl_available():
            pytest.fail("two GPUs but torch.distributed has no NCCL backend")
    mp.spawn(_tp_worker, args=(TP_WORLD, backend, _free_port(), backend == "nccl"),
             nprocs=TP_WORLD, join=True)
