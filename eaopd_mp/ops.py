"""The loss as ``torch.library`` custom ops, so a caller's ``torch.compile`` sees one opaque
op (no graph break, no re-tracing of the chunk loop) whose inner kernels are compiled once.

* ``eaopd_mp::loss(student, teacher, mask, spec) -> (out, stats, g0, g1, g2, hs, ht)``:
  ``out`` is the per-token loss ``(N,)`` (``reduction="none"``) or the mask-weighted sum
  ``()``; ``stats`` the ``(N, 7)`` per-token statistics (zeros for skipped tokens); for
  scalar reductions ``g0..g2`` are the gradients of ``out`` with respect to the student
  tensors (accumulator dtypes; empty where not needed); ``hs, ht``: the all-gathered
  student and teacher hidden states under sequence parallelism with ``reduction="none"``
  (empty otherwise), kept for the backward (:func:`_regathered`).
* ``eaopd_mp::loss_backward(...)``: the ``reduction="none"`` backward (recomputes logits).
* ``eaopd_mp::reduce_hidden_grad(grad_h, spec)``: the tensor-parallel all-reduce (or
  reduce-scatter under sequence parallelism) of the fused path's hidden gradient.

Autograd (:func:`_backward`) saves every input through ``save_for_backward`` (so in-place
changes between forward and backward raise autograd's version-counter error), returns
fresh gradient tensors (never a buffer the op keeps) and refuses double backward.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.library import custom_op

from . import core
from .driver import LinearHead, LogitsHead, Part, Plan, run_backward, run_forward
from .gates import GATES
from .options import REDUCTIONS, TOPK_TAILS
from .plan import Spec, parse, sized
from .teachers import routing_problem
from .topk import TopkHead, ids_problem, logprobs_problem
from .tp import (
    TPCombiner,
    fingerprint_values,
    mask_fingerprint,
    routing_fingerprint,
    tensor_fingerprint,
)

_INTEGER_MASK = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# --------------------------------------------------------------------------- in the op


@contextlib.contextmanager
def _op_context(device: torch.device):
    """What every op body runs under: autocast off (the op casts explicitly, see
    :func:`eaopd_mp.driver.gemm_dtypes`) and the dispatcher below autograd. The op is
    reached both through its autograd kernel and directly (a compiled caller's graph);
    the same thread-local dispatch state in both keeps the inner compiled kernels' guards
    from failing (and recompiling) on it."""
    with torch.autocast(device.type, enabled=False), torch._C._AutoDispatchBelowADInplaceOrView():
        yield


def _n_tokens(student: list[torch.Tensor], spec: Spec) -> int:
    """Tokens the loss covers (the gathered count under sequence parallelism)."""
    n = student[0].shape[0]
    return n * spec.tp if spec.sequence_parallel else n


def _width(student: list[torch.Tensor], spec: Spec) -> int:
    """Logit columns held here (padding included)."""
    return student[1].shape[0] if spec.student == "linear" else student[0].shape[-1]


def _resolved(student: list[torch.Tensor], spec: str) -> Spec:
    """The op body's spec: parsed, its width-derived values filled in from the student
    tensors (concrete here, even when the caller's trace had a symbolic width)."""
    return sized(spec, _width(student, parse(spec)))




def _compute_dtype(student: list[torch.Tensor], teacher: list[torch.Tensor],
                   spec: Spec) -> torch.dtype:
    s = student[0] if len(student) == 1 else student[1]
    dtypes = []
    for part, (tensors, _) in zip(spec.parts, spec.split(teacher)[0], strict=True):
        # tensors[1] is W_t (linear) or the int64 ids (top-k: log-probs first)
        t = tensors[0] if len(tensors) == 1 or part.teacher == "topk" else tensors[1]
        dtypes.append(t.dtype)
    return core.compute_dtype(s.dtype, *dtypes)


def mask_weight(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The ``(N,)`` token weights in ``dtype``; bad values raise ``ValueError``.

    Integer and bool masks must be 0/1 (token ids such as Hugging Face's ``-100`` are not a
    mask); float masks must be finite and >= 0.
    """
    if mask is None:
        return None
    if mask.dtype in _INTEGER_MASK:
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            bad = mask[(mask != 0) & (mask != 1)][:3].tolist()
            raise ValueError(
                f"labels is a 0/1 mask (or float weights), not token ids: got values {bad} "
                "outside {0, 1}. From Hugging Face labels use labels.ne(-100); from an "
                "attention or completion mask pass it as is")
        return mask.to(dtype)
    weight = mask.to(dtype)
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError("float labels are token weights and must be finite and >= 0")
    return weight


def _heads(student, teacher, spec: Spec, combiner: TPCombiner | None):
    """The student head and one :class:`~eaopd_mp.driver.Part` per teacher; under
    sequence parallelism the hidden states are all-gathered here (the ops take this
    rank's slice)."""
    need = spec.need

    def gathered(h):
        if combiner is not None and spec.sequence_parallel:
            return combiner.all_gather(h)
        return h

    if spec.student == "logits":
        s_head = LogitsHead(student[0], spec.cols, need_grad=need[0])
    else:
        h, w, *b = student
        s_head = LinearHead(gathered(h), w, b[0] if b else None, spec.cols, need,
                            spec.autocast)
    parts = []
    for part, (tensors, entropy) in zip(spec.parts, spec.split(teacher)[0], strict=True):
        if part.teacher == "topk":
            head, entropy = TopkHead(tensors[0], tensors[1], entropy), None
        elif part.teacher == "logits":
            head = LogitsHead(tensors[0], spec.cols)
        else:
            th, tw, *tb = tensors
            head = LinearHead(gathered(th), tw, tb[0] if tb else None, spec.cols,
                              autocast=spec.autocast)
        parts.append(Part(head, part, entropy))
    return s_head, parts


def _header(student, teacher, spec: Spec, n: int, kept: int,
            weight: torch.Tensor | None, index: torch.Tensor | None) -> list[float]:
    """This rank's view of the call, in the order of :data:`eaopd_mp.tp.HEADER`."""
    return [student[0].shape[0], kept, *mask_fingerprint(weight, n), spec.stride,
            spec.chunk, spec.vocab_size, spec.inv_tau, spec.p1, spec.p2,
            GATES.index(spec.gate), REDUCTIONS.index(spec.reduction),
            spec.s_scale, spec.s_cap or 0.0, spec.t_scale, spec.t_cap or 0.0,
            *_topk_code(teacher, spec), len(spec.parts), *routing_fingerprint(index, n),
            *_teacher_fingerprint(teacher, spec)]


def _teacher_fingerprint(teacher, spec: Spec) -> list[float]:
    """The fingerprint (:func:`eaopd_mp.tp.tensor_fingerprint`) of every teacher input that
    all ranks hold alike: served top-k log-probs and ids, a given gate entropy, and dense
    hidden states when they are not split along the sequence. (Teacher logits and heads are
    this rank's vocabulary columns, different on every rank by design.) One pass over
    ``(N, k)`` numbers, or ``(N, H_t)`` for hidden states: no vocabulary-sized work."""
    total = None
    for j, (part, (tensors, entropy)) in enumerate(zip(spec.parts, spec.split(teacher)[0],
                                                       strict=True)):
        shared = []
        if part.teacher == "topk":
            shared = tensors[:2]
        elif part.teacher == "linear" and not spec.sequence_parallel:
            shared = tensors[:1]
        if entropy is not None:
            shared = [*shared, entropy]
        for i, x in enumerate(shared):
            hashes = tensor_fingerprint(x, salt=4 * j + i)
            total = hashes if total is None else total + hashes
    return [0.0, 0.0] if total is None else fingerprint_values(total)


def _topk_code(teacher, spec: Spec) -> tuple[float, int]:
    """``(k, target)``: ``(0, -1)`` for dense teachers; else the top-k teachers' ``k``
    (teacher ``j``'s scaled by ``1000 ** j``) and the index of ``topk_tail`` in
    :data:`eaopd_mp.options.TOPK_TAILS` (each mode its own value)."""
    code, topk = 0.0, False
    for j, (part, (tensors, _)) in enumerate(zip(spec.parts, spec.split(teacher)[0],
                                                 strict=True)):
        if part.teacher == "topk":
            code += tensors[0].shape[1] * 1000.0 ** j
            topk = True
    return code, (TOPK_TAILS.index(spec.topk_tail) if topk else -1)


def _route(index: torch.Tensor | None, keep: torch.Tensor | None, n_parts: int):
    """Kept tokens grouped by teacher: ``(rows, t_rows, counts)``.

    ``rows``: the student token of each kept position (each teacher's tokens in token
    order, teacher 0 first); ``t_rows``: the row of that token in its teacher's tensors;
    ``counts``: kept tokens per teacher. One teacher without routing: ``(rows, None,
    [n_kept])`` with ``rows`` the kept tokens (None: all of them).
    """
    if index is None:
        rows = None if keep is None else keep.nonzero().squeeze(1)
        return rows, None, None
    n = index.numel()
    order = torch.sort(index, stable=True).indices  # tokens grouped by teacher
    starts = torch.bincount(index, minlength=n_parts).cumsum(0) - \
        torch.bincount(index, minlength=n_parts)
    local = torch.empty_like(index)
    local[order] = torch.arange(n, device=index.device) - starts[index[order]]
    rows = order if keep is None else order[keep[order]]
    counts = torch.bincount(index[rows], minlength=n_parts).tolist()
    return rows, local[rows], counts


def _plan(student, teacher, mask, spec: Spec, agree: bool = True) -> Plan:
    """Validate the mask and the routing, agree with the other ranks (forward only),
    build the heads."""
    n = _n_tokens(student, spec)
    weight = mask_weight(mask, _compute_dtype(student, teacher, spec))
    combiner = TPCombiner(spec.group, spec.sequence_parallel) if spec.group else None
    groups, index = spec.split(teacher)
    keep, kept = None, n
    if weight is not None:
        keep = weight != 0
        kept = int(keep.sum())
        if kept == n and index is None:
            keep = None
    problems = [None, None]  # (routing or ids, log-probs): the header's last two flags
    if index is not None and agree:
        problems[0] = routing_problem(index, [_rows(t, p, spec) for (t, _), p in
                                              zip(groups, spec.parts, strict=True)],
                                      [_first_name(p) for p in spec.parts])
    rows, t_rows, counts = (None, None, None) if problems[0] else \
        _route(index, keep, len(groups))
    if problems[0] is None and agree:
        problems = _teacher_problems(groups, spec, rows, t_rows, counts)
    if combiner is not None and agree:
        header = _header(student, teacher, spec, n, kept, weight, index)
        header += [float(p is not None) for p in problems]
        combiner.check_agreement(header, student[0].device)
    for problem in problems:  # the same teachers on every rank (agreed): every rank raises
        if problem is not None:
            raise ValueError(problem)
    s_head, parts = _heads(student, teacher, spec, combiner)
    lo = 0
    for part, count in zip(parts, counts or [kept], strict=True):
        part.lo, part.hi = lo, lo + count
        lo += count
    return Plan(s_head, parts, rows, weight, n, spec, combiner, t_rows)


def _rows(tensors: list, part: Spec, spec: Spec) -> int:
    """A teacher's token rows (gathered under sequence parallelism)."""
    n = tensors[0].shape[0]
    return n * spec.tp if part.teacher == "linear" and spec.sequence_parallel else n


def _first_name(part: Spec) -> str:
    return {"linear": "teacher_hidden", "logits": "teacher_logits",
            "topk": "teacher_topk_logprobs"}[part.teacher]


def _teacher_problems(groups, spec: Spec, rows, t_rows, counts) -> list[str | None]:
    """``[ids problem, log-probs problem]`` of the first top-k teacher with one (each
    None if none); only the kept tokens' ids and log-probs are read."""
    found: list[str | None] = [None, None]
    lo = 0
    for j, (part, (tensors, _)) in enumerate(zip(spec.parts, groups, strict=True)):
        if part.teacher == "topk":
            lp, ids, where = tensors[0], tensors[1], rows
            if counts is not None:  # teacher j's kept rows, and their student tokens
                mine = t_rows[lo:lo + counts[j]]
                lp, ids, where = lp[mine], ids[mine], rows[lo:lo + counts[j]]
            elif rows is not None:
                lp, ids = lp[rows], ids[rows]
            new = [ids_problem(ids, spec.vocab_size), logprobs_problem(lp, where)]
            prefix = "" if counts is None else f"teacher {j}: "
            found = [f if f is not None or p is None else prefix + p
                     for f, p in zip(found, new, strict=True)]
        lo += 0 if counts is None else counts[j]
    return found


def _pad3(grads: tuple, student) -> list[torch.Tensor]:
    """Three gradient outputs; an empty (distinct) tensor where there is none."""
    grads = tuple(grads) + (None,) * (3 - len(grads))
    return [g if g is not None else student[0].new_empty(0) for g in grads]


def _keeps_gathered(spec: Spec) -> tuple[bool, bool]:
    """Whether the op returns the gathered student / teacher hidden states for backward.

    Under sequence parallelism the forward all-gathers the hidden states; the
    ``reduction="none"`` backward recomputes the logits from them. Keeping them (``(N, H)``
    per rank instead of ``(N / tp, H)``, from the loss's forward to its backward) saves
    one all-gather per hidden tensor in backward. Megatron's ``ColumnParallelLinear``
    re-gathers instead, because every layer of the model would otherwise hold a ``tp``
    times larger input through the whole backward pass; here there is one such tensor,
    the forward holds it anyway, and the loss's backward is the first to run.
    """
    # Not with routed teachers: their backward re-gathers every dense teacher's slice.
    keep = spec.sequence_parallel and not spec.scalar and not spec.teachers
    return keep and spec.student == "linear", keep and spec.teacher == "linear"


def _gathered_out(plan: Plan, spec: Spec, student) -> list[torch.Tensor]:
    """The two hidden-state outputs of the loss op (empty tensors where not kept)."""
    keep = _keeps_gathered(spec)
    heads = (plan.student, plan.parts[0].head)  # keep[1]: one dense linear teacher only
    return [heads[i].h if keep[i] else student[0].new_empty(0) for i in range(2)]


@custom_op("eaopd_mp::loss", mutates_args=())
def loss_op(student: list[torch.Tensor], teacher: list[torch.Tensor],
            mask: torch.Tensor | None, spec: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor, torch.Tensor]:
    """See the module docstring."""
    spec_ = _resolved(student, spec)
    with _op_context(student[0].device):
        plan = _plan(student, teacher, mask, spec_)
        scale = None
        if spec_.scalar and any(spec_.need):
            plan.student.start_grad()
            w = plan.kept_weight()
            scale = w if w is not None else torch.ones(
                plan.n_kept, dtype=plan.dtype, device=plan.student.device)
        stats = plan.scatter(run_forward(plan, scale))
        per_tok = core.token_loss(stats)
        if plan.weight is not None:
            per_tok = per_tok * plan.weight
        out = per_tok if spec_.reduction == "none" else per_tok.sum()
        grads = plan.student.grads() if scale is not None else ()
        return (out, stats, *_pad3(grads, student), *_gathered_out(plan, spec_, student))


@loss_op.register_fake
def _loss_fake(student, teacher, mask, spec):
    spec_ = parse(spec)
    n = _n_tokens(student, spec_)
    dtype = _compute_dtype(student, teacher, spec_)
    out = student[0].new_empty((n,) if spec_.reduction == "none" else (), dtype=dtype)
    stats = student[0].new_empty((n, core.NSTATS), dtype=dtype)
    grads = [student[0].new_empty(0) for _ in range(3)]
    if spec_.scalar:
        grads = [_grad_like(student, i, spec_, accumulator=True) if spec_.need[i]
                 else student[0].new_empty(0) for i in range(3)]
    keep = _keeps_gathered(spec_)
    gathered = [src[0].new_empty((n, src[0].shape[1])) if keep[i] else student[0].new_empty(0)
                for i, src in enumerate((student, teacher))]
    return (out, stats, *grads, *gathered)


def _grad_like(student, i: int, spec: Spec, accumulator: bool) -> torch.Tensor:
    """An empty tensor shaped like the gradient of ``student[i]`` before any reduction
    over ranks (the gathered hidden states under sequence parallelism)."""
    x = student[i]
    if spec.student == "linear" and i == 0:
        return x.new_empty((_n_tokens(student, spec), x.shape[1]))
    if spec.student == "linear" and accumulator:
        return x.new_empty(x.shape, dtype=core.compute_dtype(x.dtype))
    return torch.empty_like(x)


@custom_op("eaopd_mp::loss_backward", mutates_args=())
def loss_backward_op(student: list[torch.Tensor], teacher: list[torch.Tensor],
                     mask: torch.Tensor | None, stats: torch.Tensor, grad_tok: torch.Tensor,
                     spec: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad_tok * per_token_loss)`` for ``reduction="none"``, recomputed
    chunk by chunk from the saved ``(N, 7)`` statistics; in the student tensors' dtypes."""
    spec_ = _resolved(student, spec)
    with _op_context(student[0].device):
        plan = _plan(student, teacher, mask, spec_, agree=False)
        # Detached: a saved output still says requires_grad, which the kernels guard on.
        stats = stats.detach()
        scale = grad_tok.detach().to(plan.dtype).contiguous()  # often an expand (stride 0)
        if plan.weight is not None:
            scale = scale * plan.weight
        if plan.rows is not None:
            scale, stats = scale[plan.rows], stats[plan.rows]
        plan.student.start_grad()
        run_backward(plan, stats, scale)
        grads = [None if g is None else g.to(x.dtype) if i > 0 else g
                 for i, (g, x) in enumerate(zip(plan.student.grads(), student, strict=False))]
        return tuple(_pad3(tuple(grads), student))


@loss_backward_op.register_fake
def _loss_backward_fake(student, teacher, mask, stats, grad_tok, spec):
    spec_ = parse(spec)
    return tuple(_grad_like(student, i, spec_, accumulator=False) if spec_.need[i]
                 else student[0].new_empty(0) for i in range(3))


@custom_op("eaopd_mp::reduce_hidden_grad", mutates_args=())
def reduce_hidden_grad_op(grad_h: torch.Tensor, spec: str) -> torch.Tensor:
    """Sum of the hidden gradient over the tensor-parallel ranks (this rank's sequence
    slice under sequence parallelism)."""
    spec_ = parse(spec)
    return TPCombiner(spec_.group, spec_.sequence_parallel).reduce_hidden_grad(grad_h)


@reduce_hidden_grad_op.register_fake
def _reduce_fake(grad_h, spec):
    spec_ = parse(spec)
    n = grad_h.shape[0] // spec_.tp if spec_.sequence_parallel else grad_h.shape[0]
    return grad_h.new_empty((n, *grad_h.shape[1:]))


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    student, teacher, mask, spec = inputs
    ctx.spec = spec
    ctx.n_student = len(student)
    ctx.dtypes = [x.dtype for x in student]
    spec_ = parse(spec)
    keep = list(output[2:5]) if spec_.scalar else [output[1], *output[5:]]
    ctx.n_teacher = len(teacher)
    # Only the loss is differentiable: no zero (V, H) gradients materialised for the rest.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    # Every input goes through save_for_backward: in-place changes raise at backward.
    ctx.save_for_backward(*student, *teacher, mask, *keep)


def _scaled(g: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g * factor`` as a new ``dtype`` tensor, rounded once. Block by block when the
    dtype changes, so that no temporary as large as ``g`` (a float32 ``(V, H)`` one for a
    16-bit weight) is made."""
    factor = factor.to(g.dtype)
    if dtype == g.dtype or g.dim() == 0 or torch.compiler.is_compiling():
        return (g * factor).to(dtype)  # compiled: the multiply and cast fuse anyway
    out = torch.empty_like(g, dtype=dtype)
    step = max(1, _BLOCK // max(1, g[0].numel()))
    for lo in range(0, g.shape[0], step):
        out[lo:lo + step] = g[lo:lo + step] * factor
    return out


_BLOCK = 2**22  # elements per block of _scaled: 16 MiB of float32


def _backward(ctx, grad_out, _grad_stats, *_grad_grads):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "eaopd_mp's loss is once-differentiable: its backward is a closed-form "
            "gradient, so backward(create_graph=True) / double backward through it is not "
            "supported")
    spec = parse(ctx.spec)
    saved = ctx.saved_tensors
    ns, nt = ctx.n_student, ctx.n_teacher
    if grad_out is None:  # the loss output took no part in this backward
        return [None] * ns, [None] * nt, None, None
    student, teacher = saved[:ns], saved[ns:ns + nt]
    mask, kept = saved[ns + nt], saved[ns + nt + 1:]
    if spec.scalar:
        # Fresh tensors: the gradient never aliases a buffer the graph keeps (retain_graph).
        grads = [_scaled(g, grad_out, dt) if need else None
                 for g, need, dt in zip(kept, spec.need, ctx.dtypes, strict=False)]
    else:
        student, teacher, key = _regathered(student, teacher, kept[1:], spec, ctx.spec)
        grads = list(torch.ops.eaopd_mp.loss_backward(
            student, teacher, mask, kept[0], grad_out, key))
        grads = [g if need else None for g, need in zip(grads, spec.need, strict=False)]
    if spec.group and spec.student == "linear" and grads[0] is not None:
        grads[0] = torch.ops.eaopd_mp.reduce_hidden_grad(grads[0], ctx.spec)
    return grads[:ns], [None] * nt, None, None


def _regathered(student, teacher, gathered, spec: Spec, key: str):
    """``(student, teacher, spec key)`` for the ``reduction="none"`` backward: with the
    hidden states the forward gathered (:func:`_keeps_gathered`) in place of this rank's
    slices, and a spec that gathers nothing (``sequence_parallel=False``: the token count
    is then the gathered one; the hidden gradient is still reduce-scattered with the
    call's own spec)."""
    keep = _keeps_gathered(spec)
    if not any(keep):
        return list(student), list(teacher), key
    student, teacher = list(student), list(teacher)
    if keep[0]:
        student[0] = gathered[0]
    if keep[1]:
        teacher[0] = gathered[1]
    return student, teacher, dataclasses.replace(spec, sequence_parallel=False).key()


loss_op.register_autograd(_backward, setup_context=_setup_context)
