"""The teachers of a call: one, or several routed token by token.

Every teacher argument of every entry point (:data:`ARGS`) is either one tensor (one
teacher) or, with ``teacher_index``, a list with one entry per teacher (``None`` where a
teacher does not use that argument). ``teacher_index`` has the student's token shape,
holds int64 values in ``[0, n_teachers)``, and says which teacher scores each token;
teacher ``j``'s tensors hold exactly the tokens routed to it, in token order
(``N_j = (teacher_index == j).sum()`` rows once the token dims are flattened).

The front doors (:mod:`eaopd_mp.loss`, :mod:`eaopd_mp.parallel`) check their student and
hand this module their teacher arguments and a per-door check of one teacher
(:func:`logits_check`, :func:`fused_check`); :func:`build` returns a :class:`TeacherSet`
that :func:`eaopd_mp.plan.run` encodes for the custom op. Row counts against the routing
and index values are checked inside the op, before the first chunk (they need the data).

A new teacher argument is added here: in :data:`ARGS` and in :func:`tensors`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import _checks

ARGS = ("teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logits",
        "teacher_topk_logprobs", "teacher_topk_indices", "teacher_entropy")


@dataclass(frozen=True)
class TeacherSet:
    """The checked teachers of a call (token dims flattened, detached).

    Attributes:
        forms: per teacher, ``"logits"``, ``"linear"`` or ``"topk"``.
        tensors: per teacher, its tensor list in the form's order (see
            :mod:`eaopd_mp.plan`).
        entropies: per teacher, its ``(N_j,)`` gate entropy or None.
        index: the ``(N,)`` int64 routing, or None for one teacher without routing.
    """

    forms: tuple
    tensors: tuple
    entropies: tuple
    index: torch.Tensor | None = None

    @property
    def several(self) -> bool:
        """Routed by ``teacher_index`` (even a list of one teacher)."""
        return self.index is not None


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
    :func:`eaopd_mp._checks.same_device`."""
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


def form(t_hidden, t_weight, t_logits, t_bias, topk_logprobs, topk_indices,
         token_shape, vocab: int, vocab_size: int | None = None) -> str:
    """Check a fused call's teacher (exactly one form); ``"linear"``, ``"logits"`` or
    ``"topk"``. ``token_shape``: that of ``teacher_logits`` / the top-k tensors;
    ``vocab``: the student's width."""
    if topk_logprobs is None and topk_indices is None:
        _checks.teacher_source(t_hidden, t_weight, t_logits, t_bias, token_shape, vocab,
                               vocab_size)
        return "logits" if t_logits is not None else "linear"
    if any(x is not None for x in (t_hidden, t_weight, t_logits, t_bias)):
        raise ValueError("give the teacher in one form: teacher_hidden + teacher_weight, "
                         "teacher_logits, or teacher_topk_logprobs + teacher_topk_indices")
    _checks.topk_teacher(topk_logprobs, topk_indices, token_shape, vocab_size or vocab)
    return "topk"


def logits_check(student_logits: torch.Tensor, vocab_size: int | None, topk_vocab: int, *,
                 sharded: bool = False):
    """The per-teacher check of a logits-in call: ``teacher_logits`` like the student's
    (a routed teacher: its own token shape), or a top-k teacher with ids below
    ``topk_vocab``."""
    width = student_logits.shape[-1]

    def check(a: dict, shape, several: bool) -> str:
        y, lp, ids = (a["teacher_logits"], a["teacher_topk_logprobs"],
                      a["teacher_topk_indices"])
        for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
            if a.get(k) is not None:
                raise ValueError(f"{k} applies to the fused functions only; give logits "
                                 "or top-k log-probabilities here")
        if y is not None and (lp is not None or ids is not None):
            raise ValueError("give the teacher as teacher_logits OR teacher_topk_logprobs + "
                             "teacher_topk_indices, not both")
        if y is None and lp is None and ids is None:
            raise ValueError("the teacher is missing: give teacher_logits, or "
                             "teacher_topk_logprobs + teacher_topk_indices")
        if y is None:
            _checks.topk_teacher(lp, ids, shape, topk_vocab)
            return "topk"
        if not several:
            _checks.logits_pair(student_logits, y, vocab_size, sharded=sharded)
            return "logits"
        _checks.tensor("teacher_logits", y, min_dim=1)
        if vocab_size is not None and not sharded:
            _checks.vocab_fits(vocab_size, student_logits=width, teacher_logits=y.shape[-1])
        elif y.shape[-1] != width:
            raise ValueError(f"teacher_logits width {y.shape[-1]} (shape {tuple(y.shape)}) "
                             f"!= student_logits width {width}")
        return "logits"
    return check


def fused_check(vocab: int, vocab_size: int | None, topk_vocab: int | None = None,
                hidden_shape: tuple | None = None):
    """The per-teacher check of a fused call. ``topk_vocab``: the id range of a top-k
    teacher when it differs from ``vocab_size or vocab`` (tensor parallelism);
    ``hidden_shape``: a single teacher's hidden token shape when it differs from the
    student's full one (this rank's slice under sequence parallelism)."""
    def check(a: dict, shape, several: bool) -> str:
        topk = a["teacher_topk_logprobs"] is not None or a["teacher_topk_indices"] is not None
        if hidden_shape is not None and not several and not topk \
                and a["teacher_logits"] is None:
            shape = hidden_shape
        return form(a["teacher_hidden"], a["teacher_weight"], a["teacher_logits"],
                    a["teacher_bias"], a["teacher_topk_logprobs"], a["teacher_topk_indices"],
                    shape, topk_vocab if topk and topk_vocab else vocab, vocab_size)
    return check


def rows(x: torch.Tensor) -> torch.Tensor:
    """``(..., C)`` -> ``(N, C)``, the token dims flattened; also for ``C = 0`` (a tensor-
    parallel rank's empty vocabulary shard), where ``reshape(-1, 0)`` is ambiguous."""
    return x.reshape(-1, x.shape[-1]) if x.shape[-1] else x.reshape(x.shape[:-1].numel(), 0)


def topk_tensors(logprobs: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    """The top-k teacher's tensor list ``[(N, k) log-probs, (N, k) int64 ids]``."""
    k = logprobs.shape[-1]
    return [logprobs.detach().reshape(-1, k), ids.detach().reshape(-1, k).to(torch.int64)]


def flat_entropy(entropy: torch.Tensor | None) -> torch.Tensor | None:
    """The ``(N,)`` gate entropy (detached), or None."""
    return None if entropy is None else entropy.detach().reshape(-1)


def tensors(a: dict, form_: str) -> list[torch.Tensor]:
    """One teacher's tensor list (token dims flattened, detached) for its form."""
    if form_ == "logits":
        y = a["teacher_logits"]
        return [rows(y.detach())]
    if form_ == "topk":
        return topk_tensors(a["teacher_topk_logprobs"], a["teacher_topk_indices"])
    h, w, b = a["teacher_hidden"], a["teacher_weight"], a["teacher_bias"]
    out = [h.detach().reshape(-1, h.shape[-1]), w.detach()]
    return out + ([b.detach()] if b is not None else [])


def student_tensors(hidden, weight, bias) -> list[torch.Tensor]:
    """A fused call's student list ``[h (N, H), W(, b)]``."""
    out = [hidden.reshape(-1, hidden.shape[-1]), weight]
    return out + ([bias] if bias is not None else [])


def build(args: dict, teacher_index, token_shape: tuple, check, *,
          sequence_split: int = 1) -> TeacherSet:
    """Check every teacher and the routing; the call's :class:`TeacherSet`.

    Args:
        args: the call's :data:`ARGS` (tensors, lists of them, or None).
        teacher_index: None, or the student-token-shaped routing.
        token_shape: the student's token shape (the full one under sequence parallelism).
        check: ``check(args_j, token_shape_j, several) -> form`` of the front door
            (:func:`logits_check`, :func:`fused_check`); with several teachers
            ``token_shape_j`` is the teacher's own.
        sequence_split: under sequence parallelism the group size (a dense teacher's
            hidden states are this rank's slice; its entropy covers all its tokens).
    """
    per = split(args, teacher_index)
    several = teacher_index is not None
    forms, lists, ents = [], [], []
    for j, a in enumerate(per):
        with naming(j if several else None):
            shape = token_shape if not several else own_shape(a)
            form_ = check(a, shape if shape is not None else token_shape, several)
            if several and form_ == "linear" and sequence_split > 1 and shape:
                shape = (shape[0] * sequence_split, *shape[1:])
            _checks.entropy(a["teacher_entropy"], shape if several else token_shape)
        forms.append(form_)
        lists.append(tensors(a, form_))
        ents.append(flat_entropy(a["teacher_entropy"]))
    index = routing(teacher_index, token_shape, len(per)) if several else None
    return TeacherSet(tuple(forms), tuple(lists), tuple(ents), index)


def routing(teacher_index, token_shape: tuple, n_teachers: int) -> torch.Tensor:
    """The ``(N,)`` int64 routing (its values are checked inside the op)."""
    if not isinstance(teacher_index, torch.Tensor):
        raise TypeError(f"teacher_index must be a torch.Tensor, got "
                        f"{type(teacher_index).__name__}")
    if teacher_index.is_floating_point() or teacher_index.is_complex() \
            or teacher_index.dtype == torch.bool:
        raise TypeError(f"teacher_index must hold integer teacher numbers (int64), got dtype "
                        f"{teacher_index.dtype}")
    if tuple(teacher_index.shape) != tuple(token_shape):
        raise ValueError(f"teacher_index shape {tuple(teacher_index.shape)} != token shape "
                         f"{tuple(token_shape)} (one teacher number per token, in "
                         f"[0, {n_teachers}))")
    return teacher_index.detach().reshape(-1).to(torch.int64)


def routing_problem(index: torch.Tensor, rows: list[int], names: list[str]) -> str | None:
    """What is wrong with the routing (run inside the op before any chunk), or None.

    Args:
        index: ``(N,)`` int64 teacher numbers; rows: each teacher's row count;
        names: each teacher's first tensor's name (for the message).
    """
    n = len(rows)
    bad = (index < 0) | (index >= n)
    if bool(bad.any()):
        return (f"teacher_index values must be in [0, {n}) (the teacher lists have {n} "
                f"entries), got {index[bad][:3].tolist()}")
    counts = torch.bincount(index, minlength=n).tolist()
    for j, (want, got) in enumerate(zip(counts, rows, strict=True)):
        if want != got:
            return (f"teacher {j}: {names[j]} has {got} token rows but teacher_index routes "
                    f"{want} tokens to it (a teacher's tensors hold exactly its routed "
                    "tokens, in token order)")
    return None
