#!/usr/bin/env bash
# make gpu-check: the CUDA tests, then the GPU benchmark, on a machine with a GPU.
#
#   bash bench/gpu_check.sh [OUT]        (default OUT: gpu-check-out)
#
# Needs: python3 (or $PYTHON) with a CUDA build of torch that sees a GPU, pytest, numpy,
# matplotlib and tqdm; triton comes with CUDA torch. Nothing is downloaded. liger-kernel
# is optional: if it is not importable and gpu-wheels/ holds its wheel (`make gpu-wheels`
# on a machine with internet), it is installed from there with --no-deps; otherwise the
# two Liger rows of the benchmark are recorded as skipped and the summary says so.
#
# Written to finish within 8 minutes on one H100/H200. Budgets, each enforced by
# `timeout` (a part that overruns fails the check; what it wrote is kept):
#   preflight (CUDA, nvidia-smi, versions, liger)     30 s
#   1. CUDA tests: pytest tests/test_devices.py      150 s
#   1b. DeepSpeed ZeRO-3, one rank (test_zero3.py)    60 s (skipped, with its reason,
#       where deepspeed is not importable: it is not in the dev extra)
#   2. bench/run.py --suite gpu                      280 s
#   (about 20 s left for start-up and the summary)
# These are estimates, not yet measured (no GPU was available when this was written):
# the tests compile a few dozen Triton kernels; the benchmark compiles each
# implementation once or twice (~150 s in all), builds 4 GiB of inputs per point on the
# CPU and runs ~170 steps of 0.05-0.3 s. TEST_BUDGET_S and BENCH_BUDGET_S override them.
#
# Exit status: 0 only if CUDA is there, every CUDA test passed and the benchmark
# finished; 2 without CUDA (nothing else runs); 1 otherwise. The benchmark's goals
# are reported in bench/results.md and the summary; a missed goal is a
# measurement, not a failure of the check.
set -uo pipefail

OUT=${1:-gpu-check-out}
PY=${PYTHON:-python3}
TEST_BUDGET_S=${TEST_BUDGET_S:-150}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-280}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

fail() {
    echo "gpu-check: FAILED: $*" >&2
    exit "${2:-1}"
}

# ------------------------------------------------------------------ preflight
start_all=$SECONDS
if ! "$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError as exc:
    sys.exit(f"cannot import torch: {exc}")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) at "
             f"{sys.executable} sees no CUDA device")
EOF
then
    echo "gpu-check: FAILED: no usable CUDA device (above). make gpu-check runs on a" \
         "machine with an NVIDIA GPU and a CUDA build of torch (PYTHON=... picks the" \
         "interpreter); nothing was run." >&2
    exit 2
fi

if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ ! -f "$OUT/.gpu-check" ]; then
    fail "$OUT exists and is not a previous gpu-check output: not replacing it"
fi
rm -rf "$OUT"
mkdir -p "$OUT"
touch "$OUT/.gpu-check"
{ nvidia-smi && nvidia-smi -q -d CLOCK,POWER,MEMORY; } >"$OUT/nvidia-smi.txt" 2>&1 \
    || echo "nvidia-smi failed or is missing (see $OUT/nvidia-smi.txt)"

liger_note="liger-kernel: importable"
if ! "$PY" -c "import liger_kernel" 2>/dev/null; then
    wheel=$(find gpu-wheels -maxdepth 1 -name 'liger_kernel-*.whl' 2>/dev/null | head -n 1)
    if [ -n "$wheel" ] && "$PY" -m pip install --quiet --no-deps --no-index "$wheel" \
        >"$OUT/pip-liger.txt" 2>&1; then
        liger_note="liger-kernel: installed from $wheel"
    else
        liger_note="liger-kernel: NOT INSTALLED (no gpu-wheels/liger_kernel-*.whl, or its
  install failed: $OUT/pip-liger.txt): liger_jsd and liger_eaopd are skipped"
    fi
fi
echo "$liger_note"

"$PY" - >"$OUT/versions.txt" 2>&1 <<'EOF'
import platform, subprocess
from importlib import metadata
import torch
def version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"
props = torch.cuda.get_device_properties(0)
commit = subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True,
                        text=True).stdout.strip() or "unknown (no git)"
for k, v in {
    "python": platform.python_version(), "torch": torch.__version__,
    "torch CUDA": torch.version.cuda, "cuDNN": torch.backends.cudnn.version(),
    "NCCL": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-",
    "triton": version("triton"), "liger-kernel": version("liger-kernel"),
    "numpy": version("numpy"), "pytest": version("pytest"),
    "GPUs": torch.cuda.device_count(),
    "GPU 0": f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
             f"capability {props.major}.{props.minor}, {props.multi_processor_count} SMs",
    "eaopd_mp commit": commit,
}.items():
    print(f"{k}: {v}")
EOF
cat "$OUT/versions.txt"
echo "preflight: $((SECONDS - start_all)) s (budget 30 s)"

# ------------------------------------------------------------------ 1. CUDA tests
t0=$SECONDS
EAOPD_REQUIRE_CUDA=1 timeout -k 10 "$TEST_BUDGET_S" "$PY" -m pytest tests/test_devices.py \
    -k "cuda or nccl" -rA -p no:cacheprovider --junitxml="$OUT/pytest.xml" 2>&1 \
    | tee "$OUT/pytest.txt"
tests_rc=${PIPESTATUS[0]}
tests_s=$((SECONDS - t0))
case $tests_rc in
    0) tests_status="passed" ;;
    124) tests_status="TIMED OUT after its budget of $TEST_BUDGET_S s" ;;
    5) tests_status="NO TEST RAN (exit 5)" ;;
    *) tests_status="FAILED (pytest exit $tests_rc)" ;;
esac
echo "CUDA tests: $tests_status in $tests_s s (budget $TEST_BUDGET_S s)"

# ------------------------------------------------------------------ 1b. ZeRO-3, one rank
t0=$SECONDS
if "$PY" -c "import deepspeed" >"$OUT/deepspeed-import.txt" 2>&1; then
    timeout -k 10 "${ZERO3_BUDGET_S:-60}" "$PY" -m pytest tests/test_zero3.py -k cuda -rA \
        -p no:cacheprovider 2>&1 | tee "$OUT/zero3.txt"
    zero3_rc=${PIPESTATUS[0]}
    case $zero3_rc in
        0) zero3_status="passed" ;;
        124) zero3_status="TIMED OUT" ;;
        *) zero3_status="FAILED (pytest exit $zero3_rc)" ;;
    esac
else
    zero3_rc=0
    zero3_status="SKIPPED: deepspeed is not importable ($(tail -n 1 "$OUT/deepspeed-import.txt"));
  pip install deepspeed on this machine to run it"
fi
echo "ZeRO-3 case: $zero3_status in $((SECONDS - t0)) s"

# ------------------------------------------------------------------ 2. benchmark
t0=$SECONDS
timeout -k 10 "$BENCH_BUDGET_S" "$PY" bench/run.py --suite gpu --warmup 2 --repeats 5 \
    --out "$OUT/bench" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}
bench_s=$((SECONDS - t0))
case $bench_rc in
    0) bench_status="finished" ;;
    124) bench_status="TIMED OUT after its budget of $BENCH_BUDGET_S s (finished points kept)" ;;
    *) bench_status="FAILED (exit $bench_rc)" ;;
esac
echo "benchmark: $bench_status in $bench_s s (budget $BENCH_BUDGET_S s)"

# ------------------------------------------------------------------ summary
{
    echo "gpu-check $(date -Is)"
    echo "total: $((SECONDS - start_all)) s (goal: under 480 s)"
    echo "CUDA tests: $tests_status in $tests_s s (budget $TEST_BUDGET_S s):"
    grep -E '^(=+ .*(passed|failed|skipped|error).* =+|FAILED|ERROR|SKIPPED)' \
        "$OUT/pytest.txt" | sed 's/^/  /'
    echo "ZeRO-3 case: $zero3_status"
    echo "benchmark: $bench_status in $bench_s s (budget $BENCH_BUDGET_S s)"
    echo "$liger_note"
    if [ -f "$OUT/bench/results.md" ]; then
        sed -n '/^### Goals/,/^### /p' "$OUT/bench/results.md" | sed '$d'
    fi
    echo
    cat "$OUT/versions.txt"
} >"$OUT/summary.txt"
echo
echo "================================ gpu-check summary"
cat "$OUT/summary.txt"

if [ "$tests_rc" -ne 0 ] || [ "$zero3_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
    fail "CUDA tests: $tests_status; ZeRO-3: $zero3_status; benchmark: $bench_status (outputs in $OUT/)"
fi
echo "gpu-check: OK (outputs in $OUT/)"
