"""Megatron-LM adapter: the vocab-parallel fused loss as a ``forward_step`` loss function,
and forward-step factories for megatron-core's pipeline schedules.

Nothing here imports megatron; the models are used through their attributes only.

Wiring, with or without pipeline parallelism (the student is the model being trained,
wrapped in megatron's ``DistributedDataParallel``; the teacher a frozen GPTModel built with
the same tensor- and pipeline-parallel layout; ``get_batch(data_iterator)`` returns
``tokens, position_ids, attention_mask, loss_mask`` of one micro-batch)::

    from megatron.core.pipeline_parallel import get_forward_backward_func
    from eaopd_mp.megatron import eaopd_forward_step, teacher_hidden_states

    forward_backward = get_forward_backward_func()
    micro_batches = [...]  # this step's, the same for the teacher and the student
    shapes = dict(num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=b)
    teacher_hidden = teacher_hidden_states(forward_backward, teacher, iter(micro_batches),
                                           get_batch, **shapes)
    losses = forward_backward(
        forward_step_func=eaopd_forward_step(
            get_batch, teacher, teacher_hidden,
            vocab_size=tokenizer.vocab_size,  # the real one; megatron pads the output layer
            sequence_parallel=config.sequence_parallel),
        data_iterator=iter(micro_batches), model=student, forward_only=False, **shapes)

With pipeline parallelism the teacher runs its own ``forward_only`` pipeline first; the
schedule returns, on the last stage only, one ``[s(/tp), b, h_t]`` teacher hidden-state
tensor per micro-batch (never logits), and the student's last stage consumes them in
micro-batch order. See :func:`teacher_hidden_states` for why.

The schedule calls ``loss_func(output_tensor)``, i.e. :func:`eaopd_loss_func` on the
student's last-stage hidden states; it returns megatron's ``(loss_sum, num_tokens,
logged)`` triple, so ``config.calculate_per_token_loss=True`` makes the step's gradient
that of the per-token mean over all micro-batches and data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

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
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
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
            Both None for a served teacher: pass ``teacher_topk_logprobs`` and
            ``teacher_topk_indices`` ``[s, b, k]`` (the full sequence even under sequence
            parallelism, global vocabulary ids, the same on every tensor-parallel rank)
            in ``loss_options``.
        loss_mask: ``[b, s]`` 0/1 (megatron's layout): the positions that count.
        sequence_parallel: the hidden states are split along the sequence (megatron's
            ``config.sequence_parallel``).
        vocab_size: the real vocabulary when the output layer is padded (megatron's
            ``--make-vocab-size-divisible-by``): padding columns get no probability.
        tp_group: default megatron's tensor-parallel group.
        loss_options: ``h_max``, ``temperature``, ``gate``, ``gate_threshold``,
            ``fkl_coef``, ``fkl_weight``, ``chunk_size``, ``topk_tail``, ``student_bias``,
            ``teacher_bias``, ``teacher_topk_logprobs``, ``teacher_topk_indices``,
            ``teacher_entropy``, ``teacher_index`` of
            :func:`eaopd_mp.parallel.fused_linear_vocab_parallel_eaopd_loss`. With
            several teachers (``teacher_index`` ``[s, b]``, the teacher arguments lists),
            ``logged`` adds ``"teacher j <name>"`` pairs over teacher j's tokens.
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
    for j, mine in enumerate(stats.get("per_teacher", ())):  # several teachers
        n_j = mine["tokens"].detach().view(1).to(torch.float32)
        for name, key in LOGGED_STATS.items():
            logged[f"teacher {j} {name}"] = torch.cat([mine[key].detach().view(1) * n_j, n_j])
    return loss_sum, num_tokens, logged


# get_batch(data_iterator) -> (tokens [b, s], position_ids [b, s], attention_mask, loss_mask
# [b, s]) of one micro-batch.
GetBatch = Callable[[Iterator], tuple]


def _is_last_stage(model) -> bool:
    return bool(_unwrap(model).post_process)


def teacher_forward_step(get_batch: GetBatch) -> Callable:
    """A ``forward_step_func`` for a frozen teacher's ``forward_only`` schedule.

    Every stage returns ``(hidden, None)``: ``hidden`` is :func:`gpt_hidden_states` (on the
    last stage the final-norm output, ``[s, b, h_t]`` or ``[s / tp, b, h_t]`` under sequence
    parallelism), and with no loss function megatron's schedule keeps the last stage's
    output of every micro-batch and returns them in order.
    """
    def forward_step(data_iterator, model):
        tokens, position_ids, attention_mask, _ = get_batch(data_iterator)
        return gpt_hidden_states(model, tokens, position_ids, attention_mask), None
    return forward_step


def teacher_hidden_states(forward_backward_func: Callable, teacher, data_iterator: Iterator,
                          get_batch: GetBatch, *, num_microbatches: int, seq_length: int,
                          micro_batch_size: int) -> list[torch.Tensor]:
    """Run the frozen teacher over one step's micro-batches with megatron's schedule.

    Design: the teacher has the student's pipeline layout and runs its own
    ``forward_only=True`` schedule (under ``torch.no_grad``) before the student's step; the
    last stage keeps one hidden-state tensor per micro-batch, ``num_microbatches * s/tp * b
    * h_t`` values, never ``[s, b, V/tp]`` logits. The teacher thus costs one extra forward
    pipeline (with its own bubble) per step and no change to the student's schedule or
    its p2p tensors (whose shape is the student's hidden size). Sending the teacher's
    activations alongside the student's would need a custom p2p shape and entangle the
    two models in one schedule; putting the whole teacher on the last stage would cost
    that stage all the teacher's weights.

    Args:
        forward_backward_func: ``megatron.core.pipeline_parallel.get_forward_backward_func()``.
        teacher: the teacher GPTModel (unwrapped or wrapped); its config holds the pipeline
            settings (``pipeline_dtype``, ``hidden_size``).
        data_iterator: yields the step's micro-batches, the same ones, in the same order, as
            the student's iterator.
        get_batch: see :func:`eaopd_forward_step`.
        num_microbatches, seq_length, micro_batch_size: as for the student's schedule.
    Returns:
        On the last pipeline stage, ``num_microbatches`` tensors ``[s, b, h_t]`` (``[s / tp,
        b, h_t]`` under sequence parallelism) in the teacher's dtype; ``[]`` elsewhere.
    """
    with torch.no_grad():
        hidden = forward_backward_func(
            forward_step_func=teacher_forward_step(get_batch),
            data_iterator=data_iterator,
            model=teacher,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    if _is_last_stage(teacher) and len(hidden) != num_microbatches:
        raise RuntimeError(f"the teacher's schedule returned {len(hidden)} outputs for "
                           f"{num_microbatches} micro-batches")
    return list(hidden)


def eaopd_forward_step(get_batch: GetBatch, teacher, teacher_hidden: Sequence[torch.Tensor],
                       *, sequence_parallel: bool = False, vocab_size: int | None = None,
                       **loss_options) -> Callable:
    """The student's ``forward_step_func`` for megatron-core's schedules.

    Every stage computes :func:`gpt_hidden_states`; the last stage returns it with
    :func:`eaopd_loss_func` bound to the student's and teacher's output-layer shards, the
    micro-batch's loss mask and the next of ``teacher_hidden``; other stages return
    ``(hidden, None)`` (the schedule sends ``hidden`` on and never calls a loss there).

    Args:
        get_batch: ``get_batch(data_iterator) -> (tokens, position_ids, attention_mask,
            loss_mask)`` for one micro-batch: ``[b, s]`` int64 tokens and positions, the
            attention mask as for ``GPTModel.forward`` (or None), ``[b, s]`` 0/1 float loss
            mask. Called once per micro-batch on every stage.
        teacher: the teacher GPTModel (for its output-layer shard on the last stage).
        teacher_hidden: :func:`teacher_hidden_states` of the same micro-batches (used on
            the last stage only, in order; may be empty elsewhere).
        sequence_parallel, vocab_size, loss_options: as for :func:`eaopd_loss_func`.
    Returns:
        ``forward_step(data_iterator, model) -> (output_tensor, loss_func | None)``. It
        raises ``RuntimeError`` if the last stage runs more micro-batches than there are
        teacher hidden states.
    """
    remaining = iter(teacher_hidden)

    def forward_step(data_iterator, model):
        tokens, position_ids, attention_mask, loss_mask = get_batch(data_iterator)
        hidden = gpt_hidden_states(model, tokens, position_ids, attention_mask)
        if not _is_last_stage(model):
            return hidden, None
        t_hidden = next(remaining, None)
        if t_hidden is None:
            raise RuntimeError("more micro-batches than teacher hidden states")
        return hidden, partial(
            eaopd_loss_func,
            student_weight=output_layer_weight(model),
            teacher_hidden=t_hidden,
            teacher_weight=output_layer_weight(teacher),
            loss_mask=loss_mask,
            sequence_parallel=sequence_parallel,
            vocab_size=vocab_size,
            **loss_options,
        )
    return forward_step
