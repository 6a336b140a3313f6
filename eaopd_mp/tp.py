"""Tensor-parallel communication: the group, the per-chunk combine, the gradient reduction.

Rank ``r`` of a tensor-parallel group of size ``tp`` holds vocabulary columns
``[r * V_local, (r + 1) * V_local)`` (Megatron's ``VocabUtility`` layout). Per call:

* one header all-gather before anything else (token counts, a fingerprint of the mask,
  shard width, chunk size, options), so that ranks that disagree all raise the same
  ``ValueError`` instead of hanging or returning a wrong answer;
* one all-gather of the ``(n, 6)`` partial statistics per chunk (:meth:`TPCombiner.gather`);
* in backward, the fused path's hidden-state gradient is all-reduced (reduce-scattered
  under sequence parallelism), as a column-parallel output layer would do.

Inside the loss's custom ops the group travels by name (``ProcessGroup.group_name``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

HEADER = ("tokens", "kept tokens", "mask sum", "mask first moment", "mask second moment",
           "shard width", "chunk_size", "vocab_size", "1/temperature", "gate p1", "gate p2",
           "gate", "reduction", "student_logit_scale", "student_softcap",
           "teacher_logit_scale", "teacher_softcap", "teacher top-k", "teachers",
           "routing fingerprint 1", "routing fingerprint 2", "teacher ids invalid")


def _collective(new: str, old: str):
    """torch >= 2.13 renamed the single-tensor collectives; older releases have ``old``."""
    return getattr(dist, new, None) or getattr(dist, old)


def default_group():
    """Megatron's tensor-parallel group; a clear error if it is not initialised."""
    try:
        from megatron.core import parallel_state
    except ImportError as exc:
        raise RuntimeError(
            "tp_group=None uses megatron.core's tensor-parallel group, but megatron-core is "
            "not installed: pip install 'eaopd-mp[megatron]' or pass tp_group"
        ) from exc
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "tp_group=None uses megatron.core's tensor-parallel group, which is not "
            "initialised: call parallel_state.initialize_model_parallel(...) or pass tp_group"
        )
    return parallel_state.get_tensor_model_parallel_group()


@dataclass(frozen=True)
class TPInfo:
    """What a call needs to know about its tensor-parallel group (plain values)."""

    group: str  # ProcessGroup.group_name
    size: int
    rank: int
    vocab_size: int  # the real (unpadded) vocabulary
    cols: int  # how many of this rank's columns are real vocabulary
    sequence_parallel: bool


def resolve(group, width: int, vocab_size, sequence_parallel: bool) -> TPInfo:
    """Check the group and ``vocab_size``; work out this rank's real columns."""
    if group is None:
        group = default_group()
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    full = width * size
    if vocab_size is None:
        vocab_size = full
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    elif not 0 < vocab_size <= full:
        raise ValueError(
            f"vocab_size must be in [1, {full}] (shard width {width} x {size} ranks), "
            f"got {vocab_size}"
        )
    cols = max(0, min(width, vocab_size - rank * width))
    return TPInfo(group.group_name, size, rank, vocab_size, cols, bool(sequence_parallel))


class TPCombiner:
    """Combines a chunk's statistics across the group; reduces the hidden gradient."""

    def __init__(self, group_name: str, sequence_parallel: bool = False):
        self.group = _resolve_process_group(group_name)
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.sequence_parallel = sequence_parallel

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, ...)`` on each rank -> ``(tp * n, ...)`` (rank-major)."""
        x = x.contiguous()
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        _collective("all_gather_single", "all_gather_into_tensor")(out, x, group=self.group)
        return out

    def gather(self, parts: torch.Tensor) -> torch.Tensor:
        """``(n, 6)`` local partial statistics -> ``(tp, n, 6)``: the chunk's one collective."""
        return self.all_gather(parts).view(self.size, *parts.shape)

    def reduce_hidden_grad(self, grad_h: torch.Tensor) -> torch.Tensor:
        """Sum the ``(N, H)`` hidden-state gradient over ranks; under sequence parallelism
        reduce-scatter it to this rank's ``(N / tp, H)`` slice. Returns a new tensor."""
        if self.sequence_parallel:
            out = grad_h.new_empty((grad_h.shape[0] // self.size, *grad_h.shape[1:]))
            _collective("reduce_scatter_single", "reduce_scatter_tensor")(
                out, grad_h.contiguous(), group=self.group)
            return out
        out = grad_h.clone()
        dist.all_reduce(out, group=self.group)
        return out

    def check_agreement(self, header: list[float], device) -> None:
        """Gather every rank's header; all ranks raise the same error on a mismatch."""
        mine = torch.tensor(header, dtype=torch.float64, device=device)
        table = self.all_gather(mine.unsqueeze(0)).cpu()
        bad = [name for i, name in enumerate(HEADER) if not torch.all(table[:, i] == table[0, i])]
        if bad:
            rows = "; ".join(
                f"rank {r}: " + ", ".join(f"{n}={table[r, HEADER.index(n)].item():g}" for n in bad)
                for r in range(self.size)
            )
            raise ValueError(f"tensor-parallel ranks disagree on {', '.join(bad)} ({rows})")


def mask_fingerprint(weight: torch.Tensor | None, n: int) -> list[float]:
    """``[sum w, sum w i, sum w i^2]`` over token positions ``i = 1..n`` (float64).

    Ranks with the same number of kept tokens but a different mask, or different weights,
    get different fingerprints (with overwhelming probability), at the cost of one pass.
    """
    if weight is None:
        i = torch.arange(1, n + 1, dtype=torch.float64)
        return [float(n), float(i.sum()), float((i * i).sum())]
    w = weight.to(torch.float64)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=w.device)
    return [float(w.sum()), float((w * i).sum()), float((w * i * i).sum())]


def routing_fingerprint(index: torch.Tensor | None, n: int) -> list[float]:
    """``[sum (t + 1) i, sum (t + 1) i^2]`` over token positions ``i = 1..n`` of the
    teacher numbers ``t`` (float64; zeros for one teacher): ranks that route tokens
    differently get different fingerprints (with overwhelming probability)."""
    if index is None:
        return [0.0, 0.0]
    t = index.to(torch.float64) + 1
    i = torch.arange(1, n + 1, dtype=torch.float64, device=t.device)
    return [float((t * i).sum()), float((t * i * i).sum())]
