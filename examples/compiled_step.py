"""The fused loss inside a compiled, mixed-precision training step (CPU or GPU).

    python examples/compiled_step.py

A small student (an embedding and an MLP standing in for a transformer) learns from a
frozen, wider teacher of the same shape; the whole loss computation, the student's
forward included, is one ``torch.compile`` region with ``fullgraph=True``, run under
bfloat16 autocast at five sequence lengths (one static graph, then one dynamic one).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._dynamo.utils import counters

from eaopd_mp import fused_linear_eaopd_loss

if __name__ == "__main__":  # no options: --help, and an unknown flag is refused
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
hidden, vocab = 64, 1000


def body(width):
    return torch.nn.Sequential(torch.nn.Embedding(vocab, width), torch.nn.Linear(width, width),
                               torch.nn.GELU()).to(device)


student, lm_head = body(hidden), torch.nn.Linear(hidden, vocab, bias=False).to(device)
teacher, teacher_head = body(2 * hidden), torch.nn.Linear(2 * hidden, vocab, bias=False)
teacher.requires_grad_(False)
teacher_head = teacher_head.to(device).requires_grad_(False)
opt = torch.optim.AdamW([*student.parameters(), *lm_head.parameters()], lr=3e-3)


@torch.compile(fullgraph=True)
def loss_fn(ids, teacher_hidden, completion_mask):
    with torch.autocast(device, dtype=torch.bfloat16):
        return fused_linear_eaopd_loss(
            student(ids), lm_head.weight,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_head.weight,
            labels=completion_mask, reduction="mean", return_stats=True,
        )


for step in range(10):
    seq = (128, 160, 192, 224, 256)[step % 5]
    ids = torch.randint(0, vocab, (4, seq), device=device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        teacher_hidden = teacher(ids)
    completion_mask = torch.arange(seq, device=device).expand(4, seq) >= 32  # prompt: 32
    t = time.perf_counter()
    loss, stats = loss_fn(ids, teacher_hidden, completion_mask)
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step} seq {seq}: loss {loss.item():.4f}, teacher entropy "
          f"{stats['teacher_entropy'].item():.3f}, fkl weight {stats['fkl_weight'].item():.3f}, "
          f"{time.perf_counter() - t:.2f} s")
print("graphs compiled:", counters["stats"]["unique_graphs"])
