"""The EAOPD loss written on Liger Kernel's fused-linear distillation base class.

``LigerFusedLinearDistillationBase`` (``liger_kernel.chunked_loss``) walks the tokens in
chunks, makes each chunk's logits with ``hidden @ weight.T``, and differentiates a
per-chunk loss with ``torch.func.grad_and_value`` inside one ``torch.compile``'d
function; a subclass supplies only ``distillation_loss_fn``. This is how a Liger user
would write EAOPD, so it is the baseline for "what does our hand-written closed-form
gradient buy over autodiff of the same chunked loss".

Conventions of the base class, and the choices made here to match
``eaopd_mp.fused_linear_eaopd_loss(..., reduction="batchmean")`` on flat ``(N, H)``
tokens:

* the loss is ``weight_hard_loss * CE + weight_soft_loss * soft``: we pass 0 and 1, so
  the cross-entropy (and its float32 log-softmax) is never computed;
* ``distillation_loss_fn`` returns the *sum* over the chunk's tokens, and the base class
  divides by the number of tokens whose target is not ``ignore_index`` over the whole
  batch. With every target valid that is ``N``, i.e. ``batchmean`` over flat tokens.
  (With a mask the two differ: ``eaopd_mp`` divides by ``N`` whatever the mask, like
  ``KLDivLoss(reduction="batchmean")``.)
* the base class divides both logits by ``temperature`` before the loss; the gate needs
  the untempered teacher entropy, so the temperature is passed again as ``tau``.
* Liger chunks with ``torch.chunk(x, max(1, N // chunk_size))``: chunks have
  ``chunk_size`` tokens when ``N`` is a multiple of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    from liger_kernel.chunked_loss.fused_linear_distillation import (
        LigerFusedLinearDistillationBase,
    )
except ImportError as exc:  # liger-kernel is optional
    LIGER_IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
    LigerFusedLinearDistillationBase = torch.autograd.Function
else:
    LIGER_IMPORT_ERROR = None


def eaopd_token_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, h_max: float, tau: float
) -> torch.Tensor:
    """Per-token EAOPD loss of tempered logits ``(n, V)`` -> ``(n,)`` float32.

    ``w = clamp(H / h_max, 0, 1)`` with ``H`` the entropy of the *untempered* teacher
    (``teacher_logits * tau``); loss ``w KL(t || s) + (1 - w) KL(s || t)``.
    """
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    u = t if tau == 1.0 else F.log_softmax(teacher_logits.float() * tau, dim=-1)
    entropy = -(u.exp() * u).sum(-1)
    w = (entropy / h_max).clamp(0.0, 1.0)
    kl_fwd = (t.exp() * (t - s)).sum(-1)
    kl_rev = (s.exp() * (s - t)).sum(-1)
    return w * kl_fwd + (1.0 - w) * kl_rev


class LigerFusedLinearEAOPDFunction(LigerFusedLinearDistillationBase):
    """EAOPD on Liger's chunked, compiled, autodiff'd fused-linear distillation loop."""

    @staticmethod
    def distillation_loss_fn(
        student_logits, teacher_logits, beta=None, target=None, ignore_index=-100,
        h_max=1.0, tau=1.0,
    ):
        """Sum over the chunk's valid tokens (the base class divides by their count).

        ``beta`` is the JSD parameter the base class always passes; unused here.
        """
        del beta
        loss = eaopd_token_loss(student_logits, teacher_logits, h_max, tau)
        if target is not None:
            loss = loss.masked_fill(target == ignore_index, 0.0)
        return loss.sum()

    @classmethod
    def forward(
        cls, ctx, student_input, student_weight, teacher_input, teacher_weight, true_labels,
        student_bias=None, teacher_bias=None, h_max=None, temperature=1.0,
        chunk_size=1024, compiled=True, ignore_index=-100,
    ):
        if h_max is None:
            h_max = math.log(student_weight.shape[0])
        return super().forward(
            cls=cls, ctx=ctx, student_input=student_input, student_weight=student_weight,
            teacher_input=teacher_input, teacher_weight=teacher_weight, target=true_labels,
            student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=chunk_size,
            ignore_index=ignore_index, weight_hard_loss=0.0, weight_soft_loss=1.0,
            compute_ce_loss=False, temperature=temperature, compiled=compiled,
            h_max=float(h_max), tau=float(temperature),
        )

    @staticmethod
    def backward(ctx, grad_output, *args):
        grads = LigerFusedLinearDistillationBase.backward(ctx, grad_output, *args)[:6]
        # teacher_bias, h_max, temperature, chunk_size, compiled, ignore_index
        return (*grads, None, None, None, None, None, None)


def liger_eaopd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    h_max: float | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    compiled: bool = True,
) -> torch.Tensor:
    """EAOPD (linear gate) on flat ``(N, H)`` tokens with Liger's base class.

    Matches ``fused_linear_eaopd_loss(..., reduction="batchmean")`` when every token is
    kept. ``labels`` are Liger targets (``-100`` drops a token); None keeps all.
    """
    if LIGER_IMPORT_ERROR is not None:
        raise ImportError(f"liger-kernel is needed for liger_eaopd ({LIGER_IMPORT_ERROR})")
    if labels is None:
        labels = torch.zeros(student_hidden.shape[0], dtype=torch.long,
                             device=student_hidden.device)
    return LigerFusedLinearEAOPDFunction.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        None, None, h_max, temperature, chunk_size, compiled,
    )
