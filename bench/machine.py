"""What a benchmark's numbers depend on: the machine, the versions, the settings, the
commit (``meta.json``). Shared by every suite (``run.py``, ``startup.py``)."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
from impls import IMPLS
from memory import GIB, available_bytes


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


def _cpu_bf16_flags() -> str:
    """The CPU's bf16 instructions (they decide whether bf16 GEMMs beat fp32 ones)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return " ".join(found) or "none"


def machine_meta(args: argparse.Namespace, budget: int, budget_from: str) -> dict:
    """What the numbers depend on: hardware, versions, settings, when, which commit."""
    meta = {
        "command": "python bench/run.py " + shlex.join(sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores visible",
        "cpu bf16 instructions": _cpu_bf16_flags(),
        "torch threads": torch.get_num_threads(),
        "memory": f"{_mem_total() / GIB:.1f} GiB, "
                  f"{available_bytes(torch.device('cpu')) / GIB:.1f} GiB available at start",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "liger-kernel": _version("liger-kernel"),
        "eaopd_mp commit": _git_commit(),
        "memory budget": f"{budget / GIB:.1f} GiB ({budget_from})",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "steps": f"{args.warmup} warm-up + {args.repeats} timed per point, interleaved",
    }
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
        meta["cuda"] = torch.version.cuda
        meta["triton"] = _version("triton")
    meta["implementations"] = {name: impl.about for name, impl in IMPLS.items()}
    return meta
