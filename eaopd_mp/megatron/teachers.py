"""Frozen teachers under megatron-core's schedules: their hidden states
(:func:`teacher_hidden_states`, one ``forward_only`` pipeline per teacher), several
teachers' routing (:func:`teacher_routing`, :func:`teacher_list`) and each teacher's rows
of a micro-batch."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import inputs
from . import layouts
from .batch import Batch, GetBatch, _batch, read_batch
from .forward import (
    _is_last_stage,
    _unwrap,
    gpt_hidden_states,
    last_model_chunk,
    output_layer_weight,
)
from .loss import _all_gather_sequence, _tp_group


def teacher_routing(batch: Batch, n_teachers: int, *, cp_group=None) -> torch.Tensor:
    """The micro-batch's routing as ``[b, s]`` int64 over this context-parallel rank's
    positions (``batch.tokens``' shape), from any of :class:`Batch`'s ``teacher_index``
    layouts; checked (type, shape, values in ``[0, n_teachers)``) with ``ValueError`` /
    ``TypeError`` naming ``teacher_index`` and the sizes."""
    raw = batch.teacher_index
    if raw is None:
        raise ValueError(f"several teachers ({n_teachers}): get_batch must return a mapping "
                         "with teacher_index ([b], [b, s] or [b, s * cp]) for every "
                         "micro-batch")
    inputs.integers("teacher_index", raw, "integer teacher numbers")
    b, s = batch.tokens.shape[0], batch.tokens.shape[-1]
    cp_size, cp_rank = layouts.context_parallel_layout(cp_group)
    full = s * cp_size
    packed = batch.packed_seq_params
    bounds = None if packed is None else layouts._cu_seqlens(packed, padded=True).cpu()
    cut = False
    if raw.dim() == 1 and bounds is not None and raw.numel() == bounds.numel() - 1:
        index = raw.to("cpu", torch.int64).repeat_interleave(bounds.diff()).view(1, -1)
        cut = True
    elif raw.dim() == 1 and raw.numel() == b:
        index = raw.view(b, 1).expand(b, s)
    elif raw.dim() == 2 and raw.shape[0] == b and raw.shape[1] in (s, full):
        index, cut = raw, raw.shape[1] != s
    else:
        per_packed = ("" if bounds is None else
                      f", [{bounds.numel() - 1}] (one per packed sequence)")
        whole = f" or [{b}, {full}] (the whole sequence, {cp_size} context-parallel ranks)" \
            if cp_size > 1 else ""
        raise ValueError(f"teacher_index shape {tuple(raw.shape)} fits none of [{b}] (one "
                         f"teacher per sequence){per_packed}, [{b}, {s}] (per token, this "
                         f"rank's positions like loss_mask){whole}")
    if cut and index.shape[1] != full:
        raise ValueError(f"teacher_index covers {index.shape[1]} positions but the packed "
                         f"row has {full} ({cp_size} ranks x {s})")
    if cut and cp_size > 1:
        keep = layouts.context_parallel_index(full, cp_size, cp_rank, cu_seqlens_padded=bounds,
                                      device=index.device)
        index = index.index_select(1, keep)
    index = index.to(batch.tokens.device, torch.int64)
    bad = (index < 0) | (index >= n_teachers)
    if bool(bad.any()):
        raise ValueError(f"teacher_index values must be in [0, {n_teachers}) ({n_teachers} "
                         f"teachers), got {index[bad].unique()[:5].tolist()}")
    return index


def teacher_list(teacher) -> list[list] | None:
    """Several teachers, each as its list of model chunks; None for one teacher.

    One teacher is a model or the list of its virtual-stage chunks (megatron's
    ``get_model`` returns such a list even without virtual stages). Several teachers are a
    list of teachers of which at least one is itself a list: ``[[t0], [t1]]``,
    ``[t0_chunks, t1_chunks]`` (a bare model entry counts as a one-chunk teacher).
    """
    if not isinstance(teacher, (list, tuple)) or \
            not any(isinstance(t, (list, tuple)) for t in teacher):
        return None
    out = [list(t) if isinstance(t, (list, tuple)) else [t] for t in teacher]
    for j, chunks in enumerate(out):
        if not chunks:
            raise ValueError(f"teacher {j}: an empty list of model chunks")
    if len({len(c) for c in out}) > 1:
        raise ValueError(f"teachers differ in model chunks: {[len(c) for c in out]} (every "
                         "teacher has the student's virtual pipeline stages)")
    return out


def teacher_forward_step(get_batch: GetBatch) -> Callable:
    """A ``forward_step_func`` for a frozen teacher's ``forward_only`` schedule.

    Every stage returns ``(hidden, None)``: ``hidden`` is :func:`gpt_hidden_states`
    (``model(...)`` with :func:`hidden_states_processor` where megatron-core has the
    ``output_processor`` hook; on the last stage the final-norm output, ``[s, b, h_t]`` or
    ``[s / tp, b, h_t]`` under sequence parallelism), and with no loss function megatron's
    schedule keeps the last stage's output of every micro-batch and returns them in order.
    ``packed_seq_params`` from ``get_batch`` reach the teacher.
    """
    def forward_step(data_iterator, model):
        tokens, position_ids, attention_mask, _, packed = _batch(get_batch, data_iterator)
        return gpt_hidden_states(model, tokens, position_ids, attention_mask, packed), None
    return forward_step


def _stored_forward_step(data_iterator, model):
    """:func:`teacher_forward_step` over :class:`Batch` es already read."""
    batch = next(data_iterator)
    return gpt_hidden_states(model, batch.tokens, batch.position_ids, batch.attention_mask,
                             batch.packed_seq_params), None


def teacher_hidden_states(forward_backward_func: Callable, teacher, data_iterator,
                          get_batch: GetBatch, *, num_microbatches: int, seq_length: int,
                          micro_batch_size: int) -> list:
    """Run the frozen teacher(s) over one step's micro-batches with megatron's schedule.

    Design: the teacher has the student's pipeline layout and runs its own
    ``forward_only=True`` schedule (under ``torch.no_grad``) before the student's step; the
    last stage keeps one hidden-state tensor per micro-batch, ``num_microbatches * s/tp * b
    * h_t`` values, never ``[s, b, V/tp]`` logits. The teacher thus costs one extra forward
    pipeline (with its own bubble) per step and no change to the student's schedule or
    its p2p tensors (whose shape is the student's hidden size). Sending the teacher's
    activations alongside the student's would need a custom p2p shape and entangle the
    two models in one schedule; putting the whole teacher on the last stage would cost
    that stage all the teacher's weights.

    Several teachers (``teacher`` a list of per-teacher chunk lists, :func:`teacher_list`;
    each its own GPTModel with its own hidden size and layers, the student's pipeline
    layout): the step's micro-batches are read once here (``get_batch`` on this stage;
    a mapping with ``teacher_index``, see :class:`Batch`), and each teacher runs its own
    ``forward_only`` schedule over the micro-batches that route at least one token to it,
    in order: a teacher no micro-batch routes to costs nothing. Which micro-batches those
    are is agreed over the pipeline, tensor- and context-parallel groups (one small
    all-reduce of a ``[n_teachers, num_microbatches]`` table: stages whose ``get_batch``
    has no ``teacher_index``, e.g. the middle ones, learn it there, and the context-parallel
    ranks, which see different positions, run the same micro-batches). Under the
    interleaved schedule a teacher's count is rounded up to one megatron accepts (a
    multiple of ``microbatch_group_size_per_vp_stage``, or a remainder of at least the
    pipeline size) with the earliest micro-batches it skipped, whose outputs are dropped.

    Args:
        forward_backward_func: ``megatron.core.pipeline_parallel.get_forward_backward_func()``.
        teacher: the teacher GPTModel (unwrapped or wrapped); its config holds the pipeline
            settings (``pipeline_dtype``, ``hidden_size``). With virtual pipeline stages
            (interleaved schedule), the list of its model chunks. Several teachers: a list
            of per-teacher chunk lists (``[[t0], [t1]]``).
        data_iterator: yields the step's micro-batches, the same ones, in the same order, as
            the student's iterator (with virtual pipeline stages: one such iterator per
            model chunk, as megatron's interleaved schedule takes them). Several teachers
            share it: it is read ``num_microbatches`` times (per chunk) here.
        get_batch: see :func:`eaopd_forward_step`.
        num_microbatches, seq_length, micro_batch_size: as for the student's schedule.
    Returns:
        One teacher: on the last pipeline stage, ``num_microbatches`` tensors ``[s, b,
        h_t]`` (``[s / tp, b, h_t]`` under sequence parallelism; ``s`` this
        context-parallel rank's tokens) in the teacher's dtype, in micro-batch order (with
        virtual stages: the outputs of the last model chunk, which the interleaved schedule
        runs in micro-batch order); ``[]`` elsewhere. Several teachers: one such list per
        teacher, with None for the micro-batches that route no token to it (``[]`` per
        teacher elsewhere).
    """
    several = teacher_list(teacher)
    if several is not None:
        return _several_hidden_states(forward_backward_func, several, data_iterator,
                                      get_batch, num_microbatches, seq_length,
                                      micro_batch_size)
    if isinstance(teacher, (list, tuple)) and len(teacher) > 1 and \
            not isinstance(data_iterator, (list, tuple)):
        raise ValueError(f"teacher is a list of {len(teacher)} model chunks (virtual pipeline "
                         "stages) but data_iterator is one iterator (one per chunk); for "
                         "several teachers give a list of per-teacher chunk lists, "
                         "[[teacher_0], [teacher_1], ...]")
    with torch.no_grad():
        hidden = forward_backward_func(
            forward_step_func=teacher_forward_step(get_batch),
            data_iterator=data_iterator,
            model=teacher,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    if _is_last_stage(teacher) and len(hidden) != num_microbatches:
        raise RuntimeError(f"the teacher's schedule returned {len(hidden)} outputs for "
                           f"{num_microbatches} micro-batches")
    return list(hidden)


def _model_parallel_groups() -> list:
    """megatron's pipeline, tensor- and context-parallel groups with more than one rank
    (none when its parallel state is not initialised)."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return []
    if not ps.model_parallel_is_initialized():
        return []
    import torch.distributed as dist
    groups = []
    for get in (ps.get_pipeline_model_parallel_group, ps.get_tensor_model_parallel_group,
                ps.get_context_parallel_group):
        g = get()
        for one in (g if isinstance(g, (list, tuple)) else [g]):
            if one is not None and dist.get_world_size(one) > 1:
                groups.append(one)
    return groups


def _agree_max(table: torch.Tensor) -> torch.Tensor:
    """``table``'s element-wise max over the model-parallel ranks (see
    :func:`_model_parallel_groups`; the max over a product of groups, group by group)."""
    groups = _model_parallel_groups()
    if not groups:
        return table
    import torch.distributed as dist
    device = "cpu"
    if torch.cuda.is_available() and dist.get_backend(groups[0]) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    out = table.to(device)
    for g in groups:
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=g)
    return out.cpu()


def _interleaved_run(chosen: list[int], total: int, chunk) -> list[int]:
    """``chosen`` micro-batches plus the earliest others until megatron's interleaved
    schedule accepts the count (its ``microbatch_group_size_per_vp_stage`` rule)."""
    config = _unwrap(chunk).config
    pp = config.pipeline_model_parallel_size
    group = getattr(config, "microbatch_group_size_per_vp_stage", None) or pp

    def accepted(m):
        return m >= group and (m % group == 0 or m % group >= pp)

    run, others = set(chosen), [i for i in range(total) if i not in chosen]
    while not accepted(len(run)) and others:
        run.add(others.pop(0))
    return sorted(run)


def _several_hidden_states(forward_backward_func, teachers, data_iterator, get_batch,
                           num_microbatches, seq_length, micro_batch_size) -> list:
    """:func:`teacher_hidden_states` for several teachers (``teachers``: chunk lists)."""
    n, m = len(teachers), num_microbatches
    iterators = list(data_iterator) if isinstance(data_iterator, (list, tuple)) \
        else [data_iterator]
    if len(teachers[0]) != len(iterators):
        raise ValueError(f"each teacher has {len(teachers[0])} model chunks but data_iterator "
                         f"is {len(iterators)} iterator(s) (one per virtual pipeline stage)")
    batches = [[read_batch(get_batch, it) for _ in range(m)] for it in iterators]
    # Rows 0..n-1: micro-batch i routes a token to teacher j; row n: the routing is known
    # here; row n + 1: this rank found a bad teacher_index (every rank raises).
    table = torch.zeros(n + 2, m, dtype=torch.int64)
    problem = None
    for i in range(m):
        for chunk_batches in batches:
            batch = chunk_batches[i]
            if batch.teacher_index is None:
                continue
            try:
                index = teacher_routing(batch, n)
            except (TypeError, ValueError) as exc:
                problem = problem or exc
                table[n + 1, i] = 1
                continue
            table[:n, i] |= (torch.bincount(index.reshape(-1).cpu(), minlength=n) > 0).long()
            table[n, i] = 1
    table = _agree_max(table)
    if problem is not None:
        raise problem
    if bool(table[n + 1].any()):
        raise ValueError("another model-parallel rank's get_batch returned a bad "
                         "teacher_index (see its error)")
    unknown = (table[n] == 0).nonzero().view(-1).tolist()
    if unknown:
        raise ValueError(f"several teachers ({n}): no pipeline stage's get_batch returned a "
                         f"teacher_index for micro-batches {unknown} of {m}")
    out = []
    for j, chunks in enumerate(teachers):
        chosen = table[j].nonzero().view(-1).tolist()
        last = _is_last_stage(chunks)
        hidden = [None] * m if last else []
        if chosen:
            run = _interleaved_run(chosen, m, chunks[-1]) if len(chunks) > 1 else chosen
            data = [iter([b[i] for i in run]) for b in batches]
            with torch.no_grad():
                result = forward_backward_func(
                    forward_step_func=_stored_forward_step,
                    data_iterator=data if len(chunks) > 1 else data[0],
                    model=chunks if len(chunks) > 1 else chunks[0],
                    num_microbatches=len(run),
                    seq_length=seq_length,
                    micro_batch_size=micro_batch_size,
                    forward_only=True,
                )
            if last:
                if len(result) != len(run):
                    raise RuntimeError(f"teacher {j}'s schedule returned {len(result)} "
                                       f"outputs for {len(run)} micro-batches")
                for i, h in zip(run, result, strict=True):
                    if i in chosen:
                        hidden[i] = h
        out.append(hidden)
    return out


def _routed_teacher_hidden(hidden: list, index: torch.Tensor, teachers: list,
                           sequence_parallel: bool, tp_group, micro: int):
    """The teacher lists of one micro-batch: each teacher's hidden-state rows of its
    routed tokens, in token order, and whether the student's must be gathered.

    ``hidden[j]``: teacher j's ``[s(/tp), b, h_j]`` or None; ``index``: ``[s, b]`` (the
    whole sequence of this context-parallel rank). Under sequence parallelism the op
    gathers each teacher's rows over the tensor-parallel ranks in rank order, which is
    token order (rank r holds positions ``[r s / tp, (r + 1) s / tp)``) when every rank's
    slice holds as many of teacher j's tokens as the others (per-sequence routing does);
    otherwise the slices are gathered here and the loss runs on the whole sequence.
    """
    n = len(hidden)
    s, b = index.shape
    counts = torch.bincount(index.reshape(-1), minlength=n).tolist()
    for j, h in enumerate(hidden):
        if counts[j] and h is None:
            raise RuntimeError(f"teacher {j} has no hidden states for micro-batch {micro} but "
                               f"get_batch routes {counts[j]} tokens to it (teacher_hidden_"
                               "states saw another routing)")
    local, gather = index, False
    if sequence_parallel:
        import torch.distributed as dist
        group = _tp_group(tp_group)
        tp_size, tp_rank = dist.get_world_size(group), dist.get_rank(group)
        if tp_size > 1:
            parts = index.reshape(tp_size, s // tp_size, b)
            per_rank = torch.stack([torch.bincount(p.reshape(-1), minlength=n) for p in parts])
            gather = not bool((per_rank == per_rank[0]).all())
            local = index if gather else parts[tp_rank]
    out = []
    for j, h in enumerate(hidden):
        weight = output_layer_weight(last_model_chunk(teachers[j]))
        if h is None:
            out.append(weight.new_empty(0, weight.shape[-1]))
            continue
        if gather:
            h = _all_gather_sequence(h, tp_group)
        if tuple(h.shape[:2]) != tuple(local.shape):
            raise ValueError(f"teacher {j}'s hidden states for micro-batch {micro} have shape "
                             f"{tuple(h.shape)}, expected [{local.shape[0]}, {local.shape[1]}, "
                             "h] (the student's tokens)")
        out.append(h if counts[j] == index.numel()
                   else h.reshape(-1, h.shape[-1])[local.reshape(-1) == j])
    return out, gather
