"""The loss in megatron-core's conventions: ``loss_func``'s ``(loss_sum, num_tokens,
logged)`` triple (:func:`eaopd_loss_func`) and ``GPTModel.forward``'s output processor
(:func:`eaopd_output_processor`, :class:`EaopdOutput`), over the vocab-parallel fused loss
(:func:`eaopd_mp.parallel.fused_linear_vocab_parallel_eaopd_loss`)."""

from __future__ import annotations

import torch

from ..errors import surfaced
from ..parallel import fused_linear_vocab_parallel_eaopd_loss
from . import layouts
from .forward import _check_output_config

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


def _slice_served_teacher(loss_options: dict, num_tokens: int, packed_seq_params,
                          cp_group) -> dict:
    """``loss_options`` with the served teacher's whole-sequence ``teacher_topk_logprobs``
    / ``teacher_topk_indices`` ``[s, b, k]`` and ``teacher_entropy`` ``[s, b]`` cut to this
    context-parallel rank's ``num_tokens`` positions (:func:`slice_for_context_parallel`).
    A sequence length other than ``num_tokens * cp`` raises ``ValueError``. Several
    teachers' lists (their routed rows) are this rank's already and pass through."""
    cp_size, _ = layouts.context_parallel_layout(cp_group)
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
        out[name] = layouts.slice_for_context_parallel(t, 0, cp_group=cp_group,
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
        loss_mask = layouts.packed_loss_mask(loss_mask, packed_seq_params, cp_group=cp_group)
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
        teacher_hidden, teacher_weight, sequence_parallel, vocab_size, tp_group, loss_options:
            as for :func:`eaopd_loss_func` (checked here, before the forward); with several
            teachers lists and ``teacher_index`` in ``loss_options``.
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
    from ..tp import default_group
    return default_group()


def _all_gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """The ranks' ``x`` concatenated along dim 0, in rank order (no gradient): the
    combiner's all-gather (:meth:`eaopd_mp.tp.TPCombiner.all_gather`)."""
    from ..tp import TPCombiner
    return TPCombiner(_tp_group(group).group_name).all_gather(x.detach())
