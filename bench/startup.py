"""Start-up time: the first forward + backward of a loss in a fresh process.

``python bench/run.py --suite startup --out DIR`` runs, for each implementation, two
fresh Python processes (this file with ``--child``) on one new, empty compile cache
directory (``TORCHINDUCTOR_CACHE_DIR``, with ``TRITON_CACHE_DIR`` inside it):

* **cold**: the directory is empty: dynamo traces, inductor lowers and compiles;
* **warm**: the same directory again, in another fresh process: dynamo still traces
  (it has no on-disk cache of its own), inductor's FX-graph and AOTAutograd caches hit.

Each child times its imports, its first step (what a training script waits for before
step 1), then ``--steady`` more steps (median: the steady state), and reads dynamo's
and inductor's counters: cache hits and misses confirm which case it was, the compile
phases say where the first call's time goes. Defaults: N = 2048, H = 256, V = 32000,
CPU, fp32, implementations ``eaopd_fused``, ``naive_compiled``,
``liger_eaopd``. Writes ``results.json`` (one record per implementation and phase),
``results.md`` and ``meta.json``.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before torch is imported: the child's import time counts it

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

IMPLS = ("eaopd_fused", "naive_compiled", "liger_eaopd")
TOKENS, HIDDEN, VOCAB = 2048, 256, 32000
CHILD_TIMEOUT_S = 900
HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> dict:
    """In the fresh process: import, build inputs, time the first and steady steps.

    Returns the record (also printed as JSON on the last line of stdout).
    """
    import torch
    from cases import Case, make_inputs
    from impls import IMPLS as ALL
    from suites import default_chunk
    from torch._dynamo.utils import counters

    imported = time.perf_counter()
    case = Case(sweep="startup", x="tokens", device=args.device, dtype="fp32",
                tokens=args.tokens, hidden=args.hidden, vocab=args.vocab,
                chunk=default_chunk(args.vocab), impls=(args.child,))
    impl = ALL[args.child]
    record = {"impl": args.child, "phase": args.phase, **case.describe(),
              "threads": torch.get_num_threads(), "import_s": round(imported - _T0, 3)}
    if (reason := impl.needs(case)) is not None:
        return {**record, "status": "skipped", "reason": reason}
    inputs = make_inputs(case, seed=0)
    step = impl.make_step(case, inputs)

    def timed() -> float:
        inputs.clear_grads()
        if case.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if case.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = timed()
    steady = [timed() for _ in range(args.steady)]
    median = statistics.median(steady) if steady else None
    caches = {f"{group}.{k}": v for group in ("inductor", "aot_autograd")
              for k, v in counters[group].items() if "cache" in k or "autograd_cache" in k}
    return {
        **record, "status": "ok", "reason": None,
        "first_call_s": round(first, 3),
        "steady_s": None if median is None else round(median, 3),
        "first_minus_steady_s": None if median is None else round(first - median, 3),
        "steady_times_s": [round(t, 3) for t in steady],
        "graphs": counters["stats"]["unique_graphs"],
        "caches": caches,
        "compile_phases_s": _compile_phases(),
    }


def _compile_phases() -> dict[str, float]:
    """Total seconds per compile phase (dynamo's ``compile_times``), largest first."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        out = {n: float(v) for n, v in zip(names, values, strict=True)}
    except Exception:  # noqa: BLE001 - a private API: the figures are a bonus
        return {}
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])


def run_child(impl: str, phase: str, cache: Path, args: argparse.Namespace) -> dict:
    """One fresh process on ``cache``; its record, or an error record."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache),
           "TRITON_CACHE_DIR": str(cache / "triton")}
    cmd = [sys.executable, str(Path(__file__)), "--child", impl, "--phase", phase,
           "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab",
           str(args.vocab), "--steady", str(args.steady), "--device", args.device]
    base = {"impl": impl, "phase": phase, "tokens": args.tokens, "hidden": args.hidden,
            "vocab": args.vocab, "device": args.device}
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return {**base, "status": "error", "reason": f"timed out after {CHILD_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {**base, "status": "error",
                "reason": f"exit {done.returncode}: " + " | ".join(tail)[:500]}
    return json.loads(lines[-1])


def run(args: argparse.Namespace) -> list[dict]:
    """Cold then warm for each implementation, each on its own new cache directory."""
    records = []
    for impl in args.impls:
        cache = Path(tempfile.mkdtemp(prefix=f"eaopd-startup-{impl}-"))
        try:
            for phase in ("cold", "warm"):
                print(f"startup: {impl} {phase} ...", flush=True)
                records.append(run_child(impl, phase, cache, args))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return records


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(records: list[dict]) -> str:
    """Markdown: one row per implementation and phase, seconds."""
    lines = ["| impl | phase | import s | first call s | steady s | first - steady s | "
             "inductor cache hit/miss | status |", "|---|---|---:|---:|---:|---:|---|---|"]
    for r in records:
        c = r.get("caches", {})
        hits = c.get("inductor.fxgraph_cache_hit", 0)
        misses = c.get("inductor.fxgraph_cache_miss", 0)
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append(f"| {r['impl']} | {r['phase']} | {_fmt(r.get('import_s'))} | "
                     f"{_fmt(r.get('first_call_s'))} | {_fmt(r.get('steady_s'))} | "
                     f"{_fmt(r.get('first_minus_steady_s'))} | {hits}/{misses} | {status} |")
    return "\n".join(lines)


def phases(records: list[dict]) -> str:
    """Where each first call's compile time went (dynamo's phases), one line each."""
    out = []
    for r in records:
        if r.get("compile_phases_s"):
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["compile_phases_s"].items())[:5])
            out.append(f"- {r['impl']} {r['phase']}: {top}")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    """``run.py --suite startup``: plan (``--dry-run``) or measure and write ``--out``."""
    from machine import machine_meta

    args.impls = args.impls.split(",") if args.impls else list(IMPLS)
    unknown = [i for i in args.impls if i not in IMPLS]
    if unknown:
        sys.exit(f"--suite startup measures {', '.join(IMPLS)}; not {', '.join(unknown)}")
    args.tokens = int(args.tokens) if args.tokens else TOKENS
    args.hidden, args.vocab = args.hidden or HIDDEN, args.vocab or VOCAB
    args.steady = max(1, min(args.repeats, 3))
    plan = [f"{impl} {phase}: fresh process, {'new empty' if phase == 'cold' else 'same'} "
            f"cache dir, N={args.tokens} H={args.hidden} V={args.vocab} {args.device} fp32, "
            f"first step + {args.steady} steady" for impl in args.impls
            for phase in ("cold", "warm")]
    if args.dry_run:
        print("suite startup:\n" + "\n".join(plan))
        return 0
    start = time.perf_counter()
    meta = machine_meta(args, 0, "")
    del meta["memory budget"]
    meta["steps"] = f"first step, then {args.steady} steady steps (median), per process"
    records = run(args)
    meta["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["duration"] = f"{(time.perf_counter() - start) / 60:.1f} min"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    md = ["# eaopd_mp start-up time\n", f"Command: `{meta['command']}`\n",
          "| machine | |\n|---|---|"] + [f"| {k} | {v} |" for k, v in meta.items()
                                         if k not in ("command", "implementations")]
    md += ["", table(records), "", "Compile phases of each first call (s):", "",
           phases(records), ""]
    (args.out / "results.md").write_text("\n".join(md))
    print(table(records))
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'results.md'} in "
          f"{meta['duration']}")
    return 0 if all(r["status"] != "error" for r in records) else 1


def _child_main() -> int:
    p = argparse.ArgumentParser(description="one fresh-process start-up measurement")
    p.add_argument("--child", required=True, choices=IMPLS)
    p.add_argument("--phase", required=True, choices=("cold", "warm"))
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--steady", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    print(json.dumps(child(p.parse_args())))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
