"""The gate: how forward and reverse KL are mixed for each token.

Every gate writes the per-token loss as ``L = a * KL_fwd + b * KL_rev`` where ``a`` and
``b`` depend on the *untempered* teacher entropy ``H`` only (no gradient flows through
them). This module is the single implementation used by every path.

| gate        | a                                        | b              |
|-------------|------------------------------------------|----------------|
| "linear"    | clamp(H / h_max, 0, 1) (the reference's) | 1 - a          |
| "threshold" | fkl_coef * 1[H >= gate_threshold]        | 1              |
| "fixed"     | fkl_weight                               | 1 - fkl_weight |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import guard_scalar

GATES = ("linear", "threshold", "fixed")

_PARAMS = {
    "linear": ("h_max",),
    "threshold": ("gate_threshold", "fkl_coef"),
    "fixed": ("fkl_weight",),
}


@dataclass(frozen=True)
class Gate:
    """A resolved gate: its kind and two float parameters.

    ``p1``/``p2`` are ``1/h_max`` and unused for "linear", ``gate_threshold`` and
    ``fkl_coef`` for "threshold", ``fkl_weight`` and unused for "fixed". The kernels get
    them as a tensor (``core.make_params``), so new values never recompile. ``p1`` is None
    for the linear gate's default ``h_max = log V`` resolved without a vocabulary size
    (the op fills it in, see :meth:`eaopd_mp.plan.Spec.sized`).
    """

    kind: str
    p1: float | None
    p2: float = 0.0

    def describe(self) -> dict[str, float | str]:
        """The gate and its parameters as a user would write them."""
        if self.kind == "linear":
            return {"gate": "linear", "h_max": 1.0 / self.p1}
        if self.kind == "threshold":
            return {"gate": "threshold", "gate_threshold": self.p1, "fkl_coef": self.p2}
        return {"gate": "fixed", "fkl_weight": self.p1}


def default_h_max(vocab_size: int) -> float:
    """log(V), the entropy of the uniform distribution; 1.0 when V == 1 (H is then 0)."""
    return math.log(vocab_size) if vocab_size > 1 else 1.0


# Bounds of the options that multiply or divide logits or divergences: temperature, h_max,
# the softcaps and logit scales in [SCALE_MIN, SCALE_MAX], fkl_coef in [0, SCALE_MAX].
# Within them the largest factor a logit
# can meet is 1e12 (scale / temperature), so no finite logit below ~3e26 overflows the
# float32 compute, and every reciprocal (1/temperature, 1/h_max) is finite; a value
# outside them is a mistake (a temperature of 1e-7 is an argmax, 1e7 a uniform target).
SCALE_MIN, SCALE_MAX = 1e-6, 1e6


def in_scale_range(name: str, value: float, low: float = SCALE_MIN) -> float:
    """``value`` (a finite float) within ``[low, SCALE_MAX]``, else ValueError."""
    if low <= value <= SCALE_MAX:
        return value
    raise ValueError(f"{name} must be in [{low:g}, {SCALE_MAX:g}] (the float32 compute's "
                     f"safe range), got {value:g}")


def plain(value: int | float) -> int | float:
    """A Python number as a plain constant. Inside a step traced by ``torch.compile``
    (``dynamic=True``, or after a value changed between calls) a Python number may be
    symbolic; an option is configuration, so the trace is specialised on its value
    (guarded: a new value compiles a new graph of the caller's step, never of the kernels,
    which take the values as a tensor). A no-op outside tracing."""
    return guard_scalar(value)


def real_number(name: str, value: object) -> float:
    """``value`` as a finite float: TypeError for non-numbers (bool included), ValueError
    for NaN or infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(plain(value))
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def resolve_gate(
    gate: str,
    vocab_size: int | None,
    *,
    h_max: float | None = None,
    gate_threshold: float | None = None,
    fkl_coef: float | None = None,
    fkl_weight: float | None = None,
) -> Gate:
    """Validate the gate arguments and return a :class:`Gate`.

    Raises ``ValueError`` for an unknown gate, a parameter out of range, or a parameter
    that belongs to another gate (for example ``h_max`` with ``gate="fixed"``).
    ``vocab_size`` None leaves the linear gate's default ``h_max`` unresolved (``p1``
    None).
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    given = {
        "h_max": h_max,
        "gate_threshold": gate_threshold,
        "fkl_coef": fkl_coef,
        "fkl_weight": fkl_weight,
    }
    foreign = [k for k, v in given.items() if v is not None and k not in _PARAMS[gate]]
    if foreign:
        raise ValueError(
            f"{', '.join(foreign)} does not apply to gate={gate!r} "
            f"(it takes {', '.join(_PARAMS[gate])})"
        )
    if gate == "linear":
        if h_max is None:
            return Gate("linear", None if vocab_size is None else 1.0 / default_h_max(vocab_size))
        h = real_number("h_max", h_max)
        if h <= 0:
            raise ValueError(f"h_max must be > 0, got {h}")
        return Gate("linear", 1.0 / in_scale_range("h_max", h))
    if gate == "threshold":
        thr = 0.8 if gate_threshold is None else real_number("gate_threshold", gate_threshold)
        coef = 1.0 if fkl_coef is None else real_number("fkl_coef", fkl_coef)
        if thr < 0:
            raise ValueError(f"gate_threshold must be >= 0, got {thr}")
        if coef < 0:
            raise ValueError(f"fkl_coef must be >= 0, got {coef}")
        in_scale_range("fkl_coef", coef, low=0.0)
        return Gate("threshold", thr, coef)
    weight = 0.5 if fkl_weight is None else real_number("fkl_weight", fkl_weight)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fkl_weight must be in [0, 1], got {weight}")
    return Gate("fixed", weight)


def gate_weights(
    entropy: torch.Tensor, kind: str, p1: float | torch.Tensor, p2: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mixing weights ``(a, b)`` from the untempered teacher entropy.

    Args:
        entropy: ``(n,)`` teacher entropy in nats (float32, or float64 for float64 inputs).
        kind, p1, p2: the fields of a :class:`Gate`; ``p1``/``p2`` floats or 0-d tensors.
    Returns:
        ``a`` (forward-KL weight) and ``b`` (reverse-KL weight), ``(n,)`` like ``entropy``.
    """
    if kind == "linear":
        a = (entropy * p1).clamp(0.0, 1.0)
        return a, 1.0 - a
    if kind == "threshold":
        a = (entropy >= p1).to(entropy.dtype) * p2
        return a, torch.ones_like(entropy)
    a = torch.zeros_like(entropy) + p1  # p1 may be a 0-d tensor (traced, no recompiles)
    return a, 1.0 - a
