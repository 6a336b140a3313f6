"""Hugging Face ``transformers`` causal LMs: the fused loss on logits exactly as they make them.

A causal LM computes ``logits = post(lm_head(base_model(ids).last_hidden_state))`` where
``post`` is nothing (Llama, Qwen2, Mistral, ...), a logit scale (Cohere's ``logit_scale``,
Granite's ``1 / logits_scaling``) or a soft-cap (Gemma 2/3's
``final_logit_softcapping``). :func:`lm_head` reads the head and its ``post`` from the model
and its config; :func:`eaopd_loss` runs the fused loss from the two models' last hidden
states, so no ``(tokens, V)`` logits are made, and equals
:func:`eaopd_mp.entropy_aware_opd_loss` on the models' own ``.logits`` (shifted, masked, cut
to the shared vocabulary).

``transformers`` is imported by nothing here: the functions take models as they are
(``pip install 'eaopd-mp[hf]'`` installs a tested version).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import engines, layouts
from .errors import surfaced
from .loss import fused_linear_eaopd_loss

# Options that lm_head reads from the model: eaopd_loss refuses them as loss options.
HEAD_OPTIONS = ("student_softcap", "teacher_softcap", "student_logit_scale",
                "teacher_logit_scale")


@dataclass(frozen=True)
class LMHead:
    """What a fused call needs to reproduce a causal LM's logits.

    Attributes:
        weight: ``(V_rows, H)`` output embedding (the input embedding when tied: the same
            parameter, so its gradient reaches both uses).
        bias: ``(V_rows,)`` or None.
        softcap: ``final_logit_softcapping`` or None.
        logit_scale: the factor applied to ``h W^T + b`` before the soft-cap (1.0 if none).
        vocab_size: the real vocabulary (the config's ``vocab_size``, at most ``V_rows``).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    logit_scale: float
    vocab_size: int

    def options(self, side: str) -> dict:
        """The head transform as loss options of ``side`` (``"student"``/``"teacher"``)."""
        return {f"{side}_softcap": self.softcap, f"{side}_logit_scale": self.logit_scale}


def _unwrap(model):
    """A DeepSpeed engine's or PEFT model's underlying ``transformers`` model (else
    ``model``)."""
    if layouts.is_engine(model):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _logit_scale(config) -> float:
    """The multiplier a model applies to ``lm_head``'s output, from its text config.

    Cohere's ``logit_scale``; Granite's ``logits_scaling`` (its logits are divided by it).
    """
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        return float(scale)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return 1.0 / float(scaling)
    return 1.0


def lm_head(model) -> LMHead:
    """The output layer of a ``transformers`` causal LM and how its logits are post-processed.

    Reads ``model.get_output_embeddings()`` (weight, bias), and from
    ``model.config.get_text_config()``: ``final_logit_softcapping`` (Gemma 2/3),
    ``logit_scale`` (Cohere) or ``logits_scaling`` (Granite), and ``vocab_size``.
    Raises ``TypeError`` for a model without an output layer.
    """
    model = _unwrap(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(model).__name__} has no output layer with a (vocab, hidden) "
                        "weight: pass a causal LM (an ...ForCausalLM)")
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    rows = weight.shape[0]
    vocab = getattr(config, "vocab_size", None) or rows
    return LMHead(weight=weight, bias=getattr(head, "bias", None),
                  softcap=None if softcap is None else float(softcap),
                  logit_scale=_logit_scale(config), vocab_size=min(int(vocab), rows))


def last_hidden_state(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      **kwargs) -> torch.Tensor:
    """``(B, T, H)`` hidden states that the model's ``lm_head`` turns into its logits.

    Runs the backbone (``model.base_model``) with the same inputs ``model(input_ids,
    attention_mask, **kwargs)`` would give it, without the KV cache.
    """
    model = _unwrap(model)
    backbone = model.base_model
    if backbone is model:
        raise TypeError(f"{type(model).__name__} has no separate backbone (base_model is the "
                        "model itself): pass a causal LM (an ...ForCausalLM)")
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state


def _binary_mask(name: str, mask: object, shape: tuple) -> torch.Tensor:
    """``mask`` checked as a 0/1 mask of ``shape`` (bool, integer or float), as bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name} must be a 0/1 mask (bool, integer or float), got dtype "
                        f"{mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(mask.shape)} != input_ids shape {tuple(shape)}")
    if mask.dtype == torch.bool:
        return mask
    bad = (mask != 0) & (mask != 1)  # NaN included
    if bool(bad.any()):
        values = mask[bad][:3].tolist()
        hint = (" From Hugging Face labels use labels.ne(-100)." if name == "completion_mask"
                else "")
        raise ValueError(f"{name} must be a 0/1 mask (bool, integer or float), got values "
                         f"{values}.{hint}")
    return mask != 0


def next_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    completion_mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, T - 1)`` float 0/1 mask of the positions whose next token is trained on.

    Position ``t`` predicts token ``t + 1``: it counts when token ``t + 1`` is a completion
    token (``completion_mask``, all tokens if None) and both tokens ``t`` and ``t + 1``
    are real (``attention_mask``): a pad before the first real token (left padding)
    predicts nothing. Both masks must be 0/1 (bool, integer or float) with the shape of
    ``input_ids``; anything else raises, naming the mask.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    shape = tuple(input_ids.shape)
    keep = torch.ones(shape, dtype=torch.bool, device=input_ids.device)[:, 1:]
    if attention_mask is not None:
        real = _binary_mask("attention_mask", attention_mask, shape).to(keep.device)
        keep = keep & real[:, 1:] & real[:, :-1]
    if completion_mask is not None:
        comp = _binary_mask("completion_mask", completion_mask, shape).to(keep.device)
        keep = keep & comp[:, 1:]
    return keep.to(torch.float32)


@surfaced
def eaopd_loss(student, teacher=None, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None,
               completion_mask: torch.Tensor | None = None, *, teachers: list | None = None,
               teacher_index: torch.Tensor | None = None, **loss_options):
    """The entropy-aware OPD loss of two ``transformers`` causal LMs on ``input_ids``.

    Args:
        student: the causal LM being trained (gradients reach its parameters).
        teacher: a causal LM sharing the student's token ids (another family and a
            differently padded vocabulary are fine); run under ``torch.no_grad`` as it is
            (put it in eval mode yourself).
        input_ids: ``(B, T)`` prompt + completion tokens.
        attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding (left or right); None
            means no padding. A 0/1 mask (bool, integer or float); other values raise.
        completion_mask: ``(B, T)`` 1 on the tokens the loss trains on (the completion);
            None means every real token after a sequence's first. A 0/1 mask, like
            ``attention_mask`` (Hugging Face ``labels`` with ``-100``: pass
            ``labels.ne(-100)``). A position counts when it and its next token are real and
            the next token is a completion token, so left, right and no padding give the
            same per-sequence losses.
        teachers, teacher_index: several teachers instead of ``teacher``: a list of causal
            LMs (each of its own size and head width, the same head transforms) and the
            ``(B,)`` integer teacher of each sequence. Each teacher runs on its own
            sequences only; one fused call scores every sequence by its teacher
            (``stats["per_teacher"]`` with ``return_stats=True``).
        **loss_options: :class:`~eaopd_mp.options.LossOptions` (``reduction``,
            ``temperature``, ``gate``, ``return_stats``, ...). ``vocab_size`` defaults to
            the smallest of the models' vocabularies. The head transforms come from the
            models' configs and cannot be given here.
    Returns:
        As :func:`eaopd_mp.fused_linear_eaopd_loss` over the ``(B, T - 1)`` next-token
        positions; equal to :func:`eaopd_mp.entropy_aware_opd_loss` on
        ``student(...).logits[:, :-1, :V]`` and the teacher's, ``V`` the shared vocabulary.
    """
    given = sorted(set(loss_options) & set(HEAD_OPTIONS))
    if given:
        raise TypeError(f"{', '.join(given)} come(s) from the models' configs (see "
                        "eaopd_mp.hf.lm_head); call eaopd_mp.fused_linear_eaopd_loss to set "
                        "them by hand")
    if input_ids is None:
        raise TypeError("eaopd_loss needs input_ids")
    models = _teacher_models(teacher, teachers, teacher_index, input_ids)
    if teachers is not None:
        return _routed(student, models, teacher_index, input_ids, attention_mask,
                       completion_mask, loss_options)
    vocab = loss_options.pop("vocab_size", None)
    labels = next_token_mask(input_ids, attention_mask, completion_mask)

    def student_part(ids):  # inside the student's forward: its (sharded) head is gathered
        hidden = last_hidden_state(student, ids, attention_mask)[:, :-1]

        def teacher_part(ids):  # inside the teacher's forward, frozen
            with torch.no_grad():
                t_hidden = last_hidden_state(teacher, ids, attention_mask)[:, :-1]
            return _fused(hidden, t_hidden, student, teacher, labels, vocab, loss_options)

        return engines.run_in_forwards(_owners(teacher), teacher_part, ids, frozen=True)

    return engines.run_in_forwards(_owners(student), student_part, input_ids)


def _owners(model) -> list:
    """The FSDP2 modules / DeepSpeed engine whose forward gathers ``model``'s output layer
    (see :func:`eaopd_mp.engines.owners`)."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return engines.owners(model, head)


def gathered_heads(*models):
    """:func:`eaopd_mp.engines.gathered` over the output layers' weights and biases of
    ``models`` (a context manager; a no-op unless they are ZeRO-3 partitioned)."""
    heads = [_unwrap(m).get_output_embeddings() for m in models]
    return engines.gathered(*(getattr(h, n, None) for h in heads if h is not None
                              for n in ("weight", "bias")))


def _fused(hidden, t_hidden, student, teacher, labels, vocab, loss_options):
    """The fused loss from the two models' hidden states, their heads read (and, under
    DeepSpeed ZeRO-3, gathered) here, inside the models' forwards."""
    with gathered_heads(student, teacher):
        s_head, t_head = lm_head(student), lm_head(teacher)
        if vocab is None:
            vocab = min(s_head.vocab_size, t_head.vocab_size)
        keep = functools.partial(engines.kept_for_backward, engine_owned=bool(_owners(teacher)),
                                 reduction=loss_options.get("reduction"))
        return fused_linear_eaopd_loss(
            hidden, s_head.weight, student_bias=s_head.bias, teacher_hidden=t_hidden,
            teacher_weight=keep(t_head.weight), teacher_bias=keep(t_head.bias),
            labels=labels.to(hidden.device), vocab_size=vocab, **s_head.options("student"),
            **t_head.options("teacher"), **loss_options)


def _routed(student, models, teacher_index, input_ids, attention_mask, completion_mask,
            loss_options):
    """:func:`eaopd_loss` with several teachers, each run on its own sequences.

    Sharded models (FSDP2, ZeRO-3) run as one teacher does: the loss inside the student's
    forward and inside every teacher's frozen forward (nested, teacher 0 outermost), where
    every head is gathered. Every rank enters every sharded teacher, in the same order: a
    rank with no sequence for teacher ``j`` still runs ``j``'s backbone, on its first
    sequence, and drops the result (FSDP2's and ZeRO-3's all-gathers are collectives: a rank
    that skipped them would hang the others). A teacher counts as sharded when any part of it
    is (:func:`eaopd_mp.layouts.is_sharded`: decoder layers ``fully_shard``-ed under a plain
    root count); an unsharded teacher with no sequence is not run.
    """
    check_same_transforms(models)
    vocab = loss_options.pop("vocab_size", None)
    labels = next_token_mask(input_ids, attention_mask, completion_mask)
    index = teacher_index.to(input_ids.device)
    rows = [(index == j).nonzero().squeeze(1) for j in range(len(models))]
    owners = [_owners(m) for m in models]
    # Collectives in a teacher's forward (its layers fully_shard-ed even where its root and
    # head are not, ZeRO-3, TP): every rank runs it.
    collective = [bool(o) or layouts.is_sharded(m) for o, m in zip(owners, models, strict=True)]
    t_hidden = []

    def teacher_step(j, model):
        def forward(take):
            mask = None if attention_mask is None else attention_mask[take]
            return last_hidden_state(model, input_ids[take], mask)[:, :-1]

        def empty():
            w = lm_head(model).weight
            return w.new_zeros(0, input_ids.shape[1] - 1, w.shape[1])

        def step():  # inside teacher j's forward (frozen)
            t_hidden.append(engines.routed_hidden(rows[j], collective[j], forward, empty))
        return step

    def student_part(ids):  # inside the student's forward: its (sharded) head is gathered
        hidden = last_hidden_state(student, ids, attention_mask)[:, :-1]

        def loss():  # inside every teacher's forward: every head is gathered
            return _fused_routed(hidden, t_hidden, student, models, owners, index, labels,
                                 vocab, loss_options)

        steps = [teacher_step(j, m) for j, m in enumerate(models)]
        return engines.run_teachers_frozen(owners, steps, loss)

    return engines.run_in_forwards(_owners(student), student_part, input_ids)


def check_same_transforms(models) -> None:
    """Raise ``ValueError`` unless the teachers ``models`` share one head transform (read
    from their configs: no head is read, no model runs, so this is safe before any
    collective)."""
    transforms = {_transforms(m) for m in models}
    if len(transforms) > 1:
        found = sorted(transforms, key=str)  # str: None beside a float does not sort
        raise ValueError(f"the teachers' head transforms differ ({found}): one call takes "
                         "one teacher_softcap / teacher_logit_scale")


def _transforms(model) -> tuple:
    """A model's head transform as teacher options (read from its config, so that nothing
    reads a possibly partitioned head here)."""
    config = _unwrap(model).config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    return (("teacher_logit_scale", _logit_scale(config)),
            ("teacher_softcap", None if softcap is None else float(softcap)))


def _fused_routed(hidden, t_hidden, student, models, owners, index, labels, vocab,
                  loss_options):
    """:func:`_fused` with several teachers: every head read (and, under ZeRO-3,
    gathered) here, inside every model's forward."""
    with gathered_heads(student, *models):
        s_head, t_heads = lm_head(student), [lm_head(m) for m in models]
        if vocab is None:
            vocab = min(s_head.vocab_size, *(t.vocab_size for t in t_heads))
        reduction = loss_options.get("reduction")
        keep = [functools.partial(engines.kept_for_backward, engine_owned=bool(o),
                                  reduction=reduction) for o in owners]
        return fused_linear_eaopd_loss(
            hidden, s_head.weight, student_bias=s_head.bias,
            teacher_hidden=[h.to(hidden.device) for h in t_hidden],
            teacher_weight=[k(t.weight) for k, t in zip(keep, t_heads, strict=True)],
            teacher_bias=[k(t.bias) for k, t in zip(keep, t_heads, strict=True)],
            teacher_index=index[:, None].expand(labels.shape).to(hidden.device),
            labels=labels.to(hidden.device), vocab_size=vocab, **s_head.options("student"),
            **t_heads[0].options("teacher"), **loss_options)


def _teacher_models(teacher, teachers, teacher_index, input_ids) -> list:
    """``[teacher]``, or the checked ``teachers`` with a ``(B,)`` ``teacher_index``."""
    if teachers is None:
        if teacher is None:
            raise TypeError("eaopd_loss needs a teacher (or teachers + teacher_index)")
        if teacher_index is not None:
            raise ValueError("teacher_index routes sequences to teachers=[...]; with one "
                             "teacher leave it out")
        return [teacher]
    if teacher is not None:
        raise ValueError("give teacher OR teachers=[...], not both")
    if not isinstance(teachers, (list, tuple)) or not teachers:
        raise TypeError("teachers must be a non-empty list of causal LMs")
    if not isinstance(teacher_index, torch.Tensor) or teacher_index.is_floating_point() \
            or tuple(teacher_index.shape) != (input_ids.shape[0],):
        raise ValueError(f"teacher_index must be an integer tensor of shape "
                         f"({input_ids.shape[0]},) (one teacher per sequence), got "
                         f"{getattr(teacher_index, 'shape', teacher_index)}")
    bad = (teacher_index < 0) | (teacher_index >= len(teachers))
    if bool(bad.any()):  # here, before any model runs (a sharded model's collectives)
        raise ValueError(f"teacher_index values must be in [0, {len(teachers)}) (one entry "
                         f"per teacher), got {teacher_index[bad][:3].tolist()}")
    return list(teachers)
