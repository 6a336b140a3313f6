"""Single-device entry points: logits in, or fused with the output layer.

Both check their tensors, build the :class:`~eaopd_mp.options.LossOptions` once and hand
both to the shared plan builder (:func:`eaopd_mp.plan.run`); they differ only in the
tensor forms. ``**options`` are those of :class:`~eaopd_mp.options.LossOptions`:
``h_max``, ``temperature``, ``reduction``, ``return_stats``, ``gate``, ``gate_threshold``,
``fkl_coef``, ``fkl_weight``, ``chunk_size``, the head transforms ``student_softcap``,
``teacher_softcap``, ``student_logit_scale``, ``teacher_logit_scale``, ``vocab_size`` and
``topk_tail``.
"""

from __future__ import annotations

import torch

from . import _checks, ops, plan, sharded  # noqa: F401 - ops registers the custom ops
from .core import compute_dtype
from .options import LossOptions


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


def entropy_aware_opd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_topk_indices: torch.Tensor | None = None,
    teacher_entropy: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, plan.Stats]:
    """Entropy-aware mixture of forward and reverse KL on given logits (the seed's API).

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
        labels: ``(...)`` mask over tokens: 0/1 (bool or integer) or float weights >= 0;
            None means all tokens. Tokens of weight 0 are skipped.
        **options: :class:`~eaopd_mp.options.LossOptions` (``h_max``, ``temperature``,
            ``reduction``, ``return_stats``, ``gate``, ``topk_tail``, ...).
    Returns:
        The loss (float32; float64 for float64 inputs), or ``(loss, stats)``.
    """
    return logits_loss(student_logits, teacher_logits, labels, LossOptions.build(options),
                       teacher_topk_logprobs, teacher_topk_indices, teacher_entropy)


def logits_loss(student_logits, teacher_logits, labels, options: LossOptions,
                topk_logprobs=None, topk_indices=None, entropy=None):
    """:func:`entropy_aware_opd_loss` with its options already built."""
    if sharded.any_dtensor(student_logits, teacher_logits, labels, topk_logprobs,
                           topk_indices, entropy):  # vocabulary-sharded DTensor logits
        return sharded.dtensor_logits_loss(student_logits, teacher_logits, labels, options,
                                           topk_logprobs, topk_indices, entropy)
    _checks.tensor("student_logits", student_logits, min_dim=1)
    token_shape = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    if teacher_logits is not None and (topk_logprobs is not None or topk_indices is not None):
        raise ValueError("give the teacher as teacher_logits OR teacher_topk_logprobs + "
                         "teacher_topk_indices, not both")
    if teacher_logits is None and topk_logprobs is None and topk_indices is None:
        raise ValueError("the teacher is missing: give teacher_logits, or "
                         "teacher_topk_logprobs + teacher_topk_indices")
    if teacher_logits is not None:
        _checks.logits_pair(student_logits, teacher_logits, options.vocab_size)
        y = teacher_logits.detach()
        teacher, form = [y.reshape(-1, y.shape[-1])], "logits"
    else:
        _checks.topk_teacher(topk_logprobs, topk_indices, token_shape,
                             options.vocab_size or vocab)
        teacher, form = topk_tensors(topk_logprobs, topk_indices), "topk"
    _checks.entropy(entropy, token_shape)
    _checks.same_device(student_logits=student_logits, teacher_logits=teacher_logits,
                        teacher_topk_logprobs=topk_logprobs,
                        teacher_topk_indices=topk_indices, teacher_entropy=entropy,
                        labels=labels)
    labels = _checks.labels(labels, token_shape)
    z = student_logits.reshape(-1, vocab)
    return plan.run([z], teacher, labels, token_shape, options, student_form="logits",
                    teacher_form=form, width=vocab, entropy=flat_entropy(entropy))


def topk_tensors(logprobs: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    """The top-k teacher's tensor list ``[(N, k) log-probs, (N, k) int64 ids]``."""
    k = logprobs.shape[-1]
    return [logprobs.detach().reshape(-1, k), ids.detach().reshape(-1, k).to(torch.int64)]


def flat_entropy(entropy: torch.Tensor | None) -> torch.Tensor | None:
    """The ``(N,)`` gate entropy (detached), or None."""
    return None if entropy is None else entropy.detach().reshape(-1)


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
    teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_topk_indices: torch.Tensor | None = None,
    teacher_entropy: torch.Tensor | None = None,
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
        labels, teacher_entropy, **options: as :func:`entropy_aware_opd_loss`;
            ``student_softcap``, ``student_logit_scale`` (and the teacher's) transform each
            head's logits as Gemma and Cohere do: ``cap * tanh(scale * (h W^T + b) / cap)``.
    Returns:
        The loss (float32; float64 for float64 inputs), or ``(loss, stats)``.
    """
    return linear_loss(student_hidden, student_weight, student_bias, teacher_hidden,
                       teacher_weight, teacher_bias, teacher_logits, labels,
                       LossOptions.build(options), teacher_topk_logprobs,
                       teacher_topk_indices, teacher_entropy)


def linear_loss(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                teacher_bias, teacher_logits, labels, options: LossOptions,
                topk_logprobs=None, topk_indices=None, entropy=None):
    """:func:`fused_linear_eaopd_loss` with its options already built."""
    if sharded.any_dtensor(student_hidden, student_weight, student_bias, teacher_hidden,
                           teacher_weight, teacher_bias, teacher_logits, labels,
                           topk_logprobs, topk_indices, entropy):  # DTensor TP
        return sharded.dtensor_linear_loss(student_hidden, student_weight, student_bias,
                                           teacher_hidden, teacher_weight, teacher_bias,
                                           teacher_logits, labels, options, topk_logprobs,
                                           topk_indices, entropy)
    _checks.linear("student", student_hidden, student_weight, student_bias)
    token_shape = tuple(student_hidden.shape[:-1])
    vocab = student_weight.shape[0]
    form = teacher_form(teacher_hidden, teacher_weight, teacher_logits, teacher_bias,
                        topk_logprobs, topk_indices, token_shape, vocab, options.vocab_size)
    _checks.entropy(entropy, token_shape)
    _checks.same_device(student_hidden=student_hidden, student_weight=student_weight,
                        student_bias=student_bias, teacher_hidden=teacher_hidden,
                        teacher_weight=teacher_weight, teacher_logits=teacher_logits,
                        teacher_bias=teacher_bias, teacher_topk_logprobs=topk_logprobs,
                        teacher_topk_indices=topk_indices, teacher_entropy=entropy,
                        labels=labels)
    labels = _checks.labels(labels, token_shape)
    student, teacher = linear_tensors(student_hidden, student_weight, student_bias,
                                      teacher_hidden, teacher_weight, teacher_bias,
                                      teacher_logits, topk_logprobs, topk_indices)
    return plan.run(student, teacher, labels, token_shape, options, student_form="linear",
                    teacher_form=form, width=vocab, entropy=flat_entropy(entropy))


def teacher_form(t_hidden, t_weight, t_logits, t_bias, topk_logprobs, topk_indices,
                 token_shape, vocab: int, vocab_size: int | None = None) -> str:
    """Check the fused call's teacher (exactly one form); ``"linear"``, ``"logits"`` or
    ``"topk"``. ``token_shape``: that of ``teacher_logits`` / the top-k tensors."""
    if topk_logprobs is None and topk_indices is None:
        _checks.teacher_source(t_hidden, t_weight, t_logits, t_bias, token_shape, vocab,
                               vocab_size)
        return "logits" if t_logits is not None else "linear"
    if any(x is not None for x in (t_hidden, t_weight, t_logits, t_bias)):
        raise ValueError("give the teacher in one form: teacher_hidden + teacher_weight, "
                         "teacher_logits, or teacher_topk_logprobs + teacher_topk_indices")
    _checks.topk_teacher(topk_logprobs, topk_indices, token_shape, vocab_size or vocab)
    return "topk"


def linear_tensors(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits,
                   topk_logprobs=None, topk_indices=None):
    """The student and teacher tensor lists of a fused call (token dims flattened), for
    whichever teacher form was given (see :func:`teacher_form`)."""
    student = [s_hidden.reshape(-1, s_hidden.shape[-1]), s_weight]
    if s_bias is not None:
        student.append(s_bias)
    if t_logits is not None:
        return student, [t_logits.detach().reshape(-1, t_logits.shape[-1])]
    if topk_logprobs is not None:
        return student, topk_tensors(topk_logprobs, topk_indices)
    teacher = [t_hidden.detach().reshape(-1, t_hidden.shape[-1]), t_weight.detach()]
    if t_bias is not None:
        teacher.append(t_bias.detach())
    return student, teacher
