"""The chunk loop the custom ops run (eagerly, inside the op).

A *head* turns rows of tokens into logits (a slice of given logits, or ``h @ W.T + b``)
and takes the gradient of those logits back. The driver walks the kept tokens chunk by
chunk, asks both heads for a chunk of logits, runs a core kernel on it, and hands the
student head its gradient. Tensor parallelism only adds a combiner
(:class:`eaopd_mp.tp.TPCombiner`): one collective per chunk between the partial and the
combined statistics.

Gradient modes:
  * scalar reductions: each chunk's gradient (times the token's mask weight) is computed
    in the forward pass; backward only multiplies by ``grad_output``;
  * ``reduction="none"``: forward keeps ``(N, 7)`` per-token statistics and backward
    recomputes each chunk's logits, scaled by the per-token ``grad_output``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import core, topk
from .gates import gate_weights

# Size of one float32 (chunk, V) buffer that the default chunk size aims for.
CHUNK_BYTES = 64 * 2**20
MAX_CHUNK = 4096
_HALF = (torch.float16, torch.bfloat16)


def default_chunk_size(vocab: int) -> int:
    """Tokens per chunk so that one ``(chunk, V)`` float32 tensor is about 64 MiB.

    A chunk's live set is two such buffers, reused for every chunk of a call: the
    student's logits (overwritten by their gradient) and the teacher's; the compiled
    kernels keep their temporaries per row. So the working memory is about 2 x 64 MiB
    (half that for 16-bit GEMMs) whatever the number of tokens: 512 tokens at V = 32k,
    128 at V = 128k. A power of two between 16 and 4096.
    """
    rows = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    size = 16
    while size * 2 <= min(rows, MAX_CHUNK):
        size *= 2
    return size


@functools.cache
def cpu_has_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for ``dtype`` (bfloat16/float16) GEMMs.

    Measured on a 2-core AMD EPYC with ``avx512_bf16``: bf16 GEMMs beat float32 ones
    (``(2048, 32000) @ (32000, 512)``: 0.23 s vs 0.36 s; the fused bf16 step at N = 8,
    H = 256, V = 256000: 0.37 s native vs 0.78 s with float32 GEMMs). Without such
    instructions torch's CPU 16-bit GEMMs are 8-150x slower than float32 ones (measured on
    another CPU: 112 s vs 0.76 s at the same shape).
    """
    cpu = torch.cpu
    names = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
             torch.float16: ("_is_amx_fp16_supported",)}.get(dtype, ())
    return any(getattr(cpu, name, lambda: False)() for name in names)


def gemm_dtypes(param: torch.dtype, autocast: str, device: torch.device):
    """``(round_to, compute_in)`` for a head's GEMMs.

    Operands are rounded to the autocast dtype when autocast is on (as ``nn.Linear``
    under autocast), else kept in the parameter's dtype. On a CPU without 16-bit GEMM
    instructions (:func:`cpu_has_half_gemm`), 16-bit GEMMs run in float32 on the rounded
    operands: what a 16-bit GEMM with float32 accumulation computes, up to its output
    rounding, at float32 speed.
    """
    round_to = getattr(torch, autocast) if autocast else param
    if param == torch.float64:
        round_to = param  # autocast leaves float64 alone
    compute_in = round_to
    if device.type == "cpu" and round_to in _HALF and not cpu_has_half_gemm(round_to):
        compute_in = torch.float32
    return round_to, compute_in


def _cast(x: torch.Tensor, round_to, compute_in) -> torch.Tensor:
    return x.to(round_to).to(compute_in)


class LogitsHead:
    """Given logits ``(N, V)``; only the first ``cols`` columns are real vocabulary."""

    def __init__(self, logits: torch.Tensor, cols: int, need_grad: bool = False):
        self.x = logits
        self.dtype = logits.dtype
        self.device = logits.device
        self.cols = cols
        self.need_grad = need_grad
        self.grad: torch.Tensor | None = None
        self.buf: torch.Tensor | None = None
        self.pool: Pool | None = None  # a teacher's: the plan's shared buffer (Plan)

    def logits(self, rows) -> torch.Tensor:
        """A copy in the head's buffer: the gradient kernels overwrite the student's."""
        if isinstance(rows, slice):
            src = self.x[rows, : self.cols]
            return _buffer(self, src.shape[0], self.x.dtype).copy_(src)
        out = _buffer(self, rows.numel(), self.x.dtype)
        return torch.index_select(self.x[:, : self.cols], 0, rows, out=out)

    def release(self) -> None:
        self.buf = None

    def start_grad(self) -> None:
        self.grad = torch.zeros_like(self.x) if self.need_grad else None

    def add_grad(self, grad: torch.Tensor, rows) -> None:
        if self.grad is not None:
            self.grad[rows, : self.cols] = grad.to(self.grad.dtype)

    def grads(self) -> tuple:
        return (self.grad,)


class LinearHead:
    """Logits ``h @ W[:cols].T + b[:cols]`` from hidden ``(N, H)`` and weight ``(V, H)``.

    ``need`` says which of (hidden, weight, bias) want a gradient. The weight and bias
    gradients are accumulated in float32 (float64 for float64 weights) across chunks,
    without a ``(V, H)`` temporary per chunk; the hidden gradient is written in the hidden
    states' dtype. ``autocast`` is the autocast dtype in force at the call (or ``""``).
    """

    def __init__(self, hidden, weight, bias=None, cols=None, need=(False, False, False),
                 autocast: str = ""):
        self.h, self.w, self.b = hidden, weight, bias
        self.dtype = weight.dtype
        self.device = weight.device
        self.cols = weight.shape[0] if cols is None else cols
        self.need = need
        self.round_to, self.mm = gemm_dtypes(weight.dtype, autocast, weight.device)
        self.wm = _cast(weight[: self.cols], self.round_to, self.mm)  # no copy if same dtype
        self.bm = None if bias is None else _cast(bias[: self.cols], self.round_to, self.mm)
        self.grad_h = self.grad_w = self.grad_b = None
        self.buf: torch.Tensor | None = None
        self.pool: Pool | None = None  # a teacher's: the plan's shared buffer (Plan)
        self.scratch: torch.Tensor | None = None  # _accumulate_mm's product (CPU, 16-bit)
        self.fresh_w = False  # grad_w allocated, not yet written by a chunk

    def _hidden(self, rows) -> torch.Tensor:
        return _cast(self.h[rows], self.round_to, self.mm)

    def logits(self, rows) -> torch.Tensor:
        h = self._hidden(rows)
        out = _buffer(self, h.shape[0], self.mm)
        if self.bm is None:
            return torch.mm(h, self.wm.t(), out=out)
        return torch.addmm(self.bm, h, self.wm.t(), out=out)

    def release(self) -> None:
        self.buf = self.scratch = None

    def start_grad(self) -> None:
        need_h, need_w, need_b = self.need
        acc = dict(dtype=core.compute_dtype(self.w.dtype), device=self.device)
        self.grad_h = torch.zeros_like(self.h) if need_h else None
        # The weight gradient's real rows are written (not added) by the first chunk: no
        # zero-fill and no read of a (V, H) accumulator that holds only zeros.
        self.grad_w = torch.empty(self.w.shape, **acc) if need_w else None
        if self.grad_w is not None:
            self.grad_w[self.cols:].zero_()  # padding rows get no gradient
        self.fresh_w = need_w
        self.grad_b = torch.zeros(self.w.shape[0], **acc) if need_b and self.b is not None \
            else None

    def add_grad(self, grad: torch.Tensor, rows) -> None:
        """``grad``: the chunk's ``(n, cols)`` logits gradient."""
        g = grad.to(self.mm)
        if self.grad_h is not None:
            if isinstance(rows, slice) and self.grad_h.dtype == self.mm:
                torch.mm(g, self.wm, out=self.grad_h[rows])
            else:
                self.grad_h[rows] = (g @ self.wm).to(self.grad_h.dtype)
        if self.grad_w is not None:
            self.scratch = _accumulate_mm(self.grad_w[: self.cols], g.t(), self._hidden(rows),
                                          self.scratch, first=self.fresh_w)
            self.fresh_w = False
        if self.grad_b is not None:
            self.grad_b[: self.cols].add_(g.sum(0, dtype=self.grad_b.dtype))

    def grads(self) -> tuple:
        if self.fresh_w:  # no chunk at all (every token masked)
            self.grad_w.zero_()
            self.fresh_w = False
        return (self.grad_h, self.grad_w, self.grad_b)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scratch: torch.Tensor | None = None, first: bool = False
                   ) -> torch.Tensor | None:
    """``acc += a @ b`` (``acc = a @ b`` when ``first``: ``acc`` may hold garbage) with
    ``acc`` in float32/64 and ``a``, ``b`` possibly 16-bit, without a ``(V, H)`` temporary
    per chunk; returns the scratch buffer to pass to the next call.

    CUDA: one 16-bit GEMM with a float32 output. CPU (only reached with 16-bit GEMM
    instructions, :func:`gemm_dtypes`): torch has no 16-bit CPU GEMM with a float32
    output (``out_dtype`` is CUDA-only in torch 2.13), so the product is a 16-bit GEMM
    (float32 accumulation inside, one rounding of its output, as ``nn.Linear``'s 16-bit
    weight gradient) into ``scratch`` (kept across chunks: a fresh 16 MiB product is
    page-faulted anew, 36 vs 27 ms for GEMM + add at ``(32000, 512) @ (512, 256)`` on a
    2-core AMX CPU), added to ``acc`` in blocks of at most :data:`_ACC_BLOCK` elements;
    the running sum stays in ``acc``'s dtype. Smaller blocks are slower (60 ms with 2048
    rows: the GEMM is then inefficient). Casting ``a`` and ``b`` to float32 instead runs
    this GEMM at float32 speed: 3.8x (AMD, AVX512-BF16) to 9x (Intel, AMX) the 16-bit
    GEMM's time at that shape.
    """
    if a.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif acc.is_cuda:
        if first:
            acc.zero_()
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # float32 accumulation
    else:
        step = max(1, _ACC_BLOCK // max(1, b.shape[1]))
        rows = min(step, a.shape[0])
        if scratch is None or scratch.numel() < rows * b.shape[1] or scratch.dtype != a.dtype:
            scratch = torch.empty(rows * b.shape[1], dtype=a.dtype, device=a.device)
        for lo in range(0, a.shape[0], step):
            hi = min(lo + step, a.shape[0])
            out = scratch[: (hi - lo) * b.shape[1]].view(hi - lo, b.shape[1])
            torch.mm(a[lo:hi], b, out=out)
            if first:
                acc[lo:hi].copy_(out)
            else:
                acc[lo:hi].add_(out)
    return scratch


_ACC_BLOCK = 2**23  # elements of one 16-bit product block in _accumulate_mm (16 MiB)


def _buffer(head, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The head's reusable ``(n, cols)`` logits buffer (allocated once per call).

    Fresh ``(chunk, V)`` tensors per chunk cost more than the maths on CPU: buffers this
    large are mmapped and page-faulted anew on every allocation. Teacher heads share one
    :class:`Pool` (a plan holds one teacher's chunk at a time), so several teachers cost
    one buffer, allocated once.
    """
    if head.pool is not None:
        head.buf = head.pool.take(n, head.cols, dtype, head.device)
    elif head.buf is None or head.buf.shape[0] < n:
        head.buf = torch.empty((n, head.cols), dtype=dtype, device=head.device)
    return head.buf[:n]


class Pool:
    """One flat buffer that the teacher heads of a plan take their ``(n, cols)`` logits
    from in turn (each teacher's width and dtype; only one teacher's chunk is live)."""

    def __init__(self):
        self.flat: torch.Tensor | None = None

    def take(self, n: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
        """A contiguous ``(n, cols)`` view of the pool, grown (never shrunk) as needed."""
        need = n * cols * dtype.itemsize
        flat = self.flat
        if flat is None or flat.numel() < need or flat.device != torch.device(device):
            self.flat = flat = torch.empty(need, dtype=torch.uint8, device=device)
        return flat[:need].view(dtype).view(n, cols)

    def release(self) -> None:
        self.flat = None


@dataclass
class Part:
    """One teacher's share of a call: positions ``[lo, hi)`` of the kept tokens.

    Attributes:
        head: the teacher's head over its own ``N_j`` rows.
        spec: the single-teacher :class:`eaopd_mp.plan.Spec` of this teacher (its form,
            whether its entropy is given): it selects the chunk's kernels.
        entropy: ``(N_j,)`` gate entropy given for a dense teacher, or None (a top-k
            teacher head carries its own).
    """

    head: object
    spec: object
    entropy: torch.Tensor | None
    lo: int = 0
    hi: int = 0


@dataclass
class Plan:
    """One evaluation inside the op.

    The kept tokens are walked in *kept order*: token order, or with several teachers
    grouped by teacher (teacher 0's tokens first, each group in token order), so that
    every chunk belongs to one teacher and the student's logits are made once per token.

    Attributes:
        student: the student head over ``N`` flattened tokens.
        parts: one :class:`Part` per teacher, in kept order.
        rows: the student token of each kept position, or None (all tokens, in order).
        weight: ``(N,)`` mask weights in the compute dtype, or None.
        spec: the call's :class:`eaopd_mp.plan.Spec`.
        combiner: None on one device; a :class:`eaopd_mp.tp.TPCombiner` otherwise.
        t_rows: the teacher row of each kept position (None: the same as ``rows``).
    """

    student: LogitsHead | LinearHead
    parts: list
    rows: torch.Tensor | None
    weight: torch.Tensor | None
    n_tokens: int
    spec: object
    combiner: object = None
    t_rows: torch.Tensor | None = None

    def __post_init__(self):
        self.n_kept = self.n_tokens if self.rows is None else int(self.rows.numel())
        self.dtype = core.compute_dtype(self.student.dtype,
                                        *(p.head.dtype for p in self.parts))
        self.params = core.make_params(self.spec.inv_tau, self.spec.gate_obj, self.dtype,
                                       self.student.device)
        head, flags = core.make_head(self.spec.transform, self.dtype, self.student.device)
        # Head transforms select the *_x kernels, which take (head, flags) after the rest.
        self.transformed = head is not None
        self.extra = (head, flags) if self.transformed else ()
        self.pool = Pool()
        for part in self.parts:  # the teachers take turns with one logits buffer
            part.head.pool = self.pool

    def kept_weight(self) -> torch.Tensor | None:
        if self.weight is None:
            return None
        return self.weight if self.rows is None else self.weight[self.rows]

    def chunks(self):
        """Yield ``(lo, hi, rows, t_rows, part)``: positions in the kept tokens, the
        student's and the teacher's row selectors, and the chunk's teacher. The teachers'
        logits buffer (:class:`Pool`) is released after the last chunk."""
        chunk = self.spec.chunk
        for part in self.parts:
            for lo in range(part.lo, part.hi, chunk):
                hi = min(lo + chunk, part.hi)
                rows = slice(lo, hi) if self.rows is None else self.rows[lo:hi]
                t_rows = rows if self.t_rows is None else self.t_rows[lo:hi]
                yield lo, hi, rows, t_rows, part
            part.head.release()
        self.pool.release()

    def scatter(self, kept: torch.Tensor) -> torch.Tensor:
        """Per-kept-token rows -> all ``N`` tokens (zeros for the skipped ones)."""
        if self.rows is None:
            return kept
        out = kept.new_zeros((self.n_tokens, *kept.shape[1:]))
        out[self.rows] = kept
        return out


def _empty_partial(n: int, dtype, device) -> torch.Tensor:
    """Partial statistics of a shard with no real vocabulary column."""
    out = torch.zeros(n, core.NPARTIAL, dtype=dtype, device=device)
    out[:, :3] = float("-inf")
    return out


def _chunk(plan: Plan, spec, z, y, scale, entropy=None):
    """Statistics ``(n, 7)`` of one chunk; with ``scale``, the gradient is written over
    ``z`` (the student head's buffer) and ``z`` is returned as the gradient.
    ``spec``: the chunk's teacher's (:attr:`Part.spec`); ``entropy``: the chunk's ``(n,)``
    given gate entropy (dense teacher), or None."""
    params, x = plan.params, plan.extra
    if spec.teacher == "topk":
        return topk.chunk(plan, spec, z, y, scale)
    if entropy is not None:
        return _chunk_given_entropy(plan, spec, z, y, scale, entropy)
    kind, untempered = spec.gate, spec.inv_tau == 1.0
    tf = plan.transformed
    if plan.combiner is None:
        if scale is None:
            return _single_stats(plan, z, y, kind, untempered), None
        kernel = core.fwd_grad_x_kernel_ if tf else core.fwd_grad_kernel_
        sums = kernel(z, y, scale, params, kind, untempered, *x)
        return core.sums_stats_kernel(sums, params, kind), z
    gathered = plan.combiner.gather(_partial(plan, z, y, untempered))
    if scale is None or z.shape[1] == 0:
        return core.combine_stats(gathered, params, kind), (None if scale is None else z)
    kernel = core.shard_grad_x_kernel_ if tf else core.shard_grad_kernel_
    return kernel(z, y, gathered, scale, params, kind, *x), z


def _partial(plan: Plan, z, y, untempered: bool) -> torch.Tensor:
    """A column shard's ``(n, 6)`` partial statistics: its row sums, then
    :func:`eaopd_mp.core.partial_from_sums` (two kernels, as :func:`_single_stats`); a shard
    with no real vocabulary column has :func:`_empty_partial`."""
    if z.shape[1] == 0:
        return _empty_partial(z.shape[0], plan.dtype, z.device)
    return core.parts_kernel(_sums(plan, z, y, untempered))


def _single_stats(plan: Plan, z, y, kind: str, untempered: bool) -> torch.Tensor:
    """One device, no gradient: the chunk's ``(n, 7)`` statistics (its row sums, then the
    statistics made from them: :func:`eaopd_mp.core.single_sums`)."""
    return core.sums_stats_kernel(_sums(plan, z, y, untempered), plan.params, kind)


def _sums(plan: Plan, z, y, untempered: bool) -> torch.Tensor:
    """The chunk's ``(n, NSUMS)`` packed row sums (:func:`eaopd_mp.core.single_sums`), head
    transforms applied if the plan has them."""
    kernel = core.sums_x_kernel if plan.transformed else core.sums_kernel
    return kernel(z, y, plan.params, untempered, *plan.extra)


def _override_gate(stats: torch.Tensor, entropy: torch.Tensor, params: torch.Tensor,
                  kind: str) -> torch.Tensor:
    """Dense ``(n, 7)`` statistics with the gate recomputed from a given ``(n,)``
    entropy (a NaN entropy makes the token's loss NaN)."""
    ent = entropy.to(stats.dtype)
    a, b = gate_weights(ent, kind, params[1], params[2])
    fwd = torch.where(torch.isnan(ent), torch.full_like(ent, float("nan")), stats[:, core.KL_FWD])
    return torch.cat([stats[:, :core.KL_FWD], fwd[:, None], stats[:, core.KL_REV:core.ENTROPY],
                      torch.stack([ent, a, b], dim=-1)], dim=1)


def _chunk_given_entropy(plan: Plan, spec, z, y, scale, entropy):
    """:func:`_chunk` with the caller's gate entropy: the dense statistics, the gate
    recomputed from ``entropy`` (:func:`_override_gate`), then the gradient
    from those statistics (one more pass over the chunk than the fused kernel)."""
    params, x, tf = plan.params, plan.extra, plan.transformed
    untempered = spec.inv_tau == 1.0
    if plan.combiner is None:
        stats = _single_stats(plan, z, y, spec.gate, untempered)
    else:
        parts = plan.combiner.gather(_partial(plan, z, y, untempered))
        stats = core.combine_stats(parts, params, spec.gate)
    stats = _override_gate(stats, entropy, params, spec.gate)
    if scale is None:
        return stats, None
    if z.shape[1] > 0:
        kernel = core.grad_x_kernel_ if tf else core.grad_kernel_
        kernel(z, y, stats, scale, params, *x)
    return stats, z


def fresh(x: torch.Tensor) -> torch.Tensor:
    """``x`` at storage offset 0 (a copy of a small per-chunk slice if needed): the
    compiled kernels specialise on an offset of 0 or 1 against one >= 2, so slices that
    start anywhere would compile each kernel twice (seconds each)."""
    return x if x.storage_offset() == 0 else x.clone()


def run_forward(plan: Plan, scale: torch.Tensor | None) -> torch.Tensor:
    """Per-kept-token statistics ``(n_kept, 7)``; with ``scale`` also the student gradient."""
    student = plan.student
    stats = torch.empty(plan.n_kept, core.NSTATS, dtype=plan.dtype, device=student.device)
    for lo, hi, rows, t_rows, part in plan.chunks():
        z, y = student.logits(rows), part.head.logits(t_rows)
        s = None if scale is None else fresh(scale[lo:hi])
        ent = None if part.entropy is None else fresh(part.entropy[t_rows])
        stats[lo:hi], grad = _chunk(plan, part.spec, z, y, s, ent)
        if grad is not None:
            student.add_grad(grad, rows)
        y = None  # the teachers' pool is released after the last chunk (Plan.chunks)
    student.release()
    return stats


def run_backward(plan: Plan, stats: torch.Tensor, scale: torch.Tensor) -> None:
    """Recompute each chunk's logits and hand the student its gradient (no collective)."""
    student = plan.student
    for lo, hi, rows, t_rows, part in plan.chunks():
        z, y = student.logits(rows), part.head.logits(t_rows)
        if z.shape[1] == 0:
            y = None
            continue
        st, sc = fresh(stats[lo:hi]), fresh(scale[lo:hi])
        if part.spec.teacher == "topk":
            topk.backward_chunk(plan, z, y, st, sc)
        else:
            kernel = core.grad_x_kernel_ if plan.transformed else core.grad_kernel_
            kernel(z, y, st, sc, plan.params, *plan.extra)
        student.add_grad(z, rows)
        y = None  # as in run_forward
    student.release()
