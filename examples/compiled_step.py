"""The fused loss inside a compiled, mixed-precision training step (CPU or GPU).

    python examples/compiled_step.py

A small student (an MLP standing in for a transformer) and a frozen teacher head; the
whole step, model forward and loss, is one ``torch.compile`` region with
``fullgraph=True``, run under bfloat16 autocast at several sequence lengths.
"""

from __future__ import annotations

import time

import torch
from torch._dynamo.utils import counters

from eaopd_mp import fused_linear_eaopd_loss

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
hidden, vocab = 64, 1000
student = torch.nn.Sequential(torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, hidden),
                              torch.nn.GELU()).to(device)
lm_head = torch.nn.Linear(hidden, vocab, bias=False).to(device)
teacher_head = torch.nn.Linear(hidden, vocab, bias=False).to(device).requires_grad_(False)
opt = torch.optim.AdamW([*student.parameters(), *lm_head.parameters()], lr=1e-3)


@torch.compile(fullgraph=True)
def loss_fn(ids, teacher_hidden, completion_mask):
    with torch.autocast(device, dtype=torch.bfloat16):
        return fused_linear_eaopd_loss(
            student(ids), lm_head.weight,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_head.weight,
            labels=completion_mask, reduction="mean", return_stats=True,
        )


for step, seq in enumerate([128, 160, 192, 224, 256]):
    ids = torch.randint(0, vocab, (4, seq), device=device)
    teacher_hidden = torch.randn(4, seq, hidden, device=device)
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
