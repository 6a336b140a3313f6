"""The per-chunk maths every path shares, written once.

For a chunk of ``n`` tokens whose student logits ``z`` and teacher logits ``y`` cover a
set of vocabulary columns (the whole vocabulary on one device, a shard under tensor
parallelism):

1. :func:`partial_stats` reduces the columns to six numbers per token: the local
   log-sum-exp of ``z/tau``, ``y/tau`` and ``y``, and the locally normalised sums
   ``F = sum q_r (t_r - s_r)``, ``R = sum p_r (s_r - t_r)``, ``E = sum u_r exp(u_r)``.
2. :func:`combine_stats` merges the partial statistics of ``k`` column sets (``k = 1``
   on one device; the all-gathered shards under tensor parallelism) into the global
   log-sum-exps, ``KL_fwd``, ``KL_rev`` and the teacher entropy ``H``, and applies the
   gate (:func:`eaopd_mp.gates.gate_weights`).
3. :func:`grad_logits` is the closed-form gradient with respect to the local student
   logits, ``[a (p - q) + b p (s - t - KL_rev)] / tau``, scaled per token.

Conventions: a column that is ``-inf`` for both student and teacher contributes nothing
(no NaN). All maths runs in ``params.dtype``: float32 for half, bfloat16 and float32
inputs, float64 for float64 inputs (:func:`compute_dtype`).

Per-token statistics are packed in an ``(n, NSTATS)`` tensor, columns below.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from .gates import Gate, gate_weights

# Columns of the packed per-token statistics returned by combine_stats.
LSE_S, LSE_T, KL_FWD, KL_REV, ENTROPY, A, B = range(7)
NSTATS = 7
# Columns of partial_stats.
_LS, _LT, _LU, _F, _R, _E = range(6)
NPARTIAL = 6


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _shifted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x - max(x)`` over the last dim, the max, and whether the row is broken.

    A row of all ``-inf`` gets the most negative finite max (its shifted values stay
    ``-inf``, and ``max + log(0)`` is ``-inf``). A row holding NaN or ``+inf`` is
    *broken*: its max is NaN or ``+inf`` (``amax`` propagates NaN), so the check costs
    nothing beyond the max itself.

    The max is made finite with a ``clamp`` to the dtype's range, not
    ``where(isfinite(m), m, 0)``: with the ``where``, inductor's CPU code makes the max
    and the pass that uses it two passes over the whole chunk; with the clamp it runs them
    row by row in one loop nest, the row still in cache (a ``(512, 32000)`` float32 max
    and exponential pass: 7.7 vs 16 ms on a 2-core Xeon).
    """
    m = x.amax(dim=-1, keepdim=True)
    broken = (torch.isnan(m) | (m == float("inf"))).squeeze(-1)
    big = torch.finfo(x.dtype).max
    m = m.clamp(-big, big)
    return x - m, m.squeeze(-1), broken


def partial_stats(z: torch.Tensor, y: torch.Tensor, params: torch.Tensor,
                  untempered: bool) -> torch.Tensor:
    """Per-token statistics of one set of vocabulary columns.

    Args:
        z: ``(n, v)`` student logits, any float dtype.
        y: ``(n, v)`` teacher logits, same shape.
        params: ``[1/tau, p1, p2]`` in the compute dtype (see :func:`make_params`).
        untempered: ``tau == 1`` (the gate's softmax is then the tempered teacher's).
    Returns:
        ``(n, 6)`` in the compute dtype: ``[lse(z/tau), lse(y/tau), lse(y), F, R, E]`` where, with
        ``s, t, u`` the log-softmax of ``z/tau, y/tau, y`` over these columns only,
        ``F = sum q (t - s)``, ``R = sum p (s - t)``, ``E = sum exp(u) u``.
        Columns with no finite logit give ``lse = -inf`` and sums 0; a side with mass here
        where the other has none gives an infinite ``F`` or ``R`` (a genuinely infinite
        KL). A row with NaN or ``+inf`` in ``z`` or ``y`` gets NaN everywhere.
    """
    return partial_from_sums(row_sums(z, y, params, untempered))


# Columns of row_sums: the shifts (row maxima), the sums of exponentials, the weighted
# sums of F, R and E, and whether the row is broken (1.0) or not (0.0).
NSUMS = 10


def row_sums(z: torch.Tensor, y: torch.Tensor, params: torch.Tensor,
             untempered: bool) -> tuple[torch.Tensor, ...]:
    """The ``(n, v)`` passes of :func:`partial_stats`: ten ``(n,)`` per-token numbers.

    ``(mz, my, mu, sz, sy, su, sf, sr, se, bad)``: with ``dz, dy, du`` the shifted ``z/tau,
    y/tau, y`` (:func:`_shifted`, shifts ``mz, my, mu``) and ``e`` their exponentials,
    ``s* = sum e*``, ``sf = sum ey (dy - dz)``, ``sr = sum ez (dz - dy)``, ``se = sum eu du``
    (columns where the exponential is 0 add 0, not ``0 * -inf``), in the compute dtype, and
    ``bad``: ``z`` or ``y`` holds NaN or ``+inf`` (bool; 1.0/0.0 in :func:`packed_sums`).
    """
    torch._check(z.shape[0] == y.shape[0])
    inv_tau = params[0]
    z, y = z.to(params.dtype), y.to(params.dtype)
    dz, mz, bad_z = _shifted(z * inv_tau)
    dy, my, bad_y = _shifted(y * inv_tau)
    ez, ey = dz.exp(), dy.exp()
    sz, sy = ez.sum(-1), ey.sum(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    # where(e > 0, ...) drops columns that are -inf here (0 * -inf would be NaN).
    sf = torch.where(ey > 0, ey * (dy - dz), zero).sum(-1)
    sr = torch.where(ez > 0, ez * (dz - dy), zero).sum(-1)
    if untempered:
        du, mu, eu, su = dy, my, ey, sy
    else:
        du, mu, _ = _shifted(y)
        eu = du.exp()
        su = eu.sum(-1)
    se = torch.where(eu > 0, eu * du, zero).sum(-1)
    return mz, my, mu, sz, sy, su, sf, sr, se, bad_z | bad_y


def partial_from_sums(sums) -> torch.Tensor:
    """:func:`row_sums`'s ten ``(n,)`` numbers (a sequence, or :func:`packed_sums`'s
    ``(n, NSUMS)``) -> :func:`partial_stats`'s ``(n, 6)``."""
    mz, my, mu, sz, sy, su, sf, sr, se, bad = (
        sums.unbind(-1) if isinstance(sums, torch.Tensor) else sums)
    log_sz, log_sy, log_su = sz.log(), sy.log(), su.log()
    zero = torch.zeros((), dtype=sz.dtype, device=sz.device)
    inf = torch.full((), float("inf"), dtype=sz.dtype, device=sz.device)
    fwd = torch.where(sy > 0, torch.where(sz > 0, sf / sy - log_sy + log_sz, inf), zero)
    rev = torch.where(sz > 0, torch.where(sy > 0, sr / sz - log_sz + log_sy, inf), zero)
    ent = torch.where(su > 0, se / su - log_su, zero)
    out = torch.stack([mz + log_sz, my + log_sy, mu + log_su, fwd, rev, ent], dim=-1)
    return torch.where((bad > 0)[:, None], torch.full_like(out, float("nan")), out)


def packed_sums(sums: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """:func:`row_sums` as one ``(n, NSUMS)`` tensor in the compute dtype."""
    return torch.stack([*sums[:-1], sums[-1].to(sums[0].dtype)], dim=-1)


def stats_from_sums(sums, params: torch.Tensor, kind: str) -> torch.Tensor:
    """One device: :func:`row_sums` (the tuple, or :func:`packed_sums`'s ``(n, NSUMS)``)
    -> ``(n, 7)`` statistics."""
    return combine_stats(partial_from_sums(sums).unsqueeze(0), params, kind)


def _lse_shards(lse: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over dim 0 (the column sets); all ``-inf`` gives ``-inf``, not NaN."""
    d, m, _ = _shifted(lse.t())
    return m + d.exp().sum(-1).log()


def _log_share(lse: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Share ``pi_r = exp(lse_r - L)`` of each column set and ``log pi_r`` (0 where pi = 0)."""
    log_pi = lse - total
    pi = log_pi.exp()
    return pi, torch.where(pi > 0, log_pi, torch.zeros_like(log_pi))


def combine_stats(parts: torch.Tensor, params: torch.Tensor, kind: str) -> torch.Tensor:
    """Merge the partial statistics of ``k`` column sets and apply the gate.

    Args:
        parts: ``(k, n, 6)``, :func:`partial_stats` of each column set.
        params: ``[1/tau, p1, p2]`` in the compute dtype; kind: the gate.
    Returns:
        ``(n, 7)`` ``[lse_s, lse_t, KL_fwd, KL_rev, H, a, b]`` in the compute dtype.
    """
    ls, lt, lu, fwd, rev, ent = parts.unbind(-1)
    tot_s, tot_t, tot_u = (_lse_shards(x) for x in (ls, lt, lu))
    pi_s, log_pi_s = _log_share(ls, tot_s)
    pi_t, log_pi_t = _log_share(lt, tot_t)
    pi_u, log_pi_u = _log_share(lu, tot_u)
    kl_fwd = (pi_t * (fwd + log_pi_t - log_pi_s)).sum(0).clamp_min(0.0)
    kl_rev = (pi_s * (rev + log_pi_s - log_pi_t)).sum(0).clamp_min(0.0)
    entropy = (-(pi_u * (ent + log_pi_u)).sum(0)).clamp_min(0.0)
    # NaN/+inf anywhere in the row (NaN totals), or a side with no finite logit at all
    # (total -inf): the token's loss is undefined, and says so.
    broken = ~((tot_s > float("-inf")) & (tot_t > float("-inf")))
    nan = torch.full_like(kl_fwd, float("nan"))
    kl_fwd, kl_rev, entropy = (torch.where(broken, nan, x) for x in (kl_fwd, kl_rev, entropy))
    a, b = gate_weights(entropy, kind, params[1], params[2])
    return torch.stack([tot_s, tot_t, kl_fwd, kl_rev, entropy, a, b], dim=-1)


def weighted(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w * x``, and exactly 0 where ``w == 0`` (``0 * inf`` counts as 0).

    A term of weight exactly 0 contributes nothing to the loss *or to its gradient*: with
    ``gate="fixed", fkl_weight=1`` and a teacher ``-inf`` where the student has mass,
    ``KL_rev = +inf`` and its gradient coefficient is infinite, but neither reaches the
    result. A NaN weight still gives NaN. ``w`` broadcasts against ``x``.
    """
    return torch.where(w == 0, torch.zeros_like(x), w * x)


def token_loss(stats: torch.Tensor) -> torch.Tensor:
    """``(n, 7)`` statistics -> ``(n,)`` per-token loss ``a * KL_fwd + b * KL_rev``.

    A weight of exactly 0 ignores an infinite divergence (:func:`weighted`); a token
    whose statistics are NaN (broken input) gets NaN whatever its gate weights.
    """
    fwd = weighted(stats[:, A], stats[:, KL_FWD])
    rev = weighted(stats[:, B], stats[:, KL_REV])
    broken = torch.isnan(stats[:, KL_FWD]) | torch.isnan(stats[:, KL_REV])
    return torch.where(broken, torch.full_like(fwd, float("nan")), fwd + rev)


def grad_logits(
    z: torch.Tensor,
    y: torch.Tensor,
    stats: torch.Tensor,
    scale: torch.Tensor,
    params: torch.Tensor,
) -> torch.Tensor:
    """Closed-form gradient of ``scale * L`` with respect to the student logits ``z``.

    ``dL/dz = [a (p - q) + b p (s - t - KL_rev)] / tau`` on the columns held here, with
    ``s, t`` the global log-softmax of ``z/tau`` and ``y/tau``. A term whose coefficient
    is exactly 0 contributes exactly 0 (:func:`weighted`): with ``b = 0`` and a teacher
    ``-inf`` where the student has mass (``KL_rev = +inf``), the gradient is the forward
    KL's, ``a (p - q) / tau`` with ``q = 0`` there, not ``0 * inf``. With ``b > 0`` the
    loss is ``+inf`` and the gradient is not finite.

    Args:
        z, y: ``(n, v)`` student and teacher logits (the columns held here).
        stats: ``(n, 7)`` from :func:`combine_stats` (global over all columns).
        scale: ``(n,)`` per-token factor (mask weight x reduction x grad_output).
        params: ``[1/tau, p1, p2]``; its dtype is the compute dtype.
    Returns:
        ``(n, v)`` in the compute dtype.
    """
    torch._check(z.shape[0] == y.shape[0])
    torch._check(z.shape[0] == stats.shape[0])
    torch._check(z.shape[0] == scale.shape[0])
    inv_tau = params[0]
    s = z.to(params.dtype) * inv_tau - stats[:, LSE_S, None]
    t = y.to(params.dtype) * inv_tau - stats[:, LSE_T, None]
    p, q = s.exp(), t.exp()
    ca = (scale * stats[:, A] * inv_tau)[:, None]
    cb = (scale * stats[:, B] * inv_tau)[:, None]
    rev = torch.where(p > 0, p * (s - t - stats[:, KL_REV, None]), torch.zeros_like(p))
    return ca * (p - q) + weighted(cb, rev)


def single_stats(z, y, params, kind: str, untempered: bool) -> torch.Tensor:
    """One device, no gradient: ``(n, 7)`` statistics of a chunk."""
    return stats_from_sums(row_sums(z, y, params, untempered), params, kind)


def single_sums(z, y, params, untempered: bool) -> torch.Tensor:
    """One device, no gradient: the chunk's ``(n, NSUMS)`` packed :func:`row_sums`,
    which :func:`stats_from_sums` makes the statistics of :func:`single_stats`. Two
    kernels rather than one for the reason given in :func:`single_grad_`: 33 -> 18 ms
    (tempered 37 -> 22) for a ``(512, 32000)`` float32 chunk on a 2-core Xeon; bf16 21 ->
    19 ms (tempered unchanged)."""
    return packed_sums(row_sums(z, y, params, untempered))


def grad_logits_(z, y, stats, scale, params) -> torch.Tensor:
    """:func:`grad_logits` written over ``z`` (a buffer of ours); returns ``stats``."""
    z.copy_(grad_logits(z, y, stats, scale, params))
    return stats


def single_grad_(z, y, scale, params, kind: str, untempered: bool) -> torch.Tensor:
    """One device: the gradient overwrites ``z``; returns the ``(n, NSUMS)``
    :func:`row_sums` (:func:`stats_from_sums` makes them the statistics).

    Returning the raw sums, not the statistics made from them, is for speed: inductor's
    CPU code then runs the whole chunk (maxima, sums, gradient) row by row in one loop
    nest, each row still in cache for the next pass: 35 vs 50 ms for a ``(512, 32000)``
    float32 chunk on a 2-core Xeon (no change in bf16, whose loops it tiles otherwise).
    """
    sums = row_sums(z, y, params, untempered)
    z.copy_(grad_logits(z, y, stats_from_sums(sums, params, kind), scale, params))
    return packed_sums(sums)


def shard_grad_(z, y, parts, scale, params, kind: str) -> torch.Tensor:
    """Column shards: combine the gathered ``(k, n, 6)`` partials into ``(n, 7)``
    statistics; the local gradient overwrites ``z``."""
    torch._check(parts.shape[1] == z.shape[0])
    return grad_logits_(z, y, combine_stats(parts, params, kind), scale, params)


def make_params(inv_tau: float, gate: Gate, dtype: torch.dtype, device) -> torch.Tensor:
    """The kernels' parameters ``[1/tau, p1, p2]`` in the compute dtype.

    A tensor rather than Python floats, so new values never trigger a recompilation; its
    dtype (:func:`compute_dtype`) is the dtype all the maths runs in.
    """
    return torch.tensor([inv_tau, gate.p1, gate.p2], dtype=dtype, device=device)


# ------------------------------------------------------------------ head transforms
#
# A head may transform its raw logits x (h W^T + b, or given logits) before the loss:
# r = scale * x, then z = cap * tanh(r / cap) (Gemma's soft-capping, Cohere's logit scale).
# The kernels below apply it to the chunk in the compute dtype, run the plain maths on z,
# and chain the gradient back to x: dL/dx = scale * (1 - (z / cap)^2) * dL/dz, all inside
# one compiled graph (no extra (n, V) tensor). Which side is capped is static (a graph
# each: 4 at most per gate, tempered and dtype); the values are a tensor, so new values
# never recompile. A scale of 1 multiplies exactly.

# Columns of the head tensor (make_head).
_S_SCALE, _S_CAP, _T_SCALE, _T_CAP = range(4)


def make_head(transform: tuple, dtype: torch.dtype, device) -> tuple[torch.Tensor | None, tuple]:
    """The kernels' head tensor and static flags from ``(s_scale, s_cap, t_scale, t_cap)``.

    Returns ``[s_scale, s_cap, t_scale, t_cap]`` in ``dtype`` (a missing cap stored as 1)
    and ``(student_capped, teacher_capped)``; ``(None, ())`` when there is no transform
    at all (the plain kernels then run).
    """
    s_scale, s_cap, t_scale, t_cap = transform
    if s_scale == 1.0 and t_scale == 1.0 and s_cap is None and t_cap is None:
        return None, ()
    values = [s_scale, 1.0 if s_cap is None else s_cap, t_scale, 1.0 if t_cap is None else t_cap]
    flags = (s_cap is not None, t_cap is not None)
    return torch.tensor(values, dtype=dtype, device=device), flags


def _transform(x: torch.Tensor, head: torch.Tensor, k: int, capped: bool) -> torch.Tensor:
    """``cap * tanh(scale * x / cap)`` (``scale * x`` if not capped), in HF's order."""
    x = x * head[k]
    if capped:
        x = torch.tanh(x / head[k + 1]) * head[k + 1]
    return x


def transform_pair(x, xt, head, flags, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ``(n, v)`` student and teacher logits -> the transformed ones in ``dtype``."""
    return (_transform(x.to(dtype), head, _S_SCALE, flags[0]),
            _transform(xt.to(dtype), head, _T_SCALE, flags[1]))


def chain_student(grad: torch.Tensor, z: torch.Tensor, head, flags) -> torch.Tensor:
    """``dL/dz`` -> ``dL/dx`` for the transformed student logits ``z``: times
    ``1 - (z / cap)^2`` (the tanh's derivative, if capped) and times ``scale``."""
    if flags[0]:
        t = z / head[_S_CAP]
        grad = grad * (1.0 - t * t)
    return grad * head[_S_SCALE]


def _grad_x_(x, z, y, stats, scale, params, head, flags) -> torch.Tensor:
    """The gradient with respect to the raw student logits written over ``x``."""
    x.copy_(chain_student(grad_logits(z, y, stats, scale, params), z, head, flags))
    return stats


def single_sums_x(x, xt, params, untempered: bool, head, flags):
    """:func:`single_sums` on transformed logits (``x``, ``xt``: raw student, teacher)."""
    z, y = transform_pair(x, xt, head, flags, params.dtype)
    return single_sums(z, y, params, untempered)


def single_grad_x_(x, xt, scale, params, kind: str, untempered: bool, head, flags):
    """:func:`single_grad_` on transformed logits; the raw-logit gradient overwrites ``x``;
    returns the ``(n, NSUMS)`` :func:`row_sums`."""
    z, y = transform_pair(x, xt, head, flags, params.dtype)
    sums = row_sums(z, y, params, untempered)
    _grad_x_(x, z, y, stats_from_sums(sums, params, kind), scale, params, head, flags)
    return packed_sums(sums)


def shard_grad_x_(x, xt, parts, scale, params, kind: str, head, flags):
    """:func:`shard_grad_` on transformed logits; the raw-logit gradient overwrites ``x``."""
    torch._check(parts.shape[1] == x.shape[0])
    z, y = transform_pair(x, xt, head, flags, params.dtype)
    return _grad_x_(x, z, y, combine_stats(parts, params, kind), scale, params, head, flags)


def grad_logits_x_(x, xt, stats, scale, params, head, flags):
    """:func:`grad_logits_` on transformed logits; the raw-logit gradient overwrites ``x``."""
    z, y = transform_pair(x, xt, head, flags, params.dtype)
    return _grad_x_(x, z, y, stats, scale, params, head, flags)


# --------------------------------------------------------------------------- compile


def compile_enabled() -> bool:
    """False when ``EAOPD_COMPILE=0`` (or ``false``/``off``) is set."""
    return os.environ.get("EAOPD_COMPILE", "1").lower() not in ("0", "false", "off", "no")


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "could not compile" (tracing, lowering, the C++/Triton
    toolchain), as opposed to errors of the computation itself (out of memory, bad values),
    which propagate."""
    errors: list[type[BaseException]] = [torch._dynamo.exc.TorchDynamoException]
    try:
        from torch._inductor import exc as inductor_exc
    except ImportError:  # pragma: no cover - inductor is part of torch
        return tuple(errors)
    for name in ("InductorError", "CppCompileError", "CUDACompileError"):
        if hasattr(inductor_exc, name):
            errors.append(getattr(inductor_exc, name))
    return tuple(errors)


COMPILE_ERRORS = _compile_errors()

# Inductor's CPU backend proves, once per process, that the C++ compiler can build and
# load vectorised code: it dry-compiles a probe per instruction set and dlopens each in a
# fresh subprocess, ~1.6 s of every process's first call (measured: pick_vec_isa() 1.59 s
# with a warm cache). The instruction sets themselves still come from the CPU's flags; a
# toolchain that cannot build them fails the compilation, and the kernel falls back to
# eager with a warning (COMPILE_ERRORS). No effect on GPU kernels.
COMPILE_OPTIONS = {"cpp.vec_isa_ok": True}

# Graphs one kernel may legitimately need: gate (3) x tempered (2) x dtype x device.
RECOMPILE_LIMIT = 64


class Kernel:
    """A core function run under ``torch.compile`` with a dynamic token dimension.

    The token dimension of the tensor arguments listed in ``dynamic`` (position -> dim)
    is marked dynamic, so chunks of any length share one graph per (gate, tempered,
    dtype, device); dynamo's per-function limit is raised to ``RECOMPILE_LIMIT`` for
    these calls only, as those combinations can exceed its default of 8. Sizes 0 and 1
    would be specialised by the compiler: an empty chunk runs eagerly and a one-token
    chunk is padded to two (its duplicate is dropped). A kernel returns one tensor with
    the token dimension first. ``devices``: the device types it is compiled for (None:
    every one); on others it runs eagerly. If compilation fails (:data:`COMPILE_ERRORS`),
    the call is run eagerly: if that fails too, the input was at fault and the eager error
    propagates (the kernel stays compiled); otherwise one warning is issued and the eager
    function is used from then on. Any other error (out of memory, a bad value) propagates.
    """

    def __init__(self, fn: Callable, dynamic: dict[int, int], devices: tuple | None = None):
        self.fn = fn
        self.dynamic = dynamic
        self.devices = devices  # device types it is compiled for (None: all)
        self._compiled: Callable | None = None
        self._failed = False

    def __call__(self, *args):
        pos, dim = next(iter(self.dynamic.items()))
        x = args[pos]
        n = x.shape[dim]
        eager = self.devices is not None and x.device.type not in self.devices
        if self._failed or eager or not compile_enabled() or n == 0:
            return self.fn(*args)
        if n == 1:
            padded = tuple(
                torch.cat([a, a], d) if (d := self.dynamic.get(i)) is not None else a
                for i, a in enumerate(args)
            )
            out = self(*padded)
            args[0].copy_(padded[0][:1])  # in-place kernels wrote over their first argument
            return out[:1]
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, fullgraph=True, options=COMPILE_OPTIONS)
        for i, d in self.dynamic.items():
            torch._dynamo.maybe_mark_dynamic(args[i], d)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return self._compiled(*args)
        except COMPILE_ERRORS as exc:
            # The compiler's fault, or an input the computation itself cannot take (dynamo
            # wraps errors met while tracing)? The eager run tells: its error is raised as
            # is, and only a failure to compile what runs eagerly falls back for good.
            out = self.fn(*args)
            self._failed = True
            warnings.warn(
                f"eaopd_mp: torch.compile failed ({type(exc).__name__}: {exc}); "
                "falling back to eager for the rest of this process",
                RuntimeWarning,
                stacklevel=2,
            )
            return out


# Kernels whose name ends in "_" write the gradient over their first argument, the
# student logits buffer: a (chunk, V) allocation per chunk costs more than the maths.
sums_kernel = Kernel(single_sums, {0: 0, 1: 0})
fwd_grad_kernel_ = Kernel(single_grad_, {0: 0, 1: 0, 2: 0})
# The row sums -> statistics (or a shard's partials): ~40 operations on (n, 10) numbers per
# chunk, compiled on GPUs only, where each eager one is a kernel launch. On CPU a compiled
# graph costs more at start-up than it saves: 0.8 vs 0.3 ms per (512, 32000) chunk on a
# loaded 2-core Xeon (the chunk itself takes ~35 ms idle), against ~1 s of every process's
# first call (dynamo's tracing and the cache's load; 3-5 s cold) for each graph.
sums_stats_kernel = Kernel(stats_from_sums, {0: 0}, devices=("cuda",))
parts_kernel = Kernel(partial_from_sums, {0: 0}, devices=("cuda",))
shard_grad_kernel_ = Kernel(shard_grad_, {0: 0, 1: 0, 2: 1, 3: 0})
grad_kernel_ = Kernel(grad_logits_, {0: 0, 1: 0, 2: 0, 3: 0})


# The same with head transforms (see make_head): extra arguments (head, flags).
sums_x_kernel = Kernel(single_sums_x, {0: 0, 1: 0})
fwd_grad_x_kernel_ = Kernel(single_grad_x_, {0: 0, 1: 0, 2: 0})
shard_grad_x_kernel_ = Kernel(shard_grad_x_, {0: 0, 1: 0, 2: 1, 3: 0})
grad_x_kernel_ = Kernel(grad_logits_x_, {0: 0, 1: 0, 2: 0, 3: 0})
