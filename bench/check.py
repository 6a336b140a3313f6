"""The exact answer for a case, and how far an implementation is from it.

The reference is ``eaopd_mp.reference_eaopd_loss`` (eager, float32, autograd) applied
chunk by chunk: the loss is a sum over tokens, so summing per-chunk losses and
back-propagating each chunk is exact while holding only ``(chunk, V)`` at a time. Its
inputs are the case's inputs cast to float32, so for bf16 the error includes the
rounding of the bf16 logits.
"""

from __future__ import annotations

import torch
from cases import Inputs
from impls import Outputs

import eaopd_mp

# Tokens per reference chunk: a (chunk, V) float32 tensor of about this many bytes (the
# eager reference holds ~20 of them).
REFERENCE_CHUNK_BYTES = 64 * 2**20


def reference_chunk(vocab: int) -> int:
    """A power of two between 16 and 4096 tokens."""
    chunk = 16
    while chunk < 4096 and 2 * chunk * vocab * 4 <= REFERENCE_CHUNK_BYTES:
        chunk *= 2
    return chunk


@torch.no_grad()
def reference_outputs(x: Inputs) -> Outputs:
    """Loss (``batchmean`` over flat tokens) and float32 gradients of the reference."""
    chunk = reference_chunk(x.ws.shape[0])
    hs, ws = x.hs.detach().float(), x.ws.detach().float()
    ht, wt = x.ht.float(), x.wt.float()
    n = hs.shape[0]
    grad_h = torch.empty_like(hs)
    grad_w = torch.zeros_like(ws)
    total = 0.0
    for lo in range(0, n, chunk):
        h = hs[lo : lo + chunk]
        with torch.enable_grad():
            z = (h @ ws.t()).requires_grad_()
            loss = eaopd_mp.reference_eaopd_loss(z, ht[lo : lo + chunk] @ wt.t(),
                                                 reduction="sum") / n
            (grad_z,) = torch.autograd.grad(loss, z)
        total += float(loss)
        grad_h[lo : lo + chunk] = grad_z @ ws
        grad_w.addmm_(grad_z.t(), h)
    return Outputs(total, grad_h, grad_w)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def errors(out: Outputs, ref: Outputs) -> dict[str, float | None]:
    """``loss_rel_err`` and ``grad_rel_err`` (the worse of the hidden and weight grads).

    Gradients are compared on the rows the output holds (a shard under TP).
    """
    res: dict[str, float | None] = {"loss_rel_err": None, "grad_rel_err": None}
    if out.loss is not None:
        res["loss_rel_err"] = abs(out.loss - ref.loss) / max(abs(ref.loss), 1e-30)
    if out.grad_h is not None and out.grad_w is not None:
        rows = out.weight_rows or slice(None)
        res["grad_rel_err"] = max(_rel(out.grad_h, ref.grad_h),
                                  _rel(out.grad_w, ref.grad_w[rows]))
    return res
