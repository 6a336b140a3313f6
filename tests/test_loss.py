"""Parity of the logits-in and fused paths with the eager reference (fp32, bf16, fp64)."""

from __future__ import annotations

import itertools

import pytest
import torch

import formulas
from eaopd_mp import (
    EntropyAwareOPDLoss,
    FusedLinearEAOPDLoss,
    entropy_aware_opd_loss,
    fused_linear_eaopd_loss,
    reference_eaopd_loss,
    teacher_entropy,
)

REDUCTIONS = ["batchmean", "sum", "mean", "none"]


def _mask(kind, shape):
    if kind is None:
        return None
    if kind == "binary":
        m = (torch.rand(shape) > 0.35).float()
        m.view(-1)[0] = 1.0
        return m
    return torch.rand(shape) * (torch.rand(shape) > 0.3)  # float weights, some zero


_close = formulas.close


def _backward(loss, seed=1):
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed)) \
        if loss.dim() else torch.tensor(0.7)
    loss.backward(g)


# ----------------------------------------------------------------------- reference itself


@pytest.mark.parametrize("tau", [1.0, 0.6, 2.0])
@pytest.mark.parametrize("gate", ["linear", "threshold", "fixed"])
def test_reference_matches_independent_formulas(tau, gate):
    z, y = torch.randn(4, 6, 37) * 3, torch.randn(4, 6, 37) * 2
    extra = {"h_max": 2.0} if gate == "linear" else {}
    mine = reference_eaopd_loss(z, y, temperature=tau, reduction="none", gate=gate, **extra)
    indep = formulas.per_token(z, y, temperature=tau, gate=gate, **extra)
    _close(mine.double(), indep, rtol=1e-5, atol=1e-6)


def test_teacher_entropy_matches_categorical():
    y = torch.randn(3, 5, 41) * 4
    _close(teacher_entropy(y), torch.distributions.Categorical(logits=y).entropy())
    assert teacher_entropy(y.bfloat16()).dtype == torch.bfloat16


# ----------------------------------------------------------------------- logits in


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask", [None, "binary", "float"])
@pytest.mark.parametrize("tau,h_max", [(1.0, None), (0.7, 1.3), (2.5, None)])
def test_logits_in_matches_reference(reduction, mask, tau, h_max):
    shape = (3, 7)
    z0, y = torch.randn(*shape, 53) * 3, torch.randn(*shape, 53) * 3
    labels = _mask(mask, shape)
    for chunk in (1, 5, None):
        z, zr = z0.clone().requires_grad_(), z0.clone().requires_grad_()
        kw = dict(labels=labels, h_max=h_max, temperature=tau, reduction=reduction)
        loss = entropy_aware_opd_loss(z, y, chunk_size=chunk, **kw)
        ref = reference_eaopd_loss(zr, y, **kw)
        _close(loss, ref)
        _backward(loss)
        _backward(ref)
        _close(z.grad, zr.grad)


def test_logits_in_matches_independent_formula_float64():
    z, y = torch.randn(2, 9, 31, dtype=torch.float64) * 3, torch.randn(2, 9, 31).double()
    labels = _mask("binary", (2, 9))
    loss = entropy_aware_opd_loss(z, y, labels=labels, temperature=0.8, reduction="sum")
    _close(loss, formulas.reduce(formulas.per_token(z, y, temperature=0.8), labels, "sum"),
           rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------- fused


def _fused_inputs(n_shape=(3, 5), hid=12, t_hid=9, vocab=41, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(*n_shape, hid, generator=g).to(dtype)
    w = (torch.randn(vocab, hid, generator=g) / hid**0.5 * 3).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype)
    th = torch.randn(*n_shape, t_hid, generator=g).to(dtype)
    tw = (torch.randn(vocab, t_hid, generator=g) / t_hid**0.5 * 3).to(dtype)
    tb = torch.randn(vocab, generator=g).to(dtype)
    return h, w, b, th, tw, tb


CASES = list(itertools.product(
    REDUCTIONS, [False, True], ["linear", "logits"], [None, "binary"], [1.0, 0.8],
))


@pytest.mark.parametrize("reduction,bias,teacher,mask,tau", CASES)
def test_fused_matches_reference(reduction, bias, teacher, mask, tau):
    h0, w0, b0, th, tw, tb = _fused_inputs()
    labels = _mask(mask, h0.shape[:-1])
    t_logits = th @ tw.T + tb
    for chunk in (2, 7, None):
        h, w, b = (x.clone().requires_grad_() for x in (h0, w0, b0))
        hr, wr, br = (x.clone().requires_grad_() for x in (h0, w0, b0))
        kw = dict(labels=labels, temperature=tau, reduction=reduction)
        t_kw = dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb) \
            if teacher == "linear" else dict(teacher_logits=t_logits)
        loss = fused_linear_eaopd_loss(h, w, student_bias=b if bias else None,
                                       chunk_size=chunk, **t_kw, **kw)
        ref = reference_eaopd_loss(hr @ wr.T + (br if bias else 0), t_logits, **kw)
        _close(loss, ref)
        _backward(loss)
        _backward(ref)
        _close(h.grad, hr.grad)
        _close(w.grad, wr.grad)
        if bias:
            _close(b.grad, br.grad)
        else:
            assert b.grad is None


def test_both_gradient_modes_agree():
    """reduction="none" (recompute in backward) summed == reduction="sum" (grad in forward)."""
    h0, w0, _, th, tw, _ = _fused_inputs((4, 6))
    labels = _mask("float", (4, 6))
    grads = []
    for reduction in ("sum", "none"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw,
                                       labels=labels, reduction=reduction, chunk_size=5)
        loss = loss.sum() if reduction == "none" else loss
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads, strict=True):
        _close(a, b)


def test_teacher_never_gets_gradient():
    h, w, b, th, tw, tb = (x.requires_grad_() for x in _fused_inputs())
    fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw,
                            teacher_bias=tb).backward()
    assert th.grad is None and tw.grad is None and tb.grad is None
    assert h.grad is not None and w.grad is not None


def test_frozen_weight_only_hidden_grad():
    h, w, _, th, tw, _ = _fused_inputs()
    h.requires_grad_()
    fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw).backward()
    assert h.grad is not None and w.grad is None


def test_no_grad_forward_equals_grad_forward():
    h, w, _, th, tw, _ = _fused_inputs()
    with torch.no_grad():
        a = fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw)
    b = fused_linear_eaopd_loss(h.requires_grad_(), w, teacher_hidden=th, teacher_weight=tw)
    _close(a, b.detach())


# ----------------------------------------------------------------------- bf16


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_bf16_against_fp32_reference(reduction):
    h0, w0, b0, th, tw, tb = _fused_inputs((4, 16), hid=32, t_hid=24, vocab=97,
                                           dtype=torch.bfloat16)
    h, w, b = (x.clone().requires_grad_() for x in (h0, w0, b0))
    loss = fused_linear_eaopd_loss(h, w, student_bias=b, teacher_hidden=th, teacher_weight=tw,
                                   teacher_bias=tb, reduction=reduction, chunk_size=8)
    hr, wr, br = (x.float().requires_grad_() for x in (h0, w0, b0))
    ref = reference_eaopd_loss(hr @ wr.T + br, th.float() @ tw.float().T + tb.float(),
                               reduction=reduction)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=3e-2)
    (loss.sum() if reduction == "none" else loss).backward()
    (ref.sum() if reduction == "none" else ref).backward()
    for got, want in ((h.grad, hr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert got.dtype == torch.bfloat16
        cos = torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), 0)
        assert cos > 0.995, cos
        assert (got.float() - want).norm() <= 0.05 * want.norm()


# ----------------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("gate", ["linear", "threshold", "fixed"])
def test_gradcheck_logits(eager, reduction, gate):
    z = (torch.randn(2, 3, 7, dtype=torch.float64) * 2).requires_grad_()
    y = torch.randn(2, 3, 7, dtype=torch.float64) * 2
    labels = torch.tensor([[1.0, 0.0, 0.5], [1.0, 1.0, 0.0]], dtype=torch.float64)

    def f(z):
        return entropy_aware_opd_loss(z, y, labels=labels, temperature=0.7, gate=gate,
                                      reduction=reduction, chunk_size=2)

    assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_fused(eager, reduction):
    h, w, b, th, tw, tb = (x.double() for x in _fused_inputs((2, 3), hid=4, t_hid=5, vocab=6))
    h, w, b = (x.requires_grad_() for x in (h, w, b))

    def f(h, w, b):
        return fused_linear_eaopd_loss(h, w, student_bias=b, teacher_hidden=th,
                                       teacher_weight=tw, teacher_bias=tb, temperature=1.3,
                                       reduction=reduction, chunk_size=4)

    assert torch.autograd.gradcheck(f, (h, w, b))


# ----------------------------------------------------------------------- edge cases


def test_masked_vocabulary_is_finite():
    """-inf in both student and teacher: the seed gives NaN, we give the loss without it."""
    z0, y = torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    z0[..., 7:] = float("-inf")
    y[..., 7:] = float("-inf")
    z = z0.clone().requires_grad_()
    loss = entropy_aware_opd_loss(z, y, temperature=0.9, h_max=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert (z.grad[..., 7:] == 0).all()
    zr = z0[..., :7].clone().requires_grad_()
    ref = reference_eaopd_loss(zr, y[..., :7], temperature=0.9, h_max=2.0)
    ref.backward()
    _close(loss, ref)
    _close(z.grad[..., :7], zr.grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_tokens_and_all_masked(reduction):
    h, w, _, th, tw, _ = _fused_inputs()
    for hid, thid, labels in ((h[:0], th[:0], None), (h, th, torch.zeros(h.shape[:-1]))):
        hid = hid.clone().requires_grad_()
        w_ = w.clone().requires_grad_()
        loss = fused_linear_eaopd_loss(hid, w_, teacher_hidden=thid, teacher_weight=tw,
                                       labels=labels, reduction=reduction)
        assert torch.isfinite(loss).all() and (loss == 0).all()
        loss.sum().backward()
        assert (hid.grad == 0).all() and (w_.grad == 0).all()


def test_vocab_of_one():
    z = torch.randn(3, 1, requires_grad=True)
    loss = entropy_aware_opd_loss(z, torch.randn(3, 1))
    loss.backward()
    assert loss.item() == 0.0 and (z.grad == 0).all()


def test_default_chunk_bounds_working_set():
    from eaopd_mp.driver import CHUNK_BYTES, default_chunk_size
    for vocab in (2, 1000, 32000, 151_936, 262_144):
        c = default_chunk_size(vocab)
        assert 16 <= c <= 4096 and c & (c - 1) == 0
        assert c * vocab * 4 <= CHUNK_BYTES or c == 16


# ----------------------------------------------------------------------- modules and stats


def test_modules_equal_functions():
    h, w, b, th, tw, _ = _fused_inputs()
    mod = FusedLinearEAOPDLoss(temperature=0.9, reduction="sum")
    _close(mod(h, w, student_bias=b, teacher_hidden=th, teacher_weight=tw),
           fused_linear_eaopd_loss(h, w, student_bias=b, teacher_hidden=th, teacher_weight=tw,
                                   temperature=0.9, reduction="sum"))
    z, y = h @ w.T, th @ tw.T
    _close(EntropyAwareOPDLoss(h_max=1.5)(z, y), reference_eaopd_loss(z, y, h_max=1.5))
    assert "temperature=0.9" in repr(mod)


def test_return_stats_are_masked_means():
    z, y = torch.randn(3, 8, 29) * 2, torch.randn(3, 8, 29) * 2
    labels = _mask("binary", (3, 8))
    loss, stats = entropy_aware_opd_loss(z.requires_grad_(), y, labels=labels, h_max=2.0,
                                         return_stats=True)
    m = labels.bool()
    s, t = torch.log_softmax(z.detach(), -1), torch.log_softmax(y, -1)
    ent = torch.distributions.Categorical(logits=y).entropy()
    _close(stats["teacher_entropy"], ent[m].mean())
    _close(stats["fkl_weight"], (ent / 2.0).clamp(0, 1)[m].mean())
    _close(stats["kl_fwd"], (t.exp() * (t - s)).sum(-1)[m].mean())
    _close(stats["kl_rev"], (s.exp() * (s - t)).sum(-1)[m].mean())
    assert stats["tokens"].item() == m.sum().item()
    assert stats["gate"] == "linear" and stats["h_max"] == 2.0
    assert all(not v.requires_grad for v in stats.values() if isinstance(v, torch.Tensor))
    assert loss.requires_grad


def test_non_contiguous_inputs():
    h0 = torch.randn(7, 3, 10).transpose(0, 1)  # (3, 7, 10), not contiguous
    w0 = torch.randn(10, 23).t()  # (23, 10), not contiguous
    th, tw = torch.randn(3, 7, 6), torch.randn(23, 6)
    h, w = h0.requires_grad_(), w0.requires_grad_()  # leaves with strided layouts
    hr = h0.detach().contiguous().requires_grad_()
    wr = w0.detach().contiguous().requires_grad_()
    loss = fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw, chunk_size=4)
    ref = reference_eaopd_loss(hr @ wr.T, th @ tw.T)
    loss.backward()
    ref.backward()
    assert not h.is_contiguous() and not w.is_contiguous()
    _close(loss, ref)
    _close(h.grad, hr.grad)
    _close(w.grad, wr.grad)


def test_bf16_teacher_with_fp32_student():
    z = torch.randn(4, 5, 31, requires_grad=True)
    y = (torch.randn(4, 5, 31) * 2).bfloat16()
    zr = z.detach().clone().requires_grad_()
    loss = entropy_aware_opd_loss(z, y, temperature=0.9)
    ref = reference_eaopd_loss(zr, y.float(), temperature=0.9)
    loss.backward()
    ref.backward()
    _close(loss, ref)
    _close(z.grad, zr.grad)
    assert z.grad.dtype == torch.float32


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_token_without_batch_dims(reduction):
    z, y = torch.randn(13, requires_grad=True), torch.randn(13)
    zr = z.detach().clone().requires_grad_()
    loss = entropy_aware_opd_loss(z, y, reduction=reduction)
    ref = reference_eaopd_loss(zr, y, reduction=reduction)
    assert loss.shape == ()
    loss.backward()
    ref.backward()
    _close(loss, ref)
    _close(z.grad, zr.grad)


@pytest.mark.parametrize("inv_tau", [1.0, 0.5])
def test_a_shard_with_no_finite_column_adds_nothing(eager, inv_tau):
    """Under tensor parallelism a token's row can be all -inf on one rank's columns (a
    masked vocabulary range) and finite on another's. That shard's partial statistics
    must say "no mass here" (log-sum-exps -inf, sums 0), never NaN, and the combined
    statistics must be those of the whole row; the same with the row all -inf for the
    student only, or for the teacher only (an infinite KL, not NaN)."""
    from eaopd_mp import core

    gen = torch.Generator().manual_seed(5)
    z, y = torch.randn(4, 12, generator=gen) * 2, torch.randn(4, 12, generator=gen) * 2
    z[0, 6:] = y[0, 6:] = float("-inf")   # shard 1 holds nothing of token 0
    z[1, :6] = y[1, :6] = float("-inf")   # shard 0 holds nothing of token 1
    z[2, 6:] = float("-inf")              # the student has no mass on shard 1
    y[3, :6] = float("-inf")              # the teacher has none on shard 0
    params = torch.tensor([inv_tau, 0.3, 0.0])
    untempered = inv_tau == 1.0
    shards = [core.partial_stats(z[:, c], y[:, c], params, untempered)
              for c in (slice(0, 6), slice(6, 12))]
    assert not any(torch.isnan(s).any() for s in shards)
    assert (shards[1][0, :3] == float("-inf")).all() and (shards[1][0, 3:] == 0).all()
    assert (shards[0][1, :3] == float("-inf")).all() and (shards[0][1, 3:] == 0).all()
    combined = core.combine_stats(torch.stack(shards), params, "linear")
    whole = core.single_stats(z, y, params, "linear", untempered)
    formulas.close(combined, whole)
    assert combined[2, core.KL_FWD] == float("inf") and combined[3, core.KL_REV] == float("inf")
    assert torch.isfinite(combined[:2]).all()
