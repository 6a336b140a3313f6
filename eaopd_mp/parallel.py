"""Vocab-parallel loss for Megatron-style tensor parallelism.

Rank ``r`` of a tensor-parallel group of size ``tp`` holds vocabulary columns
``[r * V_local, (r + 1) * V_local)`` (Megatron's ``VocabUtility`` layout). Each chunk of
tokens costs one collective: an all-gather of the ``(n, 6)`` partial statistics of
:func:`eaopd_mp.core.partial_stats` (``(n, k + 2)`` with a top-k teacher,
:func:`eaopd_mp.topk.partial_stats`), combined locally into the exact global statistics.
The gradient of the local logits needs nothing more; the fused path adds one all-reduce
of the hidden-state gradient (a reduce-scatter under sequence parallelism), as a
column-parallel output layer would. Communication lives in :mod:`eaopd_mp.tp`.

Before the first chunk, ranks exchange a header (token counts, a fingerprint of the mask,
shard width, chunk size, options) so that ranks that disagree raise the same
``ValueError`` instead of hanging or returning a wrong answer.

These front doors are siblings of :mod:`eaopd_mp.loss` over the same plan builder
(:func:`eaopd_mp.plan.run`); ``**options`` are :class:`~eaopd_mp.options.LossOptions`.
"""

from __future__ import annotations

import torch

from . import inputs, ops, plan  # noqa: F401 - ops registers the custom ops
from .errors import surfaced
from .options import LossOptions


@surfaced
def vocab_parallel_eaopd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | list | None = None,
    *,
    labels: torch.Tensor | None = None,
    tp_group=None,
    vocab_size: int | None = None,
    teacher_topk_logprobs: torch.Tensor | list | None = None,
    teacher_topk_indices: torch.Tensor | list | None = None,
    teacher_entropy: torch.Tensor | list | None = None,
    teacher_index: torch.Tensor | None = None,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, plan.Stats]:
    """:func:`eaopd_mp.entropy_aware_opd_loss` on this rank's vocabulary shards.

    Args:
        student_logits, teacher_logits: ``(..., V_local)`` shards of the logits (rank r
            holds columns ``[r V_local, (r+1) V_local)``), the same tokens on every rank.
        teacher_topk_logprobs, teacher_topk_indices: instead of ``teacher_logits``, a
            served teacher ``(..., k)``, identical on every rank, with *global* ids in
            ``[0, vocab_size)`` (each lives on one rank); see
            :func:`eaopd_mp.entropy_aware_opd_loss`. The chunk's one all-gather then
            carries ``k + 2`` numbers per token.
        teacher_entropy: ``(...)``, optional, identical on every rank: the gate's entropy.
        teacher_index: several teachers (see :func:`eaopd_mp.entropy_aware_opd_loss`),
            identical on every rank (checked); each teacher's tensors hold its routed
            tokens (dense teachers: this rank's shard columns).
        labels: the token mask, identical on every rank (checked).
        tp_group: the tensor-parallel group; None means megatron-core's.
        vocab_size: the real vocabulary when it was padded; columns past it get no
            probability and no gradient, and ``h_max`` defaults to ``log(vocab_size)``.
        **options: as the single-device function.
    Returns:
        The same value on every rank: equal to the single-device loss on the gathered
        logits. Backward needs no communication.
    """
    options = LossOptions.build(dict(options, vocab_size=vocab_size))
    teacher = dict(teacher_logits=teacher_logits, teacher_topk_logprobs=teacher_topk_logprobs,
                   teacher_topk_indices=teacher_topk_indices, teacher_entropy=teacher_entropy)
    return logits_parallel(student_logits, teacher, labels, teacher_index, options, tp_group)


def logits_parallel(student_logits, teacher: dict, labels, teacher_index, options: LossOptions,
                    tp_group, stride: int | None = None):
    """:func:`vocab_parallel_eaopd_loss` with its options built and its teacher arguments
    (:data:`eaopd_mp.inputs.ARGS`) in ``teacher``; ``stride``: see
    :func:`eaopd_mp.tp.resolve` (uneven shards)."""
    return plan.run(inputs.logits_call(student_logits, teacher, labels, teacher_index,
                                       options.vocab_size, parallel=True, tp_group=tp_group,
                                       stride=stride), options)


@surfaced
def fused_linear_vocab_parallel_eaopd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | list | None = None,
    teacher_weight: torch.Tensor | list | None = None,
    teacher_logits: torch.Tensor | list | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | list | None = None,
    labels: torch.Tensor | None = None,
    tp_group=None,
    vocab_size: int | None = None,
    sequence_parallel: bool = False,
    teacher_topk_logprobs: torch.Tensor | list | None = None,
    teacher_topk_indices: torch.Tensor | list | None = None,
    teacher_entropy: torch.Tensor | list | None = None,
    teacher_index: torch.Tensor | None = None,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, plan.Stats]:
    """:func:`eaopd_mp.fused_linear_eaopd_loss` with vocabulary-sharded output layers.

    Args:
        student_hidden: ``(..., H)`` replicated over the group; with
            ``sequence_parallel=True`` this rank's slice along dim 0 (Megatron's ``[s, b,
            h]`` sequence dim), gathered inside and its gradient reduce-scattered.
        student_weight, student_bias: this rank's ``(V_local, H)`` / ``(V_local,)`` shards.
        teacher_hidden + teacher_weight (+ teacher_bias): like the student's (split the
            same way under sequence parallelism); or teacher_logits ``(..., V_local)``
            shards with the full token shape; or teacher_topk_logprobs +
            teacher_topk_indices ``(..., k)`` with the full token shape and global ids
            (see :func:`vocab_parallel_eaopd_loss`).
        teacher_entropy: ``(...)`` over the full token shape, optional.
        teacher_index: several teachers (see :func:`eaopd_mp.fused_linear_eaopd_loss`)
            over the full token shape, identical on every rank (checked). Under sequence
            parallelism a dense teacher's hidden states are this rank's slice of its
            routed tokens, whose all-gather must be those tokens in token order (per-sequence
            routing of Megatron's ``[s, b, h]`` layout is).
        labels: mask over the full (gathered) token shape.
        tp_group, vocab_size: as :func:`vocab_parallel_eaopd_loss`.
        **options: as the single-device function.
    Returns:
        The same loss on every rank; ``reduction="none"`` gives the full token shape.
    """
    options = LossOptions.build(dict(options, vocab_size=vocab_size))
    teacher = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                   teacher_bias=teacher_bias, teacher_logits=teacher_logits,
                   teacher_topk_logprobs=teacher_topk_logprobs,
                   teacher_topk_indices=teacher_topk_indices, teacher_entropy=teacher_entropy)
    return linear_parallel(student_hidden, student_weight, student_bias, teacher, labels,
                           teacher_index, options, tp_group, sequence_parallel)


def linear_parallel(student_hidden, student_weight, student_bias, teacher: dict, labels,
                    teacher_index, options: LossOptions, tp_group, sequence_parallel: bool = False,
                    stride: int | None = None):
    """:func:`fused_linear_vocab_parallel_eaopd_loss` with its options built and its teacher
    arguments (:data:`eaopd_mp.inputs.ARGS`) in ``teacher``; ``stride``: see
    :func:`eaopd_mp.tp.resolve` (uneven shards)."""
    return plan.run(inputs.linear_call(
        student_hidden, student_weight, student_bias, teacher, labels, teacher_index,
        options.vocab_size, parallel=True, tp_group=tp_group,
        sequence_parallel=sequence_parallel, stride=stride), options)


__all__ = [
    "fused_linear_vocab_parallel_eaopd_loss",
    "vocab_parallel_eaopd_loss",
]
