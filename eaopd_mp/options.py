"""The loss options: one validated object, built once per call (or once per module).

Every public entry point takes the same keyword options (``**options``) and turns them
into a :class:`LossOptions` before touching a tensor; a new option is added here, in one
place, and reaches every path (logits-in, fused, vocab-parallel, Megatron, modules).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .gates import Gate, in_scale_range, plain, real_number, resolve_gate

REDUCTIONS = ("batchmean", "sum", "mean", "none")
TOPK_TAILS = ("bucket", "renormalize", "truncate")


def positive_int(name: str, value: object) -> int:
    """``value`` as an int > 0; TypeError for non-ints (bool included)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = plain(value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def positive_real(name: str, value: object) -> float:
    """``value`` as a float in ``[SCALE_MIN, SCALE_MAX]`` (:data:`eaopd_mp.gates.SCALE_MIN`:
    1e-6 to 1e6); TypeError for non-numbers, ValueError otherwise."""
    x = real_number(name, value)
    if x <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return in_scale_range(name, x)


@dataclass(frozen=True)
class LossOptions:
    """Options shared by every entry point (all keyword-only there).

    Attributes:
        h_max: entropy normaliser of the linear gate; None means ``log(V)`` (V the real
            vocabulary: ``vocab_size`` when given).
        temperature: divides student and teacher logits (the gate uses the untempered
            teacher). A top-k teacher's served log-probabilities are the target as given
            (serve them at the temperature you train at): only the student is divided.
        reduction: ``"batchmean"`` (sum / first token dim, the reference definition's default),
            ``"sum"``, ``"mean"`` (sum / number of tokens, masked ones included) or
            ``"none"`` (float32, token-shaped).
        return_stats: ``True`` also returns mask-weighted means of the teacher entropy, the
            gate weights and both KLs (detached), the token count and the gate used;
            ``"token"`` adds ``stats["token"]``, the same quantities per token (see
            :func:`eaopd_mp.plan.token_stats`).
        gate, gate_threshold, fkl_coef, fkl_weight: see :mod:`eaopd_mp.gates`.
        chunk_size: tokens per chunk; None picks about 64 MiB of float32 logits per chunk.
        student_softcap, teacher_softcap: None, or ``c > 0``: that side's logits are
            ``c * tanh(raw / c)`` (Gemma's ``final_logit_softcapping``).
        student_logit_scale, teacher_logit_scale: ``raw = scale * x`` where ``x`` is that
            side's ``h W^T + b`` (or its given logits); Cohere's ``logit_scale``. The scale
            is applied before the softcap, and the temperature divides the result.
        vocab_size: the real vocabulary when the logits or heads are padded: only the first
            ``vocab_size`` columns count (no probability, no gradient past them), and
            student and teacher may then have different widths ``>= vocab_size``. Under
            tensor parallelism, the global real vocabulary.
        topk_tail: with a top-k teacher, ``"bucket"`` (every other id in one tail bucket:
            exact KLs of the bucketed distributions), ``"renormalize"`` (both
            distributions renormalised over the k ids: NeMo-RL's default) or
            ``"truncate"`` (full-vocabulary log-probs summed over the k ids, no tail term:
            verl's top-k forward KL, NeMo-RL's with ``zero_outside_topk``). See
            :mod:`eaopd_mp.topk`.

    Bounds: ``temperature``, ``h_max``, the softcaps and logit scales must lie in
    ``[1e-6, 1e6]`` and ``fkl_coef`` in ``[0, 1e6]``
    (:data:`eaopd_mp.gates.SCALE_MIN`, ``SCALE_MAX``): their reciprocals stay finite and
    the largest factor a logit can meet is 1e12, far inside float32, the compute dtype
    (float64 inputs compute in float64). Outside, a ``ValueError`` names the option.

    Under ``torch.compile`` the options are constants of the traced step: a symbolic
    Python number (``dynamic=True``) is specialised on its value (see
    :func:`eaopd_mp.gates.plain`).
    """

    h_max: float | None = None
    temperature: float = 1.0
    reduction: str = "batchmean"
    return_stats: bool | str = False
    gate: str = "linear"
    gate_threshold: float | None = None
    fkl_coef: float | None = None
    fkl_weight: float | None = None
    chunk_size: int | None = None
    student_softcap: float | None = None
    teacher_softcap: float | None = None
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    vocab_size: int | None = None
    topk_tail: str = "bucket"

    def __post_init__(self):
        object.__setattr__(self, "temperature", positive_real("temperature", self.temperature))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        token = isinstance(self.return_stats, str) and self.return_stats == "token"
        if not (isinstance(self.return_stats, bool) or token):
            raise TypeError(f"return_stats must be True, False or \"token\", got "
                            f"{self.return_stats!r}")
        for name in ("chunk_size", "vocab_size"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, positive_int(name, getattr(self, name)))
        for side in ("student", "teacher"):
            cap, scale = f"{side}_softcap", f"{side}_logit_scale"
            if getattr(self, cap) is not None:
                object.__setattr__(self, cap, positive_real(cap, getattr(self, cap)))
            object.__setattr__(self, scale, positive_real(scale, getattr(self, scale)))
        if self.topk_tail not in TOPK_TAILS:
            raise ValueError(f"topk_tail must be one of {TOPK_TAILS}, got {self.topk_tail!r}")
        self.resolve_gate(None)  # every gate check (none depends on the vocabulary)

    @classmethod
    def build(cls, options: dict) -> LossOptions:
        """From a call's ``**options``; an unknown name raises ``TypeError``."""
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}; the options are "
                f"{', '.join(sorted(OPTION_NAMES))}"
            )
        return cls(**options)

    def resolve_gate(self, vocab_size: int | None) -> Gate:
        """The gate with its parameters resolved for a (real) vocabulary size; None leaves
        the linear gate's default ``h_max = log V`` unresolved (``p1`` None)."""
        return resolve_gate(self.gate, vocab_size, h_max=self.h_max,
                            gate_threshold=self.gate_threshold, fkl_coef=self.fkl_coef,
                            fkl_weight=self.fkl_weight)

    def given(self) -> dict:
        """The options that differ from the defaults (for ``repr``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


# Read once: ``dataclasses.fields`` on the class breaks a caller's torch.compile graph.
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LossOptions))
