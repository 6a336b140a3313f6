"""Several teachers in one fused call: a "math" teacher and a "code" teacher.

Two tiny teachers over a 64-token vocabulary, each *sharp* on its own kind of prompt (it
knows the answer: one token takes most of the mass) and *diffuse* on the other kind (it
does not know). A small student (embedding -> MLP -> output layer) is distilled twice
with the fused entropy-aware OPD loss:

* **routed**: each prompt is scored by its own kind's teacher (``teacher_index``), in one
  call per step: the student's output-layer GEMMs run once per token;
* **averaged**: every prompt is scored by one teacher, the average of the two
  distributions (what a single merged teacher gives without routing).

For each student and each kind of prompt the script reports the KL from that kind's
expert to the student, how often the student's top token is the expert's, the student's
entropy, and (routed run) each teacher's statistics from ``stats["per_teacher"]``.

    python examples/multi_teacher.py            # ~80 s of CPU time (mostly compiling)
    python examples/multi_teacher.py --steps 50 # quicker
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import eaopd_mp

VOCAB, PROMPTS, HIDDEN = 64, 48, 32  # prompts 0..23 are "math", 24..47 "code"
KINDS = ("math", "code")


def teachers(seed: int = 0) -> list[torch.Tensor]:
    """Two ``(PROMPTS, VOCAB)`` logit tables: teacher k is sharp (an answer token at +8,
    two runners-up at +4) on its kind's prompts, diffuse (logits of std 0.3) elsewhere."""
    g = torch.Generator().manual_seed(seed)
    tables = []
    for k in range(2):
        table = torch.randn(PROMPTS, VOCAB, generator=g) * 0.3
        mine = torch.arange(PROMPTS) // (PROMPTS // 2) == k
        for p in mine.nonzero().squeeze(1).tolist():
            answer = torch.randperm(VOCAB, generator=g)[:3]
            table[p, answer] += torch.tensor([8.0, 4.0, 4.0])
        tables.append(table)
    return tables


class Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(PROMPTS, HIDDEN)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh())
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def hidden(self, prompts: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(prompts))


def distill(routed: bool, tables: list[torch.Tensor], steps: int, seed: int = 0):
    """Train a student; return it and the last step's statistics."""
    torch.manual_seed(seed)
    student = Student()
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    kind = torch.arange(PROMPTS) // (PROMPTS // 2)  # the teacher of each prompt
    onehot = torch.eye(PROMPTS)  # a teacher's "hidden state" of prompt p: e_p
    # The averaged teacher: log of the mean of the two distributions.
    averaged = (torch.logsumexp(torch.stack([t.log_softmax(-1) for t in tables]), 0)
                - torch.log(torch.tensor(2.0)))
    prompts = torch.arange(PROMPTS).repeat(4)  # a batch: every prompt 4 times
    index = kind[prompts]
    stats = None
    for _ in range(steps):
        h = student.hidden(prompts)
        if routed:  # teacher j's tensors hold its own prompts, in batch order
            loss, stats = eaopd_mp.fused_linear_eaopd_loss(
                h, student.lm_head.weight,
                teacher_hidden=[onehot[prompts[index == j]] for j in range(2)],
                teacher_weight=[t.T for t in tables], teacher_index=index,
                return_stats=True)
        else:
            loss, stats = eaopd_mp.fused_linear_eaopd_loss(
                h, student.lm_head.weight, teacher_hidden=onehot[prompts],
                teacher_weight=averaged.T, return_stats=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student, stats


@torch.no_grad()
def report(student: Student, tables: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per kind: KL(expert || student), top-1 agreement with the expert, entropy."""
    logits = student.lm_head(student.hidden(torch.arange(PROMPTS)))
    out = {}
    for k, name in enumerate(KINDS):
        rows = slice(k * PROMPTS // 2, (k + 1) * PROMPTS // 2)
        s = logits[rows].log_softmax(-1)
        t = tables[k][rows].log_softmax(-1)
        out[name] = {
            "KL(expert||student)": float(F.kl_div(s, t, log_target=True,
                                                  reduction="batchmean")),
            "top-1 = expert's": float((s.argmax(-1) == t.argmax(-1)).float().mean()),
            "student entropy": float(-(s.exp() * s).sum(-1).mean()),
            "expert entropy": float(-(t.exp() * t).sum(-1).mean()),
        }
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    tables = teachers()
    results = {}
    for routed in (True, False):
        name = "routed" if routed else "averaged"
        student, stats = distill(routed, tables, args.steps)
        results[name] = report(student, tables)
        print(f"\n{name} teacher{'s' if routed else ''} ({args.steps} steps)")
        print(f"  {'prompts':8s} {'KL(expert||student)':>20s} {'top-1 = expert':>15s} "
              f"{'student H':>10s} {'expert H':>9s}")
        for kind, row in results[name].items():
            print(f"  {kind:8s} {row['KL(expert||student)']:20.3f} "
                  f"{row['top-1 = expert' + chr(39) + 's']:15.2f} "
                  f"{row['student entropy']:10.3f} {row['expert entropy']:9.3f}")
        if routed:
            for j, mine in enumerate(stats["per_teacher"]):
                print(f"  teacher {j} ({KINDS[j]}), last step: tokens "
                      f"{int(mine['tokens'])}, teacher entropy "
                      f"{float(mine['teacher_entropy']):.3f}, forward-KL weight "
                      f"{float(mine['fkl_weight']):.3f}, KL fwd {float(mine['kl_fwd']):.4f}")
        else:
            print(f"  averaged teacher, last step: teacher entropy "
                  f"{float(stats['teacher_entropy']):.3f}, forward-KL weight "
                  f"{float(stats['fkl_weight']):.3f}")
    return results


if __name__ == "__main__":
    main()
