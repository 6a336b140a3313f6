"""The micro-batch protocol of the forward steps: what ``get_batch(data_iterator)``
returns (:class:`Batch`, :func:`read_batch`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch

# get_batch(data_iterator) -> one micro-batch (this context-parallel rank's part): the tuple
# (tokens [b, s], position_ids [b, s], attention_mask, loss_mask [b, s][, packed_seq_params])
# or a mapping with those keys and, for several teachers, "teacher_index" (see Batch).
GetBatch = Callable[[Iterator], Any]


class Batch(NamedTuple):
    """One micro-batch as :func:`read_batch` reads it from ``get_batch``.

    ``teacher_index`` (several teachers; only from a mapping) routes the micro-batch's
    tokens: ``[b]`` (one teacher per sequence), ``[n]`` with packed sequences (one teacher
    per packed sequence, ``n = len(cu_seqlens_q_padded) - 1``), ``[b, s]`` (per token,
    this context-parallel rank's positions like ``loss_mask``) or ``[b, s * cp]`` (per
    token for the whole sequence; cut into this rank's zig-zag chunks here, per packed
    sequence with ``packed_seq_params``); int64 values in ``[0, n_teachers)``.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: Any
    loss_mask: Any
    packed_seq_params: Any = None
    teacher_index: Any = None


_REQUIRED_KEYS = ("tokens", "position_ids", "loss_mask")


def read_batch(get_batch: GetBatch, data_iterator) -> Batch:
    """The next micro-batch: ``get_batch(data_iterator)`` returns ``(tokens, position_ids,
    attention_mask, loss_mask)``, those four and megatron's ``PackedSeqParams`` (packed
    sequences, THD), or a mapping with keys ``tokens``, ``position_ids``,
    ``attention_mask``, ``loss_mask`` and optionally ``packed_seq_params`` and
    ``teacher_index`` (other keys, e.g. ``labels``, are ignored)."""
    batch = get_batch(data_iterator)
    if isinstance(batch, Mapping):
        missing = [k for k in _REQUIRED_KEYS if k not in batch]
        if missing:
            raise ValueError(f"get_batch returned a mapping without {', '.join(missing)} "
                             f"(keys: {', '.join(Batch._fields)}), got keys {sorted(batch)}")
        return Batch(*(batch.get(k) for k in Batch._fields))
    batch = tuple(batch)
    if len(batch) not in (4, 5):
        raise ValueError("get_batch must return (tokens, position_ids, attention_mask, "
                         f"loss_mask[, packed_seq_params]) or a mapping, got {len(batch)} "
                         "values")
    return Batch(*batch)


def _batch(get_batch: GetBatch, data_iterator) -> tuple:
    """``(tokens, position_ids, attention_mask, loss_mask, packed_seq_params)`` of the next
    micro-batch (:func:`read_batch`, one teacher: a ``teacher_index`` must be all 0)."""
    batch = read_batch(get_batch, data_iterator)
    if batch.teacher_index is not None and bool((batch.teacher_index != 0).any()):
        raise ValueError("get_batch's teacher_index routes tokens to teachers other than 0, "
                         "but one teacher model was given (several teachers: a list of "
                         "per-teacher chunk lists, [[teacher_0], [teacher_1], ...])")
    return tuple(batch[:5])
