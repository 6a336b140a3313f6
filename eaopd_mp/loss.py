"""Single-device entry points: logits in, or fused with the output layer.

Both build a :class:`~eaopd_mp.driver.Plan` (two heads, mask, gate, options) and hand it
to the shared driver; they differ only in the heads.
"""

from __future__ import annotations

import torch

from . import _checks
from .core import compute_dtype
from .driver import LinearHead, LogitsHead, Plan, default_chunk_size, evaluate, summarize
from .gates import Gate, resolve_gate

Stats = dict[str, object]


def teacher_entropy(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``softmax(teacher_logits)`` over the last dim.

    Args:
        teacher_logits: ``(..., V)`` floating tensor.
    Returns:
        ``(...)`` in the input dtype (computed in float32). ``-inf`` columns count as
        probability 0 (no NaN).
    """
    _checks.tensor("teacher_logits", teacher_logits, min_dim=1)
    u = torch.log_softmax(teacher_logits.to(compute_dtype(teacher_logits.dtype)), dim=-1)
    u_finite = torch.where(torch.isfinite(u), u, torch.zeros_like(u))
    return (-(u.exp() * u_finite).sum(-1)).to(teacher_logits.dtype)


def mask_rows(labels: torch.Tensor | None, n_tokens: int, dtype: torch.dtype):
    """``(rows, weight)``: indices of tokens with non-zero weight (None if all) and the
    ``(N,)`` weights in ``dtype`` (None without labels)."""
    if labels is None:
        return None, None
    weight = labels.reshape(-1).to(dtype)
    keep = weight != 0
    if int(keep.sum()) == n_tokens:
        return None, weight
    return keep.nonzero().squeeze(1), weight


def make_plan(
    student, teacher, token_shape, labels, gate: Gate, temperature: float,
    chunk_size: int | None, reduction: str, combiner=None,
) -> Plan:
    """Assemble a plan; the default chunk size follows the (local) vocabulary width."""
    n_tokens = 1
    for d in token_shape:
        n_tokens *= d
    rows, weight = mask_rows(labels, n_tokens, compute_dtype(student.dtype, teacher.dtype))
    if chunk_size is None:
        chunk_size = default_chunk_size(student.width)
    return Plan(
        student=student, teacher=teacher, token_shape=tuple(token_shape), rows=rows,
        weight=weight, gate=gate, inv_tau=1.0 / temperature, chunk=chunk_size,
        reduction=reduction, combiner=combiner,
    )


def finish(plan: Plan, student_tensors: tuple, return_stats: bool):
    """Evaluate the plan; with ``return_stats`` also the logged statistics."""
    loss, stats = evaluate(plan, student_tensors)
    if not return_stats:
        return loss
    out: Stats = dict(summarize(plan, stats))
    out.update(plan.gate.describe())
    return loss, out


def entropy_aware_opd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    h_max: float | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    return_stats: bool = False,
    gate: str = "linear",
    gate_threshold: float | None = None,
    fkl_coef: float | None = None,
    fkl_weight: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Stats]:
    """Entropy-aware mixture of forward and reverse KL on given logits (the seed's API).

    Args:
        student_logits: ``(..., V)`` floating; receives the gradient.
        teacher_logits: ``(..., V)`` floating, same shape; never receives a gradient.
        labels: ``(...)`` 0/1 or float weight mask over tokens; None means all tokens.
        h_max: entropy normaliser of the linear gate; default ``log(V)``.
        temperature: applied to both student and teacher (the gate uses the untempered
            teacher).
        reduction: ``"batchmean"`` (sum / first token dim), ``"sum"``, ``"mean"`` (sum /
            number of tokens, masked ones included) or ``"none"`` (``(...)`` float32).
        return_stats: also return mask-weighted means of the teacher entropy, the gate
            weights and both KLs (detached), and the gate used.
        gate, gate_threshold, fkl_coef, fkl_weight: see :mod:`eaopd_mp.gates`.
        chunk_size: tokens per chunk (default from V).
    Returns:
        float32 loss, or ``(loss, stats)``.
    """
    token_shape, labels, tau = _checks.logits_inputs(student_logits, teacher_logits, labels,
                                                     temperature, reduction, chunk_size)
    vocab = student_logits.shape[-1]
    g = resolve_gate(gate, vocab, h_max=h_max, gate_threshold=gate_threshold,
                     fkl_coef=fkl_coef, fkl_weight=fkl_weight)
    z = student_logits.reshape(-1, vocab)
    student = LogitsHead(z, need_grad=z.requires_grad)
    teacher = LogitsHead(teacher_logits.detach().reshape(-1, vocab))
    plan = make_plan(student, teacher, token_shape, labels, g, tau, chunk_size, reduction)
    return finish(plan, (z,), return_stats)


def fused_linear_eaopd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    h_max: float | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
    return_stats: bool = False,
    gate: str = "linear",
    gate_threshold: float | None = None,
    fkl_coef: float | None = None,
    fkl_weight: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Stats]:
    """The loss on ``student_hidden @ student_weight.T + student_bias``, chunk by chunk.

    No ``(tokens, V)`` tensor is ever held: logits are made ``chunk_size`` tokens at a
    time. Same result and gradients as :func:`entropy_aware_opd_loss` on the full logits.

    Args:
        student_hidden: ``(..., H)``; student_weight: ``(V, H)`` (``nn.Linear`` layout);
            student_bias: ``(V,)`` or None. These receive gradients (in their dtype).
        teacher_hidden ``(..., H_t)`` + teacher_weight ``(V, H_t)`` (+ teacher_bias), or
            teacher_logits ``(..., V)``: exactly one form. No gradient to the teacher.
        Other arguments as :func:`entropy_aware_opd_loss`.
    Returns:
        float32 loss, or ``(loss, stats)``.
    """
    _checks.linear("student", student_hidden, student_weight, student_bias)
    token_shape = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    _checks.teacher_source(teacher_hidden, teacher_weight, teacher_logits, teacher_bias,
                           token_shape, vocab)
    _checks.same_device(student_hidden=student_hidden, student_weight=student_weight,
                        student_bias=student_bias, teacher_hidden=teacher_hidden,
                        teacher_weight=teacher_weight, teacher_logits=teacher_logits,
                        teacher_bias=teacher_bias, labels=labels)
    labels = _checks.labels(labels, token_shape)
    tau = _checks.options(temperature, reduction, chunk_size)
    g = resolve_gate(gate, vocab, h_max=h_max, gate_threshold=gate_threshold,
                     fkl_coef=fkl_coef, fkl_weight=fkl_weight)
    student, teacher, tensors = linear_heads(
        student_hidden, student_weight, student_bias,
        teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
    )
    plan = make_plan(student, teacher, token_shape, labels, g, tau, chunk_size, reduction)
    return finish(plan, tensors, return_stats)


def linear_heads(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits, cols=None):
    """Student and teacher heads over flattened tokens, and the student tensors."""
    h = s_hidden.reshape(-1, s_hidden.shape[-1])
    need = (h.requires_grad, s_weight.requires_grad,
            s_bias is not None and s_bias.requires_grad)
    student = LinearHead(h, s_weight, s_bias, cols=cols, need=need)
    if t_logits is not None:
        vocab = t_logits.shape[-1]
        teacher = LogitsHead(t_logits.detach().reshape(-1, vocab), cols=cols)
    else:
        th = t_hidden.detach().reshape(-1, t_hidden.shape[-1])
        tb = None if t_bias is None else t_bias.detach()
        teacher = LinearHead(th, t_weight.detach(), tb, cols=cols)
    return student, teacher, (h, s_weight, s_bias)
