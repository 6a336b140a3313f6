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

# megatron_cpu first: it filters megatron's environment warnings before they are raised.
from megatron_cpu import (  # noqa: E402
    broadcast_tp,
    causal_mask,
    destroy_parallel,
    init_parallel,
    positions,
    tiny_gpt,
)

# isort: split
from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402

from eaopd_mp.megatron import (  # noqa: E402
    EaopdOutput,
    eaopd_forward_step,
    eaopd_output_processor,
    gpt_forward,
    gpt_hidden_states,
    output_layer_weight,
    teacher_hidden_states,
    uses_output_processor,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="distillation steps")
    p.add_argument("--teacher-steps", type=int, default=200,
                   help="teacher pre-training steps")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--sequence-parallel", action="store_true")
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
    return p.parse_args(argv)


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


def micro_batches(tokens: torch.Tensor, loss_mask: torch.Tensor, n: int) -> list[dict]:
    """Split ``[B, s]`` tokens and ``[B, s]`` loss mask into ``n`` micro-batches (dicts with
    ``tokens``, ``position_ids``, ``attention_mask``, ``loss_mask``)."""
    mask = causal_mask(tokens.shape[1], tokens.device)
    return [dict(tokens=t, position_ids=positions(t), attention_mask=mask, loss_mask=m)
            for t, m in zip(tokens.chunk(n), loss_mask.chunk(n), strict=True)]


def get_batch(data_iterator):
    """``(tokens, position_ids, attention_mask, loss_mask)`` of the next micro-batch."""
    batch = next(data_iterator)
    return batch["tokens"], batch["position_ids"], batch["attention_mask"], batch["loss_mask"]


# ----------------------------------------------------------------------------- megatron


def build_model(args, vocab_size: int, hidden: int, layers: int, heads: int):
    """This rank's stage of a tiny GPT, in bf16 inside megatron's ``Float16Module`` with
    ``--bf16``; ``calculate_per_token_loss`` set before DDP reads it."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = tiny_gpt(vocab_size, hidden, layers, heads, args.seq_len, args.sequence_parallel,
                     params_dtype=dtype)
    model.config.calculate_per_token_loss = True
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if args.bf16:
        model = Float16Module(model.config, model)
    return model


def setup_training(model, args, lr: float):
    """Wrap ``model`` in megatron's DDP, build its optimizer and wire the schedule's hooks
    into the model config, as Megatron-LM's ``setup_model_and_optimizer`` and ``train``
    do. Returns ``(ddp_model, optimizer)``."""
    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16,
        overlap_grad_reduce=True,
        use_distributed_optimizer=args.distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=1.0,
                        bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else
                        torch.float32, use_distributed_optimizer=args.distributed_optimizer),
        [ddp_model],
    )
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp_model.no_sync
    config.grad_sync_func = ddp_model.start_grad_sync  # Megatron-LM's --align-grad-reduce
    config.finalize_model_grads_func = finalize_model_grads
    return ddp_model, optimizer


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


def forward_backward(forward_step_func, batches: list[dict], model, args,
                     forward_only: bool = False) -> list:
    """megatron-core's schedule over ``batches``; returns its per-micro-batch outputs."""
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=args.seq_len,
        micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )


def train_step(forward_step_func, batches: list[dict], model, optimizer,
               args) -> dict[str, float]:
    """One optimizer step as Megatron-LM's ``train_step``: zero the grad buffer, run the
    schedule (which finalizes the gradients), step. Returns the logged values on the last
    pipeline stage, ``{}`` elsewhere."""
    model.zero_grad_buffer()
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
    if not parallel_state.is_pipeline_last_stage():
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
                                args.micro_batches)
        for batch, t in zip(batches, targets.chunk(args.micro_batches), strict=True):
            batch["targets"] = t
        loss = train_step(cross_entropy_forward_step, batches, teacher, optimizer,
                          args).get("lm loss", float("nan"))
    return loss


def freeze(ddp_model):
    """The model inside ``ddp_model``, without gradients or the training hooks in its
    config: the frozen teacher, run by ``forward_only`` schedules only."""
    model = ddp_model.module.requires_grad_(False)
    model.config.grad_scale_func = None
    model.config.no_sync_func = None
    model.config.grad_sync_func = None
    model.config.finalize_model_grads_func = None
    return model


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
    batch = micro_batches(tokens, torch.zeros_like(tokens), 1)  # no loss here
    for t in range(prompts.shape[1], args.seq_len):
        out = forward_backward(logits_forward_step, batch, model, args, forward_only=True)
        column = torch.empty_like(tokens[:, t])
        if parallel_state.is_pipeline_last_stage():
            probs = torch.softmax(out[0][:, t - 1, : args.vocab_size].float(), dim=-1)
            column.copy_(torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0])
            broadcast_tp(column)
        dist.broadcast(column, parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        tokens[:, t] = column
    return tokens


def served_topk(teacher, teacher_hidden: list[torch.Tensor], k: int, vocab_size: int,
                sequence_parallel: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What an inference server would return for each micro-batch: the teacher's top-k
    log-probabilities over the real vocabulary and their ids, ``[s, b, k]`` each (the
    full sequence, the same on every tensor-parallel rank). Here they are made from the
    frozen teacher's last-stage hidden states by gathering its logits (a server's job)."""
    if not teacher_hidden:  # not the last pipeline stage
        return []
    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    weight = output_layer_weight(teacher)
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
        out.append((lp, ids))
    return out


def topk_forward_step(served: list, *, sequence_parallel: bool, vocab_size: int,
                      topk_tail: str):
    """:func:`eaopd_mp.megatron.eaopd_forward_step` for a served teacher: the last stage's
    forward computes the loss on the micro-batch's top-k tensors (no teacher model)."""
    remaining = iter(served)

    def forward_step(data_iterator, model):
        tokens, position_ids, attention_mask, loss_mask = get_batch(data_iterator)
        if not parallel_state.is_pipeline_last_stage():
            return gpt_hidden_states(model, tokens, position_ids, attention_mask), None
        lp, ids = next(remaining)
        out = EaopdOutput(None, None, sequence_parallel=sequence_parallel,
                          vocab_size=vocab_size, teacher_topk_logprobs=lp,
                          teacher_topk_indices=ids, topk_tail=topk_tail)
        loss_sum = gpt_forward(model, tokens, position_ids, attention_mask,
                               eaopd_output_processor, context=out, loss_mask=loss_mask)
        return loss_sum, out.loss_func
    return forward_step


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world % (args.tp * args.pp):
        sys.exit(f"--tp {args.tp} x --pp {args.pp} does not divide {world} processes")
    dp = world // (args.tp * args.pp)
    if args.batch_size % (dp * args.micro_batches):
        sys.exit(f"--batch-size {args.batch_size} does not split into {dp} data-parallel "
                 f"ranks x {args.micro_batches} micro-batches")
    args.local_batch = args.batch_size // dp
    device = init_parallel(args.tp, args.seed, pp_size=args.pp)
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
    teacher, optimizer = setup_training(build_model(args, padded, 64, 2, 4), args, lr=1e-2)
    say(f"tp={args.tp} pp={args.pp} dp={dp} sequence_parallel={args.sequence_parallel} "
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
    student, optimizer = setup_training(build_model(args, padded, 32, 2, 2), args, args.lr)
    shapes = dict(seq_length=args.seq_len, micro_batch_size=args.local_batch //
                  args.micro_batches, num_microbatches=args.micro_batches)
    for step in range(1, args.steps + 1):
        prompts = sample_chain(chain, args.local_batch, args.prompt_len, data).to(device)
        tokens = generate(student, prompts, args, sampling)
        legal = legal_fraction(chain, tokens, args.prompt_len)
        # Loss positions: prompt_len - 1 .. s - 2, those whose next token was sampled.
        loss_mask = torch.zeros(tokens.shape, dtype=torch.float32, device=device)  # [b, s]
        loss_mask[:, args.prompt_len - 1: -1] = 1.0
        batches = micro_batches(tokens, loss_mask, args.micro_batches)
        teacher_hidden = teacher_hidden_states(get_forward_backward_func(), teacher,
                                               iter(batches), get_batch, **shapes)
        if args.teacher_topk:
            served = served_topk(teacher, teacher_hidden, args.teacher_topk,
                                 args.vocab_size, args.sequence_parallel)
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
