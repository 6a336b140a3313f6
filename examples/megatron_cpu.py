"""Tiny megatron-core GPT models on CPU (gloo) or GPU (NCCL), for examples and tests.

megatron-core (0.16.1 and 0.19.2 tested) assumes CUDA in a few places; :func:`init_parallel`
works around them on a machine without a GPU (nothing here is needed, or done, when CUDA
is available):

* ``torch.cuda.current_device()`` (sequence-parallel gather buffers, GPTModel, p2p shape
  buffers) is redirected to the CPU;
* ``torch.cuda.current_stream()`` (megatron-core >= 0.19's DDP ``start_grad_sync`` waits
  on it for CUDA-graph gradient events) returns a stream that has nothing to wait for;
* the modules that allocate small tensors with ``device="cuda"`` (the schedules'
  ``total_num_tokens``; the optimizer's loss scale and the grad-norm buffers in
  ``megatron.core.optimizer.{optimizer, clip_grads}`` and ``megatron.core.utils``) see a
  ``torch`` whose ``tensor`` / ``zeros`` / ``ones`` / ``empty`` put ``"cuda"`` tensors on
  the CPU; everything else in those modules is the real ``torch``;
* ``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor`` gradients: the
  optimizer gets the same scaling without the assertion (:func:`clip_grad_by_total_norm`);
* :func:`tiny_gpt` turns off ``batch_p2p_sync`` (a ``torch.cuda.synchronize()`` after
  every pipeline send/receive) and ``batch_p2p_comm`` (gloo pairs a batch's messages to
  one peer in posting order: with 2 stages the interleaved schedule would swap
  activations and gradients);
* the model-parallel RNG tracker is created without CUDA RNG states (dropout is off in
  the tiny models, so the tracker's forks never matter);
* the local layer spec's torch norm refuses ``sequence_parallel=True`` (it would not mark
  its parameters), so the models use :class:`LayerNorm`, which does;
* the causal mask that megatron builds on its own is a CUDA tensor, so callers pass
  :func:`causal_mask`.

Usage (every rank, under ``torchrun`` or with a process group already initialised)::

    device = init_parallel(tp_size=2)
    model = tiny_gpt(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                     max_seq_len=16, sequence_parallel=True).to(device)
    hidden = gpt_hidden_states(model, tokens, positions(tokens), causal_mask(16, device))

``gpt_hidden_states`` and ``output_layer_weight`` are :mod:`eaopd_mp.megatron`'s,
re-exported. Tests import this file with ``sys.path.insert(0, "examples")``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings

import torch
import torch.distributed as dist

# Environment notices, not problems: no Transformer Engine / Apex here, no CUDA streams to
# tune, and torch 2.13 deprecating collectives that megatron-core 0.16 calls.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 ".*CUDA_DEVICE_MAX_CONNECTIONS", "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                        category=FutureWarning)

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_block import (  # noqa: E402
    TransformerBlock,
    TransformerBlockSubmodules,
)
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from eaopd_mp.megatron import gpt_hidden_states, output_layer_weight  # noqa: E402

__all__ = [
    "LayerNorm",
    "broadcast_tp",
    "causal_mask",
    "destroy_parallel",
    "gpt_hidden_states",
    "init_parallel",
    "output_layer_weight",
    "positions",
    "tiny_gpt",
    "tiny_gpt_chunks",
]


class _CpuTorch:
    """``torch`` for a megatron module on a machine without CUDA: the factories put
    tensors asked for on ``"cuda"`` on the CPU; every other attribute is torch's own."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _on_cpu(factory):
        def make(*args, device=None, **kwargs):
            if device is not None and torch.device(device).type == "cuda":
                device = "cpu"
            return factory(*args, device=device, **kwargs)
        return make


for _name in ("tensor", "zeros", "ones", "empty"):
    setattr(_CpuTorch, _name, staticmethod(_CpuTorch._on_cpu(getattr(torch, _name))))


class _CpuStream:
    """``torch.cuda.current_stream()`` on a machine without CUDA: the CPU runs one op at a
    time, so there is never anything to wait for."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def clip_grad_by_total_norm(parameters, max_norm: float, total_norm: float,
                            use_decoupled_grad: bool = False) -> None:
    """megatron-core's ``clip_grad_by_total_norm_fp32`` without its CUDA type assertion:
    scales the gradients in place by ``max_norm / (total_norm + 1e-6)`` when that is < 1."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def use_cpu() -> None:
    """Apply the CPU shims listed above, for this whole process, when there is no GPU."""
    if torch.cuda.is_available():
        return
    from megatron.core import utils as core_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as core_optimizer
    from megatron.core.pipeline_parallel import schedules

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    for module in (schedules, core_optimizer, clip_grads, core_utils):
        module.torch = _CpuTorch()
    core_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm


def init_parallel(tp_size: int = 2, seed: int = 0, pp_size: int = 1, cp_size: int = 1,
                  vp_size: int | None = None) -> torch.device:
    """Initialise torch.distributed (if needed), megatron's parallel state and RNG.

    Uses NCCL and this rank's GPU when CUDA is available, gloo and the CPU otherwise; the
    process group is read from torchrun's environment unless one already exists.

    Args:
        tp_size, pp_size, cp_size: the tensor-, pipeline- and context-parallel sizes;
            their product must divide the world size (the rest is data parallelism).
        vp_size: virtual pipeline stages per pipeline rank (interleaved schedule), or None.
        seed: seeds torch (identically on every rank, so ``use_cpu_initialization``
            builds the same full weights everywhere before sharding them).
    Returns:
        The device this rank computes on.
    """
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        use_cpu()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size,
                                             pipeline_model_parallel_size=pp_size,
                                             virtual_pipeline_model_parallel_size=vp_size,
                                             context_parallel_size=cp_size)
    torch.manual_seed(seed)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True,
                                                      force_reset=True)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def destroy_parallel() -> None:
    """Undo :func:`init_parallel`'s megatron state (the process group is left alone)."""
    parallel_state.destroy_model_parallel()


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with megatron's norm constructor; sequence-parallel aware.

    Under sequence parallelism each rank normalises its slice of the sequence, so the
    gradients of the (replicated) weight and bias are partial sums: they are marked
    ``sequence_parallel`` for ``finalize_model_grads``' all-reduce over the
    tensor-parallel group, as megatron's fused and Transformer Engine norms do.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **unused):
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


def block_spec(num_layers: int, attention: bool = True) -> ModuleSpec:
    """The local (megatron-core only) GPT block spec with :class:`LayerNorm` everywhere,
    for ``num_layers`` layers (this pipeline stage's). ``attention=False`` leaves out
    self-attention (norm, MLP and residual only): every layer is position-wise, so any
    split of the tokens (context parallelism, packed sequences) computes exactly what the
    whole sequence does; megatron's local attention refuses both without Transformer
    Engine."""
    layer = get_gpt_layer_local_spec()
    sub = dict(input_layernorm=LayerNorm, pre_mlp_layernorm=LayerNorm)
    if not attention:
        sub.update(input_layernorm=IdentityOp, self_attention=IdentityOp,
                   self_attn_bda=IdentityFuncOp)
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, **sub))
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * num_layers,
                                              layer_norm=LayerNorm),
    )


def tiny_gpt(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
             max_seq_len: int, sequence_parallel: bool = False,
             params_dtype: torch.dtype = torch.float32, *, attention: bool = True,
             vp_stage: int | None = None) -> GPTModel:
    """A GPT with no dropout, learned absolute positions, untied output layer: this
    rank's tensor-parallel shard of this pipeline stage's layers.

    Built on the CPU from the global torch seed (``use_cpu_initialization``), so with one
    pipeline stage the same seed gives the same full model whatever the tensor-parallel
    size. Call after :func:`init_parallel`; ``vocab_size`` (the padded one) must divide by
    the tensor-parallel size, ``num_layers`` by the pipeline-parallel size, and the
    sequence length by the tensor-parallel size under sequence parallelism.
    ``params_dtype=torch.bfloat16`` makes a bf16 model (``config.bf16``) for megatron's
    ``Float16Module``. The context-parallel size is megatron's; ``attention=False`` is
    :func:`block_spec`'s position-wise model (the only one that runs context parallelism
    or packed sequences without Transformer Engine). With virtual pipeline stages,
    ``vp_stage`` picks the model chunk to build (:func:`tiny_gpt_chunks` builds them all).
    """
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    if num_layers % (pp_size * vp_size):
        raise ValueError(f"{num_layers} layers do not split into {pp_size} pipeline stages "
                         f"x {vp_size} virtual stages")
    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        ffn_hidden_size=4 * hidden_size,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=pp_size,
        virtual_pipeline_model_parallel_size=vp_size if vp_size > 1 else None,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        pipeline_dtype=params_dtype,
        sequence_parallel=sequence_parallel,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # Megatron-LM's default: a pipeline stage frees its output once it is sent.
        deallocate_pipeline_outputs=True,
    )
    if not torch.cuda.is_available():
        config.batch_p2p_sync = False  # it calls torch.cuda.synchronize()
        # Batched p2p posts a stage's send to the previous stage before its send to the
        # next; with 2 stages both are the same peer and gloo pairs a batch's messages in
        # posting order, so the interleaved schedule's steady state would swap activations
        # and gradients. Unbatched p2p orders them by even/odd rank and keeps the two
        # directions on different groups.
        config.batch_p2p_comm = False
    extra = {} if vp_stage is None else {"vp_stage": vp_stage}
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(num_layers // (pp_size * vp_size), attention),
        vocab_size=vocab_size,
        max_sequence_length=max_seq_len,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                           vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                           vp_stage=vp_stage),
        share_embeddings_and_output_weights=False,
        **extra,
    )


def tiny_gpt_chunks(*args, **kwargs) -> list[GPTModel]:
    """:func:`tiny_gpt`'s model chunks for every virtual pipeline stage of this pipeline
    rank (interleaved schedule), in order."""
    vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    return [tiny_gpt(*args, vp_stage=i, **kwargs) for i in range(vp_size)]


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """megatron's ``[1, 1, s, s]`` boolean attention mask (True = not attended)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]


def cp_batch(batch: dict) -> dict:
    """``megatron.core.utils.get_batch_on_this_cp_rank`` on either stack: megatron-core
    0.19 added a required ``is_hybrid_cp`` argument (False: the plain zig-zag split) and
    an explicit ``cp_group`` (its default, None, would mean the whole world)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(
            batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group())
    return get_batch_on_this_cp_rank(batch)


def positions(tokens: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` position ids ``0 .. s-1`` for ``[b, s]`` tokens."""
    return torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)


def broadcast_tp(tensor: torch.Tensor) -> torch.Tensor:
    """Give every rank of the tensor-parallel group its first rank's ``tensor`` (in place)."""
    dist.broadcast(tensor, parallel_state.get_tensor_model_parallel_src_rank(),
                   group=parallel_state.get_tensor_model_parallel_group())
    return tensor
