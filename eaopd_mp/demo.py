"""On-policy distillation demo: what the entropy gate buys.

A synthetic language over ``V = 2n`` tokens has two kinds of positions:

* after a token of the *context* half ``B = {n..2n-1}`` comes a **free** position: the next
  token is uniform over ``K`` tokens of the *choice* half ``A = {0..n-1}`` (teacher entropy
  ``log K``);
* after a choice token ``a`` comes a **forced** position: the next token is ``forced[a]``
  (teacher entropy ~0).

The teacher is this language, exactly: a ``(V, V)`` table of logits indexed by the previous
token, 0 for allowed tokens and ``-9`` for the others (a ~1e-4 floor that keeps every KL
finite). The student, a narrow one-layer GRU language model, is first fine-tuned on data
where every free position takes the same choice, so it has lost the diversity. It is then
distilled on-policy: it samples its own continuations of teacher prompts, the teacher
scores every generated position, and
:func:`eaopd_mp.fused_linear_eaopd_loss` is taken on the generated tokens only (``labels``
masks the prompt). Three runs share the budget, the seed and the starting weights:
reverse KL only, forward KL only, and the entropy-aware gate.

With ``--teacher-topk K`` the runs are the gate on the full teacher and on the teacher's
top-K log-probabilities (what an inference server returns) in both ``topk_tail`` modes.

Run ``python -m eaopd_mp.demo [--steps N] [--seed S] [--out DIR] [--teacher-topk K]``; it
writes ``DIR/summary.json``, ``DIR/history.json`` and ``DIR/curves.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .loss import entropy_aware_opd_loss, fused_linear_eaopd_loss

METRICS = (
    "student_entropy_high",
    "student_entropy_low",
    "teacher_mode_mass_low",
    "distinct_continuations",
)
METHODS = {
    "rkl": {"gate": "fixed", "fkl_weight": 0.0},
    "fkl": {"gate": "fixed", "fkl_weight": 1.0},
    "eaopd": {"gate": "linear"},  # h_max: the library default log(V) unless --h-max
}
LABELS = {
    "rkl": "reverse KL only",
    "fkl": "forward KL only",
    "eaopd": "entropy-aware (linear gate)",
}


@dataclass(frozen=True)
class Config:
    """Everything a run depends on (besides the seed)."""

    n_choice: int = 16  # |A| = |B|; vocabulary V = 2 * n_choice
    k: int = 4  # continuations allowed at a free position
    margin: float = 9.0  # teacher logit gap between allowed and other tokens
    prompt_len: int = 3  # prompt tokens (context, choice, forced): masked out of the loss
    gen_len: int = 16  # generated tokens: gen_len / 2 free and gen_len / 2 forced positions
    dim: int = 8  # student width: a rank-8 head has to trade free against forced positions
    batch: int = 64  # sequences per distillation step
    lr: float = 3e-3  # Adam learning rate of the distillation runs
    warm_steps: int = 300  # collapsed fine-tuning steps of the starting student
    warm_lr: float = 1e-2
    eval_batch: int = 512  # sequences of the final evaluation

    @property
    def vocab(self) -> int:
        return 2 * self.n_choice


# --------------------------------------------------------------------------- language


@dataclass(frozen=True)
class Language:
    """The synthetic language and its exact teacher.

    Attributes:
        choices: ``(n, K)`` int64; row ``i`` lists the choice tokens allowed after context
            token ``n + i``. Column 0 is the single choice the collapsed student learned.
        forced: ``(n,)`` int64; ``forced[a]`` is the context token that must follow ``a``.
        teacher: ``(V, V)`` float32 teacher logits, row = previous token.
        support: ``(V, V)`` bool, the tokens the language allows after each token.
    """

    choices: torch.Tensor
    forced: torch.Tensor
    teacher: torch.Tensor
    support: torch.Tensor

    @property
    def n(self) -> int:
        return self.forced.shape[0]


def build_language(cfg: Config, gen: torch.Generator) -> Language:
    """Random choice sets and forced map, and the teacher logits they imply.

    Every choice token is the column-0 choice of exactly one context, so the collapsed
    fine-tuning data still shows the forced continuation of every choice token.
    """
    n, k = cfg.n_choice, cfg.k
    perm = torch.randperm(n, generator=gen)
    step = n // k
    idx = (torch.arange(n)[:, None] + step * torch.arange(k)[None, :]) % n
    choices = perm[idx]  # (n, K)
    forced = n + torch.randperm(n, generator=gen)  # (n,)
    support = torch.zeros(cfg.vocab, cfg.vocab, dtype=torch.bool)
    support[n + torch.arange(n)[:, None], choices] = True
    support[torch.arange(n), forced] = True
    teacher = torch.where(support, 0.0, -cfg.margin).float()
    return Language(choices=choices, forced=forced, teacher=teacher, support=support)


def sample_prompts(lang: Language, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``(batch, 3)`` int64 prompts from the language: context, uniform choice, forced."""
    n = lang.n
    ctx = torch.randint(n, (batch,), generator=gen)
    pick = torch.randint(lang.choices.shape[1], (batch,), generator=gen)
    choice = lang.choices[ctx, pick]
    return torch.stack([n + ctx, choice, lang.forced[choice]], dim=1)


def collapsed_batch(lang: Language, batch: int, length: int,
                    gen: torch.Generator) -> torch.Tensor:
    """``(batch, length)`` int64 sequences where every free position takes choice 0."""
    seq = [lang.n + torch.randint(lang.n, (batch,), generator=gen)]
    while len(seq) < length:
        prev = seq[-1]
        if len(seq) % 2 == 1:  # previous token is a context token: a free position
            seq.append(lang.choices[prev - lang.n, 0])
        else:
            seq.append(lang.forced[prev])
    return torch.stack(seq, dim=1)


# --------------------------------------------------------------------------- student


class TinyLM(nn.Module):
    """Embedding -> one-layer GRU -> linear head (the head the fused loss consumes)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def hidden(self, tokens: torch.Tensor,
               state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (B, T)`` int64 (and the ``(1, B, dim)`` state to continue from) ->
        hidden ``(B, T, dim)`` float32 and the new ``(1, B, dim)`` state."""
        return self.rnn(self.embed(tokens), state)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, T)`` int64 -> next-token logits ``(B, T, V)`` float32."""
        return self.head(self.hidden(tokens)[0])


@torch.no_grad()
def generate(model: TinyLM, prompts: torch.Tensor, n_new: int,
             gen: torch.Generator) -> torch.Tensor:
    """Sample ``n_new`` tokens after ``prompts (B, P)``; returns ``(B, P + n_new)`` int64."""
    h, state = model.hidden(prompts)
    out = [prompts]
    for _ in range(n_new):
        probs = torch.softmax(model.head(h[:, -1]), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)  # (B, 1)
        out.append(nxt)
        h, state = model.hidden(nxt, state)
    return torch.cat(out, dim=1)


def warm_start(lang: Language, cfg: Config, gen: torch.Generator) -> TinyLM:
    """A student fine-tuned (cross-entropy) on collapsed data: it lost the diversity."""
    model = TinyLM(cfg.vocab, cfg.dim)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.warm_lr)
    length = cfg.prompt_len + cfg.gen_len
    for _ in range(cfg.warm_steps):
        seq = collapsed_batch(lang, cfg.batch, length, gen)
        logits = model(seq[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), seq[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


# --------------------------------------------------------------------------- metrics


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dim: ``(..., V)`` float -> ``(...)`` float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def distinct_free(lang: Language, ctx: torch.Tensor, nxt: torch.Tensor) -> float:
    """Mean number of distinct allowed choices sampled per visited free context.

    Args:
        ctx: ``(m,)`` int64 context tokens (in ``B``) of the sampled free positions.
        nxt: ``(m,)`` int64 tokens sampled there.
    Returns:
        A float in ``[0, K]``: ``K`` when every context shows all its choices, 1 when the
        student always picks the same one.
    """
    seen = torch.zeros(lang.n, lang.support.shape[1], dtype=torch.bool)
    seen[ctx - lang.n, nxt] = True
    seen &= lang.support[lang.n:]
    visited = torch.zeros(lang.n, dtype=torch.bool)
    visited[ctx - lang.n] = True
    if not bool(visited.any()):
        return 0.0
    return float(seen.sum(1)[visited].float().mean())


@torch.no_grad()
def measure(lang: Language, seq: torch.Tensor, logits: torch.Tensor,
            prompt_len: int) -> dict[str, float]:
    """The demo's four metrics on sampled sequences.

    Args:
        seq: ``(B, T)`` int64 sequences (prompt then the student's samples).
        logits: ``(B, T-1, V)`` student logits predicting ``seq[:, 1:]``.
        prompt_len: positions predicting a prompt token are skipped.
    Returns:
        ``{metric: float}`` with the keys of :data:`METRICS`.
    """
    ctx = seq[:, prompt_len - 1 : -1].reshape(-1)
    nxt = seq[:, prompt_len:].reshape(-1)
    z = logits[:, prompt_len - 1 :].reshape(-1, logits.shape[-1])
    free, forced = ctx >= lang.n, ctx < lang.n
    h = entropy(z)
    probs = torch.softmax(z[forced].float(), dim=-1)
    target = lang.forced[ctx[forced]]
    return {
        "student_entropy_high": float(h[free].mean()) if free.any() else 0.0,
        "student_entropy_low": float(h[forced].mean()) if forced.any() else 0.0,
        "teacher_mode_mass_low": (
            float(probs.gather(1, target[:, None]).mean()) if forced.any() else 0.0
        ),
        "distinct_continuations": distinct_free(lang, ctx[free], nxt[free]),
    }


# --------------------------------------------------------------------------- distillation


def loss_labels(batch: int, length: int, prompt_len: int) -> torch.Tensor:
    """``(batch, length - 1)`` float32 mask: 1 where position ``t`` predicts a generated
    token (``t + 1 >= prompt_len``), 0 where it predicts a prompt token."""
    t = torch.arange(length - 1)
    return (t + 1 >= prompt_len).float().expand(batch, -1)


def distill_step(model: TinyLM, opt: torch.optim.Optimizer, lang: Language, cfg: Config,
                 gate: dict, gen: torch.Generator) -> dict[str, float]:
    """One on-policy step: sample, score with the teacher, fused loss on generated tokens.

    Returns the metrics of :func:`measure` on this step's samples (before the update), the
    loss and the mask-weighted mean forward/reverse KL per generated token.
    """
    seq = generate(model, sample_prompts(lang, cfg.batch, gen), cfg.gen_len, gen)
    inp = seq[:, :-1]  # (B, T-1)
    hidden, _ = model.hidden(inp)  # (B, T-1, dim)
    opts = dict(gate)
    k = opts.pop("teacher_topk", None)
    if k is None:
        teacher = dict(teacher_logits=lang.teacher[inp])
    else:  # what a server returns: the top-k log-probabilities and their ids
        lp, ids = torch.log_softmax(lang.teacher[inp], -1).topk(k, dim=-1)
        teacher = dict(teacher_topk_logprobs=lp, teacher_topk_indices=ids)
    loss, stats = fused_linear_eaopd_loss(
        hidden, model.head.weight, student_bias=model.head.bias, **teacher,
        labels=loss_labels(*seq.shape, cfg.prompt_len), return_stats=True, **opts,
    )
    with torch.no_grad():
        record = measure(lang, seq, model.head(hidden), cfg.prompt_len)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    record.update(loss=float(loss.detach()), kl_fwd=float(stats["kl_fwd"]),
                  kl_rev=float(stats["kl_rev"]))
    return record


@torch.no_grad()
def teacher_samples(lang: Language, prompts: torch.Tensor, n_new: int,
                    gen: torch.Generator) -> torch.Tensor:
    """Like :func:`generate` but sampling the teacher: ``(B, P + n_new)`` int64."""
    seq = [prompts]
    last = prompts[:, -1]
    for _ in range(n_new):
        last = torch.multinomial(torch.softmax(lang.teacher[last], -1), 1, generator=gen)[:, 0]
        seq.append(last[:, None])
    return torch.cat(seq, dim=1)


@torch.no_grad()
def evaluate(model: TinyLM | None, lang: Language, cfg: Config, seed: int) -> dict[str, float]:
    """Metrics and KLs on ``cfg.eval_batch`` fresh samples (the teacher's if ``model`` is
    None). The evaluation generator depends on the seed only, so every method is measured
    on the same prompts."""
    gen = torch.Generator().manual_seed(seed + 2)
    prompts = sample_prompts(lang, cfg.eval_batch, gen)
    if model is None:
        seq = teacher_samples(lang, prompts, cfg.gen_len, gen)
        logits = lang.teacher[seq[:, :-1]]
    else:
        seq = generate(model, prompts, cfg.gen_len, gen)
        logits = model(seq[:, :-1])
    out = measure(lang, seq, logits, cfg.prompt_len)
    _, stats = entropy_aware_opd_loss(
        logits, lang.teacher[seq[:, :-1]],
        labels=loss_labels(*seq.shape, cfg.prompt_len), return_stats=True,
    )
    out.update(kl_fwd=float(stats["kl_fwd"]), kl_rev=float(stats["kl_rev"]))
    return out


def run_method(name: str, start: TinyLM, lang: Language, cfg: Config, steps: int, seed: int,
               gate: dict, progress: bool) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Distil a copy of ``start`` for ``steps`` steps; returns the per-step history and the
    final evaluation (plus ``final_loss``: mean loss of the last tenth of the steps)."""
    from tqdm.auto import tqdm

    model = copy.deepcopy(start)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed + 1)  # same samples stream for every method
    history: dict[str, list[float]] = {}
    bar = tqdm(range(steps), desc=f"{name:>5}", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for key, value in distill_step(model, opt, lang, cfg, gate, gen).items():
            history.setdefault(key, []).append(value)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}",
                            H_free=f"{history['student_entropy_high'][-1]:.2f}")
    final = evaluate(model, lang, cfg, seed)
    tail = history["loss"][-max(1, steps // 10):]
    final["final_loss"] = sum(tail) / len(tail)
    return history, final


# --------------------------------------------------------------------------- outputs

PANELS = (
    ("student_entropy_high", "Student entropy at free positions", "nats"),
    ("student_entropy_low", "Student entropy at forced positions", "nats"),
    ("teacher_mode_mass_low", "Mass on the teacher's token (forced)", "probability"),
    ("distinct_continuations", "Distinct allowed choices sampled per free context", "count (of K)"),
    ("kl_fwd", "KL(teacher || student) per generated token", "nats (log scale)"),
    ("kl_rev", "KL(student || teacher) per generated token", "nats (log scale)"),
)
COLORS = {"rkl": "tab:red", "fkl": "tab:blue", "eaopd": "tab:green",
          "topk-bucket": "tab:purple", "topk-renormalize": "tab:orange"}


def methods(topk: int | None) -> dict[str, dict]:
    """The runs: reverse KL, forward KL and the gate on the full teacher; with
    ``--teacher-topk K``, the gate on the full teacher and on its top-K in both tails."""
    if topk is None:
        return dict(METHODS)
    return {"eaopd": METHODS["eaopd"],
            **{f"topk-{tail}": {"gate": "linear", "teacher_topk": topk, "topk_tail": tail}
               for tail in ("bucket", "renormalize")}}


def label(method: str, topk: int | None) -> str:
    if method.startswith("topk-"):
        return f"entropy-aware, top-{topk} teacher, {method[5:]}"
    return LABELS[method]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average of ``values`` over ``window`` points."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(histories: dict, teacher: dict, path: Path, title: str,
         topk: int | None = None) -> None:
    """Write the 2 x 3 figure of per-step curves (faint: raw, solid: moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    for ax, (key, name, unit) in zip(axes.flat, PANELS, strict=True):
        for method, hist in histories.items():
            ys = hist[key]
            xs = range(1, len(ys) + 1)
            ax.plot(xs, ys, color=COLORS[method], alpha=0.2, linewidth=0.8)
            ax.plot(xs, smooth(ys, max(1, len(ys) // 25)), color=COLORS[method],
                    linewidth=2, label=label(method, topk))
        if key in teacher and not key.startswith("kl"):
            ax.axhline(teacher[key], color="black", linestyle="--", linewidth=1.2,
                       label="teacher")
        if key.startswith("kl"):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("distillation step")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=len(names), fontsize=11)
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(summary: dict) -> str:
    """The result table (markdown): teacher, starting student and the three methods."""
    head = ("run", "H free", "H forced", "p(teacher tok) forced", "distinct / free ctx",
            "fwd KL", "rev KL", "final loss")
    keys = (*METRICS, "kl_fwd", "kl_rev", "final_loss")
    rows = [("teacher", summary["teacher"]), ("start", summary["start"])]
    rows += list(summary["methods"].items())
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, vals in rows:
        cells = [f"{vals[k]:.3f}" if k in vals else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: ``--steps``, ``--seed``, ``--out``, ``--h-max``, ``--teacher-topk``,
    ``--no-progress``."""
    p = argparse.ArgumentParser(
        prog="python -m eaopd_mp.demo",
        description="On-policy distillation of a collapsed student: reverse KL vs forward KL "
        "vs the entropy-aware loss, on a synthetic language with an exact teacher.",
    )
    p.add_argument("--steps", type=int, default=500, help="distillation steps per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    p.add_argument("--h-max", type=float, default=None,
                   help="h_max of the linear gate (default: the library's log(V))")
    p.add_argument("--warm-steps", type=int, default=Config.warm_steps,
                   help="collapsed fine-tuning steps of the starting student")
    p.add_argument("--teacher-topk", type=int, default=None, metavar="K",
                   help="also distil from the teacher's top-K log-probabilities (both "
                   "topk_tail modes) next to the full teacher, instead of the rkl/fkl runs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warm_steps < 0:
        p.error("--steps must be >= 1 and --warm-steps >= 0")
    if args.teacher_topk is not None and not 1 <= args.teacher_topk <= Config().vocab:
        p.error(f"--teacher-topk must be in [1, {Config().vocab}]")
    return args


def run(args: argparse.Namespace) -> dict:
    """Build the language, warm-start the student, run the three methods, write outputs."""
    cfg = Config(warm_steps=args.warm_steps)
    h_max = math.log(cfg.vocab) if args.h_max is None else args.h_max
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    lang = build_language(cfg, gen)
    start = warm_start(lang, cfg, gen)
    summary: dict = {"seed": args.seed, "steps": args.steps, "h_max": h_max,
                     "config": asdict(cfg) | {"vocab": cfg.vocab},
                     "teacher": evaluate(None, lang, cfg, args.seed),
                     "start": evaluate(start, lang, cfg, args.seed), "methods": {}}
    summary["teacher_entropy_high"] = summary["teacher"]["student_entropy_high"]
    summary["teacher_entropy_low"] = summary["teacher"]["student_entropy_low"]
    histories = {}
    summary["teacher_topk"] = args.teacher_topk
    for name, spec in methods(args.teacher_topk).items():
        gate = spec | ({"h_max": h_max} if spec["gate"] == "linear" else {})
        histories[name], summary["methods"][name] = run_method(
            name, start, lang, cfg, args.steps, args.seed, gate, not args.no_progress)
    write_outputs(args.out, summary, histories, cfg, h_max, args.teacher_topk)
    return summary


def write_outputs(out: Path, summary: dict, histories: dict, cfg: Config,
                  h_max: float, topk: int | None = None) -> None:
    """``summary.json``, ``history.json`` and ``curves.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(histories) + "\n")
    title = (f"On-policy distillation of a collapsed student (V={cfg.vocab}, K={cfg.k} "
             f"choices at free positions; eaopd: linear gate, h_max={h_max:.3f})")
    if topk is not None:
        title += f"; served top-{topk} teacher"
    plot(histories, summary["teacher"], out / "curves.png", title, topk)


@contextlib.contextmanager
def demo_runtime() -> Iterator[None]:
    """Eager kernels and one intra-op thread for the duration of the demo, then restored.

    Eager: compiling a gate's kernels cost ~11 s here and saves under 1 ms per loss call at
    these sizes (~1k tokens x 32 columns), far less than 1500 steps recoup. One thread: every op is
    tiny, so threads only add synchronisation; on a loaded 2-core machine two threads made
    the run ~10x slower (measured 138 s vs 10 s for 100 steps). Set ``EAOPD_COMPILE=1``
    explicitly to try the compiled kernels anyway.
    """
    saved_env = os.environ.get("EAOPD_COMPILE")
    threads = torch.get_num_threads()
    os.environ.setdefault("EAOPD_COMPILE", "0")
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if saved_env is None:
            os.environ.pop("EAOPD_COMPILE", None)


def main(argv: Sequence[str] | None = None) -> dict:
    """Entry point of ``python -m eaopd_mp.demo``; returns the summary written to disk."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    with demo_runtime():
        summary = run(args)
    print(table(summary))
    print(f"\nwrote {args.out}/summary.json, history.json, curves.png "
          f"in {time.perf_counter() - t0:.1f} s")
    return summary


if __name__ == "__main__":
    main()
