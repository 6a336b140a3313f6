"""Sharding engines: run the loss where FSDP2's and DeepSpeed ZeRO-3's hooks fire.

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

The Hugging Face and TRL adapters (:mod:`eaopd_mp.hf`, :mod:`eaopd_mp.trl`) build on these;
layouts are recognised by :mod:`eaopd_mp.layouts` (nothing is imported until one is seen).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .layouts import is_engine, is_fsdp1, is_fsdp2, is_zero3_param
from .loss import fused_linear_eaopd_loss


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
    if not (is_fsdp2(module) or is_engine(module)):
        return fn(*args, **kwargs)
    # A DeepSpeed engine's forward runs its bookkeeping, then its module's forward.
    inner = module.module if is_engine(module) else module
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
    :func:`eaopd_mp.layouts.is_sharded`), so that its peers' all-gathers are matched;
    otherwise it returns ``empty()`` without running the teacher."""
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
        if m is not None and (is_fsdp2(m) or is_engine(m)) and all(m is not f for f in found):
            found.append(m)
    if is_engine(model) and head is not None:
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


__all__ = [
    "gathered",
    "head_eaopd_loss",
    "owners",
    "run_frozen",
    "run_in_forward",
    "run_in_forwards",
    "run_teachers_frozen",
]
