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

HEADER = ("tokens", "kept tokens", "mask sum", "mask fingerprint", "mask fingerprint 2",
           "shard width", "chunk_size", "vocab_size", "1/temperature", "gate p1", "gate p2",
           "gate", "reduction", "student_logit_scale", "student_softcap",
           "teacher_logit_scale", "teacher_softcap", "teacher top-k", "topk_tail",
           "teachers", "routing fingerprint 1", "routing fingerprint 2",
           "teacher fingerprint 1", "teacher fingerprint 2", "teacher ids invalid",
           "teacher log-probs invalid")

# What a mismatch on a header entry most likely means, added to the error.
HINTS = {
    "teacher fingerprint 1": "the teacher inputs every rank must hold alike (served top-k "
    "log-probs and ids, teacher_entropy, teacher hidden states without sequence parallelism) "
    "differ between ranks: give every tensor-parallel rank the same teacher (broadcast it "
    "within the group)",
    "mask fingerprint": "the labels mask differs between ranks: give every tensor-parallel "
    "rank the same mask",
    "routing fingerprint 1": "teacher_index differs between ranks",
}


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
    stride: int = 0  # columns per shard: rank r's first column is r * stride


def resolve(group, width: int, vocab_size, sequence_parallel: bool,
            stride: int | None = None) -> TPInfo:
    """Check the group and ``vocab_size``; work out this rank's real columns.

    ``stride``: columns per shard when shards may differ in width (``torch.chunk``'s layout,
    as a DTensor ``Shard(0)`` lays it out: every shard ``stride`` wide but the last ones,
    which hold what is left); None means Megatron's equal shards (``stride = width``)."""
    if group is None:
        group = default_group()
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    stride = width if stride is None else stride
    full = stride * size
    if full == 0:  # the same on every rank: every shard is empty
        raise ValueError(f"the vocabulary is empty: shards of width {width} on {size} ranks "
                         "(the loss needs at least one vocabulary column)")
    if vocab_size is None:
        vocab_size = full
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    elif not 0 < vocab_size <= full:
        raise ValueError(
            f"vocab_size must be in [1, {full}] (shard width {stride} x {size} ranks), "
            f"got {vocab_size}"
        )
    cols = max(0, min(width, vocab_size - rank * stride))
    return TPInfo(group.group_name, size, rank, vocab_size, cols, bool(sequence_parallel),
                  stride)


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
            hints = "".join(f". {HINTS[n]}" for n in bad if n in HINTS)
            raise ValueError(f"tensor-parallel ranks disagree on {', '.join(bad)} ({rows})"
                             f"{hints}")


# splitmix64 (Steele, Lea & Flood 2014) constants, as signed int64.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic on signed ints)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix(i: torch.Tensor) -> torch.Tensor:
    """splitmix64 of the int64 counters ``i`` (products wrap): 64 pseudo-random bits each,
    the same on every rank and device; no generator state."""
    z = i * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def position_hashes(n: int, device=None) -> torch.Tensor:
    """``(n, 2)`` float64 pseudo-random numbers in ``[0, 1)``, a fixed function of the
    position: splitmix64 of ``2 i + 1`` and ``2 i + 2`` (53 bits each).

    Integer arithmetic only (int64 products wrap), so every rank and device computes the
    same bits; no generator state is involved.
    """
    z = _splitmix(torch.arange(2 * n, dtype=torch.int64, device=device) + 1)
    return (_shr(z, 11).to(torch.float64) * 2.0**-53).view(n, 2)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_FINGERPRINT_BLOCK = 2**20  # elements hashed at a time (8 MiB of int64 per temporary)


def tensor_fingerprint(x: torch.Tensor, salt: int) -> torch.Tensor:
    """Two int64 hashes of ``x``'s values (their bits, so NaN, ``-inf`` and the sign of 0
    count), exact and independent of summation order.

    ``x`` is viewed as ``(rows, cols)`` (its first dim by the rest); with 64-bit
    pseudo-random row and column hashes ``r, c`` (:func:`_splitmix`, streams picked by
    ``salt``), each hash is ``sum_ij r_i c_j bits_ij`` in wrapping int64 arithmetic: equal
    tensors give equal hashes on every rank and device, and a change anywhere (a value, an
    order) changes them but with probability ~2^-64. One pass over ``x``, in blocks of rows.
    Returns a ``(2,)`` int64 tensor on ``x``'s device.
    """
    device = x.device
    rows = x.shape[0] if x.dim() else 1
    cols = x.numel() // rows if rows else 0
    bits = x.detach().contiguous().view(_BITS[x.element_size()]).reshape(rows, cols)
    base = (salt + 1) << 40  # one stream of counters per salt
    c = _splitmix(base + 4 * torch.arange(cols, dtype=torch.int64, device=device)[:, None]
                  + torch.tensor([0, 1], device=device))  # (cols, 2)
    out = torch.zeros(2, dtype=torch.int64, device=device)
    step = max(1, _FINGERPRINT_BLOCK // max(cols, 1))
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        r = _splitmix(base + 4 * torch.arange(lo, hi, dtype=torch.int64, device=device)[:, None]
                      + torch.tensor([2, 3], device=device))  # (n, 2)
        row_sums = (bits[lo:hi, :, None].to(torch.int64) * c).sum(1)  # (n, 2), wrapping
        out += (row_sums * r).sum(0)
    return out


def fingerprint_values(hashes: torch.Tensor) -> list[float]:
    """A ``(2,)`` int64 fingerprint as two floats for the header (the low 52 bits of each,
    exact in float64)."""
    return (hashes & ((1 << 52) - 1)).to(torch.float64).tolist()


def mask_fingerprint(weight: torch.Tensor | None, n: int) -> list[float]:
    """``[sum w, sum w r, sum w r']`` over the ``n`` token positions, in float64.

    ``r, r'`` are :func:`position_hashes`: pseudo-random per position, so two different
    masks (or weights) with the same sum match only if two sums of 53-bit random numbers
    agree to rounding: no structured collisions (moments ``sum w i^k`` had them, e.g. the
    masks {0, 4, 5} and {1, 2, 6} share count, sum and sum of squares). One pass over the
    mask, deterministic: the same mask gives the same bits on every rank.
    """
    if weight is None:
        weight = torch.ones(n, dtype=torch.float64)
    w = weight.reshape(-1).to(torch.float64)
    r = position_hashes(w.shape[0], w.device)
    return torch.cat([w.sum().reshape(1), w @ r]).tolist()


def routing_fingerprint(index: torch.Tensor | None, n: int) -> list[float]:
    """``[sum (t + 1) r, sum (t + 1) r']`` over the ``n`` token positions of the teacher
    numbers ``t`` (float64, :func:`position_hashes`; zeros for one teacher): ranks that
    route tokens differently get different fingerprints (with overwhelming probability)."""
    if index is None:
        return [0.0, 0.0]
    t = index.reshape(-1).to(torch.float64) + 1
    return (t @ position_hashes(n, t.device)).tolist()
