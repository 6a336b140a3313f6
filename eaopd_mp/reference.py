"""The eager reference: the reference definition of the loss, written with plain autograd.

The reference definition is the function whose semantics the library follows (argument
names, the ``labels`` mask, the temperature on both sides, the four reductions and their
divisors): ``entropy_aware_opd_loss(student_logits, teacher_logits, *, labels=None,
h_max=None, temperature=1.0, reduction="batchmean")``, a clean-room implementation of the
entropy-aware OPD paper's pseudocode. This module is the library's eager copy of it, line
for line, plus the gates of :mod:`eaopd_mp.gates` and two deliberate differences, where
the reference definition returns NaN: a vocabulary column that is ``-inf`` for both
student and teacher contributes nothing (``0 * (-inf - -inf)``), and a KL term whose gate
weight is exactly 0 contributes exactly 0 to the loss and to its gradient, even where that
KL is infinite (``0 * inf``; for example the reverse KL of a one-hot teacher under
``gate="fixed", fkl_weight=1``).
It materialises the full ``(tokens, V)`` float32 tensors: use it to check the fast paths
and as the "naive" baseline in benchmarks, not for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gates import gate_weights, resolve_gate


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _weighted_kl(w: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``w * KL(a || b)`` over the last dim from log-probabilities ``(..., V)``, ``w``
    ``(...)``. Columns where ``a`` has no mass, and whole rows where ``w == 0``, are
    dropped *before* the difference, so neither the value nor autograd's gradient ever
    sees ``0 * inf``; an infinite KL with ``w > 0`` stays ``+inf``."""
    a = log_a.exp()
    keep = (a != 0) & (w != 0)[..., None]
    return w * (a * torch.where(keep, log_a - log_b, torch.zeros_like(log_a))).sum(-1)


def reference_eaopd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    h_max: float | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    gate: str = "linear",
    gate_threshold: float | None = None,
    fkl_coef: float | None = None,
    fkl_weight: float | None = None,
) -> torch.Tensor:
    """Eager float32 loss with autograd through ``log_softmax``; the reference definition's API.

    Returns the reduced loss, or the ``(...)`` per-token loss for ``reduction="none"``.
    """
    vocab = student_logits.shape[-1]
    g = resolve_gate(gate, vocab, h_max=h_max, gate_threshold=gate_threshold,
                     fkl_coef=fkl_coef, fkl_weight=fkl_weight)
    z, y = student_logits.float(), teacher_logits.detach().float()
    s = F.log_softmax(z / temperature, dim=-1)
    t = F.log_softmax(y / temperature, dim=-1)
    u = F.log_softmax(y, dim=-1)
    entropy = -(u.exp() * _finite(u)).sum(-1)
    a, b = (x.reshape(entropy.shape) for x in gate_weights(entropy.reshape(-1), g.kind,
                                                           g.p1, g.p2))
    per_token = _weighted_kl(a, t, s) + _weighted_kl(b, s, t)
    if labels is not None:
        per_token = per_token * labels.float()
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / max(1, per_token.numel())
    if reduction == "batchmean":
        return per_token.sum() / max(1, per_token.shape[0] if per_token.dim() else 1)
    raise ValueError(f"unknown reduction: {reduction!r}")
