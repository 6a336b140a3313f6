"""Distil a tiny Hugging Face student from a tiny teacher under FSDP2 with bf16 mixed precision.

    torchrun --nproc-per-node 2 examples/fsdp2_distill.py [--steps 30]

Runs on CPU (gloo) as on GPUs (nccl, one GPU per process). Both models are random-init
(no download): a 2-layer Llama student learns a 4-layer Qwen2 teacher's next-token
distributions on random prompts. Each model is ``fully_shard``-ed per decoder layer and at
the root with ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``; the loss
is :func:`eaopd_mp.hf.eaopd_loss`, which runs the fused head inside the models' FSDP
forwards (see docs/guides/sharded.md). Prints the loss over the global batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from eaopd_mp import hf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchrun_args import Parser  # noqa: E402

VOCAB = 128


def models():
    """A small student and a larger teacher sharing one vocabulary (same seed everywhere)."""
    common = dict(vocab_size=VOCAB, max_position_embeddings=64, num_attention_heads=4,
                  num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, **common))
    teacher = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=96, intermediate_size=192, num_hidden_layers=4, initializer_range=0.08,
        **common))
    return student, teacher.eval().requires_grad_(False)


def shard(model, mesh):
    """FSDP2 per decoder layer and at the root, bf16 compute, fp32 gradient reduction."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


ROWS = 8  # sequences per step, over all ranks


def batch(step: int, rank: int, world: int, device, rows: int = ROWS, seq: int = 24):
    """This rank's rows of the step's global batch: 8-token prompts + 16-token completions."""
    g = torch.Generator().manual_seed(1000 + step % 4)  # 4 batches, revisited
    ids = torch.randint(3, VOCAB, (rows, seq), generator=g)
    completion = torch.zeros_like(ids)
    completion[:, 8:] = 1
    mine = slice(rank * rows // world, (rank + 1) * rows // world)
    return ids[mine].to(device), completion[mine].to(device)


def impossible(args: argparse.Namespace, world: int) -> str | None:
    """Why these flags cannot run on ``world`` processes (one line), or None."""
    if args.steps < 1:
        return f"--steps must be at least 1, got {args.steps}"
    if args.lr <= 0:
        return f"--lr must be positive, got {args.lr}"
    if world > ROWS:
        return f"{world} processes for a batch of {ROWS} sequences: use at most {ROWS}"
    if "RANK" not in os.environ:
        return "run it with torchrun: torchrun --nproc-per-node 2 examples/fsdp2_distill.py"
    return None


def main(argv=None):
    parser = Parser(prog="fsdp2_distill.py", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    if problem := impossible(args, int(os.environ.get("WORLD_SIZE", 1))):
        parser.error(problem)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    student, teacher = models()
    student, teacher = shard(student.to(device), mesh), shard(teacher.to(device), mesh)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    start = time.perf_counter()
    for step in range(args.steps):
        ids, completion = batch(step, rank, world, device)
        # Summed over this rank's completion tokens; FSDP averages gradients over ranks.
        loss, stats = hf.eaopd_loss(student, teacher, ids, completion_mask=completion,
                                    reduction="sum", return_stats=True)
        tokens = stats["tokens"].detach().clone()
        (loss / tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        totals = torch.stack([loss.detach(), tokens])
        dist.all_reduce(totals)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss/token {totals[0] / totals[1]:.4f}  "
                  f"teacher entropy {stats['teacher_entropy']:.3f}  "
                  f"fkl weight {stats['fkl_weight']:.3f}", flush=True)
    if rank == 0:
        print(f"{args.steps} steps on {world} x {device.type} (FSDP2, bf16 params, fp32 "
              f"reduce) in {time.perf_counter() - start:.1f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
