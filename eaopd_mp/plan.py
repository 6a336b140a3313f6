"""One plan builder for every entry point.

A front door (``loss.py`` for one device, ``parallel.py`` for vocabulary shards,
``dtensor.py`` for DTensors) builds :class:`~eaopd_mp.options.LossOptions`, has
:mod:`eaopd_mp.inputs` check its arguments into a :class:`Call`, and calls :func:`run` with
it: the student and teacher tensors in one of their *forms*:

* student ``"logits"``: ``[z (N, V)]``; ``"linear"``: ``[h (N, H), W (V, H)(, b (V,))]``;
* teacher ``"logits"``: ``[y (N, V)]``; ``"linear"``: ``[h_t (N, H_t), W_t (V, H_t)(, b_t)]``;
  ``"topk"``: ``[logprobs (N, k), ids (N, k) int64]``;
* any teacher form may end with an ``(N,)`` gate entropy (``entropy_given``);
* several routed teachers (:mod:`eaopd_mp.inputs`): each teacher's list (its ``N_j``
  routed rows), one after the other, then the ``(N,)`` int64 routing (``Spec.teachers``).

:func:`run` turns the options and the tensors' static properties into a :class:`Spec` (plain
values, passed to the custom op as a string), calls ``torch.ops.eaopd_mp.loss`` (see
:mod:`eaopd_mp.ops`), and applies the reduction's divisor and the statistics outside the
op, where they are ordinary traceable tensor maths.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from dataclasses import dataclass

import torch

from . import core
from .driver import default_chunk_size
from .gates import Gate, default_h_max
from .options import LossOptions
from .teachers import TeacherSet
from .tp import TPInfo

Stats = dict[str, object]


@dataclass(frozen=True)
class Spec:
    """Everything the custom ops need besides tensors, as plain Python values.

    No value depends on a tensor's size: not on the token count, and not on the
    vocabulary width either (under ``torch.compile(dynamic=True)``, or with
    ``mark_dynamic`` on a padded head, that width is symbolic while the caller is traced).
    The values that follow from the width (the default chunk, the real columns, the
    default ``h_max = log V``) are left as None here and filled in by :meth:`sized` inside
    the op, from its real tensors. So a compiled caller keeps one graph as sequence
    lengths (and padded widths) change.

    Attributes:
        student, teacher: the tensor forms (``"logits"`` or ``"linear"``).
        reduction: the user's reduction (``"none"`` selects per-token outputs and the
            recompute backward; the others compute the gradient in the forward pass).
        gate, p1, p2: the resolved :class:`~eaopd_mp.gates.Gate`; ``p1`` None for the
            linear gate's default ``1 / log V`` (see :meth:`sized`).
        inv_tau: ``1 / temperature``.
        chunk: tokens per chunk; None for the default (``default_chunk_size(width)``).
        vocab_size: the real vocabulary size (all ranks); None for every column held
            (``width x tp``). After :meth:`sized`, always an int.
        need: which student tensors want a gradient.
        autocast: ``""`` or the autocast dtype (``"bfloat16"``) the GEMMs honour.
        group, tp, rank, sequence_parallel: the tensor-parallel group name (``""`` on one
            device), its size, this rank, and whether hidden states are split along the
            sequence.
        stride: columns per vocabulary shard (rank ``r`` starts at ``r * stride``); 0 on
            one device.
        s_scale, s_cap, t_scale, t_cap: the head transforms (logit scale, softcap or
            None) of the student and the teacher.
        topk_tail: the top-k teacher's target (one of
            :data:`~eaopd_mp.options.TOPK_TAILS`).
        entropy_given: the teacher list ends with an ``(N,)`` gate entropy.
        teachers: several routed teachers (``teacher == "routed"``): per teacher
            ``(form, tensors, entropy_given)``, its tensors (its entropy included) being
            consecutive in the op's teacher list, which ends with the ``(N,)`` int64
            routing; ``()`` for one teacher (see :meth:`split`).
        cols: how many logit columns held here are real vocabulary; set by :meth:`sized`
            (None in the key).
    """

    student: str
    teacher: str
    reduction: str
    gate: str
    p1: float | None
    p2: float
    inv_tau: float
    chunk: int | None
    vocab_size: int | None
    need: tuple
    autocast: str = ""
    group: str = ""
    tp: int = 1
    rank: int = 0
    sequence_parallel: bool = False
    stride: int = 0
    s_scale: float = 1.0
    s_cap: float | None = None
    t_scale: float = 1.0
    t_cap: float | None = None
    topk_tail: str = "bucket"
    entropy_given: bool = False
    teachers: tuple = ()
    cols: int | None = None

    def key(self) -> str:
        """The spec as a string argument of the custom ops (see :func:`parse`)."""
        return "|".join(repr(getattr(self, name)) for name in _SPEC_FIELDS)

    def sized(self, width: int) -> Spec:
        """The spec with its width-derived values filled in, from ``width``, the logit
        columns held here (padding included; concrete, inside the op)."""
        stride = self.stride or width
        vocab = self.vocab_size or stride * self.tp
        return dataclasses.replace(
            self, vocab_size=vocab, cols=max(0, min(width, vocab - self.rank * stride)),
            chunk=self.chunk or default_chunk_size(width),
            p1=1.0 / default_h_max(vocab) if self.p1 is None else self.p1)

    @property
    def scalar(self) -> bool:
        """The gradient is computed in the forward pass (every reduction but ``"none"``)."""
        return self.reduction != "none"

    @property
    def transform(self) -> tuple:
        """``(s_scale, s_cap, t_scale, t_cap)`` for :func:`eaopd_mp.core.make_head`."""
        return (self.s_scale, self.s_cap, self.t_scale, self.t_cap)

    @property
    def gate_obj(self) -> Gate:
        return Gate(self.gate, self.p1, self.p2)

    @functools.cached_property
    def parts(self) -> tuple[Spec, ...]:
        """One single-teacher spec per teacher (``(self,)`` for one teacher)."""
        if not self.teachers:
            return (self,)
        return tuple(dataclasses.replace(self, teacher=form, entropy_given=given, teachers=())
                     for form, _, given in self.teachers)

    def split(self, teacher: list) -> tuple[list, torch.Tensor | None]:
        """The op's flat teacher list -> ``([(tensors, entropy or None)] per teacher,
        routing or None)``."""
        if not self.teachers:
            if self.entropy_given:
                return [(list(teacher[:-1]), teacher[-1])], None
            return [(list(teacher), None)], None
        out, i = [], 0
        for _, count, given in self.teachers:
            mine = list(teacher[i:i + count])
            i += count
            out.append((mine[:-1], mine[-1]) if given else (mine, None))
        return out, teacher[i]


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(Spec))


@functools.lru_cache(maxsize=256)
def parse(key: str) -> Spec:
    """Inverse of :meth:`Spec.key`."""
    return Spec(*(ast.literal_eval(v) for v in key.split("|")))


@functools.lru_cache(maxsize=256)
def sized(key: str, width: int) -> Spec:
    """``parse(key).sized(width)``, cached (called by the op bodies, never traced)."""
    return parse(key).sized(width)


def _autocast_dtype(device: torch.device) -> str:
    """The autocast dtype in force for ``device`` (``""`` if autocast is off)."""
    if not torch.is_autocast_enabled(device.type):
        return ""
    return str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")


@dataclass(frozen=True)
class Call:
    """One validated call: what a front door hands :func:`run` (built by
    :mod:`eaopd_mp.inputs`, the one place where arguments are checked).

    Attributes:
        student: the student's tensors in its form's order (token dims flattened):
            ``[z (N, V)]`` or ``[h (N, H), W (V, H)(, b (V,))]``.
        form: ``"logits"`` or ``"linear"``.
        teachers: the checked teachers: one, or several routed per token.
        labels: the ``token_shape`` mask (shape-checked), or None.
        token_shape: the token dims of the result (under sequence parallelism, the full
            gathered shape).
        width: logit columns held here (the student's ``V`` on one device, where
            ``vocab_size`` may keep fewer; ``V_local`` on a rank).
        tp: the tensor-parallel group, or None on one device.
    """

    student: list
    form: str
    teachers: TeacherSet
    labels: torch.Tensor | None
    token_shape: tuple
    width: int
    tp: TPInfo | None = None


def run(call: Call, options: LossOptions):
    """Evaluate the loss through the custom op; the reduction and statistics around it.

    Returns:
        The loss (float32, float64 for float64 inputs), or ``(loss, stats)``; with several
        teachers ``stats["per_teacher"]`` holds each teacher's statistics.
    """
    student, teachers, tp, token_shape = call.student, call.teachers, call.tp, call.token_shape
    vocab = (options.vocab_size or call.width) if tp is None else tp.vocab_size  # maybe SymInt
    if "topk" in teachers.forms and _transformed(options):
        raise ValueError(
            "student_softcap / student_logit_scale / teacher_softcap / teacher_logit_scale "
            "are not supported with a top-k teacher (its log-probabilities are final; the "
            "student's transform is not in the top-k kernels yet)")
    gate = options.resolve_gate(None)  # no size: the op resolves the default h_max
    grad = torch.is_grad_enabled()
    need = tuple(bool(grad and t is not None and t.requires_grad) for t in student)
    need = need + (False,) * (3 - len(need))
    flat, form, entropy_given, described = _encode(teachers)
    spec = Spec(
        student=call.form, teacher=form, reduction=options.reduction,
        gate=gate.kind, p1=gate.p1, p2=gate.p2, inv_tau=1.0 / options.temperature,
        chunk=options.chunk_size, vocab_size=options.vocab_size, need=need,
        autocast=_autocast_dtype(student[0].device) if call.form == "linear" else "",
        group="" if tp is None else tp.group, tp=1 if tp is None else tp.size,
        rank=0 if tp is None else tp.rank,
        sequence_parallel=False if tp is None else tp.sequence_parallel,
        stride=0 if tp is None else tp.stride,
        s_scale=options.student_logit_scale, s_cap=options.student_softcap,
        t_scale=options.teacher_logit_scale, t_cap=options.teacher_softcap,
        topk_tail=options.topk_tail, entropy_given=entropy_given, teachers=described,
    )
    mask = None if call.labels is None else call.labels.reshape(-1)
    out, stats, *_ = torch.ops.eaopd_mp.loss(student, flat, mask, spec.key())
    if options.reduction == "none":
        loss = out.reshape(token_shape)
    else:
        loss = out / _divisor(options.reduction, token_shape)
    if not options.return_stats:
        return loss
    result: Stats = dict(summarize(stats, mask))
    # A Python float: with the default h_max = log V, a symbolic V is specialised here.
    result.update(options.resolve_gate(vocab).describe())
    if teachers.several:
        result["per_teacher"] = [
            summarize(stats, _routed_mask(mask, teachers.index, j, stats.dtype))
            for j in range(len(teachers.forms))]
    if options.return_stats == "token":
        result["token"] = token_stats(stats, mask, teachers, token_shape, options.topk_tail)
    return loss, result


ROUTED = "routed"  # Spec.teacher of a call with several teachers


def _encode(teachers: TeacherSet) -> tuple[list, str, bool, tuple]:
    """The op's flat teacher list, ``Spec.teacher``, ``Spec.entropy_given`` and
    ``Spec.teachers`` (see :meth:`Spec.split`)."""
    if not teachers.several:
        (tensors,), (entropy,) = teachers.tensors, teachers.entropies
        flat = list(tensors) if entropy is None else [*tensors, entropy]
        return flat, teachers.forms[0], entropy is not None, ()
    flat, described = [], []
    for form, tensors, entropy in zip(teachers.forms, teachers.tensors, teachers.entropies,
                                      strict=True):
        mine = list(tensors) if entropy is None else [*tensors, entropy]
        flat.extend(mine)
        described.append((form, len(mine), entropy is not None))
    return [*flat, teachers.index], ROUTED, False, tuple(described)


def _routed_mask(mask: torch.Tensor | None, index: torch.Tensor, j: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The token weights of teacher ``j``'s tokens (0 elsewhere)."""
    mine = (index == j).to(dtype)
    return mine if mask is None else mine * mask.detach().to(dtype)


def _transformed(options: LossOptions) -> bool:
    """Whether any head transform (softcap, logit scale) is asked for."""
    return (options.student_softcap is not None or options.teacher_softcap is not None
            or options.student_logit_scale != 1.0 or options.teacher_logit_scale != 1.0)


def _divisor(reduction: str, token_shape: tuple):
    """The reference definition's divisor: 1 (sum), numel (mean), first token dim (batchmean)."""
    if reduction == "sum":
        return 1
    if reduction == "mean":
        n = 1
        for d in token_shape:
            n = n * d
        return max(n, 1)
    return max(token_shape[0], 1) if token_shape else 1


# The statistics columns reported by name (return_stats=True: their means; "token": each).
STAT_COLUMNS = {
    "teacher_entropy": core.ENTROPY,
    "fkl_weight": core.A,
    "rkl_weight": core.B,
    "kl_fwd": core.KL_FWD,
    "kl_rev": core.KL_REV,
}


def summarize(stats: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Mask-weighted means of the ``(N, 7)`` per-token statistics, detached, for logging."""
    stats = stats.detach()
    w = torch.ones_like(stats[:, 0]) if mask is None else mask.detach().to(stats.dtype)
    total = w.sum()
    denom = torch.where(total != 0, total, torch.ones_like(total))
    # Masked tokens have all-zero statistics: 0 * w never turns into NaN there.
    out = {name: (stats[:, c] * w).sum() / denom for name, c in STAT_COLUMNS.items()}
    out["tokens"] = total
    return out


def token_stats(stats: torch.Tensor, mask: torch.Tensor | None, teachers: TeacherSet,
                token_shape: tuple, topk_tail: str) -> dict[str, torch.Tensor]:
    """The per-token statistics of ``return_stats="token"``, each detached with the loss's
    token shape in the compute dtype (float32; float64 for float64 inputs), 0 on tokens of
    weight 0 (as ``F.cross_entropy`` gives an ignored token 0): ``teacher_entropy`` (the
    gate's), ``fkl_weight``, ``rkl_weight`` (the gate's ``a``, ``b``), ``kl_fwd``, ``kl_rev``.

    With a top-k teacher also ``teacher_topk_mass`` (``sum_k exp(l_k)`` of the served
    log-probs) and ``student_topk_mass`` (the student's ``sum_k p[I_k]`` at temperature
    ``tau``), 0 on tokens whose teacher is dense. Read from the ``(N, 7)`` statistics the
    loss computes anyway, and the ``(N, k)`` served numbers: no pass over the vocabulary.
    """
    stats = stats.detach()
    out = {name: stats[:, c].reshape(token_shape) for name, c in STAT_COLUMNS.items()}
    if "topk" not in teachers.forms:
        return out
    teacher_mass = torch.zeros_like(stats[:, 0])
    student_mass = torch.zeros_like(stats[:, 0])
    index = teachers.index
    for j, (form, tensors) in enumerate(zip(teachers.forms, teachers.tensors, strict=True)):
        if form != "topk":
            continue
        mine = slice(None) if index is None else (index == j)
        teacher_mass[mine] = torch.logsumexp(tensors[0].to(stats.dtype), -1).exp()
        side = stats[mine, core.LSE_T]  # log P_tail (bucket) or log sum_k P_k (others)
        student_mass[mine] = -torch.expm1(side) if topk_tail == "bucket" else side.exp()
    if mask is not None:  # tokens of weight 0: no statistics were computed
        zero = torch.zeros_like(teacher_mass)
        teacher_mass, student_mass = (torch.where(mask.detach() == 0, zero, x)
                                      for x in (teacher_mass, student_mass))
    out["teacher_topk_mass"] = teacher_mass.reshape(token_shape)
    out["student_topk_mass"] = student_mass.reshape(token_shape)
    return out
