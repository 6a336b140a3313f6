"""The chunk loop and the autograd function shared by every path.

A *head* turns rows of tokens into logits (a slice of given logits, or ``h @ W.T + b``)
and takes the gradient of those logits back. The driver walks the tokens chunk by chunk,
asks both heads for a chunk of logits, runs the core kernel on it, and hands the student
head its gradient. Tensor parallelism only adds a *combiner* (``eaopd_mp.parallel``):
one collective per chunk between the partial and the combined statistics.

Gradient modes:
  * scalar reductions: each chunk's gradient is computed in the forward pass (scaled by
    mask weight and reduction) and backward only multiplies by ``grad_output``;
  * ``reduction="none"``: forward keeps ``(n, 7)`` per-token statistics and backward
    recomputes each chunk's logits, scaled by the per-token ``grad_output``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from . import core
from .gates import Gate

# Size of one float32 (chunk, V) buffer that the default chunk size aims for.
CHUNK_BYTES = 64 * 2**20
MAX_CHUNK = 4096


def default_chunk_size(vocab: int) -> int:
    """Tokens per chunk so that one ``(chunk, V)`` float32 tensor is about 64 MiB.

    A chunk's live set is two such buffers, reused for every chunk of a call: the
    student's logits (overwritten by their gradient) and the teacher's; the compiled
    kernels keep their temporaries per row. So the working memory is about 2 x 64 MiB
    (half that for 16-bit inputs) whatever the number of tokens: 512 tokens at V = 32k,
    128 at V = 128k. A power of two between 16 and 4096.
    """
    rows = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    size = 16
    while size * 2 <= min(rows, MAX_CHUNK):
        size *= 2
    return size


class Head(Protocol):
    """Makes ``(rows, v)`` logits and accumulates their gradient."""

    def logits(self, rows) -> torch.Tensor: ...
    def release(self) -> None: ...
    def start_grad(self) -> None: ...
    def add_grad(self, grad: torch.Tensor, rows) -> None: ...
    def grads(self, factor: torch.Tensor | None) -> tuple: ...


class LogitsHead:
    """Given logits ``(N, V)``; only the first ``cols`` columns are real vocabulary."""

    def __init__(self, logits: torch.Tensor, cols: int | None = None, need_grad=False):
        self.x = logits
        self.dtype = logits.dtype
        self.width = logits.shape[-1]
        self.cols = self.width if cols is None else cols
        self.need_grad = need_grad
        self.grad: torch.Tensor | None = None
        self.buf: torch.Tensor | None = None

    def logits(self, rows) -> torch.Tensor:
        """A copy in the head's buffer: the gradient kernels overwrite the student's."""
        if isinstance(rows, slice):
            src = self.x[rows, : self.cols]
            return _buffer(self, src.shape[0], self.x).copy_(src)
        out = _buffer(self, rows.numel(), self.x)
        return torch.index_select(self.x[:, : self.cols], 0, rows, out=out)

    def release(self) -> None:
        self.buf = None

    def start_grad(self) -> None:
        self.grad = torch.zeros_like(self.x) if self.need_grad else None

    def add_grad(self, grad: torch.Tensor, rows) -> None:
        if self.grad is not None:
            self.grad[rows, : self.cols] = grad.to(self.grad.dtype)

    def grads(self, factor: torch.Tensor | None) -> tuple:
        return (_scaled(self.grad, factor),)


class LinearHead:
    """Logits ``h @ W[:cols].T + b[:cols]`` from hidden ``(N, H)`` and weight ``(V, H)``.

    ``need`` says which of (hidden, weight, bias) want a gradient. The weight and bias
    gradients are accumulated in float32 (float64 for float64 weights) across chunks.
    """

    def __init__(self, hidden, weight, bias=None, cols=None, need=(False, False, False)):
        self.h, self.w, self.b = hidden, weight, bias
        self.dtype = weight.dtype
        self.width = weight.shape[0]
        self.cols = self.width if cols is None else cols
        self.need = need
        self.grad_h = self.grad_w = self.grad_b = None
        self.buf: torch.Tensor | None = None

    def logits(self, rows) -> torch.Tensor:
        h = self.h[rows]
        out = _buffer(self, h.shape[0], self.w)
        w = self.w[: self.cols]
        if self.b is None:
            return torch.mm(h, w.t(), out=out)
        return torch.addmm(self.b[: self.cols], h, w.t(), out=out)

    def release(self) -> None:
        self.buf = None

    def start_grad(self) -> None:
        need_h, need_w, need_b = self.need
        acc = dict(dtype=core.compute_dtype(self.w.dtype), device=self.w.device)
        self.grad_h = torch.zeros_like(self.h) if need_h else None
        self.grad_w = torch.zeros(self.w.shape, **acc) if need_w else None
        self.grad_b = torch.zeros(self.w.shape[0], **acc) if need_b and self.b is not None else None

    def add_grad(self, grad: torch.Tensor, rows) -> None:
        """``grad``: the chunk's ``(n, cols)`` logits gradient, in the weight's dtype."""
        g = grad.to(self.w.dtype)
        if self.grad_h is not None:
            if isinstance(rows, slice):
                torch.mm(g, self.w[: self.cols], out=self.grad_h[rows])
            else:
                self.grad_h[rows] = g @ self.w[: self.cols]
        if self.grad_w is not None:
            gw = self.grad_w[: self.cols]
            if g.dtype == gw.dtype:
                gw.addmm_(g.t(), self.h[rows])
            else:
                gw.add_(g.t() @ self.h[rows])
        if self.grad_b is not None:
            self.grad_b[: self.cols].add_(g.sum(0, dtype=self.grad_b.dtype))

    def grads(self, factor: torch.Tensor | None) -> tuple:
        return (
            _scaled(self.grad_h, factor),
            _scaled(self.grad_w, factor, self.w.dtype),
            _scaled(self.grad_b, factor, None if self.b is None else self.b.dtype),
        )


def _buffer(head, n: int, like: torch.Tensor) -> torch.Tensor:
    """The head's reusable ``(n, cols)`` logits buffer (allocated once per call).

    Fresh ``(chunk, V)`` tensors per chunk cost more than the maths on CPU: buffers this
    large are mmapped and page-faulted anew on every allocation.
    """
    if head.buf is None or head.buf.shape[0] < n:
        head.buf = like.new_empty((n, head.cols))
    return head.buf[:n]


def _scaled(x, factor, dtype=None):
    """An accumulated gradient times ``factor`` (None: as is), cast to ``dtype``.

    Out of place: backward may run more than once on the same graph.
    """
    if x is None:
        return None
    if factor is not None:
        x = x * factor.to(x.dtype)
    return x if dtype is None else x.to(dtype)


class Combiner(Protocol):
    """How the partial statistics of a chunk are combined across vocabulary shards."""

    def gather(self, parts: torch.Tensor) -> torch.Tensor: ...
    def reduce_grads(self, grads: tuple) -> tuple: ...


@dataclass
class Plan:
    """Everything one loss evaluation needs besides the student tensors.

    Attributes:
        student, teacher: heads over the same ``n_tokens`` flattened tokens.
        token_shape: shape of the token dims (for ``reduction="none"``).
        rows: indices of tokens with a non-zero mask weight, or None for all tokens.
        weight: ``(N,)`` mask weights in the compute dtype, or None.
        gate, inv_tau, chunk, reduction: loss options.
        combiner: None on one device; a tensor-parallel combiner otherwise.
    """

    student: Head
    teacher: Head
    token_shape: tuple
    rows: torch.Tensor | None
    weight: torch.Tensor | None
    gate: Gate
    inv_tau: float
    chunk: int
    reduction: str
    combiner: Combiner | None = None
    n_kept: int = field(init=False)

    def __post_init__(self):
        n = 1
        for d in self.token_shape:
            n *= d
        self.n_tokens = n
        self.n_kept = n if self.rows is None else int(self.rows.numel())
        self.dtype = core.compute_dtype(self.student.dtype, self.teacher.dtype)
        self.params = core.make_params(1.0 / self.inv_tau, self.gate, self.dtype,
                                       _device(self.student))

    def reduction_scale(self) -> float:
        """The seed's divisor: 1 (sum), numel (mean), first token dim (batchmean)."""
        if self.reduction == "mean":
            return 1.0 / max(1, self.n_tokens)
        if self.reduction == "batchmean":
            return 1.0 / max(1, self.token_shape[0] if self.token_shape else 1)
        return 1.0

    def kept_weight(self) -> torch.Tensor | None:
        if self.weight is None:
            return None
        return self.weight if self.rows is None else self.weight[self.rows]

    def chunks(self):
        """Yield ``(lo, hi, rows)``: positions in the kept tokens and the row selector."""
        for lo in range(0, self.n_kept, self.chunk):
            hi = min(lo + self.chunk, self.n_kept)
            yield lo, hi, (slice(lo, hi) if self.rows is None else self.rows[lo:hi])


def _empty_partial(n: int, dtype, device) -> torch.Tensor:
    """Partial statistics of a shard with no real vocabulary column."""
    out = torch.zeros(n, core.NPARTIAL, dtype=dtype, device=device)
    out[:, :3] = float("-inf")
    return out


def _chunk(plan: Plan, z, y, scale):
    """Statistics ``(n, 7)`` of one chunk; with ``scale``, the gradient is written over
    ``z`` (the student head's buffer) and ``z`` is returned as the gradient."""
    kind, untempered, params = plan.gate.kind, plan.inv_tau == 1.0, plan.params
    if plan.combiner is None:
        if scale is None:
            return core.stats_kernel(z, y, params, kind, untempered), None
        return core.fwd_grad_kernel_(z, y, scale, params, kind, untempered), z
    if z.shape[1] == 0:
        parts = _empty_partial(z.shape[0], plan.dtype, z.device)
    else:
        parts = core.partial_kernel(z, y, params, untempered)
    gathered = plan.combiner.gather(parts)
    if scale is None or z.shape[1] == 0:
        return core.combine_stats(gathered, params, kind), (None if scale is None else z)
    return core.shard_grad_kernel_(z, y, gathered, scale, params, kind), z


def run_forward(plan: Plan, scale: torch.Tensor | None) -> torch.Tensor:
    """Per-token statistics ``(n_kept, 7)``; with ``scale`` also the student gradient."""
    student, teacher = plan.student, plan.teacher
    device = _device(student)
    stats = torch.empty(plan.n_kept, core.NSTATS, dtype=plan.dtype, device=device)
    for lo, hi, rows in plan.chunks():
        z, y = student.logits(rows), teacher.logits(rows)
        s = None if scale is None else scale[lo:hi]
        stats[lo:hi], grad = _chunk(plan, z, y, s)
        if grad is not None:
            student.add_grad(grad, rows)
    student.release()
    teacher.release()
    return stats


def run_backward(plan: Plan, stats: torch.Tensor, scale: torch.Tensor) -> None:
    """Recompute each chunk's logits and hand the student its gradient (no collective)."""
    student, teacher = plan.student, plan.teacher
    for lo, hi, rows in plan.chunks():
        z, y = student.logits(rows), teacher.logits(rows)
        if z.shape[1] == 0:
            continue
        core.grad_kernel_(z, y, stats[lo:hi], scale[lo:hi], plan.params)
        student.add_grad(z, rows)
    student.release()
    teacher.release()


def _device(head) -> torch.device:
    return head.x.device if isinstance(head, LogitsHead) else head.w.device


def reduce_loss(plan: Plan, stats: torch.Tensor) -> torch.Tensor:
    """Per-token loss of the kept tokens -> the reduced (or token-shaped) float32 loss."""
    per_tok = core.token_loss(stats)
    w = plan.kept_weight()
    if w is not None:
        per_tok = per_tok * w
    if plan.reduction == "none":
        if plan.rows is None:
            return per_tok.reshape(plan.token_shape)
        out = per_tok.new_zeros(plan.n_tokens)
        out[plan.rows] = per_tok
        return out.reshape(plan.token_shape)
    return per_tok.sum() * plan.reduction_scale()


class _EAOPDFunction(torch.autograd.Function):
    """Autograd glue: inputs are the student tensors; everything else is in the plan."""

    @staticmethod
    def forward(ctx, plan: Plan, *student_tensors):
        ctx.plan = plan
        ctx.scalar = plan.reduction != "none"
        scale = None
        if ctx.scalar:
            plan.student.start_grad()
            scale = torch.full((plan.n_kept,), plan.reduction_scale(), dtype=plan.dtype,
                               device=_device(plan.student))
            w = plan.kept_weight()
            if w is not None:
                scale = scale * w
        stats = run_forward(plan, scale)
        ctx.stats = None if ctx.scalar else stats
        loss = reduce_loss(plan, stats)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        plan = ctx.plan
        if ctx.scalar:
            unit = torch.equal(grad_loss, torch.ones_like(grad_loss))
            grads = plan.student.grads(None if unit else grad_loss)
        else:
            flat = grad_loss.reshape(-1).to(plan.dtype).contiguous()  # may be an expand
            scale = flat if plan.rows is None else flat[plan.rows]
            w = plan.kept_weight()
            if w is not None:
                scale = scale * w
            plan.student.start_grad()
            run_backward(plan, ctx.stats, scale)
            grads = plan.student.grads(None)
        if plan.combiner is not None and isinstance(plan.student, LinearHead):
            grads = plan.combiner.reduce_grads(grads)
        return (None, *grads)


def evaluate(plan: Plan, student_tensors: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (reduced as asked) and per-token statistics ``(n_kept, 7)``.

    Runs through autograd only when a student tensor requires a gradient.
    """
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in student_tensors
    ):
        return _EAOPDFunction.apply(plan, *student_tensors)
    stats = run_forward(plan, None)
    return reduce_loss(plan, stats), stats


def summarize(plan: Plan, stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mask-weighted means of the per-token statistics, detached, for logging."""
    w = plan.kept_weight()
    cols = {
        "teacher_entropy": core.ENTROPY,
        "fkl_weight": core.A,
        "rkl_weight": core.B,
        "kl_fwd": core.KL_FWD,
        "kl_rev": core.KL_REV,
    }
    stats = stats.detach()
    if w is None:
        w = torch.ones(stats.shape[0], dtype=stats.dtype, device=stats.device)
    total = w.sum()
    denom = torch.where(total != 0, total, torch.ones_like(total))
    out = {name: (stats[:, c] * w).sum() / denom for name, c in cols.items()}
    out["tokens"] = total
    return out
