"""Independent formulas for the tests: torch.nn.functional.kl_div and Categorical."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Categorical


def per_token(z, y, *, temperature=1.0, gate="linear", h_max=None, gate_threshold=0.8,
              fkl_coef=1.0, fkl_weight=0.5):
    """Per-token loss written from the definitions, in float64 (no eaopd_mp code)."""
    z, y = z.double(), y.double()
    s = F.log_softmax(z / temperature, dim=-1)
    t = F.log_softmax(y / temperature, dim=-1)
    kl_fwd = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # KL(teacher||student)
    kl_rev = F.kl_div(t, s, log_target=True, reduction="none").sum(-1)  # KL(student||teacher)
    entropy = Categorical(logits=y).entropy()  # untempered teacher
    if gate == "linear":
        h = torch.log(torch.tensor(float(z.shape[-1]), dtype=torch.float64)) if h_max is None \
            else h_max
        w = (entropy / h).clamp(0, 1)
        return w * kl_fwd + (1 - w) * kl_rev
    if gate == "threshold":
        return kl_rev + fkl_coef * (entropy >= gate_threshold).double() * kl_fwd
    return fkl_weight * kl_fwd + (1 - fkl_weight) * kl_rev


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
