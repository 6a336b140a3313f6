"""The teachers of a call: one, or several routed token by token.

A call's teachers, once checked (:func:`eaopd_mp.inputs.teachers`), are a
:class:`TeacherSet`: per teacher its form and tensors (token dims flattened), and with
several teachers the ``(N,)`` routing ``teacher_index`` (each token's teacher; teacher
``j``'s tensors hold exactly its routed tokens, in token order). :func:`eaopd_mp.plan.run`
encodes them for the custom op; row counts against the routing and index values are
checked inside the op, before the first chunk (:func:`routing_problem`: they need the
data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
