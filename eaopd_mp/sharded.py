"""Sharded models: FSDP2 (``fully_shard``), DTensor tensor parallelism, DeepSpeed ZeRO-3.

A fused head loss reads the output layer's weight directly instead of calling the layer, so
a sharding engine that materialises parameters in a module's forward hooks never sees it
used. This module runs the loss *where the engine's hooks fire*:

* :func:`run_in_forward` calls a function as a module's ``forward`` (forward redirection,
  as Lightning, TRL's ``_ForwardRedirection`` and Liger's ``_FSDPForwardRedirection`` do):
  FSDP2's pre-forward hook all-gathers the module's parameters once, in its
  ``MixedPrecisionPolicy.param_dtype``; its post-forward hook reshards them (per
  ``reshard_after_forward``) and arms the pre-backward hook that all-gathers them again for
  backward, after which FSDP reduce-scatters their gradients itself. DeepSpeed ZeRO-3's
  engine forward arms its gradient hooks the same way.
* :func:`run_frozen` does the same for a frozen module (a teacher): its parameters are
  gathered for the call, but no backward hook is armed (no all-gather in backward).
* :func:`head_eaopd_loss` is :func:`eaopd_mp.fused_linear_eaopd_loss` taking the head
  *modules*: it finds their FSDP2 owners and runs the loss inside their forward.

DTensor inputs of :func:`eaopd_mp.fused_linear_eaopd_loss` and
:func:`eaopd_mp.entropy_aware_opd_loss` (lm-head weights ``Shard(0)`` over the vocabulary,
logits ``Shard(-1)``) are routed by :func:`dtensor_linear_loss` / :func:`dtensor_logits_loss`
to the vocab-parallel path (:mod:`eaopd_mp.parallel`) over the mesh dimension's process
group. Layouts that cannot be computed exactly raise ``TypeError``/``ValueError`` naming
the layout. ``torch.distributed`` is imported only when a sharded input is seen.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

from .options import LossOptions

# --------------------------------------------------------------------------- detection


def dtensor_type():
    """``torch.distributed.tensor.DTensor`` if that module was imported (else no DTensor
    can exist, and nothing is imported here)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def any_dtensor(*xs) -> bool:
    """Whether any of ``xs`` is a DTensor, or a list of teachers' tensors holding one
    (cheap: no import)."""
    cls = dtensor_type()
    return cls is not None and any(
        isinstance(x, cls) or (isinstance(x, (list, tuple)) and any_dtensor(*x)) for x in xs)


def is_fsdp2(module) -> bool:
    """Whether ``module`` was wrapped by FSDP2's ``fully_shard``."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_fsdp1(module) -> bool:
    """Whether ``module`` is an FSDP1 ``FullyShardedDataParallel`` wrapper."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def is_zero3_param(p) -> bool:
    """Whether ``p`` is a DeepSpeed ZeRO-3 partitioned parameter (it carries ``ds_id``)."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_status")


def zero3_enabled(*modules) -> bool:
    """Whether any parameter of ``modules`` is partitioned by DeepSpeed ZeRO-3."""
    return any(is_zero3_param(p) for m in modules if m is not None
               for p in m.parameters(recurse=True))


def is_sharded(model) -> bool:
    """Whether running ``model`` issues collectives that every rank must join: it is a
    DeepSpeed engine, any of its submodules is an FSDP2 unit (``fully_shard`` on its decoder
    layers only, the root left plain, counts), or any parameter is a DTensor (FSDP2, tensor
    parallelism) or ZeRO-3 partitioned. Such a teacher is run on every rank, also where this
    rank routes it no sequence (see :func:`run_teachers_frozen`)."""
    if model is None:
        return False
    if _is_engine(model) or any(is_fsdp2(m) for m in model.modules()):
        return True
    cls = dtensor_type()
    return any((cls is not None and isinstance(p, cls)) or is_zero3_param(p)
               for p in model.parameters(recurse=True))


HELPERS = ("eaopd_mp.hf.eaopd_loss (Hugging Face models), eaopd_mp.trl."
           "EAOPDDistillationTrainer, or eaopd_mp.sharded.head_eaopd_loss (your own model)")


def check_weight(name: str, weight: object) -> None:
    """Refuse, with the layout named, a head weight this library cannot read as it is: an
    FSDP1 flat parameter, or an empty (ZeRO-3 / FSDP1 partitioned) parameter."""
    if not isinstance(weight, torch.Tensor):
        return
    if getattr(weight, "_is_flat_param", False):
        raise TypeError(
            f"{name} is an FSDP1 FlatParameter (FullyShardedDataParallel): its shape "
            f"{tuple(weight.shape)} is a flattened shard of many parameters. FSDP1 is not "
            "supported: wrap the model with FSDP2 (torch.distributed.fsdp.fully_shard) and "
            f"call {HELPERS}")
    # A (0, H) weight is an empty vocabulary shard (a DTensor Shard(0) of V < ranks rows
    # leaves the last ranks none): the vocab-parallel path takes it, and one device refuses
    # an empty vocabulary on its own (eaopd_mp._checks.nonempty_vocab).
    if weight.numel() == 0 and not (weight.dim() == 2 and weight.shape[1] > 0):
        if is_zero3_param(weight):
            shape = tuple(getattr(weight, "ds_shape", ()))
            raise ValueError(
                f"{name} is a DeepSpeed ZeRO-3 partitioned parameter (shape "
                f"{tuple(weight.shape)}, full shape {shape}): it is empty outside its "
                f"module's forward. Gather it as DeepSpeed expects: call {HELPERS}")
        raise ValueError(
            f"{name} is empty (shape {tuple(weight.shape)}): a parameter partitioned outside "
            "its module's forward (DeepSpeed ZeRO-3, FSDP1)? Run the loss inside the "
            f"engine's forward: {HELPERS}")


# --------------------------------------------------------------------------- FSDP2 / ZeRO-3


def run_in_forward(module, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, run as ``module``'s forward so that its engine's hooks fire.

    For an FSDP2 module (``fully_shard``): its parameters are all-gathered once before
    ``fn`` (in the mixed-precision ``param_dtype``; floating ``args``/``kwargs`` are cast
    like any forward input, so pass tensors that must keep their dtype by closure), resharded
    after it as ``reshard_after_forward`` says, gathered again for backward, and their
    gradients reduce-scattered by FSDP. For a DeepSpeed engine, its forward's hooks. For any
    other module, this is just ``fn(*args, **kwargs)``.

    The redirection swaps ``module.forward`` for the call only (restored on exit, also on
    error), as TRL's ``_ForwardRedirection`` and Lightning's forward redirection do.
    """
    if not (is_fsdp2(module) or _is_engine(module)):
        return fn(*args, **kwargs)
    # A DeepSpeed engine's forward runs its bookkeeping, then its module's forward.
    inner = module.module if _is_engine(module) else module
    original = inner.forward

    def redirected(*a, **k):
        inner.forward = original  # fn may call the real forward
        out = fn(*a, **k)
        # FSDP2 hooks a view output's backward in a way an in-place op would drop: own it
        # (where grad is off, as in run_frozen, no hook is registered).
        view = isinstance(out, torch.Tensor) and out._base is not None
        return out.clone() if view and torch.is_grad_enabled() else out

    inner.forward = redirected
    try:
        return module(*args, **kwargs)
    finally:
        inner.forward = original


def run_frozen(module, fn, *args, **kwargs):
    """:func:`run_in_forward` for a frozen module (a teacher): its engine's hooks run
    without gradient, so backward never all-gathers it again; ``fn`` itself runs in the
    caller's grad mode, and its result is handed back around the engine's post-forward hooks
    (so the loss keeps its graph to the student: DeepSpeed passes forward outputs through
    autograd functions, which under ``no_grad`` would cut it; FSDP2 might cast it)."""
    grad = torch.is_grad_enabled()
    result = []

    def inner(*a, **k):
        with torch.set_grad_enabled(grad):
            result.append(fn(*a, **k))

    with torch.no_grad():
        run_in_forward(module, inner, *args, **kwargs)
    return result[0]


def run_in_forwards(modules, fn, *args, frozen: bool = False):
    """``fn(*args)`` inside the nested forwards of ``modules`` (outermost first)."""
    runner = run_frozen if frozen else run_in_forward
    if not modules:
        return fn(*args)
    first, rest = modules[0], modules[1:]
    return runner(first, lambda *a: run_in_forwards(rest, fn, *a, frozen=frozen), *args)


def run_teachers_frozen(owner_lists, steps, last):
    """``last()`` inside the frozen forwards of several teachers (teacher 0 outermost), with
    ``steps[j]()`` run inside teacher ``j``'s forwards first (its backbone, say).

    Every teacher's owners are entered, on every rank, in the same order, whether or not this
    rank has tokens for that teacher: FSDP2's all-gathers (and ZeRO-3's) are collectives, so
    a rank that skipped a teacher its peers run would hang them. A module that an earlier
    teacher entered already (one model given twice) is not entered again. Inside ``last``
    every teacher's head is gathered at once, so one fused call reads them all.
    """
    entered: set = set()

    def level(j):
        if j == len(owner_lists):
            return last()
        mods = [m for m in owner_lists[j] if id(m) not in entered]
        entered.update(id(m) for m in mods)

        def body():
            steps[j]()
            return level(j + 1)

        return run_in_forwards(mods, body, frozen=True)

    return level(0)


def routed_hidden(rows: torch.Tensor, collective: bool, forward, empty) -> torch.Tensor:
    """A teacher's hidden states of its routed ``rows`` (no gradient): ``forward(rows)``.

    A rank with no row for this teacher runs ``forward`` on row 0 and returns its empty
    slice when the teacher's forward holds collectives (``collective``: FSDP2, ZeRO-3,
    :func:`is_sharded`), so that its peers' all-gathers are matched; otherwise it returns
    ``empty()`` without running the teacher."""
    if rows.numel() == 0 and not collective:
        return empty()
    take = rows if rows.numel() else rows.new_zeros(1)
    with torch.no_grad():
        out = forward(take)
    return out if rows.numel() else out[:0]


def kept_for_backward(x, reduction: str, engine_owned: bool):
    """A frozen (teacher) head tensor as the loss may keep it: with ``reduction="none"``
    the backward recomputes the logits from it, after the engine has freed its gathered copy
    (FSDP2's reshard, ZeRO-3's release), so it is copied; otherwise as it is."""
    if x is None or reduction != "none" or not engine_owned:
        return x
    return x.detach().clone()


def owners(model, head) -> list:
    """The FSDP2 modules whose forward gathers ``head``'s parameters: the head itself when it
    is its own FSDP unit (NeMo Automodel's layout), and ``model`` (the root that holds it);
    or a DeepSpeed engine. Outermost first, without repeats."""
    found = []
    for m in (model, head):
        if m is not None and (is_fsdp2(m) or _is_engine(m)) and all(m is not f for f in found):
            found.append(m)
    if _is_engine(model) and head is not None:
        _register_external(model.module, head)
    if is_fsdp1(model) or is_fsdp1(head):
        raise TypeError("FSDP1 (FullyShardedDataParallel) is not supported: its flat "
                        "parameters hide the head's (vocab, hidden) layout; wrap the model "
                        "with FSDP2 (torch.distributed.fsdp.fully_shard)")
    return found


def _register_external(module, head) -> None:
    """ZeRO-3: declare the head's parameters as used in ``module``'s forward
    (``deepspeed.zero.register_external_parameter``, idempotent), so that the engine gathers
    them in that forward and again in its backward, where the fused loss's dense gradient
    then accumulates into the gathered parameter and is reduce-scattered (without it the
    first step fails with 'size of tensor a (0) must match ...')."""
    params = [p for p in head.parameters(recurse=False) if is_zero3_param(p)]
    if not params:
        return
    import deepspeed

    for p in params:
        deepspeed.zero.register_external_parameter(module, p)


def _is_engine(module) -> bool:
    """A DeepSpeed engine (its ``module`` attribute holds the model)."""
    return type(module).__name__ == "DeepSpeedEngine"


@contextlib.contextmanager
def gathered(*params):
    """DeepSpeed ZeRO-3: gather ``params`` (a head's weight and bias) for the block, as
    ``deepspeed.zero.GatheredParameters`` does (read-only; gradients flow to the partitioned
    parameters through the engine's hooks, which :func:`run_in_forward` arms). A no-op for
    parameters that are not ZeRO-3 partitioned or are gathered already (tied embeddings)."""
    todo = {id(p): p for p in params if p is not None and is_zero3_param(p)}
    if todo:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        todo = {k: p for k, p in todo.items() if p.ds_status != ZeroParamStatus.AVAILABLE}
    if not todo:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(todo.values())):
        yield


def head_eaopd_loss(student_head, student_hidden: torch.Tensor, *, model=None,
                    teacher_head=None, teacher_hidden: torch.Tensor | list | None = None,
                    teacher_model=None, **kwargs):
    """:func:`eaopd_mp.fused_linear_eaopd_loss` on the output *modules* of sharded models.

    Args:
        student_head: the student's output layer (an ``nn.Linear``-like module with
            ``weight`` ``(V, H)`` and maybe ``bias``).
        student_hidden: ``(..., H)`` hidden states (the backbone's output).
        model: the FSDP2 module whose parameters include the head (the root of
            ``fully_shard``), or a DeepSpeed engine; None when the head is its own FSDP2
            unit or not sharded.
        teacher_head, teacher_hidden, teacher_model: the same for a teacher given by its
            head (frozen: no gradient, no backward all-gather); or give ``teacher_logits``
            / the top-k form in ``kwargs``. Several teachers (``teacher_index`` in
            ``kwargs``): lists with one entry per teacher (``teacher_head`` and
            ``teacher_hidden`` None where a teacher takes another form in ``kwargs``;
            ``teacher_model`` a list, or None). Every teacher's owners are entered on every
            rank (see :func:`run_teachers_frozen`): run each teacher's backbone on every
            rank too, on zero rows if this rank routes it none.
        **kwargs: the other arguments and options of
            :func:`eaopd_mp.fused_linear_eaopd_loss`.
    Returns:
        As :func:`eaopd_mp.fused_linear_eaopd_loss`; the heads are gathered once per call,
        in FSDP's compute dtype, and the student head's gradient is reduce-scattered by FSDP.
        ``student_hidden`` is cast to the head's dtype (as FSDP casts a forward input).
    """
    from .loss import fused_linear_eaopd_loss

    several = isinstance(teacher_head, (list, tuple))
    if not several:  # one teacher: no list beside it (a list of models would be zipped short)
        for name, x in (("teacher_model", teacher_model), ("teacher_hidden", teacher_hidden)):
            if isinstance(x, (list, tuple)):
                raise ValueError(
                    f"{name} is a list of {len(x)} entries but teacher_head is "
                    f"{'None' if teacher_head is None else 'one head'}: several teachers "
                    f"take teacher_head as a list too, one entry per teacher (None where a "
                    "teacher takes another form)")
    heads = list(teacher_head) if several else [teacher_head]
    t_hidden = list(teacher_hidden) if several and isinstance(teacher_hidden, (list, tuple)) \
        else [teacher_hidden]
    models = list(teacher_model) if isinstance(teacher_model, (list, tuple)) \
        else [teacher_model] * len(heads)
    if several and not (len(t_hidden) == len(models) == len(heads)):
        raise ValueError(f"teacher_head has {len(heads)} entries, teacher_hidden "
                         f"{len(t_hidden) if isinstance(teacher_hidden, (list, tuple)) else 1}"
                         f" and teacher_model {len(models)}: one entry per teacher")
    s_owners = owners(model, student_head)
    t_owners = [owners(m, h) if h is not None else [] for m, h in zip(models, heads,
                                                                        strict=True)]
    reduction = kwargs.get("reduction")

    def loss_fn():
        s_w, s_b = student_head.weight, getattr(student_head, "bias", None)
        t_params = [(h.weight, getattr(h, "bias", None)) if h is not None else (None, None)
                    for h in heads]
        with gathered(s_w, s_b, *(p for wb in t_params for p in wb)):
            t_kw = {}
            if any(h is not None for h in heads):
                keep = [functools.partial(kept_for_backward, reduction=reduction,
                                          engine_owned=bool(o)) for o in t_owners]
                t_kw = dict(
                    teacher_hidden=[_as_dtype(x, w) for x, (w, _) in zip(t_hidden, t_params,
                                                                         strict=True)],
                    teacher_weight=[k(w) for k, (w, _) in zip(keep, t_params, strict=True)],
                    teacher_bias=[k(b) for k, (_, b) in zip(keep, t_params, strict=True)])
                if not several:
                    t_kw = {k: v[0] for k, v in t_kw.items()}
            return fused_linear_eaopd_loss(_as_dtype(student_hidden, s_w), s_w,
                                           student_bias=s_b, **t_kw, **kwargs)

    def in_teachers():
        return run_teachers_frozen(t_owners, [lambda: None] * len(t_owners), loss_fn)

    return run_in_forwards(s_owners, in_teachers)


def _as_dtype(hidden, weight):
    """``hidden`` in the (gathered) head weight's dtype, as FSDP casts a forward input."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return hidden
    if weight.is_floating_point() and hidden.dtype != weight.dtype and weight.numel() > 0:
        return hidden.to(weight.dtype)
    return hidden


# --------------------------------------------------------------------------- DTensor TP


def _placements():
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Partial, Replicate, Shard


def _layout(x) -> str:
    return f"DTensor on mesh {tuple(x.device_mesh.shape)} with placements {tuple(x.placements)}"


def tp_dim(weight, name: str) -> int:
    """The mesh dim a ``(V, H)`` DTensor weight is sharded over the vocabulary on (exactly one
    ``Shard(0)``, the other dims ``Replicate()``)."""
    Partial, Replicate, Shard = _placements()
    dims = []
    for i, p in enumerate(weight.placements):
        if isinstance(p, Shard) and p.dim == 0:
            dims.append(i)
        elif not isinstance(p, Replicate):
            raise TypeError(
                f"{name} is a {_layout(weight)}: {p!r} is not supported. The supported layout "
                "is Shard(0) over the vocabulary (torchtitan's ColwiseParallel output layer) "
                "on one mesh dim, Replicate() on the others")
    if len(dims) != 1:
        raise TypeError(
            f"{name} is a {_layout(weight)}; the supported layout is Shard(0) over the "
            "vocabulary on exactly one mesh dim (Replicate() on the others)")
    return dims[0]


def _stride(global_rows: int, mesh_size: int) -> int:
    """``torch.chunk``'s shard width: every shard but the last ones holds this many rows."""
    return -(-global_rows // mesh_size)


def _local(name: str, x, mesh, dim: int, ok_dims=(), what: str = ""):
    """``x``'s local tensor (autograd kept) and the tensor dim it is sharded on (or None).

    A plain tensor is taken as the same on every rank (replicated). A DTensor must live on
    ``mesh``, ``Replicate()`` on every mesh dim but the TP dim ``dim``, where it may also be
    ``Shard(k)`` for ``k`` in ``ok_dims`` (``what`` names that layout in errors).
    """
    if x is None or not any_dtensor(x):
        return x, None
    Partial, Replicate, Shard = _placements()
    if x.device_mesh != mesh:
        raise ValueError(f"{name} is a {_layout(x)} but the student's sharded input is on mesh "
                         f"{tuple(mesh.shape)}: give every DTensor input the same mesh")
    sharded = None
    for i, p in enumerate(x.placements):
        if isinstance(p, Replicate):
            continue
        if i == dim and isinstance(p, Shard) and p.dim % x.dim() in ok_dims:
            sharded = p.dim % x.dim()
            continue
        supported = "Replicate()" + (f" or {what}" if what else "")
        raise TypeError(
            f"{name} is a {_layout(x)}: {p!r} on mesh dim {i} is not supported; supported: "
            f"{supported} on the TP mesh dim {dim}, Replicate() on the others (no sharding "
            "along the hidden dim, no Partial)")
    return x.to_local(), sharded


def _each(name: str, x, fn):
    """``fn(name, x)`` on one tensor, or on each entry of a teacher list (named
    ``name[j]``); None (and a list's None entries) stay None."""
    if isinstance(x, (list, tuple)):
        return [None if v is None else fn(f"{name}[{j}]", v) for j, v in enumerate(x)]
    return None if x is None else fn(name, x)


def _entries(name: str, x) -> list:
    """``[(name, tensor), ...]``: one tensor, or a teacher list's given entries."""
    if isinstance(x, (list, tuple)):
        return [(f"{name}[{j}]", v) for j, v in enumerate(x) if v is not None]
    return [] if x is None else [(name, x)]


def _check_teacher_weight(name: str, tw, student_weight, dim: int, mesh) -> None:
    """A teacher head beside a DTensor student head: a DTensor ``Shard(0)`` on the same
    mesh dim with the student's row count (so that every rank's shard has the student's
    width: checked here, on every rank, rather than on the one rank whose shard differs)."""
    if not any_dtensor(tw):
        raise TypeError(f"{name} is a plain tensor but student_weight a DTensor: give every "
                        "head as a DTensor Shard(0) over the vocabulary")
    t_dim = tp_dim(tw, name)
    if t_dim != dim or tw.device_mesh != mesh:
        raise ValueError(f"{name} is a {_layout(tw)}, student_weight a "
                         f"{_layout(student_weight)}: shard both on the same mesh dim")
    if tw.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"{name} has {tw.shape[0]} rows and student_weight {student_weight.shape[0]}: "
            f"sharded over {mesh.size(dim)} ranks their shards differ in width; pad the "
            "heads to one row count (vocab_size= gives the real vocabulary)")


def _check_vocab_widths(vocab: int, student_bias, teacher_bias, teacher_logits) -> None:
    """Biases and dense teacher logits beside a DTensor head of ``vocab`` rows: DTensors
    whose *global* vocabulary width is ``vocab``, checked on every rank (with uneven shards a
    wrong width changes one rank's shard only, so the local shapes would fail on that rank
    alone while the others wait in the next collective)."""
    for name, x, what in (
            *((n, x, "Shard(0)") for n, x in _entries("student_bias", student_bias)),
            *((n, x, "Shard(0)") for n, x in _entries("teacher_bias", teacher_bias)),
            *((n, x, "Shard(-1)") for n, x in _entries("teacher_logits", teacher_logits))):
        if not any_dtensor(x):
            raise TypeError(f"{name} is a plain tensor of shape {tuple(x.shape)} but "
                            f"student_weight a DTensor: give it as a DTensor {what} over the "
                            "vocabulary")
        if x.dim() == 0 or x.shape[-1] != vocab:
            raise ValueError(f"{name} has global shape {tuple(x.shape)} but student_weight "
                             f"has {vocab} rows: its vocabulary dim must be {vocab} wide "
                             f"(sharded {what} like the heads)")


def dtensor_linear_loss(student_hidden, student_weight, student_bias, teacher_hidden,
                        teacher_weight, teacher_bias, teacher_logits, labels,
                        options: LossOptions, topk_logprobs=None, topk_indices=None,
                        entropy=None, teacher_index=None):
    """:func:`eaopd_mp.fused_linear_eaopd_loss` on DTensor inputs: the vocab-parallel fused
    loss over the process group of the mesh dim the student weight is ``Shard(0)`` on.

    Layouts: ``student_weight``/``teacher_weight`` (and biases) ``Shard(0)`` over the
    vocabulary (uneven last shards as ``torch.chunk`` lays them out); hidden states
    ``Replicate()`` (or plain tensors, the same on every rank) or sharded along one token
    dim (sequence parallelism; that dim must divide evenly); ``teacher_logits``
    ``Shard(-1)``; the mask, entropy and top-k tensors replicated. Returns a plain tensor, the
    same on every rank (the replicated loss's local value); gradients reach the DTensors with
    their placements (the weight's ``Shard(0)``, the hidden state's, summed over the mesh).

    Several teachers (``teacher_index``, replicated): each teacher argument is a list (see
    :mod:`eaopd_mp.teachers`) whose entries take the layouts above; every dense teacher's
    head is sharded on the student's mesh dim with the student's row count, and every
    hidden state is sharded alike.
    """
    from .parallel import linear_parallel

    if not any_dtensor(student_weight):
        raise TypeError(
            f"student_weight is a plain tensor of shape {tuple(student_weight.shape)} but "
            "other inputs are DTensors: give the lm-head weight as a DTensor Shard(0) over "
            "the vocabulary (or all inputs as plain tensors)")
    dim = tp_dim(student_weight, "student_weight")
    mesh = student_weight.device_mesh
    group = mesh.get_group(dim)
    size = mesh.size(dim)
    vocab = student_weight.shape[0]
    stride = _stride(vocab, size)
    for name, tw in _entries("teacher_weight", teacher_weight):
        _check_teacher_weight(name, tw, student_weight, dim, mesh)
    _check_vocab_widths(vocab, student_bias, teacher_bias, teacher_logits)
    seq = "Shard(d) on a token dim d (sequence parallelism)"
    tokens = range(student_hidden.dim() - 1)
    vocab_rows = "Shard(0) over the vocabulary"

    def local(ok, what=""):
        return lambda n, x: _local(n, x, mesh, dim, ok(x), what)[0]

    def hidden_dim(n, x):  # the token dim a hidden state is sharded on (or None)
        return _local(n, x, mesh, dim, range(x.dim() - 1), seq)[1]

    h, h_dim = _local("student_hidden", student_hidden, mesh, dim, tokens, seq)
    w, _ = _local("student_weight", student_weight, mesh, dim, (0,), vocab_rows)
    b, _ = _local("student_bias", student_bias, mesh, dim, (0,), vocab_rows)
    th = _each("teacher_hidden", teacher_hidden, local(lambda x: range(x.dim() - 1), seq))
    tw = _each("teacher_weight", teacher_weight, local(lambda x: (0,), vocab_rows))
    tb = _each("teacher_bias", teacher_bias, local(lambda x: (0,), vocab_rows))
    tl = _each("teacher_logits", teacher_logits, local(lambda x: (x.dim() - 1,),
                                                       "Shard(-1) over the vocabulary"))
    rest = [_each(n, x, local(lambda x: ())) for n, x in (
        ("labels", labels), ("teacher_topk_logprobs", topk_logprobs),
        ("teacher_topk_indices", topk_indices), ("teacher_entropy", entropy))]
    index = _each("teacher_index", teacher_index, local(lambda x: ()))
    for name, x in (("student_hidden", student_hidden),
                    *_entries("teacher_hidden", teacher_hidden)):
        if not any_dtensor(x):
            _check_replicated(name, x, group)
    for name, x in _entries("teacher_hidden", teacher_hidden):
        x_dim = hidden_dim(name, x)
        if x_dim != h_dim:
            raise ValueError(f"student_hidden ({_describe(student_hidden)}) and {name} "
                             f"({_describe(x)}) must be sharded alike")
        if x_dim is not None and x.shape[x_dim] % size:
            raise ValueError(f"{name} is a {_layout(x)}: its token dim {x_dim} of size "
                             f"{x.shape[x_dim]} does not split evenly over {size} ranks; "
                             "sequence parallelism needs equal shards")
    options = _with_vocab(options, vocab)
    if h_dim is None:
        return linear_parallel(h, w, b, th, tw, tb, tl, rest[0], options, group, False,
                               *rest[1:], stride=stride, teacher_index=index)
    return _sequence_parallel(student_hidden, h_dim, size, h, w, b, th, tw, tb, tl, rest,
                              options, group, stride, index)


def _check_replicated(name: str, x: torch.Tensor, group) -> None:
    """A plain tensor beside a DTensor weight is taken as replicated over the weight's mesh
    dim: check it (one tiny all-gather of a float64 fingerprint), so that an FSDP2-sharded
    weight read outside its module's forward (a DTensor ``Shard(0)`` over the data-parallel
    mesh, whose ranks hold different tokens) raises instead of mixing tokens."""
    import torch.distributed as dist

    v = x.detach().to(torch.float64)
    mine = torch.stack([v.sum(), (v * v).sum()]).to(x.device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    if any(not torch.equal(t, table[0]) for t in table):
        raise ValueError(
            f"{name} is a plain tensor of shape {tuple(x.shape)} that differs across the "
            "ranks the weight is sharded over; a plain hidden state must be the same on "
            "every rank (or give it as a DTensor). If the weight is an FSDP2 parameter read "
            "outside its module's forward, run the loss inside it: "
            "eaopd_mp.sharded.head_eaopd_loss(head, hidden, model=root, ...)")


def _describe(x) -> str:
    return _layout(x) if any_dtensor(x) else f"plain tensor of shape {tuple(x.shape)}"


def _with_vocab(options: LossOptions, vocab: int) -> LossOptions:
    """The real vocabulary defaults to the weight's global rows (not stride x ranks)."""
    if options.vocab_size is not None:
        return options
    return LossOptions.build(dict(options.given(), vocab_size=vocab))


def _sequence_parallel(student_hidden, d, size, h, w, b, th, tw, tb, tl, rest, options,
                       group, stride, index=None):
    """Hidden states sharded along token dim ``d``: the vocab-parallel path gathers and
    reduce-scatters along the first dim, so ``d`` is moved first (and every token-shaped
    tensor with it: a routed teacher's own tokens too, which keeps them in token order when
    the routing is along another dim); ``batchmean`` keeps dividing by the caller's first
    token dim."""
    from .parallel import linear_parallel

    full = student_hidden.shape[d]
    if full % size:
        raise ValueError(
            f"student_hidden is a {_layout(student_hidden)}: its token dim {d} of size {full} "
            f"does not split evenly over {size} ranks; sequence parallelism needs equal "
            "shards (pad the sequence)")
    token_shape = tuple(student_hidden.shape[:-1])
    if d:
        n_tok = len(token_shape)

        def first(n, x, extra=1):
            if x.dim() != n_tok + extra:  # a routed teacher's flat rows cannot be moved
                raise ValueError(
                    f"{n} has shape {tuple(x.shape)}: under sequence parallelism (token dim "
                    f"{d} sharded) give it {n_tok + extra} dims, its own tokens laid out like "
                    f"the student's {token_shape} (one teacher per sequence: its sequences)")
            return x.movedim(d, 0)

        def token(n, x):  # token-shaped (no feature dim)
            return first(n, x, 0)

        h, th, tl = h.movedim(d, 0), _each("teacher_hidden", th, first), \
            _each("teacher_logits", tl, first)
        rest = [_each(n, x, token if n in ("labels", "teacher_entropy") else first)
                for n, x in zip(("labels", "teacher_topk_logprobs", "teacher_topk_indices",
                                 "teacher_entropy"), rest, strict=True)]
        index = _each("teacher_index", index, token)
    reduction = options.reduction
    if d and reduction == "batchmean":
        options = LossOptions.build(dict(options.given(), reduction="sum"))
    out = linear_parallel(h, w, b, th, tw, tb, tl, rest[0], options, group, True, *rest[1:],
                          stride=stride, teacher_index=index)
    loss, stats = out if options.return_stats else (out, None)
    if d and reduction == "batchmean":
        loss = loss / max(token_shape[0], 1)
    elif d and reduction == "none":
        loss = loss.movedim(0, d)
    if d and stats is not None and "token" in stats:  # per-token statistics: the same move
        stats["token"] = {k: v.movedim(0, d) for k, v in stats["token"].items()}
    return loss if stats is None else (loss, stats)


def dtensor_logits_loss(student_logits, teacher_logits, labels, options: LossOptions,
                        topk_logprobs=None, topk_indices=None, entropy=None,
                        teacher_index=None):
    """:func:`eaopd_mp.entropy_aware_opd_loss` on vocabulary-sharded DTensor logits
    (``Shard(-1)`` on one mesh dim, uneven last shards as ``torch.chunk`` lays them out):
    the vocab-parallel loss over that dim's process group. Token dims must not be sharded;
    the mask, entropy and top-k tensors (and ``teacher_index``) are replicated. Several
    teachers: lists as :mod:`eaopd_mp.teachers` says, each dense teacher's logits sharded
    like the student's. Returns a plain tensor, the same on every rank."""
    from .parallel import logits_parallel

    Partial, Replicate, Shard = _placements()
    if not any_dtensor(student_logits):
        raise TypeError("student_logits is a plain tensor but other inputs are DTensors: give "
                        "the logits as a DTensor Shard(-1) over the vocabulary")
    last = student_logits.dim() - 1
    dims = [i for i, p in enumerate(student_logits.placements)
            if isinstance(p, Shard) and p.dim % student_logits.dim() == last]
    if len(dims) != 1:
        raise TypeError(f"student_logits is a {_layout(student_logits)}; the supported layout "
                        "is Shard(-1) over the vocabulary on one mesh dim, Replicate() on "
                        "the others")
    dim, mesh = dims[0], student_logits.device_mesh
    size = mesh.size(dim)
    vocab = student_logits.shape[-1]
    vocab_cols = "Shard(-1) over the vocabulary"
    z, _ = _local("student_logits", student_logits, mesh, dim, (last,), vocab_cols)
    for name, y in _entries("teacher_logits", teacher_logits):
        if not any_dtensor(y):
            raise TypeError(f"{name} is a plain tensor but student_logits a DTensor: give "
                            "both as DTensors Shard(-1) over the vocabulary")
        routed = isinstance(teacher_logits, (list, tuple))
        if (y.shape[-1] != vocab) if routed else (y.shape != student_logits.shape):
            raise ValueError(f"student_logits shape {tuple(student_logits.shape)} != "
                             f"{name} shape {tuple(y.shape)}")
    y = _each("teacher_logits", teacher_logits,
              lambda n, x: _local(n, x, mesh, dim, (x.dim() - 1,), vocab_cols)[0])
    rest = [_each(n, x, lambda n, x: _local(n, x, mesh, dim)[0]) for n, x in (
        ("labels", labels), ("teacher_topk_logprobs", topk_logprobs),
        ("teacher_topk_indices", topk_indices), ("teacher_entropy", entropy),
        ("teacher_index", teacher_index))]
    return logits_parallel(z, y, rest[0], _with_vocab(options, vocab), mesh.get_group(dim),
                           *rest[1:4], stride=_stride(vocab, size), teacher_index=rest[4])


__all__ = [
    "check_weight",
    "dtensor_linear_loss",
    "dtensor_logits_loss",
    "head_eaopd_loss",
    "is_sharded",
    "run_frozen",
    "run_in_forward",
]
