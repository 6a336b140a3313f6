"""Megatron's long-context layouts: context parallelism's zig-zag chunks and packed
sequences (THD).

:func:`context_parallel_index` and :func:`slice_for_context_parallel` cut per-token data
made outside megatron's data loader (a served teacher's top-k) exactly as
``get_batch_on_this_cp_rank`` cuts the tokens; :func:`packed_loss_mask` drops every packed
sequence's last token. megatron.core is imported only to read its context-parallel group
when none is given.
"""

from __future__ import annotations

import torch


def context_parallel_layout(cp_group=None) -> tuple[int, int]:
    """``(size, rank)`` of the context-parallel group: ``cp_group``'s, or megatron-core's
    when it is None (``(1, 0)`` when megatron's parallel state is not initialised)."""
    if cp_group is not None:
        import torch.distributed as dist
        return dist.get_world_size(cp_group), dist.get_rank(cp_group)
    try:
        from megatron.core import parallel_state
    except ImportError:
        return 1, 0
    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return (parallel_state.get_context_parallel_world_size(),
            parallel_state.get_context_parallel_rank())


def _cu_seqlens(packed_seq_params, padded: bool) -> torch.Tensor:
    """``cu_seqlens_q`` (or ``cu_seqlens_q_padded``, falling back to it) as int64."""
    cu = packed_seq_params.cu_seqlens_q
    if padded and getattr(packed_seq_params, "cu_seqlens_q_padded", None) is not None:
        cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        raise ValueError("packed_seq_params.cu_seqlens_q is None")
    return cu.detach().to(torch.int64).view(-1)


def context_parallel_index(seq_len: int, cp_size: int, cp_rank: int, *,
                           cu_seqlens_padded: torch.Tensor | None = None,
                           device=None) -> torch.Tensor:
    """The positions of a ``seq_len`` sequence that context-parallel rank ``cp_rank`` holds,
    in megatron's order: ``[seq_len / cp_size]`` int64.

    The sequence is cut into ``2 * cp_size`` equal chunks and the rank holds chunks
    ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` (causal attention's load balance), as
    ``megatron.core.utils.get_batch_on_this_cp_rank`` slices tokens. With
    ``cu_seqlens_padded`` (packed sequences, ``[n + 1]`` offsets ending at ``seq_len``),
    every packed sequence is cut that way and the rank's parts are concatenated in
    sequence order, as ``get_thd_batch_on_this_cp_rank`` (Transformer Engine's
    ``thd_get_partitioned_indices``) slices them; each sequence's padded length must
    divide by ``2 * cp_size``.
    """
    if cu_seqlens_padded is None:
        bounds = torch.tensor([0, seq_len], dtype=torch.int64)
    else:
        bounds = cu_seqlens_padded.detach().to("cpu", torch.int64).view(-1)
        if bounds.numel() < 2 or bounds[0] != 0 or bounds[-1] != seq_len:
            raise ValueError(f"cu_seqlens_padded must run from 0 to the packed length "
                             f"{seq_len}, got {bounds.tolist()}")
    lengths = bounds.diff()
    if (lengths % (2 * cp_size)).any():
        what = "sequence length" if cu_seqlens_padded is None else "padded sequence lengths"
        raise ValueError(f"context parallelism over {cp_size} ranks cuts every sequence into "
                         f"{2 * cp_size} chunks: the {what} {lengths.tolist()} must divide "
                         f"by {2 * cp_size}")
    parts = []
    for start, length in zip(bounds[:-1].tolist(), lengths.tolist(), strict=True):
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(parts).to(device)


def slice_for_context_parallel(tensor: torch.Tensor, dim: int, *, cp_group=None,
                               packed_seq_params=None) -> torch.Tensor:
    """This context-parallel rank's part of a tensor given for the whole sequence along
    ``dim``, exactly as megatron slices the tokens (:func:`context_parallel_index`).

    Use it for per-token data made outside megatron's data loader, e.g. a served
    teacher's ``[s, b, k]`` top-k log-probabilities and ids (``dim=0``);
    :func:`eaopd_loss_func` does it itself for ``teacher_topk_*`` and
    ``teacher_entropy``. With ``packed_seq_params`` (THD) each packed sequence is split
    separately (``cu_seqlens_q_padded``, or ``cu_seqlens_q`` when there is no padding).
    Returns ``tensor`` itself when the group has one rank.
    """
    cp_size, cp_rank = context_parallel_layout(cp_group)
    if cp_size == 1:
        return tensor
    cu = None if packed_seq_params is None else _cu_seqlens(packed_seq_params, padded=True)
    index = context_parallel_index(tensor.shape[dim], cp_size, cp_rank,
                                   cu_seqlens_padded=cu, device=tensor.device)
    return tensor.index_select(dim, index)


def packed_loss_mask(loss_mask: torch.Tensor, packed_seq_params, *,
                     cp_group=None) -> torch.Tensor:
    """``loss_mask`` with every packed sequence's last token, and any padding after it,
    weighted 0.

    In a packed (THD) row the last token of a sequence would "predict" the first token of
    the next one; its distillation loss means nothing, so the loss over the packed row is
    the sum of the per-sequence losses only when it is dropped.

    Args:
        loss_mask: ``[1, t]`` (megatron's THD batch: one row), this context-parallel
            rank's part when context parallelism is on (``t`` = packed length / cp).
        packed_seq_params: ``PackedSeqParams`` with ``cu_seqlens_q`` (the real sequence
            boundaries) and optionally ``cu_seqlens_q_padded`` (where each sequence starts
            in the row when sequences are padded, e.g. to ``2 * cp`` multiples).
        cp_group: default megatron's context-parallel group.
    Returns:
        ``[1, t]`` in ``loss_mask``'s dtype.
    """
    if getattr(packed_seq_params, "qkv_format", "thd") != "thd":
        raise ValueError(f"packed_seq_params.qkv_format must be 'thd', got "
                         f"{packed_seq_params.qkv_format!r}")
    if loss_mask.dim() != 2 or loss_mask.shape[0] != 1:
        raise ValueError(f"packed sequences come as one row: loss_mask must be [1, t], got "
                         f"{tuple(loss_mask.shape)}")
    cp_size, cp_rank = context_parallel_layout(cp_group)
    real = _cu_seqlens(packed_seq_params, padded=False).cpu()
    starts = _cu_seqlens(packed_seq_params, padded=True).cpu()
    total = loss_mask.shape[1] * cp_size
    if real.numel() != starts.numel() or starts[-1] != total or (real.diff() > starts.diff()).any():
        raise ValueError(f"packed_seq_params do not fit a packed row of {total} tokens: "
                         f"cu_seqlens {real.tolist()}, cu_seqlens_padded {starts.tolist()}")
    pos = torch.arange(total)
    seq = torch.searchsorted(starts, pos, right=True) - 1  # the sequence each position is in
    keep = pos - starts[seq] < real.diff()[seq] - 1  # a real token followed by one of its own
    if cp_size > 1:
        keep = keep[context_parallel_index(total, cp_size, cp_rank, cu_seqlens_padded=starts)]
    return loss_mask * keep.to(loss_mask.device, loss_mask.dtype).view(1, -1)
