"""Benchmark eaopd_mp against the alternatives: time and peak memory, forward + backward.

    python bench/run.py --quick --out bench-out            # < 5 min on 2 CPU cores
    python bench/run.py --out bench-out                     # the full CPU sweep
    python bench/run.py --device cuda --dtype bf16 --out bench-cuda
    python bench/run.py --suite acceptance --out bench-acc # fused loss vs the GEMM floor
    python bench/run.py --suite gpu --out bench-gpu         # the GPU table (CUDA)
    python bench/run.py --suite gpu --dry-run               # its plan, also without CUDA
    python bench/run.py --suite startup --out bench-startup # cold/warm first calls (CPU)
    python bench/run.py --suite cpu-bf16 --out bench-bf16   # bf16 next to fp32 on CPU
    python bench/run.py --suite topk --out bench-topk       # served top-k teacher (CPU)
    python bench/run.py --suite long --out bench-long       # long context, V = 151936
    python bench/run.py --suite long --device cuda --dtype bf16 --out bench-long-cuda
    python bench/run.py --suite teachers --out bench-teachers # 1, 2, 4 routed teachers
    python bench/run.py --suite real --out bench-real       # SmolLM2's hidden states, head

Writes ``results.json`` (one record per implementation and point), ``results.md``
(tables), ``meta.json`` (machine, versions, command) and one PNG per sweep into
``--out``, and prints a compact table. See ``harness.py`` for the method.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from harness import Bench, Progress, Settings, plan_table
from impls import IMPLS, configure_process
from machine import machine_meta
from memory import GIB, available_bytes, cpu_peak_supported
from report import dtype_ratios, flatness, gpu_goals, logits_bytes, text_table, write_all
from suites import (
    SUITE_BUDGETS_GIB,
    SUITES,
    acceptance_suite,
    cpu_bf16_suite,
    custom_sweep,
    gpu_suite,
    long_suite,
    main_suite,
    real_suite,
    teachers_suite,
    topk_suite,
)

# A dry run of a CUDA suite on a machine without CUDA sizes its budget for this much
# device memory: an H100's 80 GB, the smaller of the two GPUs the suite is written for.
NOMINAL_GPU_GIB = 80.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="output directory (required unless --dry-run)")
    p.add_argument("--suite", choices=sorted(SUITES), default="main")
    p.add_argument("--quick", action="store_true", help="a small tokens sweep only")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: the suite's device, else cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"),
                   help="default: the suite's dtype, else fp32")
    p.add_argument("--tokens", help="comma-separated N: run one custom tokens sweep "
                   "instead of the suite (with --hidden, --vocab, --chunk)")
    p.add_argument("--hidden", type=int, help="H of --tokens (default 128) or of --suite "
                   "startup (default 256)")
    p.add_argument("--vocab", type=int, help="V of --tokens or --suite startup "
                   "(default 32000)")
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
    fixed = SUITES[args.suite] or (None, None)
    for field, value, default in zip(("device", "dtype"), fixed, ("cpu", "fp32"), strict=True):
        given = getattr(args, field)
        if value is not None and given not in (None, value):
            p.error(f"--suite {args.suite} is defined on --{field} {value}, not {given}")
        setattr(args, field, given or value or default)
    if args.tokens and args.suite not in ("main", "startup"):
        p.error("--tokens replaces the suite: leave --suite out")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        p.error(f"--device cuda (--suite {args.suite}): torch {torch.__version__} sees no "
                f"CUDA device (built for CUDA {torch.version.cuda}); --dry-run shows the plan")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def select_cases(args: argparse.Namespace):
    """The suite's cases, filtered by ``--sweeps`` and ``--impls``."""
    if args.tokens:
        tokens = tuple(int(n) for n in args.tokens.split(","))
        cases = custom_sweep(args.device, args.dtype, tokens, args.hidden or 128,
                             args.vocab or 32000, args.chunk)
    elif args.suite == "acceptance":
        cases = acceptance_suite()
    elif args.suite == "gpu":
        cases = gpu_suite()
    elif args.suite == "cpu-bf16":
        cases = cpu_bf16_suite()
    elif args.suite == "topk":
        cases = topk_suite()
    elif args.suite == "long":
        cases = long_suite(args.device, args.dtype)
    elif args.suite == "teachers":
        cases = teachers_suite()
    elif args.suite == "real":
        cases = real_suite()
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


def memory_budget(args: argparse.Namespace) -> tuple[int, str]:
    """Bytes a point may use (``--mem-budget-gib``, else the suite's own, else 60 % of what
    is available) and where the figure comes from."""
    if args.mem_budget_gib:
        return int(args.mem_budget_gib * GIB), "--mem-budget-gib"
    if args.suite in SUITE_BUDGETS_GIB and not args.tokens:
        return int(SUITE_BUDGETS_GIB[args.suite] * GIB), f"the {args.suite} suite's budget"
    if args.device == "cuda" and not torch.cuda.is_available():  # a dry run
        return int(0.6 * NOMINAL_GPU_GIB * GIB), \
            f"60% of a nominal {NOMINAL_GPU_GIB:g} GiB GPU (no CUDA here)"
    where = "free GPU memory" if args.device == "cuda" else "MemAvailable"
    return int(0.6 * available_bytes(torch.device(args.device))), f"60% of {where}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.suite == "startup":
        import startup

        return startup.main(args)
    budget, budget_from = memory_budget(args)
    cases = select_cases(args)
    settings = Settings(repeats=args.repeats, warmup=args.warmup, budget_bytes=budget,
                        seed=args.seed, check=not args.no_check)
    if args.dry_run:  # changes no process-wide setting: tests call it in-process
        dtypes = "/".join(dict.fromkeys(c.dtype for c in cases))
        print(f"suite {args.suite}: {args.device} {dtypes}; memory budget "
              f"{budget / GIB:.1f} GiB ({budget_from}); {args.warmup} warm-up + "
              f"{args.repeats} timed + 1 memory step per point and implementation\n")
        print(plan_table(cases, settings))
        return 0
    configure_process()
    if args.device == "cpu":
        ok, why = cpu_peak_supported()
        if not ok:
            sys.exit(f"cannot measure CPU peak memory here: {why}")
    start = time.perf_counter()
    meta = machine_meta(args, budget, budget_from)
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
    for extra in (gpu_goals(records), dtype_ratios(records), logits_bytes(records)):
        if extra:
            print("\n" + extra)
    print(f"\nwrote {', '.join(str(p) for p in paths)} in {meta['duration']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
