"""Independent formulas for the tests: torch.nn.functional.kl_div and Categorical."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import Categorical


def gated_kl(w, log_a, log_b):
    """``w * KL(a || b)`` per row with ``F.kl_div`` over the columns where ``a`` has mass,
    from ``(..., V)`` log-probabilities; ``w``: ``(...)``.

    A row of weight exactly 0 is 0 with a zero gradient: its columns are dropped before
    ``kl_div`` sees them, so autograd never meets ``0 * inf`` (an infinite KL, ``b = 0``
    where ``a > 0``, stays ``+inf`` where ``w > 0``).
    """
    keep = (log_a.exp() != 0) & (torch.as_tensor(w) != 0)[..., None]
    zero = torch.zeros_like(log_a)
    terms = F.kl_div(torch.where(keep, log_b, zero), torch.where(keep, log_a, zero),
                     log_target=True, reduction="none")
    return w * terms.sum(-1)


def gate_weights(entropy, vocab, *, gate="linear", h_max=None, gate_threshold=0.8,
                 fkl_coef=1.0, fkl_weight=0.5):
    """The ``(a, b)`` weights of forward and reverse KL, from the README's table."""
    if gate == "linear":
        h = math.log(vocab) if h_max is None else h_max
        a = (entropy / h).clamp(0, 1)
        return a, 1 - a
    if gate == "threshold":
        return fkl_coef * (entropy >= gate_threshold).double(), torch.ones_like(entropy)
    return torch.full_like(entropy, fkl_weight), torch.full_like(entropy, 1 - fkl_weight)


def per_token(z, y, *, temperature=1.0, **gate):
    """Per-token loss written from the definitions, in float64 (no eaopd_mp code).

    ``gate``: ``gate=`` and its parameters (``h_max``, ``gate_threshold``, ``fkl_coef``,
    ``fkl_weight``) as :func:`gate_weights` takes them.
    """
    z, y = z.double(), y.double()
    s = F.log_softmax(z / temperature, dim=-1)
    t = F.log_softmax(y / temperature, dim=-1)
    a, b = gate_weights(Categorical(logits=y).entropy(), z.shape[-1], **gate)  # untempered
    return gated_kl(a, t, s) + gated_kl(b, s, t)  # KL(teacher||student), KL(student||teacher)


def reduce(per_tok, labels=None, reduction="batchmean"):
    """The seed's reductions on a per-token loss."""
    if labels is not None:
        per_tok = per_tok * labels.double()
    if reduction == "none":
        return per_tok
    if reduction == "sum":
        return per_tok.sum()
    if reduction == "mean":
        return per_tok.sum() / max(1, per_tok.numel())
    return per_tok.sum() / max(1, per_tok.shape[0])


def close(a, b, rtol=1e-5, atol=1e-6, msg=""):
    """assert_close with rtol per element plus rtol of the tensor's scale.

    Gradients are sums over tokens or vocabulary whose float32 summation order differs
    between implementations; the scale term keeps rtol meaningful for entries near 0.
    """
    scale = b.detach().abs().max().item() if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol + rtol * scale,
                               msg=(lambda m: msg + m) if msg else None)
