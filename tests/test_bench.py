"""The benchmark's GPU suite cannot rot unnoticed on a CPU-only CI.

``bench/run.py --suite gpu --dry-run`` must plan every implementation at every point
with a memory estimate; ``make gpu-check`` must refuse to pass without CUDA; the goals
it reports are checked on hand-made records. No timing is asserted here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import run  # noqa: E402
from report import gpu_goals  # noqa: E402

GPU_IMPLS = {"eaopd_fused", "floor", "floor_chunked", "naive_compiled", "liger_jsd",
             "liger_eaopd"}


def _dry_run(capsys, *args) -> str:
    """``bench/run.py ARGS --dry-run`` in this process (it changes no global setting)."""
    assert run.main([*args, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_gpu_suite_dry_run_plans_every_point(capsys):
    """Issue 13's table: bf16, H = 4096, V = 128256, N = 4k/8k/16k, six implementations,
    each with an estimate; the fused loss's estimate is flat in N, the full-logits ones
    grow with it."""
    out = _dry_run(capsys, "--suite", "gpu")
    assert "cuda bf16" in out.splitlines()[0]
    rows = re.findall(r"^(gpu-V128256)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\w+)\s+([\d.]+)\s+(.*)$",
                      out, flags=re.M)
    plan = {(int(n), impl): (float(est), what) for _s, n, h, v, _c, impl, est, what in rows
            if (int(h), int(v)) == (4096, 128256)}
    assert set(plan) == {(n, i) for n in (4096, 8192, 16384) for i in GPU_IMPLS}, plan.keys()
    for (n, impl), (est, what) in plan.items():
        assert est > 0
        assert what == "run" or what.startswith("liger-kernel not installed"), (n, impl, what)
    assert plan[(16384, "naive_compiled")][0] > 2.5 * plan[(4096, "naive_compiled")][0]
    assert plan[(16384, "eaopd_fused")][0] < 1.2 * plan[(4096, "eaopd_fused")][0]
    assert re.search(r"^gpu-chunk1024\s+8192\s+4096\s+128256\s+1024\s+liger_jsd", out,
                     flags=re.M)
    topk = re.findall(r"^gpu-topk\s+(\d+)\s+4096\s+128256\s+\d+\s+(\w+)\s+([\d.]+)\s+run$",
                      out, flags=re.M)
    assert {(int(n), impl) for n, impl, _ in topk} == {
        (n, i) for n in (4096, 8192, 16384)
        for i in ("eaopd_fused_topk32", "eaopd_fused_topk256", "floor_topk")}, topk
    teachers = re.findall(r"^gpu-teachers\s+8192\s+4096\s+128256\s+\d+\s+(\w+)\s+[\d.]+\s+run$",
                          out, flags=re.M)
    assert sorted(teachers) == ["eaopd_fused_teachers2", "eaopd_fused_teachers4"], teachers


def test_startup_and_cpu_bf16_dry_runs(capsys):
    out = _dry_run(capsys, "--suite", "startup")
    for impl in ("eaopd_fused", "naive_compiled", "liger_eaopd"):
        for phase in ("cold", "warm"):
            assert f"{impl} {phase}: fresh process" in out
    assert "N=2048 H=256 V=32000 cpu fp32" in out
    out = _dry_run(capsys, "--suite", "cpu-bf16")
    for dtype in ("fp32", "bf16"):
        assert re.search(rf"^cpu-{dtype}\s+1024\s+256\s+32000\s+\d+\s+eaopd_fused", out,
                         flags=re.M)


def test_topk_dry_run(capsys):
    """The topk suite plans the dense fused loss, both top-k sizes and both floors at
    the acceptance suite's CPU shapes."""
    out = _dry_run(capsys, "--suite", "topk")
    for tokens, hidden in ((2048, 512), (4096, 128)):
        for impl in ("eaopd_fused", "eaopd_fused_topk32", "eaopd_fused_topk256",
                     "floor_chunked", "floor_topk"):
            assert re.search(rf"^topk-H{hidden}\s+{tokens}\s+{hidden}\s+32000\s+\d+\s+"
                             rf".*{impl}", out, flags=re.M), (impl, out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_suite_without_cuda_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        run.main(["--suite", "gpu", "--out", "unused"])
    assert exc.value.code != 0
    assert "sees no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_fails_loudly_without_cuda(tmp_path):
    """``make gpu-check``'s script: exit 2 and a message, nothing run, no output dir."""
    out = tmp_path / "gpu-check-out"
    done = subprocess.run(["bash", "bench/gpu_check.sh", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "gpu-check: FAILED: no usable CUDA device" in done.stderr
    assert not out.exists()


def _record(impl, tokens, ms, peak, chunk=128, sweep="gpu-V128256"):
    return {"impl": impl, "sweep": sweep, "device": "cuda", "dtype": "bf16", "tokens": tokens,
            "hidden": 4096, "vocab": 128256, "chunk": chunk, "time_ms_median": ms,
            "peak_mib": peak}


def _goal_rows(records):
    text = gpu_goals(records)
    return {line.split("|")[1].strip(): line.split("|")[-2].strip()
            for line in text.splitlines() if line.startswith("| ") and "goal" not in line}


def test_gpu_goals_met_and_missed():
    # grad_h is N * 4096 * 2 bytes: 32, 64, 128 MiB at 4k, 8k, 16k tokens.
    met = []
    for n, fused_ms, peak in ((4096, 21.0, 2080.0), (8192, 43.0, 2112.0), (16384, 86.0, 2176.0)):
        met += [_record("eaopd_fused", n, fused_ms, peak), _record("floor", n, 20.0 * n / 4096, 0),
                _record("liger_jsd", n, 50.0 * n / 4096, 3000.0),
                _record("liger_jsd", n, 30.0 * n / 4096, 9000.0, chunk=1024,
                        sweep="gpu-chunk1024")]
    rows = _goal_rows(met)
    assert rows["eaopd_fused / floor <= 1.10"] == "met"
    assert rows["eaopd_fused faster than liger_jsd"] == "met"
    assert rows["peak - hidden grad flat in N (max/min <= 1.10)"] == "met (1.00)"

    slow = [dict(r) for r in met]
    for r in slow:
        if r["impl"] == "eaopd_fused" and r["tokens"] == 8192:
            r["time_ms_median"] = 45.0  # 1.125x the floor
        if r["impl"] == "liger_jsd" and r["tokens"] == 8192 and r["chunk"] == 1024:
            r["time_ms_median"] = 44.0  # Liger's faster chunk now beats the fused loss
        if r["impl"] == "eaopd_fused" and r["tokens"] == 16384:
            r["peak_mib"] = 2500.0  # grows beyond the hidden gradient
    rows = _goal_rows(slow)
    assert rows["eaopd_fused / floor <= 1.10"] == "MISSED"
    assert rows["eaopd_fused faster than liger_jsd"] == "MISSED"
    assert rows["peak - hidden grad flat in N (max/min <= 1.10)"].startswith("MISSED")


def test_gpu_goals_without_liger_or_gpu_records():
    records = [_record("eaopd_fused", n, 21.0, 2100.0) for n in (4096, 8192)]
    records += [_record("floor", n, 20.0, 0) for n in (4096, 8192)]
    rows = _goal_rows(records)
    assert rows["eaopd_fused faster than liger_jsd"] == "not measured"
    assert rows["eaopd_fused / floor <= 1.10"] == "met"
    cpu = [dict(r, device="cpu", sweep="tokens-V32000") for r in records]
    assert gpu_goals(cpu) == ""


def test_long_suite_dry_run_and_logits_table(capsys):
    """Issue 17's long-context suite: V = 151936, the fused loss and the naive compiled
    loss at H = 128 and N = 2k/8k/32k on CPU (H = 4096, N = 8k..128k with --device cuda,
    planned here without CUDA); the fused estimate is flat in N. The logits table gives
    one (N, V) fp32 tensor's size and each implementation's peak or skip reason."""
    from report import logits_bytes

    out = _dry_run(capsys, "--suite", "long")
    rows = re.findall(r"^long-V151936-H\S*\s+(\d+)\s+128\s+151936\s+\d+\s+(\w+)\s+([\d.]+)",
                      out, flags=re.M)
    plan = {(int(n), impl): float(est) for n, impl, est in rows}
    assert set(plan) == {(n, i) for n in (2048, 8192, 32768)
                         for i in ("eaopd_fused", "naive_compiled")}, plan
    assert plan[(32768, "eaopd_fused")] < 1.2 * plan[(2048, "eaopd_fused")]
    assert plan[(32768, "naive_compiled")] > 15 * plan[(2048, "naive_compiled")]
    out = _dry_run(capsys, "--suite", "long", "--device", "cuda")
    assert re.search(r"^long-V151936-H\S*\s+131072\s+4096\s+151936", out, flags=re.M)

    base = dict(sweep="long-V151936-H128", vocab=151936, time_ms_median=1500.0)
    records = [dict(base, impl="eaopd_fused", tokens=2048, status="ok", peak_mib=100.0),
               dict(base, impl="naive_compiled", tokens=2048, status="skipped",
                    reason="over budget", peak_mib=None)]
    table = logits_bytes(records).splitlines()
    assert table[2] == ("| 2048 | 1187 MiB | 100 MiB / 1.50 s | skipped: over budget |"), table
    assert logits_bytes([dict(records[0], sweep="tokens-V32000")]) == ""


def test_real_suite_dry_run(capsys):
    """The real-model suite: SmolLM2's H = 576, V = 49152 on CPU fp32, the fused loss
    against the two full-logits losses and the floor at N = 1k, 4k, 16k under its stated
    8 GiB budget: the fused loss runs at every point with a flat estimate, the logits paths
    are skipped where their estimate passes the budget."""
    out = _dry_run(capsys, "--suite", "real")
    assert "cpu fp32; memory budget 8.0 GiB (the real suite's budget)" in out.splitlines()[0]
    rows = re.findall(r"^real-smollm2\S*\s+(\d+)\s+576\s+49152\s+\d+\s+(\w+)\s+([\d.]+)\s+(.*)$",
                      out, flags=re.M)
    plan = {(int(n), impl): (float(est), what) for n, impl, est, what in rows}
    impls = ("eaopd_fused", "eaopd_logits", "naive_eager", "floor_chunked")
    assert set(plan) == {(n, i) for n in (1024, 4096, 16384) for i in impls}, plan
    runs = {key for key, (_, what) in plan.items() if what == "run"}
    assert runs == {(n, i) for n in (1024, 4096, 16384) for i in ("eaopd_fused", "floor_chunked")
                    } | {(1024, "eaopd_logits"), (4096, "eaopd_logits"), (1024, "naive_eager")}
    for key in set(plan) - runs:
        assert plan[key][1].endswith("> memory budget 8.00 GiB"), (key, plan[key])
    assert plan[(16384, "eaopd_fused")][0] < 1.2 * plan[(1024, "eaopd_fused")][0]
    out = _dry_run(capsys, "--suite", "real", "--mem-budget-gib", "32")
    assert out.count(" run\n") == 12 - 1  # naive_eager at 16k needs ~60 GiB
