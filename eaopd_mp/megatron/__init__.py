"""Megatron-LM adapter: the vocab-parallel fused loss as a ``forward_step`` loss function,
and forward-step factories for megatron-core's pipeline schedules.

The package's parts: :mod:`~eaopd_mp.megatron.forward` (the GPTModel forward without its
logits), :mod:`~eaopd_mp.megatron.layouts` (context parallelism, packed sequences),
:mod:`~eaopd_mp.megatron.batch` (the micro-batch protocol), :mod:`~eaopd_mp.megatron.loss`
(``loss_func`` and the output processor), :mod:`~eaopd_mp.megatron.teachers` (frozen teachers
under the schedules, several teachers' routing) and :mod:`~eaopd_mp.megatron.steps` (the
student's forward step). Every public name is importable from ``eaopd_mp.megatron``.

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

from .batch import Batch, GetBatch, read_batch
from .forward import (
    gpt_forward,
    gpt_hidden_states,
    hidden_states_processor,
    last_model_chunk,
    output_layer_weight,
    uses_output_processor,
)
from .layouts import (
    context_parallel_index,
    context_parallel_layout,
    packed_loss_mask,
    slice_for_context_parallel,
)
from .loss import (
    LOGGED_STATS,
    EaopdOutput,
    eaopd_loss_func,
    eaopd_output_processor,
    megatron_loss_triple,
)
from .steps import eaopd_forward_step
from .teachers import teacher_forward_step, teacher_hidden_states, teacher_list, teacher_routing

__all__ = [
    "LOGGED_STATS",
    "Batch",
    "EaopdOutput",
    "GetBatch",
    "context_parallel_index",
    "context_parallel_layout",
    "eaopd_forward_step",
    "eaopd_loss_func",
    "eaopd_output_processor",
    "gpt_forward",
    "gpt_hidden_states",
    "hidden_states_processor",
    "last_model_chunk",
    "megatron_loss_triple",
    "output_layer_weight",
    "packed_loss_mask",
    "read_batch",
    "slice_for_context_parallel",
    "teacher_forward_step",
    "teacher_hidden_states",
    "teacher_list",
    "teacher_routing",
    "uses_output_processor",
]
