"""The loss against a served teacher: its top-k log-probabilities and their ids.

Per token the teacher is given as ``k`` global vocabulary ids ``I`` and their
log-probabilities ``l`` (normalised over the whole vocabulary, as vLLM/SGLang return
them); the student ``p = softmax(z / tau)`` is over the whole vocabulary. Three targets
(``topk_tail``):

* ``"bucket"`` (default): each id of ``I`` is its own bucket and every other id shares one
  *tail* bucket, ``Q_tail = 1 - sum_k Q_k``, ``P_tail = sum_{j not in I} p_j``. The KLs are
  the exact KLs between these ``k + 1``-bucket distributions: lower bounds of the full
  KLs, equal to them when ``k = V`` (there is then no tail bucket).
* ``"renormalize"``: both distributions renormalised over the ``k`` ids, nothing else
  (NeMo-RL's default, ``zero_outside_topk: false``).
* ``"truncate"``: the full-vocabulary log-probabilities, summed over the ``k`` ids only,
  with no tail term: ``KL_fwd = sum_k Q_k (l_k - log p_k)`` (verl's top-k forward KL, and
  NeMo-RL's forward KL with ``zero_outside_topk: true``) and ``KL_rev = sum_k p_k (log p_k
  - l_k)``. Truncated sums, not divergences: neither is a KL of two distributions, and
  either can be negative.

Numerics (docs/guides/topk.md says the same for users):

* ``log P_tail`` is a log-sum-exp over the tail columns themselves, never
  ``log(1 - sum_k P_k)``: no cancellation when the top-k hold almost all the mass, no
  underflow when the student is confident.
* ``Q_tail`` comes from the served numbers only, ``-expm1(logsumexp(l))``; rounding can
  make it ``<= 0``. Where ``Q_tail`` only *weights* a term (``Q_tail log(Q_tail/P_tail)``
  in ``KL_fwd``, ``-Q_tail log Q_tail`` in the entropy) it is clamped at 0 and the term
  vanishes by continuity (``x log x -> 0``). Where it sits *inside a logarithm* as the
  reference mass (``P_tail log(P_tail / Q_tail)`` in ``KL_rev``) it is floored at
  :data:`TAIL_FLOOR`, so rounding alone cannot make the reverse KL infinite: the tail
  term is then at most ``P_tail log(P_tail / TAIL_FLOOR) <= 13.8`` nats.
* The gate's entropy is that of the bucketed teacher, ``-sum_b Q_b log Q_b`` (a lower
  bound of the true one, in every tail mode), unless ``teacher_entropy`` is given.
* Everything formed from the ``(n, k)`` numbers of a token (``Q_tail``, the entropy, the
  sums over the ids that make the KLs) is computed in float64, whatever the compute dtype:
  ``Q_tail = 1 - sum_k Q_k`` cancels (a float32 ``Q_tail`` of a peaked teacher is off by
  ~1e-2 relative, and the reverse KL's ``P_tail log Q_tail`` with it), and the KLs are
  sums of terms of both signs. It is ``k`` numbers per token, never per vocabulary column.
* Served log-probabilities are checked before any chunk (:func:`logprobs_problem`): a
  token whose ``log sum_k exp(l_k)`` exceeds :func:`logprob_tolerance` (a log-prob > 0 or
  probabilities summing above 1 beyond rounding) raises; ``+inf`` or NaN in a kept token
  gives that token NaN.
* The KLs are not clamped at 0: the gradient is that of the value returned (the floor can
  make the reverse KL negative by at most ``TAIL_FLOOR`` nats).

Per-token statistics use the dense layout of :mod:`eaopd_mp.core` (``(n, 7)``) with one
column reinterpreted: ``LSE_T`` holds ``log P_tail`` (bucket) or ``log sum_k P_k``
(renormalize, truncate), the student-side number the recomputing backward needs.

Under tensor parallelism each id lives on one rank. A rank's partial statistics of a
chunk are ``k + 2`` numbers per token: its local log-sum-exp of ``z/tau``, that of its
tail columns, and ``z_{I_k}/tau`` for the ids it holds (``-inf`` elsewhere); one
all-gather of them gives every rank everything (teacher numbers are replicated).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import core
from .core import KL_REV, LSE_S, LSE_T, Kernel, weighted
from .gates import gate_weights

__all__ = ["TAIL_FLOOR", "logprob_tolerance"]  # what users read; the rest: the kernels
TAIL_FLOOR = 1e-6
"""Floor of the teacher's tail mass ``Q_tail`` inside ``log(Q_tail)`` (the reverse KL's
tail term only): about the float32 resolution of ``1 - sum_k exp(l_k)`` for a few dozen
served log-probabilities (each rounded at ~6e-8)."""
_LOCAL_LSE, _TAIL_LSE = 0, 1  # columns of the partial statistics; then the k ids


def ids_problem(ids: torch.Tensor, vocab_size: int) -> str | None:
    """What is wrong with ``(n, k)`` int64 ids (run inside the op before any chunk), or
    None: an id outside ``[0, vocab_size)``, or an id repeated within a token."""
    if ids.numel() == 0:
        return None
    low, high = torch.aminmax(ids)  # one pass; the mask only to name the bad ids
    if int(low) < 0 or int(high) >= vocab_size:
        bad = (ids < 0) | (ids >= vocab_size)
        return (f"teacher_topk_indices must be vocabulary ids in [0, {vocab_size}), got "
                f"{ids[bad][:3].tolist()}")
    if ids.shape[1] > 1:
        dup = repeats(ids, vocab_size) if ids.device.type == "cpu" else _repeats_sorted(ids)
        if bool(dup.any()):
            row = int(dup.nonzero()[0, 0])
            return ("teacher_topk_indices repeats an id within a token (token "
                    f"{row}: {ids[row].tolist()[:8]}); each token needs k distinct ids")
    return None


def _repeats_sorted(ids: torch.Tensor) -> torch.Tensor:
    """:func:`repeats` by a sort of each token's ids: one kernel per call on a GPU, where
    :func:`repeats` would launch two per block of tokens."""
    srt = ids.sort(dim=1).values
    return (srt[:, 1:] == srt[:, :-1]).any(1)


# Elements of repeats()'s int32 scratch (16 MiB; one vocabulary row if that is larger):
# a few hundred tokens at V = 32k.
_SCRATCH = 2**22


def repeats(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``(n,)`` bool: the token's ``(n, k)`` ids (in ``[0, vocab_size)``) repeat one.

    Each token writes the positions ``0..k-1`` of its ids into a scratch row of the
    vocabulary and reads them back: a repeated id keeps only one of its positions (which
    one is unspecified), so another reads back wrong. O(k) per token, where a sort is
    O(k log k) and, on CPU, 2-3x the time (4096 tokens, k = 256: 8 vs 15-20 ms). The
    scratch is never cleared: only the columns just written are read. Used on CPU; other
    devices sort (:func:`_repeats_sorted`).
    """
    n, k = ids.shape
    rows = max(1, min(n, _SCRATCH // max(vocab_size, 1)))
    scratch = torch.empty(rows, vocab_size, dtype=torch.int32, device=ids.device)
    pos = torch.arange(k, dtype=torch.int32, device=ids.device).expand(rows, k)
    out = torch.empty(n, dtype=torch.bool, device=ids.device)
    for lo in range(0, n, rows):
        part = ids[lo:lo + rows]
        m = part.shape[0]
        mine, want = scratch[:m], pos[:m]
        mine.scatter_(1, part, want)
        out[lo:lo + m] = torch.ne(mine.gather(1, part), want).any(1)
    return out


# Room for the served numbers' float32 arithmetic (``l = x - lse`` with logits in the
# hundreds: a few float32 spacings at 100, 7.6e-6 each) in logprobs_problem's check.
LOGPROB_SLACK = 1e-4

# The coarsest precision a server computes log-probabilities in: vLLM and SGLang serve
# bfloat16 models, and a bfloat16 log_softmax rounds each l_k to 8 bits. The numbers then
# travel as JSON floats and reach the loss as float32 (verl: torch.tensor(prompt_logprobs)),
# so the tensor's dtype says nothing about their precision.
SERVER_DTYPE = torch.bfloat16


def logprob_tolerance(dtype: torch.dtype, k: int) -> float:
    """How far above 0 ``log sum_k exp(l_k)`` of ``k`` served log-probs may be.

    ``LOGPROB_SLACK`` (the server's float32 arithmetic) plus the worst effect of rounding
    each ``l_k`` to the coarser of ``dtype`` and :data:`SERVER_DTYPE` (unit roundoff
    ``u``): each ``Q_k`` moves by a factor ``exp(+-u |l_k|)``, so ``sum_k Q_k`` by at most
    ``u sum_k Q_k |l_k| <= u (log k + 1)``. For any dtype up to bfloat16's precision
    (float32 and float64 tensors included): k = 1: 0.0040; k = 20: 0.016; k = 64: 0.020;
    k = 256: 0.026. Measured at V = 128,256 on LM-like teachers, bfloat16 / float16
    servers exceed 1 by at most 7.7e-3 / 6.6e-4 (k = 256), while raw logits give
    ``log sum exp`` >= 10 and probabilities >= log k (0.69 from k = 2): both still refused.
    """
    eps = max(torch.finfo(dtype).eps, torch.finfo(SERVER_DTYPE).eps)
    return LOGPROB_SLACK + eps / 2 * (math.log(k) + 1.0)


def logprobs_problem(lp: torch.Tensor, rows: torch.Tensor | None = None) -> str | None:
    """What is wrong with ``(n, k)`` served log-probabilities, or None (run inside the op
    before any chunk, on the kept tokens; ``rows``: their token indices, for the message).

    A token is refused when ``log sum_k exp(l_k) > logprob_tolerance``: a
    log-prob above 0, or probabilities summing clearly above 1 (logits or unnormalised
    scores passed by mistake). Tokens holding NaN or ``+inf`` are not refused: their loss
    is NaN. ``-inf`` is a probability of 0.
    """
    if lp.numel() == 0:
        return None
    tol = logprob_tolerance(lp.dtype, lp.shape[1])
    # float32 is exact for 16-bit inputs, and its logsumexp is off by ~1e-7 x log k, far
    # below tol (>= 1e-4); float64 inputs stay float64.
    x = lp.to(core.compute_dtype(lp.dtype))
    lse = torch.logsumexp(x, dim=-1)
    bad = (lse > tol) & ~_broken(x)
    if not bool(bad.any()):
        return None
    row = int(bad.nonzero()[0, 0])
    token = row if rows is None else int(rows[row])
    return (f"teacher_topk_logprobs must be log-probabilities normalised over the vocabulary "
            f"(each <= 0, probabilities summing to <= 1, up to {tol:.2g} on log sum exp): "
            f"token {token} has max {x[row].max().item():.6g} and probabilities summing to "
            f"{lse[row].exp().item():.6g} ({int(bad.sum())} such token(s)). Logits passed "
            "by mistake? Pass log_softmax(logits) gathered at the ids")


def _broken(lp: torch.Tensor) -> torch.Tensor:
    """``(n,)``: the token's served log-probs hold NaN or ``+inf`` (its loss is NaN)."""
    return (torch.isnan(lp) | (lp == float("inf"))).any(-1)


def _held(ids: torch.Tensor, lo: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ids fall in this shard's real columns ``[lo, lo + cols)``, and their local
    column (0 where not held)."""
    local = ids - lo
    held = (local >= 0) & (local < cols)
    return held, torch.where(held, local, torch.zeros_like(local))


def take_ids_(z: torch.Tensor, ids: torch.Tensor, lo: int, whole: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take the teacher's ids out of a chunk of student logits, in place (eager, O(k)).

    Args:
        z: ``(n, c)`` student logits of the columns ``[lo, lo + c)`` (a buffer of ours).
        ids: ``(n, k)`` int64 global teacher ids (distinct within a token).
        whole: ``z`` holds every id (one device: the ids were checked to lie in
            ``[0, vocab_size)`` and ``c`` is the real vocabulary), so no id needs a mask.
    Returns:
        ``(at, held, col)``: ``(n, k)`` the logits at the held ids in ``z``'s dtype (any
        value where not held), whether this shard holds each id, and its local column
        (0 where not held). ``z``'s held columns are set to ``-inf``, so that one pass
        over the row sees the tail columns only: no ``(n, c)`` mask, no second pass.
        (``scatter_add_`` rather than ``scatter_``: the ids a shard does not hold point
        at column 0 and add 0 there.)
    """
    if whole:  # every id is a column here: no masks, one gather and one scatter
        at = z.gather(1, ids)
        z.scatter_(1, ids, float("-inf"))
        return at, torch.ones_like(ids, dtype=torch.bool), ids
    held, col = _held(ids, lo, z.shape[1])
    at = z.gather(1, col)
    minus_inf = torch.full((), float("-inf"), dtype=z.dtype, device=z.device)
    z.scatter_add_(1, col, torch.where(held, minus_inf, torch.zeros_like(minus_inf)))
    return at, held, col


def partial_stats(z: torch.Tensor, at: torch.Tensor, held: torch.Tensor,
                  params: torch.Tensor) -> torch.Tensor:
    """Per-token partial statistics of one set of student columns.

    Args:
        z: ``(n, c)`` student logits with the held ids' columns at ``-inf``
            (:func:`take_ids_`), any float dtype.
        at, held: ``(n, k)`` the logits at the ids and whether they are held here.
        params: ``[1/tau, p1, p2]`` in the compute dtype.
    Returns:
        ``(n, k + 2)`` in the compute dtype: ``[lse(z/tau), lse over the columns not in
        ids, z_{I_k}/tau where held else -inf]``. The first is the log-sum-exp of the
        second and the ``k`` values (``k + 1`` numbers, no cancellation), so the row is
        read in one pass. A row with NaN or ``+inf`` (tail or ids) gets NaN.
    """
    return _partial(z, at, held, params)[0]


def partial_stats_(z: torch.Tensor, at: torch.Tensor, held: torch.Tensor,
                   params: torch.Tensor) -> torch.Tensor:
    """:func:`partial_stats`, and ``z`` overwritten by ``exp(z/tau - m)`` (``m`` the row's
    max off the ids) for :func:`grad_logits` to scale instead of exponentiating again.

    The gradient off the ids is ``exp(z_j/tau - base) c``; the statistics' pass already
    forms ``exp(z_j/tau - m)``, and the exponential, not memory, bounds a pass over a
    ``(chunk, V)`` float32 row on CPU. Writing it back costs a store where the gradient
    pass saves one exponential per column. Only for a buffer in the compute dtype (a
    16-bit one would round the exponentials).

    Returns:
        ``(n, k + 3)``: :func:`partial_stats`'s columns, then ``m``.
    """
    out, e, m = _partial(z, at, held, params)
    z.copy_(e)
    return torch.cat([out, m[:, None]], dim=1)


def _partial(z, at, held, params):
    """``(out, e, m)``: :func:`partial_stats`'s ``(n, k + 2)`` result, the row's
    ``exp(z/tau - m)`` it sums and the shift ``m`` (finite: :func:`eaopd_mp.core._shifted`)."""
    torch._check(z.shape[0] == at.shape[0])
    x = z.to(params.dtype) * params[0]
    dx, m, broken = core._shifted(x)
    e = dx.exp()
    tail = m + e.sum(-1).log()
    at_x = at.to(params.dtype) * params[0]
    at_ids = torch.where(held, at_x, torch.full_like(at_x, float("-inf")))
    broken = broken | _broken(at_ids)
    lse = core._lse_shards(torch.cat([tail[:, None], at_ids], dim=1).t())
    out = torch.cat([lse[:, None], tail[:, None], at_ids], dim=1)
    return torch.where(broken[:, None], torch.full_like(out, float("nan")), out), e, m


class Served(NamedTuple):
    """The served teacher's per-token numbers of a chunk, each formed once, in float64
    (``1 - sum_k Q_k`` cancels; the KLs sum terms of both signs).

    Attributes:
        lp, q: ``(n, k)`` the log-probs and ``Q_k = exp(l_k)``.
        lse: ``(n,)`` ``log sum_k Q_k``.
        q_tail: ``(n,)`` ``Q_tail = 1 - sum_k Q_k`` clamped at 0 (a weight; 0 without a
            tail).
        log_q_rev: ``(n,)`` ``log Q_tail`` floored at :data:`TAIL_FLOOR` (inside the
            reverse KL).
    """

    lp: torch.Tensor
    q: torch.Tensor
    lse: torch.Tensor
    q_tail: torch.Tensor
    log_q_rev: torch.Tensor


def served(lp: torch.Tensor, has_tail: bool) -> Served:
    """:class:`Served` from ``(n, k)`` served log-probs in any float dtype."""
    lp = lp.to(torch.float64)
    lse = torch.logsumexp(lp, dim=-1)
    q_tail = (-torch.expm1(lse)).clamp_min(0.0)
    if not has_tail:
        q_tail = torch.zeros_like(q_tail)
    return Served(lp, lp.exp(), lse, q_tail, q_tail.clamp_min(TAIL_FLOOR).log())


def _xlogy(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w * x`` with 0 where ``w == 0`` (0 * -inf counts as 0)."""
    return torch.where(w > 0, w * x, torch.zeros_like(w))


def bucket_entropy(sv: Served) -> torch.Tensor:
    """``-sum_b Q_b log Q_b`` of the bucketed teacher, ``(n,)`` in float64."""
    return -_xlogy(sv.q, sv.lp).sum(-1) - _xlogy(sv.q_tail, sv.q_tail.log())


def _kls(sv: Served, log_pk: torch.Tensor, log_pt: torch.Tensor, mode: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(KL_fwd, KL_rev, LSE_T column)`` of each token from the served numbers, the
    float64 ``(n, k)`` student log-probs at the ids ``log_pk`` and ``(n,)`` ``log P_tail``."""
    lp = sv.lp
    if mode == "bucket":
        pk, pt = log_pk.exp(), log_pt.exp()
        fwd = _xlogy(sv.q, lp - log_pk).sum(-1) + _xlogy(sv.q_tail, sv.q_tail.log() - log_pt)
        rev = _xlogy(pk, log_pk - lp).sum(-1) + _xlogy(pt, log_pt - sv.log_q_rev)
        return fwd, rev, log_pt
    norm = torch.logsumexp(log_pk, dim=-1)
    if mode == "truncate":
        fwd = _xlogy(sv.q, lp - log_pk).sum(-1)
        rev = _xlogy(log_pk.exp(), log_pk - lp).sum(-1)
        return fwd, rev, norm
    lq = lp - sv.lse[:, None]
    lpk = log_pk - norm[:, None]
    fwd = _xlogy(lq.exp(), lq - lpk).sum(-1)
    rev = _xlogy(lpk.exp(), lpk - lq).sum(-1)
    return fwd, rev, norm


def combine_stats(parts: torch.Tensor, sv: Served, entropy: torch.Tensor, given: bool,
                  params: torch.Tensor, kind: str, mode: str) -> torch.Tensor:
    """Merge ``(r, n, k + 2)`` partials of ``r`` column sets; KLs, entropy and gate.

    Args:
        parts: :func:`partial_stats` of each column set (``r = 1`` on one device).
        sv: the served teacher's numbers (:func:`served`); entropy: ``(n,)``, the gate's
            entropy when ``given`` (else ignored: the bucketed teacher's is used).
        params, kind: as :func:`eaopd_mp.core.combine_stats`; mode: ``"bucket"``,
            ``"renormalize"`` or ``"truncate"``.
    Returns:
        ``(n, 7)`` ``[lse_s, log P_tail | log sum P_k, KL_fwd, KL_rev, H, a, b]`` in the
        compute dtype; the per-token sums over the ``k`` ids are formed in float64.
    """
    f64 = torch.float64
    total = core._lse_shards(parts[..., _LOCAL_LSE])
    log_pk = parts[..., 2:].amax(0) - total[:, None]  # one rank holds each id
    log_pt = core._lse_shards(parts[..., _TAIL_LSE]) - total
    ent = entropy.to(f64) if given else bucket_entropy(sv)
    fwd, rev, norm = _kls(sv, log_pk.to(f64), log_pt.to(f64), mode)
    nan = torch.isnan(ent) | torch.isnan(total) | _broken(sv.lp)
    fwd = torch.where(nan, torch.full_like(fwd, float("nan")), fwd)
    fwd, rev, ent = (x.to(params.dtype) for x in (fwd, rev, ent))
    a, b = gate_weights(ent, kind, params[1], params[2])
    return torch.stack([total, norm.to(params.dtype), fwd, rev, ent, a, b], dim=-1)


def grad_logits(z: torch.Tensor, at: torch.Tensor, held: torch.Tensor, sv: Served,
                stats: torch.Tensor, scale: torch.Tensor, params: torch.Tensor, mode: str,
                shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradient of ``scale * L`` with respect to the local student logits.

    For column ``j`` in bucket ``b(j)``: ``(p_j / tau) [a (1 - Q_b/P_b) + b (log P_b -
    log Q_b - KL_rev)]``. Renormalize: 0 off the ids, ``[a (P^_k - Q^_k) + b P^_k (log
    P^_k - log Q^_k - KL_rev)] / tau`` at them. Truncate (``S = sum_k Q_k``, ``P_I =
    sum_k p_k``): ``p_j [a S - b (KL_rev + P_I)] / tau`` off the ids, plus ``[-a Q_k + b
    p_k (log p_k - l_k + 1)] / tau`` at them. A coefficient of exactly 0 drops its term
    (:func:`eaopd_mp.core.weighted`): a served log-prob of ``-inf`` under ``b = 0`` gives
    the forward KL's gradient, not NaN.

    Every column off the ids gets ``r_j c`` with one coefficient ``c`` per token:
    ``r_j = exp(z_j/tau - base)``, ``base`` the tail's log-sum-exp in bucket mode (so
    ``p_j / P_t`` with no division: finite when ``P_t`` underflows) and ``lse`` otherwise;
    ``c`` is formed in float64 from per-token numbers (:func:`_tail_coefficient`).

    Args:
        z: ``(n, c)`` student logits with the held ids at ``-inf`` (:func:`take_ids_`);
        at, held: ``(n, k)`` (:func:`take_ids_`); sv: the served numbers (:func:`served`);
        stats: ``(n, 7)`` from :func:`combine_stats`; scale: ``(n,)``.
        shift: ``(n,)`` ``m`` when ``z`` holds ``exp(z/tau - m)`` (:func:`partial_stats_`):
            then ``r_j = z_j exp(m - base)`` (``base >= m``: no overflow).
    Returns:
        ``(n, c)`` the gradient off the ids (0 at the held ids' columns), and ``(n, k)``
        the gradient at the ids (0 where not held), both in the compute dtype.
    """
    torch._check(z.shape[0] == stats.shape[0])
    torch._check(z.shape[0] == scale.shape[0])
    inv_tau = params[0]
    base, c = _tail_coefficient(sv, stats, scale, params, mode)
    if shift is None:
        r = (z.to(params.dtype) * inv_tau - base[:, None]).exp()
    else:  # z holds exp(x - m), m finite (_shifted); a NaN or -inf base gives r NaN or 0
        # where exp(x - base) did, and the `r > 0` test below keeps both at `off`
        r = z.to(params.dtype) * (shift - base).exp()[:, None]
    off = torch.where(torch.isnan(c), c, torch.zeros_like(c))[:, None]  # NaN stays NaN
    row = torch.where(r > 0, r * c[:, None], off)
    return row, _id_gradient(at, held, sv, stats, scale, params, mode)


def _tail_coefficient(sv, stats, scale, params, mode):
    """``(base, c)``, each ``(n,)`` in the compute dtype: the gradient at a column ``j``
    off the ids is ``exp(z_j/tau - base) c`` (see :func:`grad_logits`)."""
    f64 = torch.float64
    lse, norm = stats[:, LSE_S], stats[:, LSE_T]
    kl_rev = stats[:, KL_REV].to(f64)
    ca = (scale * stats[:, core.A] * params[0]).to(f64)
    cb = (scale * stats[:, core.B] * params[0]).to(f64)
    if mode == "bucket":
        live = norm > float("-inf")  # a tail with mass (else every tail column is -inf)
        base = torch.where(live, lse + norm, torch.zeros_like(lse))
        log_pt = norm.to(f64)
        p_tail = log_pt.exp()
        d_tail = torch.where(live, log_pt - sv.log_q_rev - kl_rev, torch.zeros_like(kl_rev))
        c = ca * (p_tail - sv.q_tail) + weighted(cb, _xlogy(p_tail, d_tail))
    elif mode == "truncate":
        base = lse
        c = ca * sv.lse.exp() - weighted(cb, kl_rev + norm.to(f64).exp())
    else:
        base, c = lse, torch.zeros_like(ca)
    return base, c.to(params.dtype)


def _id_gradient(at, held, sv, stats, scale, params, mode):
    """``(n, k)`` gradient at the teacher's ids held here (0 elsewhere), compute dtype."""
    x = at.to(params.dtype) * params[0]
    lp, q = sv.lp.to(params.dtype), sv.q.to(params.dtype)
    lse, norm, kl_rev = stats[:, LSE_S, None], stats[:, LSE_T, None], stats[:, KL_REV, None]
    ca = (scale * stats[:, core.A] * params[0])[:, None]
    cb = (scale * stats[:, core.B] * params[0])[:, None]
    log_pk = x - lse
    pk = log_pk.exp()
    if mode == "bucket":
        out = ca * (pk - q) + weighted(cb, _xlogy(pk, log_pk - lp - kl_rev))
    elif mode == "truncate":
        served_mass = sv.lse.exp().to(x.dtype)[:, None]
        out = (ca * (served_mass * pk - q)
               + weighted(cb, _xlogy(pk, log_pk - lp + 1.0 - kl_rev - norm.exp())))
    else:
        lpk = log_pk - norm
        lq = (sv.lp - sv.lse[:, None]).to(params.dtype)
        pk = lpk.exp()
        out = ca * (pk - lq.exp()) + weighted(cb, _xlogy(pk, lpk - lq - kl_rev))
    return torch.where(held, out, torch.zeros_like(out))


# ----------------------------------------------------------------- kernels and chunks
#
# The compiled kernels take the chunk with its held ids at -inf (take_ids_, eager): the
# statistics (partial_stats_: the max, then one exponential per column, kept in the
# buffer), one pass for the gradient off the ids (a scale of those exponentials); the
# ``(n, k)`` gradient at the ids comes back packed after the statistics and is added at
# the ids by put_ids_ (eager, O(k)). The recomputing backward exponentiates the raw
# logits (grad_logits_).


def _grad_logits_(z, at, held, sv, stats, scale, params, mode, shift=None):
    """:func:`grad_logits`, the part off the ids written over ``z`` (a buffer of ours);
    returns ``(n, 7 + k)``: ``stats`` then the gradient at the ids."""
    row, at_grad = grad_logits(z, at, held, sv, stats, scale, params, mode, shift)
    z.copy_(row)
    return torch.cat([stats, at_grad], dim=1)


def grad_logits_(z, at, held, lp, stats, scale, params, mode, has_tail):
    """The recomputing backward: :func:`_grad_logits_` from saved statistics."""
    return _grad_logits_(z, at, held, served(lp, has_tail), stats, scale, params, mode)


def shard_stats(lp, ent, parts, given, params, kind, mode, has_tail):
    """Column shards, no gradient: combine the gathered ``(r, n, k + 2)`` partials."""
    torch._check(parts.shape[1] == lp.shape[0])
    return combine_stats(parts, served(lp, has_tail), ent, given, params, kind, mode)


def shard_grad_(z, at, held, lp, ent, parts, scale, given, params, kind, mode, has_tail,
                shift=None):
    """Column shards (one on one device): :func:`_grad_logits_` after combining the
    gathered ``(r, n, k + 2)`` partials; ``shift``: ``z`` holds ``exp(z/tau - shift)``
    (:func:`partial_stats_`), else the logits."""
    torch._check(parts.shape[1] == z.shape[0])
    sv = served(lp, has_tail)
    stats = combine_stats(parts, sv, ent, given, params, kind, mode)
    return _grad_logits_(z, at, held, sv, stats, scale, params, mode, shift)


def shard_grad_e_(z, at, held, lp, ent, parts, scale, given, params, kind, mode, has_tail,
                  shift):
    """:func:`shard_grad_` with ``shift`` given: a kernel of its own (its own code object,
    so its graphs do not count against :func:`shard_grad_`'s recompile limit)."""
    return shard_grad_(z, at, held, lp, ent, parts, scale, given, params, kind, mode,
                       has_tail, shift)


def put_ids_(z: torch.Tensor, col: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Add the ``(n, k)`` gradient at the ids (after the ``NSTATS`` columns of
    ``packed``) into ``z``'s id columns, which hold 0 (eager, O(k)); returns the stats.
    Ids not held carry 0 and point at column 0."""
    z.scatter_add_(1, col, packed[:, core.NSTATS:].to(z.dtype))
    return packed[:, :core.NSTATS]


# Token dims (position -> dim). ``ent`` is always an ``(n,)`` tensor (a dummy view when
# the entropy is not given), so that a one-token chunk can be padded like the others.
_N = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0}
partial_kernel = Kernel(partial_stats, {0: 0, 1: 0, 2: 0})
partial_kernel_ = Kernel(partial_stats_, {0: 0, 1: 0, 2: 0})
shard_stats_kernel = Kernel(shard_stats, {0: 0, 1: 0, 2: 1})
shard_grad_kernel_ = Kernel(shard_grad_, {**_N, 5: 1, 6: 0})
shard_grad_e_kernel_ = Kernel(shard_grad_e_, {**_N, 5: 1, 6: 0, 12: 0})
grad_kernel_ = Kernel(grad_logits_, {**_N, 5: 0})


class TopkHead:
    """The served teacher of ``N`` tokens: ``(N, k)`` log-probs and int64 ids, and an
    ``(N,)`` gate entropy or None."""

    def __init__(self, logprobs: torch.Tensor, ids: torch.Tensor,
                 entropy: torch.Tensor | None = None):
        self.lp, self.ids, self.entropy = logprobs, ids, entropy
        self.dtype = logprobs.dtype
        self.device = logprobs.device

    def logits(self, rows) -> tuple:
        """``(ids, logprobs, entropy)`` of the rows; a dummy entropy view if none."""
        lp, ids = self.lp[rows], self.ids[rows]
        ent = self.entropy[rows] if self.entropy is not None else None
        if isinstance(rows, slice):  # a copy, never a view of the caller's tensor (a
            # one-token chunk's kernel writes its first argument), at storage offset 0
            # (see eaopd_mp.driver.fresh)
            lp, ids = lp.clone(), ids.clone()
            ent = None if ent is None else ent.clone()
        return ids, lp, (ent if ent is not None else lp[:, 0])

    def release(self) -> None:
        pass


def _empty_partial(n: int, k: int, dtype, device) -> torch.Tensor:
    """Partial statistics of a shard with no real vocabulary column."""
    return torch.full((n, k + 2), float("-inf"), dtype=dtype, device=device)


def chunk(plan, spec, z, teacher, scale):
    """:func:`eaopd_mp.driver._chunk` for a top-k teacher (``spec``: its own): ``(n, 7)``
    statistics, and the gradient written over ``z`` (returned) when ``scale`` is given."""
    params = plan.params
    ids, lp, ent = teacher
    kind, mode, given = spec.gate, spec.topk_tail, spec.entropy_given
    has_tail = ids.shape[1] < spec.vocab_size
    lo = offset(plan)
    shift = None
    if z.shape[1] == 0:
        parts = _empty_partial(z.shape[0], ids.shape[1], plan.dtype, z.device)
    else:
        at, held, col = take_ids_(z, ids, lo, whole=plan.combiner is None)
        if scale is not None and z.dtype == plan.dtype:  # keep the exponentials in z
            packed = partial_kernel_(z, at, held, params)
            parts, shift = packed[:, :-1].contiguous(), packed[:, -1].contiguous()
        else:
            parts = partial_kernel(z, at, held, params)
    # One device: one set of columns; tensor parallelism: one all-gather of the partials.
    gathered = parts.unsqueeze(0) if plan.combiner is None else plan.combiner.gather(parts)
    if scale is None or z.shape[1] == 0:
        out = shard_stats_kernel(lp, ent, gathered, given, params, kind, mode, has_tail)
        return out, (None if scale is None else z)
    if shift is None:
        out = shard_grad_kernel_(z, at, held, lp, ent, gathered, scale, given, params, kind,
                                 mode, has_tail)
    else:
        out = shard_grad_e_kernel_(z, at, held, lp, ent, gathered, scale, given, params,
                                   kind, mode, has_tail, shift)
    return put_ids_(z, col, out), z


def backward_chunk(plan, z, teacher, stats, scale) -> None:
    """The recomputing backward of one chunk: the gradient overwrites ``z``."""
    ids, lp, _ = teacher
    has_tail = ids.shape[1] < plan.spec.vocab_size
    at, held, col = take_ids_(z, ids, offset(plan), whole=plan.combiner is None)
    put_ids_(z, col, grad_kernel_(z, at, held, lp, stats, scale, plan.params,
                                  plan.spec.topk_tail, has_tail))


def offset(plan) -> int:
    """Global id of this rank's first column: rank x shard stride (padding included)."""
    if plan.combiner is None:
        return 0
    return plan.combiner.rank * plan.spec.stride
