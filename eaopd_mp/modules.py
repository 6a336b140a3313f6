"""``nn.Module`` wrappers that hold the loss options (validated at construction)."""

from __future__ import annotations

import torch
from torch import nn

from .errors import surfaced
from .loss import linear_loss, logits_loss
from .options import LossOptions


class _Options(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = LossOptions.build(options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.given().items())


class EntropyAwareOPDLoss(_Options):
    """Module form of :func:`eaopd_mp.entropy_aware_opd_loss`.

    ``EntropyAwareOPDLoss(**options)(student_logits, teacher_logits, labels=None)``, or
    with a served teacher ``(student_logits, teacher_topk_logprobs=...,
    teacher_topk_indices=...)``; the options being those of
    :class:`~eaopd_mp.options.LossOptions` (``h_max``, ``temperature``, ``reduction``,
    ``return_stats``, ``gate``, ``topk_tail``, ...).
    """

    @surfaced
    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, teacher_topk_logprobs=None,
                teacher_topk_indices=None, teacher_entropy=None, teacher_index=None):
        """The loss (or ``(loss, stats)``), as :func:`eaopd_mp.entropy_aware_opd_loss`."""
        teacher = dict(teacher_logits=teacher_logits, teacher_topk_logprobs=teacher_topk_logprobs,
                       teacher_topk_indices=teacher_topk_indices, teacher_entropy=teacher_entropy)
        return logits_loss(student_logits, teacher, labels, teacher_index, self.options)


class FusedLinearEAOPDLoss(_Options):
    """Module form of :func:`eaopd_mp.fused_linear_eaopd_loss`.

    ``loss_fn(student_hidden, student_weight, teacher_hidden=..., teacher_weight=...,
    labels=...)`` (or ``teacher_logits=``, or ``teacher_topk_logprobs=`` +
    ``teacher_topk_indices=``); the weights are arguments, so the module holds no
    parameters and works with any ``lm_head`` (pass ``lm_head.weight`` and
    ``lm_head.bias``).
    """

    @surfaced
    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, *,
                teacher_hidden=None, teacher_weight=None, teacher_logits=None,
                student_bias=None, teacher_bias=None, labels=None, teacher_topk_logprobs=None,
                teacher_topk_indices=None, teacher_entropy=None, teacher_index=None):
        """The loss (or ``(loss, stats)``), as :func:`eaopd_mp.fused_linear_eaopd_loss`."""
        teacher = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                       teacher_bias=teacher_bias, teacher_logits=teacher_logits,
                       teacher_topk_logprobs=teacher_topk_logprobs,
                       teacher_topk_indices=teacher_topk_indices, teacher_entropy=teacher_entropy)
        return linear_loss(student_hidden, student_weight, student_bias, teacher, labels,
                           teacher_index, self.options)
