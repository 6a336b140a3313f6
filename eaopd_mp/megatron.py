"""Megatron-LM adapter: the vocab-parallel fused loss as a ``forward_step`` loss function.

Nothing here imports megatron; the models are used through their attributes only.

Wiring (the student is the model being trained, the teacher a frozen GPTModel built with
the same tensor-parallel layout)::

    from functools import partial
    from eaopd_mp.megatron import eaopd_loss_func, gpt_hidden_states, output_layer_weight

    def forward_step(data_iterator, model):
        tokens, position_ids, attention_mask, loss_mask = get_batch(data_iterator)
        with torch.no_grad():
            teacher_hidden = gpt_hidden_states(teacher, tokens, position_ids, attention_mask)
        student_hidden = gpt_hidden_states(model, tokens, position_ids, attention_mask)
        return student_hidden, partial(
            eaopd_loss_func,
            student_weight=output_layer_weight(model),
            teacher_hidden=teacher_hidden,
            teacher_weight=output_layer_weight(teacher),
            loss_mask=loss_mask,
            sequence_parallel=args.sequence_parallel,
            vocab_size=tokenizer.vocab_size,  # the real one; megatron pads the output layer
        )

The schedule calls ``loss_func(output_tensor)``, i.e. ``eaopd_loss_func(student_hidden,
...)``. This sketch assumes no pipeline parallelism: with it, the teacher's last-stage
hidden states must reach the student's last stage, and the ``partial`` is built there
only (``gpt_hidden_states`` itself returns ``model(...)``'s output on the other stages).
"""

from __future__ import annotations

import torch

from .parallel import fused_linear_vocab_parallel_eaopd_loss

# Logged name -> key of the loss statistics.
LOGGED_STATS = {
    "teacher entropy": "teacher_entropy",
    "fkl weight": "fkl_weight",
    "kl fwd": "kl_fwd",
    "kl rev": "kl_rev",
}
_FIXED = ("labels", "reduction", "return_stats", "teacher_logits")


def _unwrap(model):
    """The GPTModel inside megatron's DDP / Float16Module wrappers (``.module`` chain)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def gpt_hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> torch.Tensor:
    """A GPTModel's forward without its output layer: the hidden states the output layer
    would read.

    ``GPTModel.forward`` is ``_preprocess`` (embedding, rotary tables) -> ``decoder``
    (the layers and, on the last pipeline stage, the final norm) -> ``_postprocess``
    (output layer, loss). This runs the first two, so no ``[s, b, V/tp]`` logits are
    made. Wrappers (DDP, Float16Module) are looked through; on a bf16 model the result
    is bf16. Multi-token prediction and inference contexts are not supported.

    Args:
        model: a megatron-core ``GPTModel``, possibly wrapped.
        input_ids, position_ids: ``[b, s]``.
        attention_mask: as for ``model(...)`` (``[1, 1, s, s]`` bool, True = masked), or
            None for megatron's own causal mask.
    Returns:
        ``[s, b, h]``, or ``[s / tp, b, h]`` (this rank's sequence slice) under sequence
        parallelism.
    """
    gpt = _unwrap(model)
    if getattr(gpt, "mtp_process", False):
        raise NotImplementedError("gpt_hidden_states does not support multi-token prediction")
    if not hasattr(gpt, "_preprocess"):
        raise NotImplementedError(
            "gpt_hidden_states needs GPTModel._preprocess (written against megatron-core "
            f"0.16), got {type(gpt).__name__}")
    pre = gpt._preprocess(input_ids=input_ids, position_ids=position_ids)
    decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset = pre[:5]
    return gpt.decoder(
        hidden_states=decoder_input,
        attention_mask=attention_mask,
        rotary_pos_emb=rotary_pos_emb,
        rotary_pos_cos=rotary_pos_cos,
        rotary_pos_sin=rotary_pos_sin,
        sequence_len_offset=sequence_len_offset,
    )


def output_layer_weight(model) -> torch.Tensor:
    """This rank's ``[V_padded / tp, h]`` output-layer shard (the tied embedding if shared),
    the weight ``GPTModel`` itself would use."""
    gpt = _unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def eaopd_loss_func(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    sequence_parallel: bool = False,
    vocab_size: int | None = None,
    tp_group=None,
    **loss_options,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The entropy-aware OPD loss in megatron-core's ``loss_func`` convention.

    Like ``loss_func`` in Megatron-LM's ``pretrain_gpt.py``, returns the *summed* loss,
    the number of tokens and the values to log. The schedule divides the loss by the
    number of tokens (and microbatches), or, with ``--calculate-per-token-loss``, by the
    global token count. Every logged value is a pair ``[value * tokens, tokens]``:
    megatron sums the pairs over microbatches and data-parallel ranks and logs
    ``sum[0] / sum[1]``, the token-weighted mean over the global batch.

    Args:
        student_hidden: ``[s, b, h]`` student hidden states before the output layer
            (:func:`gpt_hidden_states`), replicated over the tensor-parallel group, or
            ``[s / tp, b, h]`` with ``sequence_parallel=True``. Gets the gradient.
        student_weight: this rank's ``[V / tp, h]`` output-layer shard. Gets the gradient.
        teacher_hidden: ``[s, b, h_t]`` (``[s / tp, b, h_t]`` under sequence parallelism).
        teacher_weight: this rank's ``[V / tp, h_t]`` teacher output-layer shard.
        loss_mask: ``[b, s]`` 0/1 (megatron's layout): the positions that count.
        sequence_parallel: the hidden states are split along the sequence (megatron's
            ``config.sequence_parallel``).
        vocab_size: the real vocabulary when the output layer is padded (megatron's
            ``--make-vocab-size-divisible-by``): padding columns get no probability.
        tp_group: default megatron's tensor-parallel group.
        loss_options: ``h_max``, ``temperature``, ``gate``, ``gate_threshold``,
            ``fkl_coef``, ``fkl_weight``, ``chunk_size``, ``student_bias``,
            ``teacher_bias`` of
            :func:`eaopd_mp.parallel.fused_linear_vocab_parallel_eaopd_loss`.
    Returns:
        ``(loss_sum, num_tokens, logged)``: the float32 loss summed over the masked
        tokens (the same on every tensor-parallel rank), an int tensor, and
        ``{"eaopd loss", "teacher entropy", "fkl weight", "kl fwd", "kl rev"}`` each a
        ``[2]`` float tensor ``[value * num_tokens, num_tokens]`` (detached).
    """
    fixed = sorted(set(loss_options) & set(_FIXED))
    if fixed:
        raise TypeError(f"eaopd_loss_func sets {', '.join(fixed)} itself")
    loss_sum, stats = fused_linear_vocab_parallel_eaopd_loss(
        student_hidden,
        student_weight,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        labels=loss_mask.transpose(0, 1),  # [b, s] -> [s, b], the hidden states' layout
        reduction="sum",
        tp_group=tp_group,
        vocab_size=vocab_size,
        sequence_parallel=sequence_parallel,
        return_stats=True,
        **loss_options,
    )
    num_tokens = loss_mask.detach().sum().to(torch.int)
    n = num_tokens.view(1).to(torch.float32)
    logged = {"eaopd loss": torch.cat([loss_sum.detach().view(1), n])}
    for name, key in LOGGED_STATS.items():
        logged[name] = torch.cat([stats[key].detach().view(1) * n, n])
    return loss_sum, num_tokens, logged
