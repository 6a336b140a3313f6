"""Property tests (hypothesis): non-negativity, identity, gate range, chunk invariance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eaopd_mp import entropy_aware_opd_loss, fused_linear_eaopd_loss
from formulas import close

pytestmark = pytest.mark.usefixtures("eager")  # properties of the maths; compile tested apart

shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 40))
temps = st.floats(0.25, 4.0)
scales = st.floats(0.1, 8.0)


def _logits(seed, shape, scale):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), shape=shapes, tau=temps, scale=scales,
       gate=st.sampled_from(["linear", "threshold", "fixed"]))
def test_nonnegative_and_gate_in_range(seed, shape, tau, scale, gate):
    z, y = _logits(seed, shape, scale)
    loss, stats = entropy_aware_opd_loss(z, y, temperature=tau, gate=gate, reduction="none",
                                         return_stats=True)
    assert (loss >= 0).all() and torch.isfinite(loss).all()
    assert 0.0 <= stats["fkl_weight"] <= (1.0 if gate != "threshold" else 1.0 + 1e-6)
    assert 0.0 <= stats["rkl_weight"] <= 1.0
    assert stats["teacher_entropy"] <= torch.log(torch.tensor(float(shape[-1]))) + 1e-5


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), shape=shapes, tau=temps, scale=scales)
def test_zero_when_student_equals_teacher(seed, shape, tau, scale):
    z, _ = _logits(seed, shape, scale)
    zg = z.clone().requires_grad_()
    loss = entropy_aware_opd_loss(zg, z, temperature=tau, reduction="sum")
    loss.backward()
    assert abs(loss.item()) <= 1e-5 * shape[0] * shape[1]
    assert zg.grad.abs().max() <= 1e-5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 30), c1=st.integers(1, 32),
       c2=st.integers(1, 32), reduction=st.sampled_from(["sum", "none"]))
def test_invariant_to_chunk_size(seed, n, c1, c2, reduction):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(n, 6, generator=g), torch.randn(17, 6, generator=g)
    th, tw = torch.randn(n, 5, generator=g), torch.randn(17, 5, generator=g)
    out = []
    for c in (c1, c2):
        hg = h.clone().requires_grad_()
        loss = fused_linear_eaopd_loss(hg, w, teacher_hidden=th, teacher_weight=tw,
                                       chunk_size=c, reduction=reduction)
        loss.sum().backward()
        out.append((loss.detach(), hg.grad))
    for a, b in zip(out[0], out[1], strict=True):
        close(a, b)
