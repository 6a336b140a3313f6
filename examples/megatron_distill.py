"""On-policy distillation of a megatron-core GPT with the vocab-parallel fused EAOPD loss,
trained through megatron-core's own machinery.

    torchrun --nproc-per-node 4 examples/megatron_distill.py --tp 2 --pp 2 --sequence-parallel

CPU and gloo by default (CUDA and NCCL when available). Tensor parallelism ``--tp``,
pipeline parallelism ``--pp``, data parallelism ``world / (tp * pp)``. Every optimizer
step, as Megatron-LM's ``train_step`` does it, runs ``get_forward_backward_func()`` over
``--micro-batches`` micro-batches of megatron's ``DistributedDataParallel`` model
(``no_sync_func``, ``finalize_model_grads_func`` and the optimizer's ``grad_scale_func``
wired into the model config, ``calculate_per_token_loss=True``), then steps an Adam
optimizer from ``get_megatron_optimizer``. ``--distributed-optimizer`` and ``--bf16``
switch on megatron's distributed optimizer and bf16 training (both need CUDA).

The teacher (2 layers, hidden 64) is first pre-trained that way, with cross entropy, on a
random Markov chain whose tokens have 1, 2, 4 or 8 equally likely successors, so its
entropy varies from token to token. The student (2 layers, hidden 32) then learns from it
on-policy: every step it samples continuations of short prompts itself (a
``forward_only`` schedule per sampled position), the frozen teacher runs a
``forward_only`` schedule over the step's micro-batches (:func:`eaopd_mp.megatron.
teacher_hidden_states`), and the student's schedule computes the loss on the positions
whose next token it sampled (:func:`eaopd_mp.megatron.eaopd_forward_step`). The loss works
on the output layers' vocabulary shards and never gathers logits; only sampling does.
``--teacher-topk K`` scores with a served teacher instead: only the teacher's top-K
log-probabilities and ids (made here as a server would, ``served_topk``) reach the loss
(``--topk-tail bucket|renormalize``).

The vocabulary has 60 tokens, padded as megatron pads it; the loss is told the real size.
Each step line shows the loss (nats per token, megatron's token-weighted mean over the
global batch), the teacher entropy and forward-KL weight averaged over the loss tokens,
both KLs, and the fraction of the student's sampled transitions that the chain allows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from importlib import metadata

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torchrun_args import Parser  # noqa: E402

# megatron_cpu before megatron: it filters megatron's environment warnings before they are
# raised.
from megatron_cpu import (  # noqa: E402
    broadcast_tp,
    causal_mask,
    cp_batch,
    destroy_parallel,
    init_parallel,
    positions,
    tiny_gpt_chunks,
)

# isort: split
from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402

from eaopd_mp.megatron import (  # noqa: E402
    EaopdOutput,
    context_parallel_index,
    eaopd_forward_step,
    eaopd_output_processor,
    gpt_forward,
    gpt_hidden_states,
    last_model_chunk,
    output_layer_weight,
    slice_for_context_parallel,
    teacher_hidden_states,
    uses_output_processor,
)

# The two models: (hidden size, layers per virtual stage, attention heads).
TEACHER, STUDENT = (64, 2, 4), (32, 2, 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def parser() -> Parser:
    p = Parser(prog="megatron_distill.py", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="distillation steps")
    p.add_argument("--teacher-steps", type=int, default=200,
                   help="teacher pre-training steps")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--cp", type=int, default=1,
                   help="context-parallel size (attention-free models without Transformer "
                   "Engine: the Markov chain needs none)")
    p.add_argument("--packed", action="store_true",
                   help="pack each micro-batch's sequences into one THD row "
                   "(PackedSeqParams; attention-free models without Transformer Engine)")
    p.add_argument("--virtual-pipeline", type=int, default=None, metavar="V",
                   help="virtual pipeline stages per pipeline rank (interleaved schedule; "
                   "needs --pp >= 2)")
    p.add_argument("--micro-batches", type=int, default=4,
                   help="micro-batches per step and data-parallel rank")
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="megatron's DistributedOptimizer (CUDA only)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 models (Float16Module) with fp32 main weights (CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16,
                   help="global batch: sequences per step over all data-parallel ranks")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-2, help="student learning rate (Adam)")
    p.add_argument("--teacher-topk", type=int, default=None, metavar="K",
                   help="score with a served teacher: only its top-K log-probabilities and "
                   "ids reach the loss (as from vLLM/SGLang), not its hidden states")
    p.add_argument("--topk-tail", choices=("bucket", "renormalize"), default="bucket",
                   help="the top-k loss's target (eaopd_mp's topk_tail)")
    return p


def impossible(args: argparse.Namespace, world: int) -> str | None:
    """Why these flags cannot run on ``world`` processes (one line), or None: checked
    before any process group or model exists, so that a bad flag is one clear message
    instead of an error from deep inside megatron."""
    heads = min(TEACHER[2], STUDENT[2])
    at_least = {"--steps": (args.steps, 1), "--teacher-steps": (args.teacher_steps, 0),
                "--tp": (args.tp, 1), "--pp": (args.pp, 1), "--cp": (args.cp, 1),
                "--micro-batches": (args.micro_batches, 1),
                "--batch-size": (args.batch_size, 1), "--prompt-len": (args.prompt_len, 1),
                "--virtual-pipeline": (args.virtual_pipeline, 1),
                "--teacher-topk": (args.teacher_topk, 1)}
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            return f"{flag} must be at least {low}, got {value}"
    if args.lr <= 0:
        return f"--lr must be positive, got {args.lr}"
    if args.vocab_size < 8:
        return f"--vocab-size must be at least 8 (the chain gives a token up to 8 " \
               f"successors), got {args.vocab_size}"
    if args.teacher_topk and args.teacher_topk > args.vocab_size:
        return f"--teacher-topk {args.teacher_topk} exceeds the vocabulary " \
               f"(--vocab-size {args.vocab_size})"
    if heads % args.tp:
        return f"--tp {args.tp} does not divide the models' attention heads ({heads} in the " \
               "student): use --tp 1 or 2"
    if STUDENT[1] % args.pp:
        return f"--pp {args.pp} does not divide the models' {STUDENT[1]} layers (per " \
               "virtual stage): use --pp 1 or 2"
    if args.sequence_parallel and args.tp < 2:
        return "--sequence-parallel needs --tp 2 (it splits the sequence over the " \
               "tensor-parallel ranks)"
    if args.virtual_pipeline and args.pp < 2:
        return "--virtual-pipeline needs --pp 2"
    if args.virtual_pipeline and args.micro_batches % args.pp:
        return f"--micro-batches {args.micro_batches} must be a multiple of --pp {args.pp} " \
               "with --virtual-pipeline (megatron's interleaved schedule)"
    cp_chunks = 2 * args.cp if args.cp > 1 else 1
    slices = args.tp if args.sequence_parallel else 1
    if args.seq_len % (cp_chunks * slices):
        what = " of ".join(w for w, n in (("2 x --cp chunks", cp_chunks),
                                          ("--tp sequence-parallel slices", slices)) if n > 1)
        return f"--seq-len {args.seq_len} must be a multiple of {cp_chunks * slices} ({what})"
    if args.prompt_len >= args.seq_len:
        return f"--prompt-len {args.prompt_len} must be below --seq-len {args.seq_len} " \
               "(the student samples the rest)"
    if (args.bf16 or args.distributed_optimizer) and not torch.cuda.is_available():
        return "--bf16 and --distributed-optimizer need CUDA (megatron's distributed " \
               "optimizer does not build on CPU)"
    model_parallel = args.tp * args.pp * args.cp
    if world % model_parallel:
        return f"--tp {args.tp} x --pp {args.pp} x --cp {args.cp} = {model_parallel} does " \
               f"not divide the {world} processes (torchrun --nproc-per-node)"
    dp = world // model_parallel
    if args.batch_size % (dp * args.micro_batches):
        return f"--batch-size {args.batch_size} does not split into {dp} data-parallel " \
               f"ranks x {args.micro_batches} micro-batches"
    if "RANK" not in os.environ:
        return "run it with torchrun: torchrun --nproc-per-node N " \
               "examples/megatron_distill.py ..."
    return None


# ----------------------------------------------------------------------------- data


def markov_chain(vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """``[V, V]`` transition matrix: token i moves to 1, 2, 4 or 8 random successors,
    uniformly (entropy 0, log 2, log 4 or log 8)."""
    probs = torch.zeros(vocab_size, vocab_size)
    fanout = torch.tensor([1, 2, 4, 8])[torch.randint(4, (vocab_size,), generator=generator)]
    for i, k in enumerate(fanout.tolist()):
        succ = torch.randperm(vocab_size, generator=generator)[:k]
        probs[i, succ] = 1.0 / k
    return probs


def sample_chain(chain: torch.Tensor, batch: int, length: int,
                 generator: torch.Generator) -> torch.Tensor:
    """``[b, length]`` token sequences of the chain from uniform start tokens."""
    tokens = torch.empty(batch, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(chain.shape[0], (batch,), generator=generator)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(chain[tokens[:, t - 1]], 1, generator=generator)[:, 0]
    return tokens


def legal_fraction(chain: torch.Tensor, tokens: torch.Tensor, start: int) -> float:
    """Fraction of the transitions into ``tokens[:, start:]`` the chain allows, over all
    data-parallel ranks."""
    prev, nxt = tokens[:, start - 1:-1].cpu(), tokens[:, start:].cpu()
    counts = torch.tensor([(chain[prev, nxt] > 0).sum().item(), nxt.numel()],
                          dtype=torch.float64, device=tokens.device)
    dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return (counts[0] / counts[1]).item()


def attention_free(args) -> bool:
    """Context parallelism and packed sequences need Transformer Engine's attention; without
    it (CPU) the models leave attention out (position-wise layers)."""
    return args.cp > 1 or args.packed


def micro_batches(tokens: torch.Tensor, loss_mask: torch.Tensor, n: int, args,
                  packed: bool = False, **extra: torch.Tensor) -> list[dict]:
    """Split ``[B, s]`` tokens and ``[B, s]`` loss mask (and ``extra`` ``[B, s]`` tensors,
    e.g. targets) into ``n`` micro-batches: dicts with ``tokens``, ``position_ids``,
    ``attention_mask``, ``loss_mask``.

    ``packed``: each micro-batch's sequences become one ``[1, b * s]`` row with per-sequence
    positions and megatron's ``PackedSeqParams`` (``packed``). Under context parallelism
    every tensor is cut to this rank's zig-zag chunks, as Megatron-LM's ``get_batch`` cuts
    them (``get_batch_on_this_cp_rank``; per sequence for packed rows).
    """
    mask = None if attention_free(args) else causal_mask(tokens.shape[1], tokens.device)
    out = []
    for i, (t, m) in enumerate(zip(tokens.chunk(n), loss_mask.chunk(n), strict=True)):
        batch = dict(tokens=t, position_ids=positions(t), loss_mask=m,
                     **{k: v.chunk(n)[i] for k, v in extra.items()})
        if packed:
            b, s = t.shape
            batch = {k: v.reshape(1, b * s) for k, v in batch.items()}
            cu = torch.arange(0, b * s + 1, s, dtype=torch.int32, device=t.device)
            batch["packed"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                                              cu_seqlens_kv=cu, max_seqlen_q=s,
                                              max_seqlen_kv=s)
        if args.cp > 1:
            packed_params = batch.pop("packed", None)
            if packed_params is None:
                batch = cp_batch(batch)
            else:  # megatron's THD split needs Transformer Engine; this is the same cut
                batch = {k: slice_for_context_parallel(v, 1, packed_seq_params=packed_params)
                         for k, v in batch.items()}
                batch["packed"] = packed_params
        batch["attention_mask"] = mask
        out.append(batch)
    return out


def get_batch(data_iterator):
    """``(tokens, position_ids, attention_mask, loss_mask[, packed_seq_params])`` of the
    next micro-batch."""
    batch = next(data_iterator)
    out = (batch["tokens"], batch["position_ids"], batch["attention_mask"], batch["loss_mask"])
    return out + ((batch["packed"],) if "packed" in batch else ())


def chunks(model) -> list:
    """The model's virtual-stage chunks (a list of one without virtual stages)."""
    return model if isinstance(model, list) else [model]


def is_last_stage(model) -> bool:
    """Whether this model chunk holds the output layer (the last virtual stage)."""
    while hasattr(model, "module"):
        model = model.module
    return bool(model.post_process)


# ----------------------------------------------------------------------------- megatron


def build_model(args, vocab_size: int, hidden: int, layers: int, heads: int):
    """This rank's stage of a tiny GPT, in bf16 inside megatron's ``Float16Module`` with
    ``--bf16``; ``calculate_per_token_loss`` set before DDP reads it. With
    ``--virtual-pipeline V`` the list of this rank's ``V`` chunks (``layers * V`` layers in
    all)."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    vp = args.virtual_pipeline or 1
    models = tiny_gpt_chunks(vocab_size, hidden, layers * vp, heads,
                             args.seq_len, args.sequence_parallel,
                             params_dtype=dtype, attention=not attention_free(args))
    out = []
    for model in models:
        model.config.calculate_per_token_loss = True
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        out.append(Float16Module(model.config, model) if args.bf16 else model)
    return out if args.virtual_pipeline else out[0]


def setup_training(model, args, lr: float):
    """Wrap ``model`` (or each of its virtual-stage chunks, given a list) in megatron's DDP,
    build its optimizer and wire the schedule's hooks into the model config, as
    Megatron-LM's ``setup_model_and_optimizer`` and ``train`` do. Returns ``(ddp_model,
    optimizer)``, ``ddp_model`` a list when ``model`` is one."""
    chunks = model if isinstance(model, list) else [model]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16,
        overlap_grad_reduce=True,
        use_distributed_optimizer=args.distributed_optimizer,
    )
    ddp_chunks = [
        # Megatron-LM: only the first chunk's buffers may start reducing early.
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=1.0,
                        bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else
                        torch.float32, use_distributed_optimizer=args.distributed_optimizer),
        ddp_chunks,
    )
    one = len(ddp_chunks) == 1
    for chunk in chunks:
        chunk.config.grad_scale_func = optimizer.scale_loss
        chunk.config.no_sync_func = (ddp_chunks[0].no_sync if one
                                     else [c.no_sync for c in ddp_chunks])
        # Megatron-LM's --align-grad-reduce
        chunk.config.grad_sync_func = (ddp_chunks[0].start_grad_sync if one
                                       else [c.start_grad_sync for c in ddp_chunks])
        chunk.config.finalize_model_grads_func = finalize_model_grads
    return (ddp_chunks[0] if not isinstance(model, list) else ddp_chunks), optimizer


def reduce_logged(losses_reduced: list[dict]) -> dict[str, float]:
    """Megatron-LM's ``train_step`` reduction: sum each ``[value * tokens, tokens]`` pair
    over micro-batches and data-parallel ranks and divide. ``{}`` off the last stage."""
    if not losses_reduced:
        return {}
    logged = {}
    for key in losses_reduced[0]:
        pair = torch.vstack([x[key].view(-1) for x in losses_reduced]).sum(dim=0)
        dist.all_reduce(pair, group=parallel_state.get_data_parallel_group(
            with_context_parallel=True))
        logged[key] = (pair[0] / pair[1]).item()
    return logged


def schedule_shapes(batches: list[dict], args) -> dict:
    """The schedule's ``num_microbatches``, ``seq_length`` (the whole sequence: megatron
    divides by the context-parallel size itself) and ``micro_batch_size``."""
    b, s_local = batches[0]["tokens"].shape
    return dict(num_microbatches=len(batches), seq_length=s_local * args.cp,
                micro_batch_size=b)


def data_iterators(batches: list[dict], model):
    """One iterator over ``batches``, or one per model chunk (interleaved schedule)."""
    if isinstance(model, list):
        return [iter(batches) for _ in model]
    return iter(batches)


def forward_backward(forward_step_func, batches: list[dict], model, args,
                     forward_only: bool = False) -> list:
    """megatron-core's schedule over ``batches``; returns its per-micro-batch outputs."""
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterators(batches, model),
        model=model,
        forward_only=forward_only,
        **schedule_shapes(batches, args),
    )


def train_step(forward_step_func, batches: list[dict], model, optimizer,
               args) -> dict[str, float]:
    """One optimizer step as Megatron-LM's ``train_step``: zero the grad buffer, run the
    schedule (which finalizes the gradients), step. Returns the logged values on the last
    pipeline stage, ``{}`` elsewhere."""
    for chunk in chunks(model):
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = forward_backward(forward_step_func, batches, model, args)
    update_successful, _, _ = optimizer.step()
    if not update_successful:
        raise RuntimeError("the optimizer skipped a step")
    return reduce_logged(losses)


def cross_entropy_forward_step(data_iterator, model):
    """Next-token cross entropy in ``pretrain_gpt.py``'s convention (the targets ride in
    the micro-batch's ``targets``)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["targets"])  # last stage: [b, s] per-token losses
    if not is_last_stage(model):
        return output, None

    def loss_func(loss_mask, losses):
        loss = (losses.float() * loss_mask).sum()
        num_tokens = loss_mask.sum().to(torch.int)
        return loss, num_tokens, {"lm loss": torch.stack([loss.detach(),
                                                          num_tokens.float()])}
    return output, partial(loss_func, batch["loss_mask"])


def pretrain_teacher(teacher, optimizer, chain: torch.Tensor, args, device,
                     generator: torch.Generator) -> float:
    """Cross entropy on chain samples; returns the last step's loss (nats per token) on
    the last pipeline stage, NaN elsewhere or without steps."""
    loss = float("nan")
    for _ in range(args.teacher_steps):
        seq = sample_chain(chain, args.local_batch, args.seq_len + 1, generator).to(device)
        inputs, targets = seq[:, :-1], seq[:, 1:]
        batches = micro_batches(inputs, torch.ones(inputs.shape, device=device),
                                args.micro_batches, args, targets=targets)
        loss = train_step(cross_entropy_forward_step, batches, teacher, optimizer,
                          args).get("lm loss", float("nan"))
    return loss


def freeze(ddp_model):
    """The model inside ``ddp_model``, without gradients or the training hooks in its
    config: the frozen teacher, run by ``forward_only`` schedules only."""
    models = [d.module.requires_grad_(False) for d in chunks(ddp_model)]
    for model in models:
        model.config.grad_scale_func = None
        model.config.no_sync_func = None
        model.config.grad_sync_func = None
        model.config.finalize_model_grads_func = None
    return models if isinstance(ddp_model, list) else models[0]


def logits_forward_step(data_iterator, model):
    """Forward-only step whose last-stage output is the ``[b, s, V_padded]`` gathered
    logits (other stages: their hidden states, sent on)."""
    batch = next(data_iterator)
    return model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                 runtime_gather_output=True), None


@torch.no_grad()
def generate(model, prompts: torch.Tensor, args, generator: torch.Generator) -> torch.Tensor:
    """Sample ``[b, seq_len]`` tokens continuing ``[b, prompt_len]`` prompts.

    One ``forward_only`` schedule per new position. The last stage samples (identically
    on its tensor-parallel ranks, then broadcast to be sure) and sends the new column to
    the other stages. No KV cache: every step runs the whole fixed-length buffer (causal
    attention, so the not yet written positions do not matter, and the length stays
    divisible by the tensor-parallel size for sequence parallelism).
    """
    tokens = torch.zeros(prompts.shape[0], args.seq_len, dtype=torch.long,
                         device=prompts.device)
    tokens[:, : prompts.shape[1]] = prompts
    cp_group = parallel_state.get_context_parallel_group()
    cp_rank = parallel_state.get_context_parallel_rank()
    for t in range(prompts.shape[1], args.seq_len):
        # No loss here; the interleaved schedule wants at least pp micro-batches.
        n = args.pp if args.virtual_pipeline else 1
        batch = micro_batches(tokens, torch.zeros_like(tokens), n, args)
        out = forward_backward(logits_forward_step, batch, model, args, forward_only=True)
        out = [torch.cat(out, dim=0)] if out else out
        column = torch.empty_like(tokens[:, t])
        # Under context parallelism the logits of position t - 1 are on one CP rank.
        owner, local = next((r, idx.tolist().index(t - 1)) for r in range(args.cp)
                            if t - 1 in (idx := context_parallel_index(args.seq_len,
                                                                       args.cp, r)))
        if parallel_state.is_pipeline_last_stage():
            if cp_rank == owner:
                probs = torch.softmax(out[0][:, local, : args.vocab_size].float(), dim=-1)
                column.copy_(torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0])
                broadcast_tp(column)
            if args.cp > 1:
                dist.broadcast(column, dist.get_global_rank(cp_group, owner), group=cp_group)
        dist.broadcast(column, parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        tokens[:, t] = column
    return tokens


def served_topk(teacher, teacher_hidden: list[torch.Tensor], k: int, vocab_size: int,
                sequence_parallel: bool, packed_params=None
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What an inference server would return for each micro-batch: the teacher's top-k
    log-probabilities over the real vocabulary and their ids, ``[s, b, k]`` each (the
    full sequence, the same on every tensor-parallel rank). Here they are made from the
    frozen teacher's last-stage hidden states by gathering its logits (a server's job)."""
    if not teacher_hidden:  # not the last pipeline stage
        return []
    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    weight = output_layer_weight(last_model_chunk(teacher))
    out = []
    for hidden in teacher_hidden:
        with torch.no_grad():
            if sequence_parallel and tp > 1:
                parts = [torch.empty_like(hidden) for _ in range(tp)]
                dist.all_gather(parts, hidden.contiguous(), group=group)
                hidden = torch.cat(parts, dim=0)
            shard = (hidden @ weight.t()).float()
            shards = [torch.empty_like(shard) for _ in range(tp)]
            dist.all_gather(shards, shard, group=group)
            logits = torch.cat(shards, dim=-1)[..., :vocab_size]
            lp, ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        out.append((whole_sequence(lp, packed_params), whole_sequence(ids, packed_params)))
    return out


def whole_sequence(local: torch.Tensor, packed_params=None) -> torch.Tensor:
    """``[s / cp, ...]`` per-token values of this context-parallel rank, put back in
    sequence order over the whole ``[s, ...]`` sequence (gathered from the CP group): what
    a server returns, which ``eaopd_loss_func`` cuts again."""
    if parallel_state.get_context_parallel_world_size() == 1:
        return local
    group = parallel_state.get_context_parallel_group()
    cp = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    full = torch.empty((local.shape[0] * cp, *local.shape[1:]), dtype=local.dtype,
                       device=local.device)
    cu = None if packed_params is None else packed_params.cu_seqlens_q
    for r, part in enumerate(parts):
        full[context_parallel_index(full.shape[0], cp, r, cu_seqlens_padded=cu)] = part
    return full


def topk_forward_step(served: list, *, sequence_parallel: bool, vocab_size: int,
                      topk_tail: str):
    """:func:`eaopd_mp.megatron.eaopd_forward_step` for a served teacher: the last stage's
    forward computes the loss on the micro-batch's top-k tensors (no teacher model)."""
    remaining = iter(served)

    def forward_step(data_iterator, model):
        tokens, position_ids, attention_mask, loss_mask, *packed = get_batch(data_iterator)
        packed = packed[0] if packed else None
        if not is_last_stage(model):
            return gpt_hidden_states(model, tokens, position_ids, attention_mask,
                                     packed), None
        lp, ids = next(remaining)  # the whole sequence: eaopd_loss_func cuts it per CP rank
        out = EaopdOutput(None, None, sequence_parallel=sequence_parallel,
                          vocab_size=vocab_size, packed_seq_params=packed,
                          teacher_topk_logprobs=lp, teacher_topk_indices=ids,
                          topk_tail=topk_tail)
        loss_sum = gpt_forward(model, tokens, position_ids, attention_mask,
                               eaopd_output_processor, context=out, loss_mask=loss_mask,
                               packed_seq_params=packed)
        return loss_sum, out.loss_func
    return forward_step


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if problem := impossible(args, world):
        p.error(problem)
    dp = world // (args.tp * args.pp * args.cp)
    args.local_batch = args.batch_size // dp
    device = init_parallel(args.tp, args.seed, pp_size=args.pp, cp_size=args.cp,
                           vp_size=args.virtual_pipeline)
    if device.type == "cpu":
        # Compiling the loss kernels takes longer than this whole run on a CPU.
        os.environ.setdefault("EAOPD_COMPILE", "0")
    # Megatron-LM logs from the last rank: it is on the last pipeline stage.
    say = print if dist.get_rank() == world - 1 else (lambda *a, **k: None)
    padded = -(-args.vocab_size // (8 * args.tp)) * 8 * args.tp  # as megatron pads it

    # The chain is the same everywhere; each data-parallel rank draws its own sequences
    # (its tensor- and pipeline-parallel ranks alike), and its last stage its own samples.
    chain = markov_chain(args.vocab_size, torch.Generator().manual_seed(args.seed))
    dp_rank = parallel_state.get_data_parallel_rank()
    data = torch.Generator().manual_seed(args.seed + 1 + dp_rank)
    sampling = torch.Generator().manual_seed(args.seed + 1001 + dp_rank)
    teacher, optimizer = setup_training(build_model(args, padded, *TEACHER), args, lr=1e-2)
    say(f"tp={args.tp} pp={args.pp} dp={dp} sequence_parallel={args.sequence_parallel} "
        f"cp={args.cp} packed={args.packed} "
        f"virtual_pipeline={args.virtual_pipeline} attention={not attention_free(args)} "
        f"micro_batches={args.micro_batches} device={device.type} vocab={args.vocab_size} "
        f"(padded to {padded}) batch={args.batch_size}x{args.seq_len}")
    path = ("GPTModel.forward(output_processor=...)" if uses_output_processor(teacher)
            else "_preprocess + decoder (no output_processor hook)")
    say(f"megatron-core {metadata.version('megatron-core')}, torch {torch.__version__}: "
        f"loss and teacher hidden states via {path}")

    start = time.perf_counter()
    ce = pretrain_teacher(teacher, optimizer, chain, args, device, data)
    teacher = freeze(teacher)
    prompts = sample_chain(chain, args.local_batch, args.prompt_len, data).to(device)
    legal = legal_fraction(chain, generate(teacher, prompts, args, sampling), args.prompt_len)
    say(f"teacher: {args.teacher_steps} steps, cross entropy {ce:.3f}, legal {legal:.0%} "
        f"({time.perf_counter() - start:.1f}s)")

    start = time.perf_counter()
    student, optimizer = setup_training(build_model(args, padded, *STUDENT), args, args.lr)
    for step in range(1, args.steps + 1):
        prompts = sample_chain(chain, args.local_batch, args.prompt_len, data).to(device)
        tokens = generate(student, prompts, args, sampling)
        legal = legal_fraction(chain, tokens, args.prompt_len)
        # Loss positions: prompt_len - 1 .. s - 2, those whose next token was sampled.
        loss_mask = torch.zeros(tokens.shape, dtype=torch.float32, device=device)  # [b, s]
        loss_mask[:, args.prompt_len - 1: -1] = 1.0
        batches = micro_batches(tokens, loss_mask, args.micro_batches, args, args.packed)
        teacher_hidden = teacher_hidden_states(get_forward_backward_func(), teacher,
                                               data_iterators(batches, teacher), get_batch,
                                               **schedule_shapes(batches, args))
        if args.teacher_topk:
            served = served_topk(teacher, teacher_hidden, args.teacher_topk,
                                 args.vocab_size, args.sequence_parallel,
                                 batches[0].get("packed"))
            forward_step = topk_forward_step(served, sequence_parallel=args.sequence_parallel,
                                             vocab_size=args.vocab_size,
                                             topk_tail=args.topk_tail)
        else:
            forward_step = eaopd_forward_step(get_batch, teacher, teacher_hidden,
                                              sequence_parallel=args.sequence_parallel,
                                              vocab_size=args.vocab_size)
        logged = train_step(forward_step, batches, student, optimizer, args)
        if logged:
            say(f"step {step:3d} loss {logged['eaopd loss']:.4f} "
                f"H_teacher {logged['teacher entropy']:.3f} w_fkl {logged['fkl weight']:.3f} "
                f"kl_fwd {logged['kl fwd']:.4f} kl_rev {logged['kl rev']:.4f} "
                f"legal {legal:.0%}")
    say(f"student: {args.steps} steps ({time.perf_counter() - start:.1f}s)")
    destroy_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
