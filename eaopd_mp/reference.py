"""The eager reference: the seed's loss written with plain autograd.

This is the specification (``shared/seed``) line for line, plus the gates of
:mod:`eaopd_mp.gates` and one deliberate difference: a vocabulary column that is
``-inf`` for both student and teacher contributes nothing (the seed returns NaN there).
It materialises the full ``(tokens, V)`` float32 tensors: use it to check the fast paths
and as the "naive" baseline in benchmarks, not for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gates import gate_weights, resolve_gate


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


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
    """Eager float32 loss with autograd through ``log_softmax``; same API as the seed.

    Returns the reduced loss, or the ``(...)`` per-token loss for ``reduction="none"``.
    """
    vocab = student_logits.shape[-1]
    g = resolve_gate(gate, vocab, h_max=h_max, gate_threshold=gate_threshold,
                     fkl_coef=fkl_coef, fkl_weight=fkl_weight)
    z, y = student_logits.float(), teacher_logits.detach().float()
    s = F.log_softmax(z / temperature, dim=-1)
    t = F.log_softmax(y / temperature, dim=-1)
    p, q = s.exp(), t.exp()
    # where(...) on the difference keeps 0 * (-inf - -inf) out of values and gradients.
    kl_fwd = (q * torch.where(q > 0, t - s, torch.zeros_like(s))).sum(-1)
    kl_rev = (p * torch.where(p > 0, s - t, torch.zeros_like(s))).sum(-1)
    u = F.log_softmax(y, dim=-1)
    entropy = -(u.exp() * _finite(u)).sum(-1)
    a, b = gate_weights(entropy.reshape(-1), g.kind, g.p1, g.p2)
    per_token = a.reshape(entropy.shape) * kl_fwd + b.reshape(entropy.shape) * kl_rev
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
