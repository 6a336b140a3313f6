"""Every front door's arguments -> one validated description of the call (a
:class:`~eaopd_mp.plan.Call`): the student and its teachers in their forms, the mask, the
token shape, the tensor-parallel group. Each check is written here once, raises a
``ValueError``/``TypeError`` naming the argument and its shape before any work, and runs
the same on every rank (data-dependent checks, which need the values, run inside the op:
:mod:`eaopd_mp.ops`).

The front doors call :func:`logits_call` (student logits) or :func:`linear_call` (student
hidden states and output layer), on one device or, with ``parallel=True``, on this rank's
vocabulary shards; :mod:`eaopd_mp.dtensor` turns DTensors into those shards first.

Teachers (:data:`ARGS`): every teacher argument is either one tensor (one teacher) or, with
``teacher_index``, a list with one entry per teacher (``None`` where a teacher does not use
it). ``teacher_index`` has the student's token shape, holds int64 values in
``[0, n_teachers)``, and says which teacher scores each token; teacher ``j``'s tensors hold
exactly the tokens routed to it, in token order (``N_j = (teacher_index == j).sum()``
rows once the token dims are flattened). A new teacher argument is added to :data:`ARGS`
and :func:`tensors`.
"""

from __future__ import annotations

import contextlib

import torch

from . import layouts, tp
from .plan import Call
from .teachers import TeacherSet

ARGS = ("teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logits",
        "teacher_topk_logprobs", "teacher_topk_indices", "teacher_entropy")

# Where a sharded head's loss runs inside its engine's forward (named in errors).
HELPERS = ("eaopd_mp.hf.eaopd_loss (Hugging Face models), eaopd_mp.trl."
           "EAOPDDistillationTrainer, or eaopd_mp.engines.head_eaopd_loss (your own model)")


# ------------------------------------------------------------------ one argument at a time


def tensor(name: str, x: object, *, floating: bool = True, min_dim: int = 0) -> torch.Tensor:
    """``x`` must be a tensor (floating point if asked) with at least ``min_dim`` dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")
    return x


def integers(name: str, x: object, what: str) -> torch.Tensor:
    """``x`` must be an integer (not bool) tensor; ``what`` says what its values are."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold {what} (int64), got dtype {x.dtype}")
    return x


def nonempty_vocab(name: str, x: torch.Tensor, dim: int = -1) -> None:
    """The vocabulary dim ``dim`` of ``x`` holds at least one column: the kernels cannot
    take an empty one (and no distribution lives on it)."""
    if x.shape[dim] == 0:
        raise ValueError(f"{name} has an empty vocabulary dim (shape {tuple(x.shape)}): "
                         "the loss needs at least one vocabulary column")


def same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors live on one device."""
    devices = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {where}")


def labels(x: object, token_shape: torch.Size) -> torch.Tensor | None:
    """A 0/1 or float weight mask with the token shape, or None."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"labels must be a real (0/1 or weight) mask, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(token_shape):
        raise ValueError(
            f"labels shape {tuple(x.shape)} != token shape {tuple(token_shape)} "
            "(the logits' shape without the vocabulary dim)"
        )
    if x.requires_grad:
        raise ValueError("labels is a constant mask and gets no gradient, but it requires "
                         "grad: pass labels.detach()")
    return x


def vocab_fits(vocab_size: int, **widths: int) -> None:
    """Each named width (columns or rows) holds the first ``vocab_size`` columns."""
    for name, width in widths.items():
        if width < vocab_size:
            raise ValueError(f"vocab_size {vocab_size} > {name} vocabulary width {width}")


def weight(name: str, w: object) -> None:
    """Refuse, with the layout named, a head weight this library cannot read as it is: an
    FSDP1 flat parameter, or a parameter partitioned outside its engine's forward (DeepSpeed
    ZeRO-3, FSDP1: an empty tensor). A ``(0, H)`` weight is an empty vocabulary shard (a
    DTensor ``Shard(0)`` of fewer rows than ranks leaves the last ranks none): the
    vocab-parallel path takes it, and one device refuses it (:func:`nonempty_vocab`)."""
    if not isinstance(w, torch.Tensor):
        return
    if layouts.is_flat_param(w):
        raise TypeError(
            f"{name} is an FSDP1 FlatParameter (FullyShardedDataParallel): its shape "
            f"{tuple(w.shape)} is a flattened shard of many parameters. FSDP1 is not "
            "supported: wrap the model with FSDP2 (torch.distributed.fsdp.fully_shard) and "
            f"call {HELPERS}")
    if w.numel() == 0 and not (w.dim() == 2 and w.shape[1] > 0):
        if layouts.is_zero3_param(w):
            shape = tuple(getattr(w, "ds_shape", ()))
            raise ValueError(
                f"{name} is a DeepSpeed ZeRO-3 partitioned parameter (shape "
                f"{tuple(w.shape)}, full shape {shape}): it is empty outside its "
                f"module's forward. Gather it as DeepSpeed expects: call {HELPERS}")
        raise ValueError(
            f"{name} is empty (shape {tuple(w.shape)}): a parameter partitioned outside "
            "its module's forward (DeepSpeed ZeRO-3, FSDP1)? Run the loss inside the "
            f"engine's forward: {HELPERS}")


def linear(prefix: str, hidden: object, w: object, bias: object) -> None:
    """Hidden ``(..., H)``, weight ``(V, H)``, bias ``(V,)`` of one linear head."""
    tensor(f"{prefix}_hidden", hidden, min_dim=1)
    weight(f"{prefix}_weight", w)
    tensor(f"{prefix}_weight", w)
    if w.dim() != 2:
        raise ValueError(f"{prefix}_weight must be (vocab, hidden), got shape {tuple(w.shape)}")
    if hidden.shape[-1] != w.shape[1]:
        raise ValueError(
            f"{prefix}_hidden width {hidden.shape[-1]} (shape {tuple(hidden.shape)}) != "
            f"{prefix}_weight width {w.shape[1]} (shape {tuple(w.shape)})"
        )
    if hidden.dtype != w.dtype and not torch.is_autocast_enabled(hidden.device.type):
        # Under autocast both are cast to the autocast dtype, as nn.Linear's would be.
        raise TypeError(
            f"{prefix}_hidden dtype {hidden.dtype} != {prefix}_weight dtype {w.dtype} "
            "(outside torch.autocast they must match)"
        )
    if bias is not None:
        tensor(f"{prefix}_bias", bias)
        if tuple(bias.shape) != (w.shape[0],):
            raise ValueError(
                f"{prefix}_bias shape {tuple(bias.shape)} != ({w.shape[0]},) "
                f"(rows of {prefix}_weight)"
            )
        if bias.dtype != w.dtype:
            raise ValueError(f"{prefix}_bias dtype {bias.dtype} != {prefix}_weight dtype "
                             f"{w.dtype}")


def entropy(x: object, token_shape) -> None:
    """``teacher_entropy``: a floating ``(...)`` tensor with the token shape, or None."""
    if x is None:
        return
    tensor("teacher_entropy", x)
    if tuple(x.shape) != tuple(token_shape):
        raise ValueError(f"teacher_entropy shape {tuple(x.shape)} != token shape "
                         f"{tuple(token_shape)}")


# ------------------------------------------------------------------ one teacher, each form


def teacher_logits(y: object, token_shape, width: int, vocab_size: int | None, *,
                   student: str, sharded: bool = False, several: bool = False) -> None:
    """Dense teacher logits beside a student (``student``: ``"logits"`` or ``"linear"``) of
    ``width`` columns and ``token_shape`` tokens (a routed teacher's own): the same shape;
    with ``vocab_size`` (one device) widths ``>= vocab_size``. Under tensor parallelism
    (``sharded``) both are this rank's shards, of one width."""
    tensor("teacher_logits", y, min_dim=1)
    pad_hint = ("if the vocabularies are padded differently, pass vocab_size=<the real "
                "shared vocabulary>")
    if student == "linear":
        if vocab_size is not None:
            if tuple(y.shape[:-1]) != tuple(token_shape):
                raise ValueError(
                    f"teacher_logits token shape {tuple(y.shape[:-1])} != student token "
                    f"shape {tuple(token_shape)}")
            vocab_fits(vocab_size, student_weight=width, teacher_logits=y.shape[-1])
        elif tuple(y.shape) != (*token_shape, width):
            raise ValueError(
                f"teacher_logits shape {tuple(y.shape)} != {(*token_shape, width)} (student "
                f"token shape + student vocabulary; {pad_hint})")
        return
    if vocab_size is not None and not sharded:
        if not several and tuple(y.shape[:-1]) != tuple(token_shape):
            raise ValueError(
                f"student_logits token shape {tuple(token_shape)} != teacher_logits token "
                f"shape {tuple(y.shape[:-1])}")
        vocab_fits(vocab_size, student_logits=width, teacher_logits=y.shape[-1])
    elif several and y.shape[-1] != width:
        raise ValueError(f"teacher_logits width {y.shape[-1]} (shape {tuple(y.shape)}) != "
                         f"student_logits width {width}")
    elif not several and tuple(y.shape) != (*token_shape, width):
        hint = "vocabulary shards must have one width on every rank and side" if sharded \
            else pad_hint
        raise ValueError(f"student_logits shape {(*token_shape, width)} != teacher_logits "
                         f"shape {tuple(y.shape)} ({hint})")


def teacher_linear(hidden, w, bias, token_shape, width: int, vocab_size: int | None) -> None:
    """A dense teacher given as hidden states + output layer beside a student of ``width``
    rows: its own hidden width; ``token_shape`` tokens; ``width`` rows (or, with
    ``vocab_size`` on one device, ``>= vocab_size``)."""
    if hidden is None or w is None:
        raise ValueError("teacher_hidden and teacher_weight must be given together")
    linear("teacher", hidden, w, bias)
    if tuple(hidden.shape[:-1]) != tuple(token_shape):
        raise ValueError(
            f"teacher_hidden token shape {tuple(hidden.shape[:-1])} != student_hidden "
            f"token shape {tuple(token_shape)}"
        )
    if vocab_size is not None:
        vocab_fits(vocab_size, student_weight=width, teacher_weight=w.shape[0])
    elif w.shape[0] != width:
        raise ValueError(
            f"teacher_weight vocab {w.shape[0]} (shape {tuple(w.shape)}) != student_weight "
            f"vocab {width} (if the vocabularies are padded differently, pass "
            "vocab_size=<the real shared vocabulary>)"
        )


def teacher_topk(logprobs: object, ids: object, token_shape, vocab: int) -> int:
    """A served teacher: ``(..., k)`` floating log-probs and ``(..., k)`` integer ids with
    the student's token shape, ``1 <= k <= vocab``. Returns ``k``. (Id values are checked
    inside the op: :func:`eaopd_mp.topk.ids_problem`.)"""
    if logprobs is None or ids is None:
        raise ValueError("teacher_topk_logprobs and teacher_topk_indices must be given "
                         "together")
    tensor("teacher_topk_logprobs", logprobs, min_dim=1)
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"teacher_topk_indices must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"teacher_topk_indices must hold integer vocabulary ids (int64), "
                         f"got dtype {ids.dtype}")
    if tuple(ids.shape) != tuple(logprobs.shape):
        raise ValueError(f"teacher_topk_indices shape {tuple(ids.shape)} != "
                         f"teacher_topk_logprobs shape {tuple(logprobs.shape)}")
    k = logprobs.shape[-1]
    want = (*token_shape, k)
    if tuple(logprobs.shape) != want:
        raise ValueError(f"teacher_topk_logprobs shape {tuple(logprobs.shape)} != {want} "
                         "(the student's token shape + k)")
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher top-k needs 1 <= k <= vocabulary size {vocab}, got k={k}")
    return k


def teacher_form(a: dict, token_shape, width: int, vocab_size: int | None, topk_vocab: int,
                 *, student: str, sharded: bool = False, several: bool = False) -> str:
    """Check one teacher's arguments ``a`` (:data:`ARGS`): exactly one form, each checked
    against the student (``student``: ``"logits"`` or ``"linear"``, of ``width``
    columns); returns ``"linear"``, ``"logits"`` or ``"topk"``. ``topk_vocab``: the ids'
    range; ``several``: a routed teacher (``token_shape`` its own)."""
    y = a["teacher_logits"]
    served = a["teacher_topk_logprobs"] is not None or a["teacher_topk_indices"] is not None
    if student == "logits":
        for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
            if a[k] is not None:
                raise ValueError(f"{k} applies to the fused functions only; give logits "
                                 "or top-k log-probabilities here")
        if y is not None and served:
            raise ValueError("give the teacher as teacher_logits OR teacher_topk_logprobs + "
                             "teacher_topk_indices, not both")
        if y is None and not served:
            raise ValueError("the teacher is missing: give teacher_logits, or "
                             "teacher_topk_logprobs + teacher_topk_indices")
    else:
        dense = a["teacher_hidden"] is not None or a["teacher_weight"] is not None
        if served and (dense or y is not None or a["teacher_bias"] is not None):
            raise ValueError("give the teacher in one form: teacher_hidden + teacher_weight, "
                             "teacher_logits, or teacher_topk_logprobs + teacher_topk_indices")
        if dense and y is not None:
            raise ValueError("give the teacher as teacher_hidden + teacher_weight OR "
                             "teacher_logits, not both")
        if not dense and y is None and not served:
            raise ValueError("the teacher is missing: give teacher_hidden + teacher_weight, "
                             "or teacher_logits")
        if y is not None and a["teacher_bias"] is not None:
            raise ValueError("teacher_bias only applies with teacher_hidden + teacher_weight")
    if served:
        teacher_topk(a["teacher_topk_logprobs"], a["teacher_topk_indices"], token_shape,
                     topk_vocab)
        return "topk"
    if y is not None:
        teacher_logits(y, token_shape, width, vocab_size, student=student, sharded=sharded,
                       several=several)
        return "logits"
    teacher_linear(a["teacher_hidden"], a["teacher_weight"], a["teacher_bias"], token_shape,
                   width, vocab_size)
    return "linear"


# ------------------------------------------------------------------ the teachers of a call


def split(args: dict, teacher_index) -> list[dict]:
    """One dict of :data:`ARGS` per teacher; ``[args]`` without ``teacher_index``."""
    lists = [k for k in ARGS if isinstance(args.get(k), (list, tuple))]
    if teacher_index is None:
        if lists:
            k = lists[0]
            raise TypeError(f"{k} must be a torch.Tensor, got {type(args[k]).__name__} (a "
                            "list with one entry per teacher needs teacher_index)")
        return [{k: args.get(k) for k in ARGS}]
    if not lists:
        raise ValueError("teacher_index routes tokens to several teachers: give each teacher "
                         "argument as a list with one entry per teacher")
    n = len(args[lists[0]])
    for k in ARGS:
        v = args.get(k)
        if v is None:
            continue
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"with teacher_index, {k} must be a list with one entry per "
                            f"teacher (None where a teacher does not use it), got "
                            f"{type(v).__name__}")
        if len(v) != n:
            raise ValueError(f"teacher lists differ in length: {lists[0]} has {n} entries, "
                             f"{k} has {len(v)} (one entry per teacher)")
    if n == 0:
        raise ValueError("teacher lists are empty: give at least one teacher")
    return [{k: (None if args.get(k) is None else args[k][j]) for k in ARGS}
            for j in range(n)]


def named(args: dict) -> dict:
    """The given teacher tensors by name (``teacher_hidden[1]`` for a list entry), for
    :func:`same_device`."""
    out = {}
    for k in ARGS:
        v = args.get(k)
        if isinstance(v, (list, tuple)):
            out.update({f"{k}[{j}]": x for j, x in enumerate(v)})
        elif v is not None:
            out[k] = v
    return out


def own_shape(args: dict) -> tuple | None:
    """A routed teacher's token shape, read from its first given tensor (None if none)."""
    for k in ("teacher_hidden", "teacher_logits", "teacher_topk_logprobs"):
        x = args.get(k)
        if isinstance(x, torch.Tensor):
            return tuple(x.shape[:-1])
    return None


@contextlib.contextmanager
def naming(j: int | None):
    """Prefix a check's error with ``teacher j:`` (several teachers only)."""
    if j is None:
        yield
        return
    try:
        yield
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"teacher {j}: {exc}") from exc


def rows(x: torch.Tensor) -> torch.Tensor:
    """``(..., C)`` -> ``(N, C)``, the token dims flattened; also for ``C = 0`` (a tensor-
    parallel rank's empty vocabulary shard), where ``reshape(-1, 0)`` is ambiguous."""
    return x.reshape(-1, x.shape[-1]) if x.shape[-1] else x.reshape(x.shape[:-1].numel(), 0)


def tensors(a: dict, form: str) -> list[torch.Tensor]:
    """One teacher's tensor list (token dims flattened, detached) for its form (see
    :mod:`eaopd_mp.plan`)."""
    if form == "logits":
        return [rows(a["teacher_logits"].detach())]
    if form == "topk":
        lp, ids = a["teacher_topk_logprobs"], a["teacher_topk_indices"]
        return [rows(lp.detach()), rows(ids.detach()).to(torch.int64)]
    h, w, b = a["teacher_hidden"], a["teacher_weight"], a["teacher_bias"]
    return [rows(h.detach()), w.detach(), *([b.detach()] if b is not None else [])]


def routing(teacher_index, token_shape: tuple, n_teachers: int) -> torch.Tensor:
    """The ``(N,)`` int64 routing (its values are checked inside the op)."""
    integers("teacher_index", teacher_index, "integer teacher numbers")
    if tuple(teacher_index.shape) != tuple(token_shape):
        raise ValueError(f"teacher_index shape {tuple(teacher_index.shape)} != token shape "
                         f"{tuple(token_shape)} (one teacher number per token, in "
                         f"[0, {n_teachers}))")
    return teacher_index.detach().reshape(-1).to(torch.int64)


def teachers(args: dict, teacher_index, token_shape: tuple, check, *,
             sequence_split: int = 1) -> TeacherSet:
    """Check every teacher and the routing; the call's
    :class:`~eaopd_mp.teachers.TeacherSet`.

    Args:
        args: the call's :data:`ARGS` (tensors, lists of them, or None).
        teacher_index: None, or the student-token-shaped routing.
        token_shape: the student's token shape (the full one under sequence parallelism).
        check: ``check(args_j, token_shape_j, several) -> form`` (see :func:`teacher_form`);
            with several teachers ``token_shape_j`` is the teacher's own.
        sequence_split: under sequence parallelism the group size (a dense teacher's
            hidden states are this rank's slice; its entropy covers all its tokens).
    """
    per = split(args, teacher_index)
    several = teacher_index is not None
    forms, lists, ents = [], [], []
    for j, a in enumerate(per):
        with naming(j if several else None):
            shape = token_shape if not several else own_shape(a)
            form = check(a, shape if shape is not None else token_shape, several)
            if several and form == "linear" and sequence_split > 1 and shape:
                shape = (shape[0] * sequence_split, *shape[1:])
            entropy(a["teacher_entropy"], shape if several else token_shape)
        forms.append(form)
        lists.append(tensors(a, form))
        ent = a["teacher_entropy"]
        ents.append(None if ent is None else ent.detach().reshape(-1))
    index = routing(teacher_index, token_shape, len(per)) if several else None
    return TeacherSet(tuple(forms), tuple(lists), tuple(ents), index)


# ------------------------------------------------------------------ the front doors' calls


def logits_call(student_logits, teacher: dict, labels_, teacher_index, vocab_size, *,
                parallel: bool = False, tp_group=None, stride: int | None = None) -> Call:
    """The :class:`~eaopd_mp.plan.Call` of a logits-in front door.

    Args:
        student_logits: ``(..., V)`` on one device; ``(..., V_local)`` this rank's shard
            with ``parallel=True`` (which may be empty: the shards together may not).
        teacher: the teacher arguments (:data:`ARGS`: ``teacher_logits``, top-k, entropy).
        labels_, teacher_index: the mask and the routing (or None).
        vocab_size: the real vocabulary (None: every column).
        parallel, tp_group, stride: this rank's shards of ``tp_group``
            (:func:`eaopd_mp.tp.resolve`).
    """
    tensor("student_logits", student_logits, min_dim=1)
    if not parallel:
        nonempty_vocab("student_logits", student_logits)
    token_shape = tuple(student_logits.shape[:-1])
    width = student_logits.shape[-1]
    info = tp.resolve(tp_group, width, vocab_size, False, stride) if parallel else None
    real = info.vocab_size if parallel else (vocab_size or width)

    def check(a: dict, shape, several: bool) -> str:
        return teacher_form(a, shape, width, None if parallel else vocab_size, real,
                            student="logits", sharded=parallel, several=several)

    chosen = teachers(teacher, teacher_index, token_shape, check)
    same_device(student_logits=student_logits, labels=labels_, teacher_index=teacher_index,
                **named(teacher))
    mask = labels(labels_, token_shape)
    return Call([rows(student_logits)], "logits", chosen, mask, token_shape, width, info)


def linear_call(student_hidden, student_weight, student_bias, teacher: dict, labels_,
                teacher_index, vocab_size, *, parallel: bool = False, tp_group=None,
                sequence_parallel: bool = False, stride: int | None = None) -> Call:
    """The :class:`~eaopd_mp.plan.Call` of a fused front door: the student's hidden
    states ``(..., H)`` and output layer ``(V, H)`` (+ bias), on one device or, with
    ``parallel=True``, this rank's ``(V_local, H)`` shard (under ``sequence_parallel`` the
    hidden states are this rank's slice along dim 0). Arguments as :func:`logits_call`."""
    linear("student", student_hidden, student_weight, student_bias)
    if not parallel:
        nonempty_vocab("student_weight", student_weight, 0)
    width = student_weight.shape[0]
    info = tp.resolve(tp_group, width, vocab_size, sequence_parallel, stride) \
        if parallel else None
    local_shape = tuple(student_hidden.shape[:-1])
    token_shape = local_shape
    if parallel and sequence_parallel:
        if not local_shape:
            raise ValueError("sequence_parallel=True needs student_hidden with a sequence dim, "
                             f"got shape {tuple(student_hidden.shape)}")
        token_shape = (local_shape[0] * info.size, *local_shape[1:])
    real = info.vocab_size if parallel else (vocab_size or width)

    def check(a: dict, shape, several: bool) -> str:
        served = a["teacher_topk_logprobs"] is not None or \
            a["teacher_topk_indices"] is not None
        if not several and not served and a["teacher_logits"] is None:
            shape = local_shape  # a dense teacher's hidden states: this rank's slice
        return teacher_form(a, shape, width, None if parallel else vocab_size, real,
                            student="linear", sharded=parallel, several=several)

    chosen = teachers(teacher, teacher_index, token_shape, check,
                      sequence_split=info.size if parallel and sequence_parallel else 1)
    same_device(student_hidden=student_hidden, student_weight=student_weight,
                student_bias=student_bias, labels=labels_, teacher_index=teacher_index,
                **named(teacher))
    mask = labels(labels_, token_shape)
    student = [rows(student_hidden), student_weight,
               *([student_bias] if student_bias is not None else [])]
    return Call(student, "linear", chosen, mask, token_shape, width, info)
