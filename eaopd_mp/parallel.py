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

from . import _checks, ops, plan, teachers, tp  # noqa: F401 - ops registers the custom ops
from .errors import surfaced
from .options import LossOptions
from .tp import TPCombiner


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
    return logits_parallel(student_logits, teacher_logits, labels, options, tp_group,
                           teacher_topk_logprobs, teacher_topk_indices, teacher_entropy,
                           teacher_index=teacher_index)


def logits_parallel(student_logits, teacher_logits, labels, options: LossOptions, tp_group,
                    teacher_topk_logprobs=None, teacher_topk_indices=None,
                    teacher_entropy=None, stride: int | None = None, *, teacher_index=None):
    """:func:`vocab_parallel_eaopd_loss` with its options built; ``stride``: see
    :func:`eaopd_mp.tp.resolve` (uneven shards)."""
    _checks.tensor("student_logits", student_logits, min_dim=1)  # a shard may be empty
    token_shape = tuple(student_logits.shape[:-1])
    width = student_logits.shape[-1]
    info = tp.resolve(tp_group, width, options.vocab_size, False, stride)
    args = dict(teacher_logits=teacher_logits, teacher_topk_logprobs=teacher_topk_logprobs,
                teacher_topk_indices=teacher_topk_indices, teacher_entropy=teacher_entropy)
    check = teachers.logits_check(student_logits, None, info.vocab_size, sharded=True)
    chosen = teachers.build(args, teacher_index, token_shape, check)
    _checks.same_device(student_logits=student_logits, labels=labels,
                        teacher_index=teacher_index, **teachers.named(args))
    labels = _checks.labels(labels, token_shape)
    z = teachers.rows(student_logits)
    return plan.run([z], chosen, labels, token_shape, options, student_form="logits",
                    width=width, tp=info)


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
    return linear_parallel(student_hidden, student_weight, student_bias, teacher_hidden,
                           teacher_weight, teacher_bias, teacher_logits, labels, options,
                           tp_group, sequence_parallel, teacher_topk_logprobs,
                           teacher_topk_indices, teacher_entropy, teacher_index=teacher_index)


def linear_parallel(student_hidden, student_weight, student_bias, teacher_hidden,
                    teacher_weight, teacher_bias, teacher_logits, labels, options: LossOptions,
                    tp_group, sequence_parallel: bool = False, teacher_topk_logprobs=None,
                    teacher_topk_indices=None, teacher_entropy=None,
                    stride: int | None = None, *, teacher_index=None):
    """:func:`fused_linear_vocab_parallel_eaopd_loss` with its options built; ``stride``:
    see :func:`eaopd_mp.tp.resolve` (uneven shards)."""
    _checks.linear("student", student_hidden, student_weight, student_bias)
    width = student_weight.shape[0]
    info = tp.resolve(tp_group, width, options.vocab_size, sequence_parallel, stride)
    local_shape = tuple(student_hidden.shape[:-1])
    token_shape = local_shape
    if sequence_parallel:
        if not local_shape:
            raise ValueError("sequence_parallel=True needs student_hidden with a sequence dim, "
                             f"got shape {tuple(student_hidden.shape)}")
        token_shape = (local_shape[0] * info.size, *local_shape[1:])
    args = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                teacher_bias=teacher_bias, teacher_logits=teacher_logits,
                teacher_topk_logprobs=teacher_topk_logprobs,
                teacher_topk_indices=teacher_topk_indices, teacher_entropy=teacher_entropy)
    check = teachers.fused_check(width, None, info.vocab_size, hidden_shape=local_shape)
    chosen = teachers.build(args, teacher_index, token_shape, check,
                            sequence_split=info.size if sequence_parallel else 1)
    _checks.same_device(student_hidden=student_hidden, student_weight=student_weight,
                        student_bias=student_bias, labels=labels,
                        teacher_index=teacher_index, **teachers.named(args))
    labels = _checks.labels(labels, token_shape)
    student = teachers.student_tensors(student_hidden, student_weight, student_bias)
    return plan.run(student, chosen, labels, token_shape, options, student_form="linear",
                    width=width, tp=info)


__all__ = [
    "TPCombiner",
    "fused_linear_vocab_parallel_eaopd_loss",
    "vocab_parallel_eaopd_loss",
]
