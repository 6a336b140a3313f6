"""Vocab-parallel loss for Megatron-style tensor parallelism.

Rank ``r`` of a tensor-parallel group of size ``tp`` holds vocabulary columns
``[r * V_local, (r + 1) * V_local)`` (Megatron's ``VocabUtility`` layout). Each chunk of
tokens costs one collective: an all-gather of the ``(n, 6)`` partial statistics of
:func:`eaopd_mp.core.partial_stats`, combined locally into the exact global statistics.
The gradient of the local logits needs nothing more; the fused path adds one all-reduce
of the hidden-state gradient (a reduce-scatter under sequence parallelism), as a
column-parallel output layer would.

Before the first chunk, ranks exchange a 10-number header (token counts, shard width,
chunk size, options) so that ranks that disagree raise the same ``ValueError`` instead of
hanging or returning a wrong answer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _checks
from .driver import LogitsHead, default_chunk_size
from .gates import GATES, Gate, resolve_gate
from .loss import Stats, finish, linear_heads, make_plan

_HEADER = ("tokens", "kept tokens", "shard width", "chunk_size", "vocab_size",
           "1/temperature", "gate p1", "gate p2", "gate", "reduction")


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


class TPCombiner:
    """Combines a chunk's statistics across the group; reduces the hidden gradient.

    Args:
        group: the tensor-parallel process group.
        sequence_parallel: the student hidden states were gathered along dim 0 on the way
            in, so their gradient is reduce-scattered on the way out.
    """

    def __init__(self, group, sequence_parallel: bool = False):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
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

    def reduce_grads(self, grads: tuple) -> tuple:
        """Sum the hidden-state gradient ``(N, H)`` over ranks (reduce-scatter under SP).

        ``grads`` is ``(hidden, weight, bias)`` of a fused head; weight and bias are
        shards and need nothing.
        """
        grad_h, *rest = grads
        if grad_h is None:
            return grads
        if self.sequence_parallel:
            out = grad_h.new_empty((grad_h.shape[0] // self.size, *grad_h.shape[1:]))
            _collective("reduce_scatter_single", "reduce_scatter_tensor")(
                out, grad_h.contiguous(), group=self.group)
            grad_h = out
        else:
            grad_h = grad_h.clone()  # the saved gradient may be used by another backward
            dist.all_reduce(grad_h, group=self.group)
        return (grad_h, *rest)

    def check_agreement(self, header: list[float], device) -> None:
        """Gather every rank's header; all ranks raise the same error on a mismatch."""
        mine = torch.tensor(header, dtype=torch.float64, device=device)
        table = self.all_gather(mine.unsqueeze(0)).cpu()
        bad = [name for i, name in enumerate(_HEADER) if not torch.all(table[:, i] == table[0, i])]
        if bad:
            rows = "; ".join(
                f"rank {r}: " + ", ".join(f"{n}={table[r, _HEADER.index(n)].item():g}" for n in bad)
                for r in range(self.size)
            )
            raise ValueError(f"tensor-parallel ranks disagree on {', '.join(bad)} ({rows})")


def _shard_columns(rank: int, width: int, vocab_size: int | None) -> int:
    """How many of this rank's ``width`` columns are real vocabulary (not padding)."""
    if vocab_size is None:
        return width
    return max(0, min(width, vocab_size - rank * width))


def _resolve(group, width: int, vocab_size, sequence_parallel: bool):
    """The combiner, the real vocabulary size and this rank's number of real columns."""
    if group is None:
        group = default_group()
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised")
    combiner = TPCombiner(group, sequence_parallel)
    full = width * combiner.size
    if vocab_size is None:
        vocab_size = full
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    elif not 0 < vocab_size <= full:
        raise ValueError(
            f"vocab_size must be in [1, {full}] (shard width {width} x {combiner.size} ranks), "
            f"got {vocab_size}"
        )
    return combiner, vocab_size, _shard_columns(combiner.rank, width, vocab_size)


def _agree(combiner: TPCombiner, *, tokens: int, labels, width: int, chunk_size, vocab_size,
           temperature: float, gate: Gate, reduction: str, device) -> None:
    """Exchange the header before any other collective of this call."""
    kept = tokens if labels is None else int((labels != 0).sum())
    chunk = default_chunk_size(width) if chunk_size is None else chunk_size
    combiner.check_agreement(
        [tokens, kept, width, chunk, vocab_size, 1.0 / temperature, gate.p1, gate.p2,
         GATES.index(gate.kind), _checks.REDUCTIONS.index(reduction)],
        device,
    )


def vocab_parallel_eaopd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    h_max: float | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    tp_group=None,
    vocab_size: int | None = None,
    return_stats: bool = False,
    gate: str = "linear",
    gate_threshold: float | None = None,
    fkl_coef: float | None = None,
    fkl_weight: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Stats]:
    """:func:`eaopd_mp.entropy_aware_opd_loss` on this rank's vocabulary shards.

    Args:
        student_logits, teacher_logits: ``(..., V_local)`` shards of the logits (rank r
            holds columns ``[r V_local, (r+1) V_local)``), the same tokens on every rank.
        tp_group: the tensor-parallel group; None means megatron-core's.
        vocab_size: the real vocabulary when it was padded; columns past it get no
            probability and no gradient, and ``h_max`` defaults to ``log(vocab_size)``.
        Other arguments as the single-device function.
    Returns:
        The same value on every rank: equal to the single-device loss on the gathered
        logits. Backward needs no communication.
    """
    token_shape, labels, tau = _checks.logits_inputs(student_logits, teacher_logits, labels,
                                                     temperature, reduction, chunk_size)
    width = student_logits.shape[-1]
    combiner, vocab_size, cols = _resolve(tp_group, width, vocab_size, False)
    g = resolve_gate(gate, vocab_size, h_max=h_max, gate_threshold=gate_threshold,
                     fkl_coef=fkl_coef, fkl_weight=fkl_weight)
    z = student_logits.reshape(-1, width)
    _agree(combiner, tokens=z.shape[0], labels=labels, width=width, chunk_size=chunk_size,
           vocab_size=vocab_size, temperature=tau, gate=g, reduction=reduction, device=z.device)
    student = LogitsHead(z, cols=cols, need_grad=z.requires_grad)
    teacher = LogitsHead(teacher_logits.detach().reshape(-1, width), cols=cols)
    plan = make_plan(student, teacher, token_shape, labels, g, tau, chunk_size, reduction,
                     combiner)
    return finish(plan, (z,), return_stats)


def fused_linear_vocab_parallel_eaopd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    h_max: float | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
    tp_group=None,
    vocab_size: int | None = None,
    sequence_parallel: bool = False,
    return_stats: bool = False,
    gate: str = "linear",
    gate_threshold: float | None = None,
    fkl_coef: float | None = None,
    fkl_weight: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Stats]:
    """:func:`eaopd_mp.fused_linear_eaopd_loss` with vocabulary-sharded output layers.

    Args:
        student_hidden: ``(..., H)`` replicated over the group; with
            ``sequence_parallel=True`` this rank's slice along dim 0 (Megatron's ``[s, b,
            h]`` sequence dim), gathered here and its gradient reduce-scattered.
        student_weight, student_bias: this rank's ``(V_local, H)`` / ``(V_local,)`` shards.
        teacher_hidden + teacher_weight (+ teacher_bias): like the student's (split the
            same way under sequence parallelism); or teacher_logits ``(..., V_local)``
            shards with the full token shape.
        labels: mask over the full (gathered) token shape.
        tp_group, vocab_size: as :func:`vocab_parallel_eaopd_loss`.
    Returns:
        The same loss on every rank; ``reduction="none"`` gives the full token shape.
    """
    _checks.linear("student", student_hidden, student_weight, student_bias)
    width = student_weight.shape[0]
    combiner, vocab_size, cols = _resolve(tp_group, width, vocab_size, sequence_parallel)
    local_shape = tuple(student_hidden.shape[:-1])
    token_shape = local_shape
    if sequence_parallel:
        if not local_shape:
            raise ValueError("sequence_parallel=True needs student_hidden with a sequence dim, "
                             f"got shape {tuple(student_hidden.shape)}")
        token_shape = (local_shape[0] * combiner.size, *local_shape[1:])
    _checks.teacher_source(teacher_hidden, teacher_weight, teacher_logits, teacher_bias,
                           token_shape if teacher_logits is not None else local_shape, width)
    _checks.same_device(student_hidden=student_hidden, student_weight=student_weight,
                        student_bias=student_bias, teacher_hidden=teacher_hidden,
                        teacher_weight=teacher_weight, teacher_logits=teacher_logits,
                        teacher_bias=teacher_bias, labels=labels)
    labels = _checks.labels(labels, token_shape)
    tau = _checks.options(temperature, reduction, chunk_size)
    g = resolve_gate(gate, vocab_size, h_max=h_max, gate_threshold=gate_threshold,
                     fkl_coef=fkl_coef, fkl_weight=fkl_weight)
    n_local = student_hidden.numel() // max(1, student_hidden.shape[-1])
    _agree(combiner, tokens=n_local, labels=labels, width=width, chunk_size=chunk_size,
           vocab_size=vocab_size, temperature=tau, gate=g, reduction=reduction,
           device=student_weight.device)
    student_full, teacher_full = student_hidden, teacher_hidden
    if sequence_parallel:
        student_full = combiner.all_gather(student_hidden.detach())
        if teacher_hidden is not None:
            teacher_full = combiner.all_gather(teacher_hidden.detach())
    student, teacher, tensors = linear_heads(
        student_full, student_weight, student_bias,
        teacher_full, teacher_weight, teacher_bias, teacher_logits, cols=cols,
    )
    if sequence_parallel:
        # Autograd sees the local hidden states; the head reads the gathered ones.
        local = student_hidden.reshape(-1, student_hidden.shape[-1])
        student.need = (local.requires_grad, *student.need[1:])
        tensors = (local, *tensors[1:])
    plan = make_plan(student, teacher, token_shape, labels, g, tau, chunk_size, reduction,
                     combiner)
    return finish(plan, tensors, return_stats)


__all__ = [
    "TPCombiner",
    "fused_linear_vocab_parallel_eaopd_loss",
    "vocab_parallel_eaopd_loss",
]
