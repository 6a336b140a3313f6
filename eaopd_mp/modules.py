"""``nn.Module`` wrappers that hold the loss options."""

from __future__ import annotations

import torch
from torch import nn

from .loss import entropy_aware_opd_loss, fused_linear_eaopd_loss


class _Options(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)


class EntropyAwareOPDLoss(_Options):
    """Module form of :func:`eaopd_mp.entropy_aware_opd_loss`.

    ``EntropyAwareOPDLoss(h_max=None, temperature=1.0, reduction="batchmean",
    return_stats=False, gate="linear", ...)(student_logits, teacher_logits, labels=None)``
    """

    def __init__(self, *, h_max=None, temperature=1.0, reduction="batchmean",
                 return_stats=False, gate="linear", gate_threshold=None, fkl_coef=None,
                 fkl_weight=None, chunk_size=None):
        super().__init__(h_max=h_max, temperature=temperature, reduction=reduction,
                         return_stats=return_stats, gate=gate, gate_threshold=gate_threshold,
                         fkl_coef=fkl_coef, fkl_weight=fkl_weight, chunk_size=chunk_size)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None):
        return entropy_aware_opd_loss(student_logits, teacher_logits, labels=labels,
                                      **self.options)


class FusedLinearEAOPDLoss(_Options):
    """Module form of :func:`eaopd_mp.fused_linear_eaopd_loss`.

    ``loss_fn(student_hidden, student_weight, teacher_hidden=..., teacher_weight=...,
    labels=...)``; the weights are arguments, so the module holds no parameters and works
    with any ``lm_head`` (pass ``lm_head.weight`` and ``lm_head.bias``).
    """

    def __init__(self, *, h_max=None, temperature=1.0, reduction="batchmean",
                 chunk_size=None, return_stats=False, gate="linear", gate_threshold=None,
                 fkl_coef=None, fkl_weight=None):
        super().__init__(h_max=h_max, temperature=temperature, reduction=reduction,
                         chunk_size=chunk_size, return_stats=return_stats, gate=gate,
                         gate_threshold=gate_threshold, fkl_coef=fkl_coef,
                         fkl_weight=fkl_weight)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, *,
                teacher_hidden=None, teacher_weight=None, teacher_logits=None,
                student_bias=None, teacher_bias=None, labels=None):
        return fused_linear_eaopd_loss(
            student_hidden, student_weight, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, teacher_logits=teacher_logits,
            student_bias=student_bias, teacher_bias=teacher_bias, labels=labels,
            **self.options,
        )
