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

On the last stage the student's forward computes the loss itself: :func:`gpt_forward`
calls ``model(..., loss_mask=..., output_processor=eaopd_output_processor,
output_processor_context=EaopdOutput(...))``, megatron-core's official hook for a custom
output (``GPTModel.forward``, megatron-core >= 0.19), so everything ``forward`` does
before its output layer still happens; on older megatron-cores (0.16) it runs the
private ``_preprocess`` and ``decoder`` instead and calls the same processor
(:func:`uses_output_processor` decides, from ``forward``'s signature). The schedule then
calls ``loss_func(output_tensor)``, which returns megatron's ``(loss_sum, num_tokens,
logged)`` triple (:func:`eaopd_loss_func`), so ``config.calculate_per_token_loss=True``
makes the step's gradient that of the per-token mean over all micro-batches and
data-parallel ranks.

Long context (docs/guides/megatron-long-context.md):

* context parallelism: ``get_batch`` returns this CP rank's zig-zag slices, as
  ``megatron.core.utils.get_batch_on_this_cp_rank`` cuts them; the loss counts this
  rank's tokens (:func:`megatron_loss_triple`) and megatron's schedule, DDP and
  ``finalize_model_grads`` reduce over data x context parallel ranks. A served teacher's
  top-k is given for the whole sequence and cut here (:func:`slice_for_context_parallel`);
* packed sequences (THD): ``get_batch`` may return megatron's ``PackedSeqParams`` as a
  fifth value; it reaches student, teacher and the loss, which drops every sequence's
  last token (:func:`packed_loss_mask`);
* interleaved pipelines: ``teacher`` may be a list of virtual-stage chunks and the data
  iterators one per chunk, as megatron's interleaved schedule takes them.

Several teachers (docs/guides/megatron.md, "Several teachers"): ``teacher`` is a list of
per-teacher chunk lists (``[[math_teacher], [code_teacher]]``, each its own frozen GPTModel
of any hidden size and depth) and ``get_batch`` returns a mapping with ``teacher_index``
(:class:`Batch`): each teacher runs its own ``forward_only`` schedule over the
micro-batches routed to it only (:func:`teacher_hidden_states`), and the student's last
stage scores every token with its own teacher in one fused call
(:func:`eaopd_forward_step`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cache
from typing import Any, NamedTuple

import torch

from .errors import surfaced
from .parallel import fused_linear_vocab_parallel_eaopd_loss

# Logged name -> key of the loss statistics.
LOGGED_STATS = {
    "teacher entropy": "teacher_entropy",
    "fkl weight": "fkl_weight",
    "kl fwd": "kl_fwd",
    "kl rev": "kl_rev",
}
_FIXED = ("labels", "reduction", "return_stats", "teacher_logits")


def _check_loss_options(loss_options: dict) -> None:
    fixed = sorted(set(loss_options) & set(_FIXED))
    if fixed:
        raise TypeError(f"eaopd_loss_func sets {', '.join(fixed)} itself")


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


# --------------------------------------------------------------- context parallelism (CP)


def context_parallel_layout(cp_group=None) -> tuple[int, int]:
    """``(size, rank)`` of the context-parallel group: ``cp_group``'s, or megatron-core's
    when it is None (``(1, 0)`` when megatron's parallel state is not initialised)."""
    if cp_group is not None:
        import torch.distributed as dist
        return dist.get_world_size(cp_group), dist.get_rank(cp_group)
    try:
        from megatron.core import parallel_state
    except ImportError:
        return 1, 0
    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return (parallel_state.get_context_parallel_world_size(),
            parallel_state.get_context_parallel_rank())


def _cu_seqlens(packed_seq_params, padded: bool) -> torch.Tensor:
    """``cu_seqlens_q`` (or ``cu_seqlens_q_padded``, falling back to it) as int64."""
    cu = packed_seq_params.cu_seqlens_q
    if padded and getattr(packed_seq_params, "cu_seqlens_q_padded", None) is not None:
        cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        raise ValueError("packed_seq_params.cu_seqlens_q is None")
    return cu.detach().to(torch.int64).view(-1)


def context_parallel_index(seq_len: int, cp_size: int, cp_rank: int, *,
                           cu_seqlens_padded: torch.Tensor | None = None,
                           device=None) -> torch.Tensor:
    """The positions of a ``seq_len`` sequence that context-parallel rank ``cp_rank`` holds,
    in megatron's order: ``[seq_len / cp_size]`` int64.

    The sequence is cut into ``2 * cp_size`` equal chunks and the rank holds chunks
    ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` (causal attention's load balance), as
    ``megatron.core.utils.get_batch_on_this_cp_rank`` slices tokens. With
    ``cu_seqlens_padded`` (packed sequences, ``[n + 1]`` offsets ending at ``seq_len``),
    every packed sequence is cut that way and the rank's parts are concatenated in
    sequence order, as ``get_thd_batch_on_this_cp_rank`` (Transformer Engine's
    ``thd_get_partitioned_indices``) slices them; each sequence's padded length must
    divide by ``2 * cp_size``.
    """
    if cu_seqlens_padded is None:
        bounds = torch.tensor([0, seq_len], dtype=torch.int64)
    else:
        bounds = cu_seqlens_padded.detach().to("cpu", torch.int64).view(-1)
        if bounds.numel() < 2 or bounds[0] != 0 or bounds[-1] != seq_len:
            raise ValueError(f"cu_seqlens_padded must run from 0 to the packed length "
                             f"{seq_len}, got {bounds.tolist()}")
    lengths = bounds.diff()
    if (lengths % (2 * cp_size)).any():
        what = "sequence length" if cu_seqlens_padded is None else "padded sequence lengths"
        raise ValueError(f"context parallelism over {cp_size} ranks cuts every sequence into "
                         f"{2 * cp_size} chunks: the {what} {lengths.tolist()} must divide "
                         f"by {2 * cp_size}")
    parts = []
    for start, length in zip(bounds[:-1].tolist(), lengths.tolist(), strict=True):
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(parts).to(device)


def slice_for_context_parallel(tensor: torch.Tensor, dim: int, *, cp_group=None,
                               packed_seq_params=None) -> torch.Tensor:
    """This context-parallel rank's part of a tensor given for the whole sequence along
    ``dim``, exactly as megatron slices the tokens (:func:`context_parallel_index`).

    Use it for per-token data made outside megatron's data loader, e.g. a served
    teacher's ``[s, b, k]`` top-k log-probabilities and ids (``dim=0``);
    :func:`eaopd_loss_func` does it itself for ``teacher_topk_*`` and
    ``teacher_entropy``. With ``packed_seq_params`` (THD) each packed sequence is split
    separately (``cu_seqlens_q_padded``, or ``cu_seqlens_q`` when there is no padding).
    Returns ``tensor`` itself when the group has one rank.
    """
    cp_size, cp_rank = context_parallel_layout(cp_group)
    if cp_size == 1:
        return tensor
    cu = None if packed_seq_params is None else _cu_seqlens(packed_seq_params, padded=True)
    index = context_parallel_index(tensor.shape[dim], cp_size, cp_rank,
                                   cu_seqlens_padded=cu, device=tensor.device)
    return tensor.index_select(dim, index)


# ------------------------------------------------------------- packed sequences (THD)


def packed_loss_mask(loss_mask: torch.Tensor, packed_seq_params, *,
                     cp_group=None) -> torch.Tensor:
    """``loss_mask`` with every packed sequence's last token, and any padding after it,
    weighted 0.

    In a packed (THD) row the last token of a sequence would "predict" the first token of
    the next one; its distillation loss means nothing, so the loss over the packed row is
    the sum of the per-sequence losses only when it is dropped.

    Args:
        loss_mask: ``[1, t]`` (megatron's THD batch: one row), this context-parallel
            rank's part when context parallelism is on (``t`` = packed length / cp).
        packed_seq_params: ``PackedSeqParams`` with ``cu_seqlens_q`` (the real sequence
            boundaries) and optionally ``cu_seqlens_q_padded`` (where each sequence starts
            in the row when sequences are padded, e.g. to ``2 * cp`` multiples).
        cp_group: default megatron's context-parallel group.
    Returns:
        ``[1, t]`` in ``loss_mask``'s dtype.
    """
    if getattr(packed_seq_params, "qkv_format", "thd") != "thd":
        raise ValueError(f"packed_seq_params.qkv_format must be 'thd', got "
                         f"{packed_seq_params.qkv_format!r}")
    if loss_mask.dim() != 2 or loss_mask.shape[0] != 1:
        raise ValueError(f"packed sequences come as one row: loss_mask must be [1, t], got "
                         f"{tuple(loss_mask.shape)}")
    cp_size, cp_rank = context_parallel_layout(cp_group)
    real = _cu_seqlens(packed_seq_params, padded=False).cpu()
    starts = _cu_seqlens(packed_seq_params, padded=True).cpu()
    total = loss_mask.shape[1] * cp_size
    if real.numel() != starts.numel() or starts[-1] != total or (real.diff() > starts.diff()).any():
        raise ValueError(f"packed_seq_params do not fit a packed row of {total} tokens: "
                         f"cu_seqlens {real.tolist()}, cu_seqlens_padded {starts.tolist()}")
    pos = torch.arange(total)
    seq = torch.searchsorted(starts, pos, right=True) - 1  # the sequence each position is in
    keep = pos - starts[seq] < real.diff()[seq] - 1  # a real token followed by one of its own
    if cp_size > 1:
        keep = keep[context_parallel_index(total, cp_size, cp_rank, cu_seqlens_padded=starts)]
    return loss_mask * keep.to(loss_mask.device, loss_mask.dtype).view(1, -1)


def _slice_served_teacher(loss_options: dict, num_tokens: int, packed_seq_params,
                          cp_group) -> dict:
    """``loss_options`` with the served teacher's whole-sequence ``teacher_topk_logprobs``
    / ``teacher_topk_indices`` ``[s, b, k]`` and ``teacher_entropy`` ``[s, b]`` cut to this
    context-parallel rank's ``num_tokens`` positions (:func:`slice_for_context_parallel`).
    A sequence length other than ``num_tokens * cp`` raises ``ValueError``. Several
    teachers' lists (their routed rows) are this rank's already and pass through."""
    cp_size, _ = context_parallel_layout(cp_group)
    names = ("teacher_topk_logprobs", "teacher_topk_indices", "teacher_entropy")
    given = {n: loss_options[n] for n in names
             if isinstance(loss_options.get(n), torch.Tensor)}
    if cp_size == 1 or not given:
        return loss_options
    for name, t in given.items():
        if t.dim() < 1 or t.shape[0] != num_tokens * cp_size:
            raise ValueError(
                f"{name} must cover the whole sequence under context parallelism: "
                f"[{num_tokens * cp_size}, ...] ({cp_size} ranks x {num_tokens} tokens of "
                f"this rank's loss_mask), got {tuple(t.shape)}; the library cuts it into "
                "this rank's zig-zag chunks itself")
    out = dict(loss_options)
    for name, t in given.items():
        out[name] = slice_for_context_parallel(t, 0, cp_group=cp_group,
                                               packed_seq_params=packed_seq_params)
    return out


def megatron_loss_triple(loss_sum: torch.Tensor, loss_mask: torch.Tensor,
                         stats: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """megatron's ``(loss, num_tokens, logged)`` from this rank's summed loss.

    The divisor is megatron's, never ours: ``num_tokens`` counts this rank's (this
    context-parallel rank's) loss tokens only, as ``pretrain_gpt.py``'s ``loss_func`` does.
    With ``calculate_per_token_loss=True`` the schedule sums ``num_tokens`` over the
    micro-batches, ``finalize_model_grads`` all-reduces it over data x context parallel
    ranks and divides the summed gradients by it: the per-token mean over the global
    batch. Without it the schedule divides each micro-batch's loss by its ``num_tokens``
    and by the number of micro-batches, and DDP averages gradients over data x context
    parallel ranks: the mean over micro-batches and DP x CP ranks of each rank's per-token
    mean of its own chunks. Logged pairs ``[value * n, n]`` are summed over micro-batches
    and DP x CP ranks by Megatron-LM's ``train_step``: token-weighted means.
    """
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


@surfaced
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
    packed_seq_params=None,
    cp_group=None,
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
            in ``loss_options``. Under context parallelism give them (and
            ``teacher_entropy``) for the *whole* sequence, ``[s * cp, b, k]``: they are cut
            into this rank's zig-zag chunks here (:func:`slice_for_context_parallel`); any
            other length raises ``ValueError``.
        loss_mask: ``[b, s]`` 0/1 (megatron's layout): the positions that count; this
            context-parallel rank's positions under context parallelism (as
            ``get_batch_on_this_cp_rank`` slices it), like the hidden states.
        sequence_parallel: the hidden states are split along the sequence (megatron's
            ``config.sequence_parallel``).
        vocab_size: the real vocabulary when the output layer is padded (megatron's
            ``--make-vocab-size-divisible-by``): padding columns get no probability.
        tp_group: default megatron's tensor-parallel group.
        packed_seq_params: megatron's ``PackedSeqParams`` when the micro-batch is packed
            sequences (THD, ``b = 1``): every sequence's last token gets weight 0
            (:func:`packed_loss_mask`), so the loss is the sum of the per-sequence losses,
            and a served teacher is cut per sequence under context parallelism.
        cp_group: default megatron's context-parallel group.
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
    _check_loss_options(loss_options)
    if packed_seq_params is not None:
        loss_mask = packed_loss_mask(loss_mask, packed_seq_params, cp_group=cp_group)
    loss_options = _slice_served_teacher(loss_options, loss_mask.shape[1], packed_seq_params,
                                         cp_group)
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
    return megatron_loss_triple(loss_sum, loss_mask, stats)


class EaopdOutput:
    """The ``output_processor_context`` of :func:`eaopd_output_processor` for one
    micro-batch: the teacher side and the loss options go in; the model's forward fills in
    the token count and the logged values, which :meth:`loss_func` hands to the schedule.

    Args:
        teacher_hidden, teacher_weight, sequence_parallel, vocab_size, tp_group,
            loss_options: as for :func:`eaopd_loss_func` (checked here, before the forward);
            with several teachers lists and ``teacher_index`` in ``loss_options``.
        gather_sequence: the student's hidden states are this rank's sequence slice but
            the loss runs on the whole sequence (``sequence_parallel`` False): the
            processor all-gathers them over ``tp_group`` first (the gradient of the slice
            is its part of the all-reduced one). :func:`eaopd_forward_step` sets it when
            several teachers are routed so that the tensor-parallel ranks' sequence
            slices hold different numbers of a teacher's tokens.
    """

    def __init__(self, teacher_hidden: torch.Tensor | list | None,
                 teacher_weight: torch.Tensor | list | None, *, sequence_parallel: bool = False,
                 vocab_size: int | None = None, tp_group=None, gather_sequence: bool = False,
                 **loss_options):
        _check_loss_options(loss_options)
        self.teacher_hidden, self.teacher_weight = teacher_hidden, teacher_weight
        self.gather_sequence = gather_sequence
        self.options = dict(sequence_parallel=sequence_parallel, vocab_size=vocab_size,
                            tp_group=tp_group, **loss_options)
        self.num_tokens: torch.Tensor | None = None
        self.logged: dict[str, torch.Tensor] | None = None

    def loss_func(self, loss_sum: torch.Tensor):
        """megatron-core's ``loss_func(output_tensor)``: ``(loss_sum, num_tokens, logged)``
        of the forward that ran :func:`eaopd_output_processor` with this context."""
        if self.logged is None:
            raise RuntimeError("the model's forward did not run eaopd_output_processor "
                               "with this context")
        return loss_sum, self.num_tokens, self.logged


def eaopd_output_processor(*, hidden_states: torch.Tensor, output_layer,
                           output_weight: torch.Tensor | None = None,
                           loss_mask: torch.Tensor | None, context: EaopdOutput, config=None,
                           **unused) -> torch.Tensor:
    """An ``output_processor`` for ``GPTModel.forward`` (see :func:`gpt_forward`): the
    :func:`eaopd_loss_func` loss on the decoder's hidden states and the output layer's
    shard (the tied embedding when ``output_weight`` is given), in place of the logits.

    Returns the float32 loss summed over the ``loss_mask`` tokens (``[b, s]`` 0/1, from
    the forward's ``loss_mask``); the token count and logged values go to ``context``.
    """
    _check_output_config(config)
    if loss_mask is None:
        raise ValueError("eaopd_output_processor needs the forward's loss_mask ([b, s] 0/1)")
    weight = output_weight if output_weight is not None else output_layer.weight
    if context.gather_sequence:
        hidden_states = _GatherSequence.apply(hidden_states, context.options["tp_group"])
    loss_sum, context.num_tokens, context.logged = eaopd_loss_func(
        hidden_states, weight, context.teacher_hidden, context.teacher_weight, loss_mask,
        **context.options)
    return loss_sum


class _GatherSequence(torch.autograd.Function):
    """All-gather ``[s / tp, ...]`` sequence slices over the tensor-parallel group into
    ``[s, ...]``; backward keeps this rank's slice of the (already all-reduced) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = _tp_group(group)
        return _all_gather_sequence(x, ctx.group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=0)[rank].contiguous(), None


def _tp_group(group):
    if group is not None:
        return group
    from .tp import default_group
    return default_group()


def _all_gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """The ranks' ``x`` concatenated along dim 0, in rank order (no gradient): the
    combiner's all-gather (:meth:`eaopd_mp.tp.TPCombiner.all_gather`)."""
    from .tp import TPCombiner
    return TPCombiner(_tp_group(group).group_name).all_gather(x.detach())


# ------------------------------------------------------------------------- micro-batches


# get_batch(data_iterator) -> one micro-batch (this context-parallel rank's part): the tuple
# (tokens [b, s], position_ids [b, s], attention_mask, loss_mask [b, s][, packed_seq_params])
# or a mapping with those keys and, for several teachers, "teacher_index" (see Batch).
GetBatch = Callable[[Iterator], Any]


class Batch(NamedTuple):
    """One micro-batch as :func:`read_batch` reads it from ``get_batch``.

    ``teacher_index`` (several teachers; only from a mapping) routes the micro-batch's
    tokens: ``[b]`` (one teacher per sequence), ``[n]`` with packed sequences (one teacher
    per packed sequence, ``n = len(cu_seqlens_q_padded) - 1``), ``[b, s]`` (per token,
    this context-parallel rank's positions like ``loss_mask``) or ``[b, s * cp]`` (per
    token for the whole sequence; cut into this rank's zig-zag chunks here, per packed
    sequence with ``packed_seq_params``); int64 values in ``[0, n_teachers)``.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: Any
    loss_mask: Any
    packed_seq_params: Any = None
    teacher_index: Any = None


_REQUIRED_KEYS = ("tokens", "position_ids", "loss_mask")


def read_batch(get_batch: GetBatch, data_iterator) -> Batch:
    """The next micro-batch: ``get_batch(data_iterator)`` returns ``(tokens, position_ids,
    attention_mask, loss_mask)``, those four and megatron's ``PackedSeqParams`` (packed
    sequences, THD), or a mapping with keys ``tokens``, ``position_ids``,
    ``attention_mask``, ``loss_mask`` and optionally ``packed_seq_params`` and
    ``teacher_index`` (other keys, e.g. ``labels``, are ignored)."""
    batch = get_batch(data_iterator)
    if isinstance(batch, Mapping):
        missing = [k for k in _REQUIRED_KEYS if k not in batch]
        if missing:
            raise ValueError(f"get_batch returned a mapping without {', '.join(missing)} "
                             f"(keys: {', '.join(Batch._fields)}), got keys {sorted(batch)}")
        return Batch(*(batch.get(k) for k in Batch._fields))
    batch = tuple(batch)
    if len(batch) not in (4, 5):
        raise ValueError("get_batch must return (tokens, position_ids, attention_mask, "
                         f"loss_mask[, packed_seq_params]) or a mapping, got {len(batch)} "
                         "values")
    return Batch(*batch)


def _batch(get_batch: GetBatch, data_iterator) -> tuple:
    """``(tokens, position_ids, attention_mask, loss_mask, packed_seq_params)`` of the next
    micro-batch (:func:`read_batch`, one teacher: a ``teacher_index`` must be all 0)."""
    batch = read_batch(get_batch, data_iterator)
    if batch.teacher_index is not None and bool((batch.teacher_index != 0).any()):
        raise ValueError("get_batch's teacher_index routes tokens to teachers other than 0, "
                         "but one teacher model was given (several teachers: a list of "
                         "per-teacher chunk lists, [[teacher_0], [teacher_1], ...])")
    return tuple(batch[:5])


def teacher_routing(batch: Batch, n_teachers: int, *, cp_group=None) -> torch.Tensor:
    """The micro-batch's routing as ``[b, s]`` int64 over this context-parallel rank's
    positions (``batch.tokens``' shape), from any of :class:`Batch`'s ``teacher_index``
    layouts; checked (type, shape, values in ``[0, n_teachers)``) with ``ValueError`` /
    ``TypeError`` naming ``teacher_index`` and the sizes."""
    raw = batch.teacher_index
    if raw is None:
        raise ValueError(f"several teachers ({n_teachers}): get_batch must return a mapping "
                         "with teacher_index ([b], [b, s] or [b, s * cp]) for every "
                         "micro-batch")
    if not isinstance(raw, torch.Tensor):
        raise TypeError(f"teacher_index must be a torch.Tensor, got {type(raw).__name__}")
    if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
        raise TypeError(f"teacher_index must hold integer teacher numbers (int64), got dtype "
                        f"{raw.dtype}")
    b, s = batch.tokens.shape[0], batch.tokens.shape[-1]
    cp_size, cp_rank = context_parallel_layout(cp_group)
    full = s * cp_size
    packed = batch.packed_seq_params
    bounds = None if packed is None else _cu_seqlens(packed, padded=True).cpu()
    cut = False
    if raw.dim() == 1 and bounds is not None and raw.numel() == bounds.numel() - 1:
        index = raw.to("cpu", torch.int64).repeat_interleave(bounds.diff()).view(1, -1)
        cut = True
    elif raw.dim() == 1 and raw.numel() == b:
        index = raw.view(b, 1).expand(b, s)
    elif raw.dim() == 2 and raw.shape[0] == b and raw.shape[1] in (s, full):
        index, cut = raw, raw.shape[1] != s
    else:
        per_packed = ("" if bounds is None else
                      f", [{bounds.numel() - 1}] (one per packed sequence)")
        whole = f" or [{b}, {full}] (the whole sequence, {cp_size} context-parallel ranks)" \
            if cp_size > 1 else ""
        raise ValueError(f"teacher_index shape {tuple(raw.shape)} fits none of [{b}] (one "
                         f"teacher per sequence){per_packed}, [{b}, {s}] (per token, this "
                         f"rank's positions like loss_mask){whole}")
    if cut and index.shape[1] != full:
        raise ValueError(f"teacher_index covers {index.shape[1]} positions but the packed "
                         f"row has {full} ({cp_size} ranks x {s})")
    if cut and cp_size > 1:
        keep = context_parallel_index(full, cp_size, cp_rank, cu_seqlens_padded=bounds,
                                      device=index.device)
        index = index.index_select(1, keep)
    index = index.to(batch.tokens.device, torch.int64)
    bad = (index < 0) | (index >= n_teachers)
    if bool(bad.any()):
        raise ValueError(f"teacher_index values must be in [0, {n_teachers}) ({n_teachers} "
                         f"teachers), got {index[bad].unique()[:5].tolist()}")
    return index


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


def teacher_list(teacher) -> list[list] | None:
    """Several teachers, each as its list of model chunks; None for one teacher.

    One teacher is a model or the list of its virtual-stage chunks (megatron's
    ``get_model`` returns such a list even without virtual stages). Several teachers are a
    list of teachers of which at least one is itself a list: ``[[t0], [t1]]``,
    ``[t0_chunks, t1_chunks]`` (a bare model entry counts as a one-chunk teacher).
    """
    if not isinstance(teacher, (list, tuple)) or \
            not any(isinstance(t, (list, tuple)) for t in teacher):
        return None
    out = [list(t) if isinstance(t, (list, tuple)) else [t] for t in teacher]
    for j, chunks in enumerate(out):
        if not chunks:
            raise ValueError(f"teacher {j}: an empty list of model chunks")
    if len({len(c) for c in out}) > 1:
        raise ValueError(f"teachers differ in model chunks: {[len(c) for c in out]} (every "
                         "teacher has the student's virtual pipeline stages)")
    return out


def teacher_forward_step(get_batch: GetBatch) -> Callable:
    """A ``forward_step_func`` for a frozen teacher's ``forward_only`` schedule.

    Every stage returns ``(hidden, None)``: ``hidden`` is :func:`gpt_hidden_states`
    (``model(...)`` with :func:`hidden_states_processor` where megatron-core has the
    ``output_processor`` hook; on the last stage the final-norm output, ``[s, b, h_t]`` or
    ``[s / tp, b, h_t]`` under sequence parallelism), and with no loss function megatron's
    schedule keeps the last stage's output of every micro-batch and returns them in order.
    ``packed_seq_params`` from ``get_batch`` reach the teacher.
    """
    def forward_step(data_iterator, model):
        tokens, position_ids, attention_mask, _, packed = _batch(get_batch, data_iterator)
        return gpt_hidden_states(model, tokens, position_ids, attention_mask, packed), None
    return forward_step


def _stored_forward_step(data_iterator, model):
    """:func:`teacher_forward_step` over :class:`Batch` es already read."""
    batch = next(data_iterator)
    return gpt_hidden_states(model, batch.tokens, batch.position_ids, batch.attention_mask,
                             batch.packed_seq_params), None


def teacher_hidden_states(forward_backward_func: Callable, teacher, data_iterator,
                          get_batch: GetBatch, *, num_microbatches: int, seq_length: int,
                          micro_batch_size: int) -> list:
    """Run the frozen teacher(s) over one step's micro-batches with megatron's schedule.

    Design: the teacher has the student's pipeline layout and runs its own
    ``forward_only=True`` schedule (under ``torch.no_grad``) before the student's step; the
    last stage keeps one hidden-state tensor per micro-batch, ``num_microbatches * s/tp * b
    * h_t`` values, never ``[s, b, V/tp]`` logits. The teacher thus costs one extra forward
    pipeline (with its own bubble) per step and no change to the student's schedule or
    its p2p tensors (whose shape is the student's hidden size). Sending the teacher's
    activations alongside the student's would need a custom p2p shape and entangle the
    two models in one schedule; putting the whole teacher on the last stage would cost
    that stage all the teacher's weights.

    Several teachers (``teacher`` a list of per-teacher chunk lists, :func:`teacher_list`;
    each its own GPTModel with its own hidden size and layers, the student's pipeline
    layout): the step's micro-batches are read once here (``get_batch`` on this stage;
    a mapping with ``teacher_index``, see :class:`Batch`), and each teacher runs its own
    ``forward_only`` schedule over the micro-batches that route at least one token to it,
    in order: a teacher no micro-batch routes to costs nothing. Which micro-batches those
    are is agreed over the pipeline, tensor- and context-parallel groups (one small
    all-reduce of a ``[n_teachers, num_microbatches]`` table: stages whose ``get_batch``
    has no ``teacher_index``, e.g. the middle ones, learn it there, and the context-parallel
    ranks, which see different positions, run the same micro-batches). Under the
    interleaved schedule a teacher's count is rounded up to one megatron accepts (a
    multiple of ``microbatch_group_size_per_vp_stage``, or a remainder of at least the
    pipeline size) with the earliest micro-batches it skipped, whose outputs are dropped.

    Args:
        forward_backward_func: ``megatron.core.pipeline_parallel.get_forward_backward_func()``.
        teacher: the teacher GPTModel (unwrapped or wrapped); its config holds the pipeline
            settings (``pipeline_dtype``, ``hidden_size``). With virtual pipeline stages
            (interleaved schedule), the list of its model chunks. Several teachers: a list
            of per-teacher chunk lists (``[[t0], [t1]]``).
        data_iterator: yields the step's micro-batches, the same ones, in the same order, as
            the student's iterator (with virtual pipeline stages: one such iterator per
            model chunk, as megatron's interleaved schedule takes them). Several teachers
            share it: it is read ``num_microbatches`` times (per chunk) here.
        get_batch: see :func:`eaopd_forward_step`.
        num_microbatches, seq_length, micro_batch_size: as for the student's schedule.
    Returns:
        One teacher: on the last pipeline stage, ``num_microbatches`` tensors ``[s, b,
        h_t]`` (``[s / tp, b, h_t]`` under sequence parallelism; ``s`` this
        context-parallel rank's tokens) in the teacher's dtype, in micro-batch order (with
        virtual stages: the outputs of the last model chunk, which the interleaved schedule
        runs in micro-batch order); ``[]`` elsewhere. Several teachers: one such list per
        teacher, with None for the micro-batches that route no token to it (``[]`` per
        teacher elsewhere).
    """
    several = teacher_list(teacher)
    if several is not None:
        return _several_hidden_states(forward_backward_func, several, data_iterator,
                                      get_batch, num_microbatches, seq_length,
                                      micro_batch_size)
    if isinstance(teacher, (list, tuple)) and len(teacher) > 1 and \
            not isinstance(data_iterator, (list, tuple)):
        raise ValueError(f"teacher is a list of {len(teacher)} model chunks (virtual pipeline "
                         "stages) but data_iterator is one iterator (one per chunk); for "
                         "several teachers give a list of per-teacher chunk lists, "
                         "[[teacher_0], [teacher_1], ...]")
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


def _model_parallel_groups() -> list:
    """megatron's pipeline, tensor- and context-parallel groups with more than one rank
    (none when its parallel state is not initialised)."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return []
    if not ps.model_parallel_is_initialized():
        return []
    import torch.distributed as dist
    groups = []
    for get in (ps.get_pipeline_model_parallel_group, ps.get_tensor_model_parallel_group,
                ps.get_context_parallel_group):
        g = get()
        for one in (g if isinstance(g, (list, tuple)) else [g]):
            if one is not None and dist.get_world_size(one) > 1:
                groups.append(one)
    return groups


def _agree_max(table: torch.Tensor) -> torch.Tensor:
    """``table``'s element-wise max over the model-parallel ranks (see
    :func:`_model_parallel_groups`; the max over a product of groups, group by group)."""
    groups = _model_parallel_groups()
    if not groups:
        return table
    import torch.distributed as dist
    device = "cpu"
    if torch.cuda.is_available() and dist.get_backend(groups[0]) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    out = table.to(device)
    for g in groups:
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=g)
    return out.cpu()


def _interleaved_run(chosen: list[int], total: int, chunk) -> list[int]:
    """``chosen`` micro-batches plus the earliest others until megatron's interleaved
    schedule accepts the count (its ``microbatch_group_size_per_vp_stage`` rule)."""
    config = _unwrap(chunk).config
    pp = config.pipeline_model_parallel_size
    group = getattr(config, "microbatch_group_size_per_vp_stage", None) or pp

    def accepted(m):
        return m >= group and (m % group == 0 or m % group >= pp)

    run, others = set(chosen), [i for i in range(total) if i not in chosen]
    while not accepted(len(run)) and others:
        run.add(others.pop(0))
    return sorted(run)


def _several_hidden_states(forward_backward_func, teachers, data_iterator, get_batch,
                           num_microbatches, seq_length, micro_batch_size) -> list:
    """:func:`teacher_hidden_states` for several teachers (``teachers``: chunk lists)."""
    n, m = len(teachers), num_microbatches
    iterators = list(data_iterator) if isinstance(data_iterator, (list, tuple)) \
        else [data_iterator]
    if len(teachers[0]) != len(iterators):
        raise ValueError(f"each teacher has {len(teachers[0])} model chunks but data_iterator "
                         f"is {len(iterators)} iterator(s) (one per virtual pipeline stage)")
    batches = [[read_batch(get_batch, it) for _ in range(m)] for it in iterators]
    # Rows 0..n-1: micro-batch i routes a token to teacher j; row n: the routing is known
    # here; row n + 1: this rank found a bad teacher_index (every rank raises).
    table = torch.zeros(n + 2, m, dtype=torch.int64)
    problem = None
    for i in range(m):
        for chunk_batches in batches:
            batch = chunk_batches[i]
            if batch.teacher_index is None:
                continue
            try:
                index = teacher_routing(batch, n)
            except (TypeError, ValueError) as exc:
                problem = problem or exc
                table[n + 1, i] = 1
                continue
            table[:n, i] |= (torch.bincount(index.reshape(-1).cpu(), minlength=n) > 0).long()
            table[n, i] = 1
    table = _agree_max(table)
    if problem is not None:
        raise problem
    if bool(table[n + 1].any()):
        raise ValueError("another model-parallel rank's get_batch returned a bad "
                         "teacher_index (see its error)")
    unknown = (table[n] == 0).nonzero().view(-1).tolist()
    if unknown:
        raise ValueError(f"several teachers ({n}): no pipeline stage's get_batch returned a "
                         f"teacher_index for micro-batches {unknown} of {m}")
    out = []
    for j, chunks in enumerate(teachers):
        chosen = table[j].nonzero().view(-1).tolist()
        last = _is_last_stage(chunks)
        hidden = [None] * m if last else []
        if chosen:
            run = _interleaved_run(chosen, m, chunks[-1]) if len(chunks) > 1 else chosen
            data = [iter([b[i] for i in run]) for b in batches]
            with torch.no_grad():
                result = forward_backward_func(
                    forward_step_func=_stored_forward_step,
                    data_iterator=data if len(chunks) > 1 else data[0],
                    model=chunks if len(chunks) > 1 else chunks[0],
                    num_microbatches=len(run),
                    seq_length=seq_length,
                    micro_batch_size=micro_batch_size,
                    forward_only=True,
                )
            if last:
                if len(result) != len(run):
                    raise RuntimeError(f"teacher {j}'s schedule returned {len(result)} "
                                       f"outputs for {len(run)} micro-batches")
                for i, h in zip(run, result, strict=True):
                    if i in chosen:
                        hidden[i] = h
        out.append(hidden)
    return out


def _routed_teacher_hidden(hidden: list, index: torch.Tensor, teachers: list,
                           sequence_parallel: bool, tp_group, micro: int):
    """The teacher lists of one micro-batch: each teacher's hidden-state rows of its
    routed tokens, in token order, and whether the student's must be gathered.

    ``hidden[j]``: teacher j's ``[s(/tp), b, h_j]`` or None; ``index``: ``[s, b]`` (the
    whole sequence of this context-parallel rank). Under sequence parallelism the op
    gathers each teacher's rows over the tensor-parallel ranks in rank order, which is
    token order (rank r holds positions ``[r s / tp, (r + 1) s / tp)``) when every rank's
    slice holds as many of teacher j's tokens as the others (per-sequence routing does);
    otherwise the slices are gathered here and the loss runs on the whole sequence.
    """
    n = len(hidden)
    s, b = index.shape
    counts = torch.bincount(index.reshape(-1), minlength=n).tolist()
    for j, h in enumerate(hidden):
        if counts[j] and h is None:
            raise RuntimeError(f"teacher {j} has no hidden states for micro-batch {micro} but "
                               f"get_batch routes {counts[j]} tokens to it (teacher_hidden_"
                               "states saw another routing)")
    local, gather = index, False
    if sequence_parallel:
        import torch.distributed as dist
        group = _tp_group(tp_group)
        tp_size, tp_rank = dist.get_world_size(group), dist.get_rank(group)
        if tp_size > 1:
            parts = index.reshape(tp_size, s // tp_size, b)
            per_rank = torch.stack([torch.bincount(p.reshape(-1), minlength=n) for p in parts])
            gather = not bool((per_rank == per_rank[0]).all())
            local = index if gather else parts[tp_rank]
    out = []
    for j, h in enumerate(hidden):
        weight = output_layer_weight(last_model_chunk(teachers[j]))
        if h is None:
            out.append(weight.new_empty(0, weight.shape[-1]))
            continue
        if gather:
            h = _all_gather_sequence(h, tp_group)
        if tuple(h.shape[:2]) != tuple(local.shape):
            raise ValueError(f"teacher {j}'s hidden states for micro-batch {micro} have shape "
                             f"{tuple(h.shape)}, expected [{local.shape[0]}, {local.shape[1]}, "
                             "h] (the student's tokens)")
        out.append(h if counts[j] == index.numel()
                   else h.reshape(-1, h.shape[-1])[local.reshape(-1) == j])
    return out, gather


def eaopd_forward_step(get_batch: GetBatch, teacher, teacher_hidden: Sequence,
                       *, sequence_parallel: bool = False, vocab_size: int | None = None,
                       **loss_options) -> Callable:
    """The student's ``forward_step_func`` for megatron-core's schedules.

    The last stage runs the student with :func:`gpt_forward` and
    :func:`eaopd_output_processor` (``model(..., output_processor=...)`` where megatron-core
    has the hook): the model's forward returns the summed loss on the student's and
    teacher's output-layer shards, the micro-batch's loss mask and the next of
    ``teacher_hidden``, and ``loss_func`` (:meth:`EaopdOutput.loss_func`) hands it to the
    schedule with its token count and logged values. Other stages return ``(hidden,
    None)`` (:func:`gpt_hidden_states`; the schedule sends ``hidden`` on and never calls a
    loss there).

    Several teachers (``teacher`` a list of per-teacher chunk lists): each micro-batch's
    ``teacher_index`` from ``get_batch`` (:class:`Batch`) is cut to this context-parallel
    rank's positions (:func:`teacher_routing`), and the loss gets, per teacher, the rows
    of its hidden states that route to it (an empty ``[0, h_j]`` for a teacher without
    tokens) and its output-layer shard, with ``teacher_index`` ``[s, b]``: each token is
    scored by its own teacher in the one fused call, and ``logged`` adds
    ``"teacher j <name>"`` pairs. Under sequence parallelism the routed rows stay this
    rank's slice when every rank's slice holds as many of each teacher's tokens
    (per-sequence routing); otherwise the student's and teachers' slices are gathered
    over the tensor-parallel group first (``EaopdOutput(gather_sequence=True)``).

    Args:
        get_batch: ``get_batch(data_iterator) -> (tokens, position_ids, attention_mask,
            loss_mask[, packed_seq_params])`` for one micro-batch: ``[b, s]`` int64 tokens
            and positions, the attention mask as for ``GPTModel.forward`` (or None),
            ``[b, s]`` 0/1 float loss mask, this context-parallel rank's part of each
            (``megatron.core.utils.get_batch_on_this_cp_rank`` /
            ``get_thd_batch_on_this_cp_rank``); optionally megatron's ``PackedSeqParams``
            for packed sequences (THD, ``b = 1``), passed to the student, the teacher and
            :func:`eaopd_loss_func`. Or a mapping with those keys and, for several
            teachers, ``teacher_index`` (:class:`Batch`). Called once per micro-batch on
            every stage.
        teacher: the teacher GPTModel, or the list of its virtual-stage chunks (for its
            output-layer shard on the last stage); several teachers: a list of per-teacher
            chunk lists (under tensor parallelism each teacher's output layer has the
            student's shard width).
        teacher_hidden: :func:`teacher_hidden_states` of the same micro-batches (used on
            the last stage only, in order; may be empty elsewhere); several teachers: its
            list of per-teacher lists.
        sequence_parallel, vocab_size, loss_options: as for :func:`eaopd_loss_func`
            (with several teachers, no teacher tensors or ``teacher_index`` there).
    Returns:
        ``forward_step(data_iterator, model) -> (output_tensor, loss_func | None)``. It
        raises ``RuntimeError`` if the last stage runs more micro-batches than there are
        teacher hidden states.
    """
    _check_loss_options(loss_options)
    several = teacher_list(teacher)
    if several is not None:
        return _several_forward_step(get_batch, several, teacher_hidden, sequence_parallel,
                                     vocab_size, loss_options)
    remaining = iter(teacher_hidden)

    def forward_step(data_iterator, model):
        tokens, position_ids, attention_mask, loss_mask, packed = _batch(get_batch,
                                                                         data_iterator)
        if not _is_last_stage(model):
            return gpt_hidden_states(model, tokens, position_ids, attention_mask,
                                     packed), None
        t_hidden = next(remaining, None)
        if t_hidden is None:
            raise RuntimeError("more micro-batches than teacher hidden states")
        out = EaopdOutput(t_hidden, output_layer_weight(last_model_chunk(teacher)),
                          sequence_parallel=sequence_parallel, vocab_size=vocab_size,
                          packed_seq_params=packed, **loss_options)
        loss_sum = gpt_forward(model, tokens, position_ids, attention_mask,
                               eaopd_output_processor, context=out, loss_mask=loss_mask,
                               packed_seq_params=packed)
        return loss_sum, out.loss_func
    return forward_step


_TEACHER_ARGS = ("teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logits",
                 "teacher_topk_logprobs", "teacher_topk_indices", "teacher_entropy",
                 "teacher_index")


def _several_forward_step(get_batch, teachers, teacher_hidden, sequence_parallel, vocab_size,
                          loss_options) -> Callable:
    """:func:`eaopd_forward_step` for several teachers (``teachers``: chunk lists)."""
    n = len(teachers)
    given = sorted(set(loss_options) & set(_TEACHER_ARGS))
    if given:
        raise TypeError(f"with several teacher models the teachers' tensors and the routing "
                        f"come from the models and get_batch, not {', '.join(given)}")
    if not isinstance(teacher_hidden, (list, tuple)) or len(teacher_hidden) != n or \
            not all(isinstance(h, (list, tuple)) for h in teacher_hidden):
        got = (f"{len(teacher_hidden)} entries" if isinstance(teacher_hidden, (list, tuple))
               else type(teacher_hidden).__name__)
        raise ValueError(f"teacher_hidden must hold one list per teacher ({n} teachers, as "
                         f"teacher_hidden_states returns them), got {got}")
    micro = iter(range(1 << 62))
    cp_group, tp_group = loss_options.get("cp_group"), loss_options.get("tp_group")

    def forward_step(data_iterator, model):
        batch = read_batch(get_batch, data_iterator)
        packed = batch.packed_seq_params
        if not _is_last_stage(model):
            return gpt_hidden_states(model, batch.tokens, batch.position_ids,
                                     batch.attention_mask, packed), None
        i = next(micro)
        index = teacher_routing(batch, n, cp_group=cp_group).transpose(0, 1)  # [s, b]
        short = [j for j in range(n) if i >= len(teacher_hidden[j])]
        if short:
            raise RuntimeError(f"more micro-batches than teacher hidden states (teachers "
                               f"{short} have {[len(teacher_hidden[j]) for j in short]})")
        t_hidden, gather = _routed_teacher_hidden(
            [h[i] for h in teacher_hidden], index, teachers, sequence_parallel, tp_group, i)
        out = EaopdOutput(t_hidden, [output_layer_weight(last_model_chunk(t)) for t in teachers],
                          sequence_parallel=sequence_parallel and not gather,
                          vocab_size=vocab_size, gather_sequence=gather,
                          packed_seq_params=packed, teacher_index=index, **loss_options)
        loss_sum = gpt_forward(model, batch.tokens, batch.position_ids, batch.attention_mask,
                               eaopd_output_processor, context=out, loss_mask=batch.loss_mask,
                               packed_seq_params=packed)
        return loss_sum, out.loss_func
    return forward_step
