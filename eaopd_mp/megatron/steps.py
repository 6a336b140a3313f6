"""The student's ``forward_step_func`` for megatron-core's pipeline schedules
(:func:`eaopd_forward_step`): one teacher, or several routed per token."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .batch import GetBatch, _batch, read_batch
from .forward import (
    _is_last_stage,
    gpt_forward,
    gpt_hidden_states,
    last_model_chunk,
    output_layer_weight,
)
from .loss import EaopdOutput, _check_loss_options, eaopd_output_processor
from .teachers import _routed_teacher_hidden, teacher_list, teacher_routing


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
