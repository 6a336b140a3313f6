"""The GPTModel's forward: its hidden states without the logits, on any megatron-core.

:func:`gpt_forward` runs ``model(..., output_processor=...)`` where ``GPTModel.forward`` has
megatron-core's ``output_processor`` hook (0.19), and the private ``_preprocess`` and
``decoder`` otherwise (0.16); :func:`gpt_hidden_states` returns what the output layer would
read. Nothing here imports megatron: models are used through their attributes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from typing import Any

import torch


def _unwrap(model):
    """The GPTModel inside megatron's DDP / Float16Module wrappers (``.module`` chain)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def uses_output_processor(model) -> bool:
    """Whether this GPTModel's ``forward`` takes megatron-core's ``output_processor`` hook.

    ``GPTModel.forward(..., output_processor=fn, output_processor_context=ctx)`` (megatron-core
    PR #4686, in 0.19) runs embedding, decoder, multi-token prediction and everything else
    ``forward`` does, then, on the last pipeline stage, returns ``fn(hidden_states=...,
    output_layer=..., output_weight=..., loss_mask=..., context=ctx, config=..., ...)``
    instead of the logits or the language-model loss. Decided by the signature, not by
    the version number. Wrappers (DDP, Float16Module) are looked through; a list of
    virtual-stage chunks is judged by its last chunk.
    """
    return _forward_has_hook(type(_unwrap(last_model_chunk(model))))


@cache
def _forward_has_hook(cls) -> bool:
    params = inspect.signature(cls.forward).parameters
    return "output_processor" in params and "output_processor_context" in params


def gpt_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, output_processor: Callable, *,
                context: Any = None, loss_mask: torch.Tensor | None = None,
                packed_seq_params=None):
    """``model(input_ids, position_ids, attention_mask, loss_mask=loss_mask,
    output_processor=output_processor, output_processor_context=context)`` on any
    megatron-core.

    Where ``GPTModel.forward`` has the hook (:func:`uses_output_processor`), this is that
    call, on the GPTModel inside the wrappers (DDP's forward only passes through, and
    Float16Module would upcast a bf16 result to fp32). Older megatron-cores (0.16) get
    the same result from the private ``_preprocess`` and ``decoder`` that ``forward``
    runs (no multi-token prediction), then the processor with the same keywords
    (``inference_context`` None, ``scale_logits`` the identity).

    Args:
        model: a megatron-core ``GPTModel``, possibly wrapped; one pipeline stage.
        input_ids, position_ids: ``[b, s]``.
        attention_mask: as for ``model(...)`` (``[1, 1, s, s]`` bool, True = masked), or
            None for megatron's own causal mask.
        output_processor: called on the last pipeline stage with megatron's keywords
            (``hidden_states`` ``[s, b, h]``, or ``[s / tp, b, h]`` under sequence
            parallelism; ``output_layer``; ``output_weight``, the tied embedding or None;
            ``loss_mask``; ``context``; ``config``; ...); accept ``**kwargs`` for the rest.
        context: passed to ``output_processor`` as ``context``.
        loss_mask: ``[b, s]``, passed to ``output_processor`` (and to megatron's
            multi-token prediction, where the hook exists).
        packed_seq_params: megatron's ``PackedSeqParams`` for packed sequences (THD),
            passed to the forward (rotary tables, every layer) and the processor.
    Returns:
        On the last pipeline stage what ``output_processor`` returns, elsewhere the
        stage's ``[s(/tp), b, h]`` output hidden states.
    """
    gpt = _unwrap(model)
    if uses_output_processor(gpt):
        return gpt(input_ids, position_ids, attention_mask, loss_mask=loss_mask,
                   packed_seq_params=packed_seq_params,
                   output_processor=output_processor, output_processor_context=context)
    return _forward_without_hook(gpt, input_ids, position_ids, attention_mask,
                                 output_processor, context, loss_mask, packed_seq_params)


def _forward_without_hook(gpt, input_ids, position_ids, attention_mask, output_processor,
                          context, loss_mask, packed_seq_params=None):
    """:func:`gpt_forward` for a GPTModel without the hook (megatron-core 0.16):
    ``_preprocess`` (embedding, rotary tables) -> ``decoder`` (the layers and, on the last
    stage, the final norm) -> the processor in place of ``_postprocess``."""
    if getattr(gpt, "mtp_process", False):
        raise NotImplementedError(
            "multi-token prediction needs megatron-core's output_processor hook "
            "(GPTModel.forward(output_processor=...), megatron-core >= 0.19)")
    if not hasattr(gpt, "_preprocess"):
        raise NotImplementedError(
            f"{type(gpt).__name__}.forward has no output_processor hook and no _preprocess "
            "(the private path written against megatron-core 0.16)")
    pre = gpt._preprocess(input_ids=input_ids, position_ids=position_ids,
                          packed_seq_params=packed_seq_params)
    decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset = pre[:5]
    hidden = gpt.decoder(
        hidden_states=decoder_input,
        attention_mask=attention_mask,
        rotary_pos_emb=rotary_pos_emb,
        rotary_pos_cos=rotary_pos_cos,
        rotary_pos_sin=rotary_pos_sin,
        sequence_len_offset=sequence_len_offset,
        packed_seq_params=packed_seq_params,
    )
    if not gpt.post_process:
        return hidden
    return output_processor(
        hidden_states=hidden,
        output_layer=gpt.output_layer,
        output_weight=(gpt.shared_embedding_or_output_weight()
                       if gpt.share_embeddings_and_output_weights else None),
        labels=None,
        loss_mask=loss_mask,
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        decoder_input=decoder_input,
        inference_context=None,
        packed_seq_params=packed_seq_params,
        runtime_gather_output=None,
        context=context,
        compute_language_model_loss=gpt.compute_language_model_loss,
        scale_logits=lambda logits: logits,
        config=gpt.config,
    )


def _check_output_config(config) -> None:
    """Refuse what the fused loss cannot reproduce of ``GPTModel``'s own output."""
    if getattr(config, "use_mup", False) and getattr(config, "mup_output_mult", 1.0) != 1.0:
        raise NotImplementedError(
            "MuP output scaling (config.use_mup with mup_output_mult != 1) is not applied "
            "by the fused EAOPD loss")


def hidden_states_processor(*, hidden_states: torch.Tensor, config=None,
                            **unused) -> torch.Tensor:
    """An ``output_processor`` that returns the hidden states the output layer would
    read (the final-norm output), ``[s, b, h]`` or ``[s / tp, b, h]``, in the model's
    dtype: no ``[s, b, V / tp]`` logits are made."""
    _check_output_config(config)
    return hidden_states


def gpt_hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None,
                      packed_seq_params=None) -> torch.Tensor:
    """A GPTModel's forward without its output layer: the hidden states the output layer
    would read.

    :func:`gpt_forward` with :func:`hidden_states_processor`: ``model(...)`` with the
    ``output_processor`` hook where megatron-core has it, its private ``_preprocess`` and
    ``decoder`` otherwise. Wrappers (DDP, Float16Module) are looked through; on a bf16
    model the result is bf16.

    Args:
        model: a megatron-core ``GPTModel``, possibly wrapped.
        input_ids, position_ids: ``[b, s]``.
        attention_mask: as for ``model(...)`` (``[1, 1, s, s]`` bool, True = masked), or
            None for megatron's own causal mask.
        packed_seq_params: megatron's ``PackedSeqParams`` for packed sequences (THD),
            passed to the embedding's rotary tables and to every layer; None otherwise.
    Returns:
        ``[s, b, h]``, or ``[s / tp, b, h]`` (this rank's sequence slice) under sequence
        parallelism.
    """
    return gpt_forward(model, input_ids, position_ids, attention_mask,
                       hidden_states_processor, packed_seq_params=packed_seq_params)


def output_layer_weight(model) -> torch.Tensor:
    """This rank's ``[V_padded / tp, h]`` output-layer shard (the tied embedding if shared),
    the weight ``GPTModel`` itself would use."""
    gpt = _unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def last_model_chunk(model):
    """The model chunk holding the output layer: ``model`` itself, or the last of a list
    of virtual pipeline stages (interleaved schedule)."""
    if isinstance(model, (list, tuple)):
        if not model:
            raise ValueError("an empty list of model chunks")
        return model[-1]
    return model


def _is_last_stage(model) -> bool:
    """Whether this (chunk of the) model is the last pipeline stage (the last virtual stage
    of the last pipeline rank under the interleaved schedule)."""
    return bool(_unwrap(last_model_chunk(model)).post_process)
