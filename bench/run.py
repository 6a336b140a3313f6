"""Benchmark eaopd_mp against the alternatives: time and peak memory, forward + backward.

    python bench/run.py --quick --out bench-out            # < 5 min on 2 CPU cores
    python bench/run.py --out bench-out                     # the full CPU sweep
    python bench/run.py --device cuda --dtype bf16 --out bench-cuda
    python bench/run.py --suite issue2 --out bench-issue2   # issue 2's acceptance table

Writes ``results.json`` (one record per implementation and point), ``results.md``
(tables), ``meta.json`` (machine, versions, command) and one PNG per sweep into
``--out``, and prints a compact table. See ``harness.py`` for the method.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import torch
from harness import Bench, Progress, Settings, plan_table
from impls import IMPLS, configure_process
from memory import GIB, available_bytes, cpu_peak_supported
from report import flatness, text_table, write_all
from suites import SUITES, custom_sweep, issue2_suite, main_suite


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="output directory (required unless --dry-run)")
    p.add_argument("--suite", choices=sorted(SUITES), default="main")
    p.add_argument("--quick", action="store_true", help="a small tokens sweep only")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--tokens", help="comma-separated N: run one custom tokens sweep "
                   "instead of the suite (with --hidden, --vocab, --chunk)")
    p.add_argument("--hidden", type=int, default=128, help="H of --tokens (default 128)")
    p.add_argument("--vocab", type=int, default=32000, help="V of --tokens (default 32000)")
    p.add_argument("--chunk", type=int, help="chunk of --tokens (default: eaopd_mp's)")
    p.add_argument("--impls", help="comma-separated subset of: " + ", ".join(IMPLS))
    p.add_argument("--sweeps", help="comma-separated subset of the suite's sweep names")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per point (>= 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per point")
    p.add_argument("--mem-budget-gib", type=float,
                   help="skip a point whose estimated peak is larger (default: 60%% of "
                        "the available memory)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the reference loss/gradient check (saves one pass per point)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="print the points, memory estimates and skips, and exit")
    args = p.parse_args(argv)
    if args.out is None and not args.dry_run:
        p.error("--out is required")
    if args.suite == "issue2" and (args.device, args.dtype) != ("cpu", "fp32"):
        p.error("--suite issue2 is defined on CPU in fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def select_cases(args: argparse.Namespace):
    """The suite's cases, filtered by ``--sweeps`` and ``--impls``."""
    if args.tokens:
        tokens = tuple(int(n) for n in args.tokens.split(","))
        cases = custom_sweep(args.device, args.dtype, tokens, args.hidden, args.vocab,
                             args.chunk)
    elif args.suite == "issue2":
        cases = issue2_suite()
    else:
        cases = main_suite(args.device, args.dtype, args.quick)
    if args.sweeps:
        keep = set(args.sweeps.split(","))
        cases = [c for c in cases if c.sweep in keep]
    if args.impls:
        wanted = args.impls.split(",")
        unknown = [w for w in wanted if w not in IMPLS]
        if unknown:
            sys.exit(f"unknown implementation(s): {', '.join(unknown)}")
        cases = [replace(c, impls=tuple(i for i in c.impls if i in wanted)) for c in cases]
        cases = [c for c in cases if c.impls]
    if not cases:
        sys.exit("nothing to run: no case left after --sweeps/--impls")
    return cases


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def machine_meta(args: argparse.Namespace, budget: int) -> dict:
    """What the numbers depend on: hardware, versions, settings, when, which commit."""
    meta = {
        "command": "python bench/run.py " + shlex.join(sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores visible",
        "torch threads": torch.get_num_threads(),
        "memory": f"{_mem_total() / GIB:.1f} GiB, "
                  f"{available_bytes(torch.device('cpu')) / GIB:.1f} GiB available at start",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "liger-kernel": _version("liger-kernel"),
        "eaopd_mp commit": _git_commit(),
        "memory budget": f"{budget / GIB:.1f} GiB",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "steps": f"{args.warmup} warm-up + {args.repeats} timed per point, interleaved",
    }
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    meta["implementations"] = {name: impl.about for name, impl in IMPLS.items()}
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_process()
    if args.device == "cpu":
        ok, why = cpu_peak_supported()
        if not ok:
            sys.exit(f"cannot measure CPU peak memory here: {why}")
    budget = int(args.mem_budget_gib * GIB) if args.mem_budget_gib else int(
        0.6 * available_bytes(torch.device(args.device)))
    cases = select_cases(args)
    settings = Settings(repeats=args.repeats, warmup=args.warmup, budget_bytes=budget,
                        seed=args.seed, check=not args.no_check)
    if args.dry_run:
        print(plan_table(cases, settings))
        return 0
    start = time.perf_counter()
    meta = machine_meta(args, budget)
    progress = Progress(cases, settings)
    bench = Bench(settings, progress)
    records: list[dict] = []
    try:
        for case in cases:
            records += bench.run_case(case)
            write_all(records, meta, args.out, plots=False)  # survives an interruption
    finally:
        bench.close()
        progress.close()
    meta["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["duration"] = f"{(time.perf_counter() - start) / 60:.1f} min"
    paths = write_all(records, meta, args.out)
    print(text_table(records))
    if flat := flatness(records):
        print("\n" + flat)
    print(f"\nwrote {', '.join(str(p) for p in paths)} in {meta['duration']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
