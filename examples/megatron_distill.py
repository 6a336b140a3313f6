"""On-policy distillation of a megatron-core GPT with the vocab-parallel fused EAOPD loss.

    torchrun --nproc-per-node 2 examples/megatron_distill.py [--sequence-parallel]

CPU and gloo by default (CUDA and NCCL when available), tensor parallelism 2, one
tensor-parallel group (``--nproc-per-node`` = ``--tp``). The teacher (2 layers, hidden
64) is first pre-trained here, with cross entropy, on a random Markov chain whose tokens
have 1, 2, 4 or 8 equally likely successors, so its entropy varies from token to token.
The student (1 layer, hidden 32) then learns from it on-policy: every step it samples
continuations of short prompts itself, and the loss compares its next-token
distributions with the teacher's on the positions whose next token it sampled. The loss
works on the output layers' vocabulary shards and never gathers logits; only sampling
does (``runtime_gather_output=True``).

The vocabulary has 60 tokens, padded to 64 as megatron pads it; the loss is told the
real size. Each step line shows the loss (nats per token), the teacher entropy and
forward-KL weight averaged over the loss tokens, both KLs, and the fraction of the
student's sampled transitions that the chain allows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eaopd_mp.megatron import eaopd_loss_func  # noqa: E402
from megatron_cpu import (  # noqa: E402
    allreduce_sequence_parallel_grads,
    broadcast_tp,
    causal_mask,
    destroy_parallel,
    gpt_hidden_states,
    init_parallel,
    output_layer_weight,
    positions,
    tiny_gpt,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="distillation steps")
    p.add_argument("--teacher-steps", type=int, default=200,
                   help="teacher pre-training steps")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-2, help="student learning rate (Adam)")
    return p.parse_args()


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
    """Fraction of the transitions into ``tokens[:, start:]`` the chain allows."""
    prev, nxt = tokens[:, start - 1:-1].cpu(), tokens[:, start:].cpu()
    return (chain[prev, nxt] > 0).float().mean().item()


# ----------------------------------------------------------------------------- training


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    allreduce_sequence_parallel_grads(model)
    optimizer.step()


def pretrain_teacher(teacher, chain: torch.Tensor, args, device, generator) -> float:
    """Next-token cross entropy on chain samples (megatron's vocab-parallel CE).
    Returns the last step's loss (nats per token), NaN when there are no steps."""
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    mask = causal_mask(args.seq_len, device)
    loss = torch.tensor(float("nan"))
    for _ in range(args.teacher_steps):
        seq = broadcast_tp(sample_chain(chain, args.batch_size, args.seq_len + 1,
                                        generator).to(device))
        inputs, targets = seq[:, :-1], seq[:, 1:]
        loss = teacher(inputs, positions(inputs), mask, labels=targets).mean()  # [b, s]
        optimizer_step(teacher, optimizer, loss)
    return loss.item()


@torch.no_grad()
def generate(model, prompts: torch.Tensor, args, device,
             generator: torch.Generator) -> torch.Tensor:
    """Sample ``[b, seq_len]`` tokens continuing ``[b, prompt_len]`` prompts.

    No KV cache: every step runs the whole fixed-length buffer (causal attention, so the
    not yet written positions do not matter, and the length stays divisible by the
    tensor-parallel size for sequence parallelism).
    """
    tokens = torch.zeros(prompts.shape[0], args.seq_len, dtype=torch.long, device=device)
    tokens[:, : prompts.shape[1]] = prompts
    pos, mask = positions(tokens), causal_mask(args.seq_len, device)
    for t in range(prompts.shape[1], args.seq_len):
        logits = model(tokens, pos, mask, runtime_gather_output=True)  # [b, s, V_padded]
        probs = torch.softmax(logits[:, t - 1, : args.vocab_size].float(), dim=-1)
        tokens[:, t] = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(device)
    return broadcast_tp(tokens)


def distill_step(student, teacher, optimizer, tokens: torch.Tensor, args,
                 device) -> dict[str, float]:
    """One optimizer step of the fused vocab-parallel loss on ``[b, s]`` tokens.

    Loss positions are ``prompt_len - 1 .. s - 2``: those whose next token the student
    sampled. Returns the logged values (token-weighted means).
    """
    loss_mask = torch.zeros(tokens.shape, dtype=torch.float32, device=device)  # [b, s]
    loss_mask[:, args.prompt_len - 1: -1] = 1.0
    pos, mask = positions(tokens), causal_mask(args.seq_len, device)
    with torch.no_grad():
        teacher_hidden = gpt_hidden_states(teacher, tokens, pos, mask)
    student_hidden = gpt_hidden_states(student, tokens, pos, mask)  # [s(/tp), b, h]
    loss_sum, num_tokens, logged = eaopd_loss_func(
        student_hidden, output_layer_weight(student),
        teacher_hidden, output_layer_weight(teacher),
        loss_mask, sequence_parallel=args.sequence_parallel, vocab_size=args.vocab_size,
    )
    optimizer_step(student, optimizer, loss_sum / num_tokens)
    return {name: (pair[0] / pair[1]).item() for name, pair in logged.items()}


def main() -> None:
    args = parse_args()
    if int(os.environ.get("WORLD_SIZE", 1)) != args.tp:
        sys.exit("run one tensor-parallel group: torchrun --nproc-per-node equal to --tp")
    device = init_parallel(args.tp, args.seed)
    if device.type == "cpu":
        # Compiling the loss kernels takes longer than this whole run on a CPU.
        os.environ.setdefault("EAOPD_COMPILE", "0")
    say = print if dist.get_rank() == 0 else (lambda *a, **k: None)
    padded = -(-args.vocab_size // (8 * args.tp)) * 8 * args.tp  # as megatron pads it

    # One stream, seeded alike on every rank: the tensor-parallel ranks see the same data.
    data = torch.Generator().manual_seed(args.seed)
    chain = markov_chain(args.vocab_size, data)
    teacher, student = (
        tiny_gpt(padded, hidden, layers, heads, args.seq_len, args.sequence_parallel).to(device)
        for hidden, layers, heads in ((64, 2, 4), (32, 1, 2))
    )
    say(f"tp={args.tp} sequence_parallel={args.sequence_parallel} device={device.type} "
        f"vocab={args.vocab_size} (padded to {padded}) batch={args.batch_size}x{args.seq_len}")

    start = time.perf_counter()
    ce = pretrain_teacher(teacher, chain, args, device, data)
    teacher.eval().requires_grad_(False)
    prompts = sample_chain(chain, args.batch_size, args.prompt_len, data).to(device)
    legal = legal_fraction(chain, generate(teacher, prompts, args, device, data), args.prompt_len)
    say(f"teacher: {args.teacher_steps} steps, cross entropy {ce:.3f}, legal {legal:.0%} "
        f"({time.perf_counter() - start:.1f}s)")

    start = time.perf_counter()
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    for step in range(1, args.steps + 1):
        prompts = sample_chain(chain, args.batch_size, args.prompt_len, data).to(device)
        tokens = generate(student.eval(), prompts, args, device, data)
        legal = legal_fraction(chain, tokens, args.prompt_len)
        logged = distill_step(student.train(), teacher, optimizer, tokens, args, device)
        say(f"step {step:3d} loss {logged['eaopd loss']:.4f} "
            f"H_teacher {logged['teacher entropy']:.3f} w_fkl {logged['fkl weight']:.3f} "
            f"kl_fwd {logged['kl fwd']:.4f} kl_rev {logged['kl rev']:.4f} legal {legal:.0%}")
    say(f"student: {args.steps} steps ({time.perf_counter() - start:.1f}s)")
    destroy_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
