"""Single-device entry points: logits in, or fused with the output layer.

Both build the :class:`~eaopd_mp.options.LossOptions` once, have :mod:`eaopd_mp.inputs`
check their arguments into one :class:`~eaopd_mp.plan.Call` and hand it to the shared plan
builder (:func:`eaopd_mp.plan.run`); they differ only in the tensor forms. DTensor inputs
(tensor parallelism) go to :mod:`eaopd_mp.dtensor`. ``**options`` are those of
:class:`~eaopd_mp.options.LossOptions`: ``h_max``, ``temperature``, ``reduction``,
``return_stats``, ``gate``, ``gate_threshold``, ``fkl_coef``, ``fkl_weight``,
``chunk_size``, the head transforms ``student_softcap``, ``teacher_softcap``,
``student_logit_scale``, ``teacher_logit_scale``, ``vocab_size`` and ``topk_tail``.
"""

from __future__ import annotations

import torch

from . import dtensor, inputs, layouts, ops, plan  # noqa: F401 - ops registers the custom ops
from .core import compute_dtype
from .errors import surfaced
from .options import LossOptions


def teacher_entropy(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``softmax(teacher_logits)`` over the last dim.

    Args:
        teacher_logits: ``(..., V)`` floating tensor.
    Returns:
        ``(...)`` in the input dtype (computed in float32). ``-inf`` columns count as
        probability 0 (no NaN).
    """
    inputs.tensor("teacher_logits", teacher_logits, min_dim=1)
    u = torch.log_softmax(teacher_logits.to(compute_dtype(teacher_logits.dtype)), dim=-1)
    u_finite = torch.where(torch.isfinite(u), u, torch.zeros_like(u))
    return (-(u.exp() * u_finite).sum(-1)).to(teacher_logits.dtype)


@surfaced
def entropy_aware_opd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | list | None = None,
    *,
    teacher_topk_logprobs: torch.Tensor | list | None = None,
    teacher_topk_indices: torch.Tensor | list | None = None,
    teacher_entropy: torch.Tensor | list | None = None,
    teacher_index: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, plan.Stats]:
    """Entropy-aware mixture of forward and reverse KL on given logits (the reference
    definition's API).

    Args:
        student_logits: ``(..., V)`` floating; receives the gradient.
        teacher_logits: ``(..., V)`` floating, same shape (with ``vocab_size``: the same
            token shape and ``V_t >= vocab_size``); never receives a gradient. Or, for a
            served teacher, instead:
        teacher_topk_logprobs, teacher_topk_indices: ``(..., k)`` log-probabilities
            (normalised over the whole vocabulary, as vLLM/SGLang return them) and their
            int64 vocabulary ids (distinct within a token, the same ``k`` for every token).
            The target is set by ``topk_tail`` (see :mod:`eaopd_mp.topk`). A kept token
            whose log-probs exceed 0, or whose probabilities sum above 1, beyond rounding
            (:func:`eaopd_mp.topk.logprob_tolerance`) raises ``ValueError``; NaN or
            ``+inf`` gives that token NaN. They are the
            teacher distribution as given: ``temperature`` divides only the student's
            logits (a served log-probability cannot be re-tempered without the rest of
            the vocabulary; serve at the temperature you train at).
        teacher_entropy: ``(...)`` floating, optional: the gate's teacher entropy (nats),
            overriding the one computed from the teacher (with a top-k teacher: the
            entropy of the bucketed teacher, a lower bound of the true one).
        teacher_index: several teachers: ``(...)`` integer, the student's token shape,
            values in ``[0, n_teachers)``: the teacher of each token. Every teacher
            argument is then a list with one entry per teacher (None where a teacher does
            not use it) holding exactly that teacher's tokens in token order (see
            :mod:`eaopd_mp.inputs`).
        labels: ``(...)`` mask over tokens: 0/1 (bool or integer) or float weights >= 0;
            None means all tokens. Tokens of weight 0 are skipped.
        **options: :class:`~eaopd_mp.options.LossOptions` (``h_max``, ``temperature``,
            ``reduction``, ``return_stats``, ``gate``, ``topk_tail``, ...).
    Returns:
        The loss (float32; float64 for float64 inputs), or ``(loss, stats)``.
    """
    teacher = dict(teacher_logits=teacher_logits, teacher_topk_logprobs=teacher_topk_logprobs,
                   teacher_topk_indices=teacher_topk_indices, teacher_entropy=teacher_entropy)
    return logits_loss(student_logits, teacher, labels, teacher_index,
                       LossOptions.build(options))


def logits_loss(student_logits, teacher: dict, labels, teacher_index, options: LossOptions):
    """:func:`entropy_aware_opd_loss` with its options built and its teacher arguments
    (:data:`eaopd_mp.inputs.ARGS`) in ``teacher``."""
    if layouts.any_dtensor(student_logits, labels, teacher_index, *teacher.values()):
        return dtensor.logits_loss(student_logits, teacher, labels, teacher_index, options)
    return plan.run(inputs.logits_call(student_logits, teacher, labels, teacher_index,
                                       options.vocab_size), options)


@surfaced
def fused_linear_eaopd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | list | None = None,
    teacher_weight: torch.Tensor | list | None = None,
    teacher_logits: torch.Tensor | list | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | list | None = None,
    labels: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | list | None = None,
    teacher_topk_indices: torch.Tensor | list | None = None,
    teacher_entropy: torch.Tensor | list | None = None,
    teacher_index: torch.Tensor | None = None,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, plan.Stats]:
    """The loss on ``student_hidden @ student_weight.T + student_bias``, chunk by chunk.

    No ``(tokens, V)`` tensor is ever held: logits are made ``chunk_size`` tokens at a
    time. Same result and gradients as :func:`entropy_aware_opd_loss` on the full logits.
    Under ``torch.autocast`` the GEMMs take the autocast dtype, as ``nn.Linear`` would.

    Args:
        student_hidden, student_weight, student_bias: ``(..., H)``, ``(V, H)``
            (``nn.Linear`` layout) and ``(V,)`` or None. These receive gradients (in their
            dtype).
        teacher_hidden, teacher_weight, teacher_bias, teacher_logits: the teacher as
            ``(..., H_t)`` + ``(V, H_t)`` (+ bias), or teacher_logits ``(..., V)``, or
            teacher_topk_logprobs + teacher_topk_indices ``(..., k)`` (see
            :func:`entropy_aware_opd_loss`): exactly one form. No
            gradient to the teacher. With ``vocab_size``, student and teacher may have
            ``V_s, V_t >= vocab_size`` rows (columns), of which the first ``vocab_size``
            count.
        labels, teacher_entropy, teacher_index, **options: as
            :func:`entropy_aware_opd_loss` (with ``teacher_index`` each teacher argument
            is a list, one entry per teacher: teachers may differ in form, hidden width
            and padded head width);
            ``student_softcap``, ``student_logit_scale`` (and the teacher's) transform each
            head's logits as Gemma and Cohere do: ``cap * tanh(scale * (h W^T + b) / cap)``.
    Returns:
        The loss (float32; float64 for float64 inputs), or ``(loss, stats)``.
    """
    teacher = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                   teacher_bias=teacher_bias, teacher_logits=teacher_logits,
                   teacher_topk_logprobs=teacher_topk_logprobs,
                   teacher_topk_indices=teacher_topk_indices, teacher_entropy=teacher_entropy)
    return linear_loss(student_hidden, student_weight, student_bias, teacher, labels,
                       teacher_index, LossOptions.build(options))


def linear_loss(student_hidden, student_weight, student_bias, teacher: dict, labels,
                teacher_index, options: LossOptions):
    """:func:`fused_linear_eaopd_loss` with its options built and its teacher arguments
    (:data:`eaopd_mp.inputs.ARGS`) in ``teacher``."""
    if layouts.any_dtensor(student_hidden, student_weight, student_bias, labels,
                           teacher_index, *teacher.values()):
        return dtensor.linear_loss(student_hidden, student_weight, student_bias, teacher,
                                   labels, teacher_index, options)
    return plan.run(inputs.linear_call(student_hidden, student_weight, student_bias, teacher,
                                       labels, teacher_index, options.vocab_size), options)
