"""The implementations compared: each turns a case and its inputs into a runnable step.

A step is one forward + backward: it leaves the gradients in ``hs.grad`` and
``ws.grad`` and returns the loss (None for the floor, which computes no loss). Every
implementation has a memory estimate (peak bytes above the inputs), used to skip a
point that would not fit instead of crashing the run; the constants were measured on
this benchmark at small shapes and rounded up.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from cases import Case, Inputs
from liger_eaopd import LIGER_IMPORT_ERROR, liger_eaopd_loss
from memory import PeakMeter, set_allocator

import eaopd_mp

Step = Callable[[], "torch.Tensor | None"]


@dataclass
class Outputs:
    """What a step produced, for the comparison with the reference.

    ``weight_rows`` says which rows of the full weight gradient ``grad_w`` holds (a
    vocabulary shard under tensor parallelism), None for all of them.
    """

    loss: float | None
    grad_h: torch.Tensor | None
    grad_w: torch.Tensor | None
    weight_rows: slice | None = None


class LocalRunner:
    """Runs a step in this process; times it and measures its peak memory."""

    def __init__(self, step: Step, inputs: Inputs, device: str):
        self.step = step
        self.inputs = inputs
        self.device = torch.device(device)
        self.meter = PeakMeter(self.device)
        self.loss: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, precise: bool = False) -> tuple[float, int]:
        """One step: ``(seconds, peak bytes above what was live before it)``.

        ``precise``: measure memory with the precise allocator setting (slower steps).
        """
        self.inputs.clear_grads()
        self.meter.start(precise)
        self._sync()
        start = time.perf_counter()
        loss = self.step()
        self._sync()
        seconds = time.perf_counter() - start
        peak = self.meter.stop()
        self.loss = None if loss is None else loss.detach().item()
        return seconds, peak

    def outputs(self) -> Outputs:
        """Loss and gradients of the last step."""
        return Outputs(self.loss, self.inputs.hs.grad, self.inputs.ws.grad)

    def close(self) -> None:
        self.inputs.clear_grads()


@dataclass(frozen=True)
class Impl:
    """An implementation under test.

    Attributes:
        name: the key in results and on plots.
        about: one line for the README.
        make_step: ``(case, inputs) -> step``; None for :data:`TP_IMPL` (other processes).
        per_token, per_chunk: the peak in float32 ``(·, V)`` rows per token and per chunk
            row, measured at small shapes and rounded up; see :meth:`estimate_bytes`.
        shards: vocabulary shards per process (2 under TP=2).
        exact: computes the EAOPD loss (so its loss and gradients are checked).
        needs: returns why it cannot run here, or None.
    """

    name: str
    about: str
    make_step: Callable[[Case, Inputs], Step] | None
    per_token: float = 0.0
    per_chunk: float = 0.0
    shards: int = 1
    exact: bool = True
    needs: Callable[[Case], str | None] = lambda case: None

    def estimate_bytes(self, case: Case) -> int:
        """Peak memory above the inputs: logits-sized buffers plus the gradients.

        Generous on purpose (float32 everywhere, gradients counted twice): it only
        decides what is skipped.
        """
        cols = case.vocab // self.shards
        rows = self.per_token * case.tokens + self.per_chunk * min(case.chunk, case.tokens)
        grads = (case.tokens + cols) * case.hidden * 4
        return int(rows * cols * 4 + 2 * grads)


def configure_process() -> None:
    """Process-wide settings for measuring (the main process and every TP worker).

    Dynamo may recompile often enough over a sweep's shapes to reach its
    ``recompile_limit``, past which it silently runs the function eagerly: raise it.
    The allocator starts in its steady setting (see :mod:`memory`).
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    set_allocator(precise=False)


# --------------------------------------------------------------------------- steps


def _naive_loss(hs, ws, ht, wt):
    return eaopd_mp.reference_eaopd_loss(hs @ ws.t(), ht @ wt.t())


_naive_compiled = torch.compile(_naive_loss)


def naive_eager(case: Case, x: Inputs) -> Step:
    """Full ``(N, V)`` logits and the eager reference loss, autograd."""

    def step():
        loss = _naive_loss(x.hs, x.ws, x.ht, x.wt)
        loss.backward()
        return loss

    return step


def naive_compiled(case: Case, x: Inputs) -> Step:
    """The same function under ``torch.compile`` (default options)."""

    def step():
        loss = _naive_compiled(x.hs, x.ws, x.ht, x.wt)
        loss.backward()
        return loss

    return step


def eaopd_logits(case: Case, x: Inputs) -> Step:
    """Full logits by autograd matmuls, then ``eaopd_mp``'s chunked logits-in loss."""

    def step():
        loss = eaopd_mp.entropy_aware_opd_loss(x.hs @ x.ws.t(), x.ht @ x.wt.t(),
                                               chunk_size=case.chunk)
        loss.backward()
        return loss

    return step


def eaopd_fused(case: Case, x: Inputs) -> Step:
    """Fused with the lm head, gradient computed in the forward pass (scalar loss)."""

    def step():
        loss = eaopd_mp.fused_linear_eaopd_loss(
            x.hs, x.ws, teacher_hidden=x.ht, teacher_weight=x.wt, chunk_size=case.chunk
        )
        loss.backward()
        return loss

    return step


def eaopd_fused_recompute(case: Case, x: Inputs) -> Step:
    """Fused, ``reduction="none"``: per-token losses, logits recomputed in backward."""

    def step():
        per_token = eaopd_mp.fused_linear_eaopd_loss(
            x.hs, x.ws, teacher_hidden=x.ht, teacher_weight=x.wt, chunk_size=case.chunk,
            reduction="none",
        )
        loss = per_token.mean()  # = batchmean over flat tokens, comparable to the others
        loss.backward()
        return loss

    return step


def served_teacher(case: Case, x: Inputs, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probabilities and ids, as a server would return them
    (computed chunk by chunk outside the timed step)."""
    lps, ids = [], []
    with torch.no_grad():
        for lo in range(0, case.tokens, case.chunk):
            y = (x.ht[lo:lo + case.chunk] @ x.wt.t()).float()
            lp, i = torch.log_softmax(y, -1).topk(k, dim=-1)
            lps.append(lp)
            ids.append(i)
    return torch.cat(lps), torch.cat(ids)


def eaopd_fused_topk(k: int) -> Callable[[Case, Inputs], Step]:
    """Fused with the lm head against a served top-k teacher (tail bucket): no teacher
    GEMM; the student's logits, their gradient and a (chunk, k) gather/scatter."""

    def make(case: Case, x: Inputs) -> Step:
        lp, ids = served_teacher(case, x, k)

        def step():
            loss = eaopd_mp.fused_linear_eaopd_loss(
                x.hs, x.ws, teacher_topk_logprobs=lp, teacher_topk_indices=ids,
                chunk_size=case.chunk)
            loss.backward()
            return loss

        return step

    return make


def eaopd_fused_teachers(n_teachers: int) -> Callable[[Case, Inputs], Step]:
    """Fused, the tokens routed round-robin to ``n_teachers`` teachers (token ``i`` to
    teacher ``i % n``): each teacher gets its own rows of the teacher hidden states and the
    same teacher head, so the loss equals the one-teacher loss (checked) and the time
    shows what the routing costs (more, shorter chunks; gathered rows)."""

    def make(case: Case, x: Inputs) -> Step:
        index = torch.arange(case.tokens, device=x.hs.device) % n_teachers
        hidden = [x.ht[index == j] for j in range(n_teachers)]  # outside the timed step

        def step():
            loss = eaopd_mp.fused_linear_eaopd_loss(
                x.hs, x.ws, teacher_hidden=hidden, teacher_weight=[x.wt] * n_teachers,
                teacher_index=index, chunk_size=case.chunk)
            loss.backward()
            return loss

        return step

    return make


def floor(case: Case, x: Inputs) -> Step:
    """The four unavoidable GEMMs at full size: two logits GEMMs and two gradient GEMMs.

    The student logits stand in for the logits gradient ``G``; the teacher logits stay
    alive until the gradient GEMMs are done, as they must in any implementation.
    """
    hs, ws = x.hs.detach(), x.ws.detach()

    def step():
        g = hs @ ws.t()
        y = x.ht @ x.wt.t()
        x.hs.grad = g @ ws
        x.ws.grad = g.t() @ hs
        del g, y

    return step


def _floor_chunked(case: Case, x: Inputs, teacher: bool) -> Step:
    """The loss's GEMMs chunk by chunk, ``(chunk, V)`` at a time: student logits, the
    teacher's (if ``teacher``), ``G W`` and ``G^T h``. ``grad_h`` is written per chunk;
    ``grad_w`` accumulates in place (``addmm_``, in the input dtype)."""
    hs, ws = x.hs.detach(), x.ws.detach()

    def step():
        grad_h = torch.empty_like(hs)
        grad_w = torch.zeros_like(ws)
        for lo in range(0, hs.shape[0], case.chunk):
            h = hs[lo : lo + case.chunk]
            g = h @ ws.t()
            y = x.ht[lo : lo + case.chunk] @ x.wt.t() if teacher else None
            torch.mm(g, ws, out=grad_h[lo : lo + case.chunk])
            grad_w.addmm_(g.t(), h)
            del g, y
        x.hs.grad, x.ws.grad = grad_h, grad_w

    return step


def floor_chunked(case: Case, x: Inputs) -> Step:
    """The same four GEMMs as :func:`floor`, chunk by chunk, like the fused loss."""
    return _floor_chunked(case, x, teacher=True)


def floor_topk(case: Case, x: Inputs) -> Step:
    """The three GEMMs a top-k teacher leaves, chunk by chunk: student logits, dX, dW."""
    return _floor_chunked(case, x, teacher=False)


def _liger_labels(case: Case, x: Inputs) -> torch.Tensor:
    return torch.zeros(case.tokens, dtype=torch.long, device=x.hs.device)


def liger_jsd(case: Case, x: Inputs) -> Step:
    """Liger Kernel's ``LigerFusedLinearJSDLoss`` (beta 0.5, soft loss only)."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, chunk_size=case.chunk
    )
    labels = _liger_labels(case, x)

    def step():
        loss = loss_fn(x.hs, x.ws, x.ht, x.wt, labels)
        loss.backward()
        return loss

    return step


def liger_eaopd(case: Case, x: Inputs) -> Step:
    """The EAOPD loss on Liger's fused-linear distillation base class (autodiff)."""
    labels = _liger_labels(case, x)

    def step():
        loss = liger_eaopd_loss(x.hs, x.ws, x.ht, x.wt, labels=labels, chunk_size=case.chunk)
        loss.backward()
        return loss

    return step


# --------------------------------------------------------------------------- registry


def _needs_liger(case: Case) -> str | None:
    if LIGER_IMPORT_ERROR is not None:
        return f"liger-kernel not installed ({LIGER_IMPORT_ERROR})"
    return None


def needs_parallel(case: Case) -> str | None:
    """Why the TP=2 path cannot run for ``case``, or None."""
    try:
        spec = importlib.util.find_spec("eaopd_mp.parallel")
    except ImportError as exc:
        spec, err = None, exc
    else:
        err = None
    if spec is None:
        return f"eaopd_mp.parallel not available ({err or 'module not found'})"
    if case.vocab % 2:
        return f"vocabulary {case.vocab} does not split in 2 shards"
    if case.device == "cuda" and torch.cuda.device_count() < 2:
        return "TP=2 on CUDA needs 2 GPUs (on CPU it runs on gloo)"
    return None


TP_IMPL = "eaopd_tp2"

IMPLS: dict[str, Impl] = {
    impl.name: impl
    for impl in (
        Impl("naive_eager", "full logits + eager reference loss, autograd", naive_eager,
             per_token=20),
        Impl("naive_compiled", "the same under torch.compile", naive_compiled, per_token=4),
        Impl("eaopd_logits", "full logits (autograd matmuls) + eaopd_mp's chunked "
             "logits-in loss", eaopd_logits, per_token=4, per_chunk=4),
        Impl("eaopd_fused", "eaopd_mp fused with the lm head, gradient in the forward",
             eaopd_fused, per_chunk=10),
        Impl("eaopd_fused_recompute", "eaopd_mp fused, reduction='none': logits "
             "recomputed in backward", eaopd_fused_recompute, per_chunk=12),
        Impl(TP_IMPL, "eaopd_mp vocab-parallel, TP=2 on gloo (2 processes, 1 thread each);"
             " memory per rank", None, per_chunk=10, shards=2, needs=needs_parallel),
        Impl("floor", "the 4 GEMMs (N,V) logits x2, dX, dW at full size", floor,
             per_token=2, exact=False),
        Impl("floor_chunked", "the same 4 GEMMs chunk by chunk", floor_chunked,
             per_chunk=4, exact=False),
        Impl("eaopd_fused_topk32", "eaopd_mp fused, served top-32 teacher (tail bucket; a "
             "different loss, not checked against the dense reference)",
             eaopd_fused_topk(32), per_chunk=10, exact=False),
        Impl("eaopd_fused_topk256", "the same with the top-256", eaopd_fused_topk(256),
             per_chunk=10, exact=False),
        Impl("floor_topk", "the 3 GEMMs a top-k teacher leaves (student logits, dX, dW), "
             "chunked", floor_topk, per_chunk=3, exact=False),
        Impl("eaopd_fused_teachers2", "eaopd_mp fused, tokens routed to 2 teachers (copies "
             "of one head: the one-teacher loss, checked)", eaopd_fused_teachers(2),
             per_chunk=10),
        Impl("eaopd_fused_teachers4", "the same with 4 teachers", eaopd_fused_teachers(4),
             per_chunk=10),
        Impl("liger_jsd", "Liger LigerFusedLinearJSDLoss (a different loss: cost "
             "reference)", liger_jsd, per_chunk=12, exact=False, needs=_needs_liger),
        Impl("liger_eaopd", "EAOPD on Liger's LigerFusedLinearDistillationBase",
             liger_eaopd, per_chunk=8, needs=_needs_liger),
    )
}
