"""A real vLLM server for these tests: started by tests/served/run.sh (make test-served),
which exports the EAOPD_SERVED_* variables below. Without them (``make test``) nothing here
is collected; run by path without a server, every test fails, naming make test-served."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# appended, not prepended: make test loads this file too, and must not see other modules first
sys.path += [str(ROOT / "examples"), str(Path(__file__).resolve().parent)]

from served_helpers import padded  # noqa: E402

collect_ignore_glob = [] if os.environ.get("EAOPD_SERVED_URL") else ["test_*.py"]

# Chats with fixed answers (the teacher's kind of text), ragged lengths once tokenized.
CHATS = [
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine "
     "known for the Eiffel Tower and the Louvre."),
    ("Write a haiku about the sea.", "Waves fold into foam,\nsalt wind carries gull voices,\n"
     "the tide keeps its time."),
    ("2+2?", "4"),
    ("Why is the sky blue?", "Sunlight scatters off the molecules of the air, and blue "
     "light, with its shorter wavelength, scatters the most, so the sky looks blue from "
     "every direction."),
]


@pytest.fixture(scope="session")
def server() -> dict:
    """The running server: url, model name, max_logprobs, the folder it serves, its pgid."""
    if not os.environ.get("EAOPD_SERVED_URL"):
        pytest.fail("these tests need the server tests/served/run.sh starts: make test-served")
    return {"url": os.environ["EAOPD_SERVED_URL"], "model": os.environ["EAOPD_SERVED_MODEL"],
            "folder": os.environ["EAOPD_SERVED_FOLDER"],
            "max_logprobs": int(os.environ["EAOPD_SERVED_MAX_LOGPROBS"]),
            "pgid": int(os.environ["EAOPD_SERVED_PGID"])}


@pytest.fixture(scope="session")
def tokenizer(server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server["folder"])


@pytest.fixture(scope="session")
def teacher(server):
    """The served model in this process, float32 (the server computes in bfloat16)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(server["folder"], dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """``(input_ids, attention_mask, sequences)``: the chats, right-padded (pad id 2)."""
    seqs = []
    for question, answer in CHATS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}],
                                            tokenize=True)
        seqs.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return (*padded(seqs, "right"), seqs)


@pytest.fixture(scope="session")
def student_hidden(teacher, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden, weight)``: the ``(B, T - 1, H)`` last hidden states of a real student (the
    teacher's every third layer, untrained) on the batch and its ``(V, H)`` output layer."""
    from served_opd import shallow_student

    from eaopd_mp.hf import last_hidden_state, lm_head

    ids, mask, _ = batch
    student = shallow_student(teacher)
    with torch.no_grad():
        return last_hidden_state(student, ids, mask)[:, :-1], lm_head(student).weight.detach()


@pytest.fixture(scope="session")
def reference(teacher, batch) -> torch.Tensor:
    """``(B, T - 1, V)`` float32 log-probabilities of the in-process teacher at the loss's
    next-token positions (each sequence run unpadded), NaN at padded positions."""
    ids, _, seqs = batch
    out = torch.full((ids.shape[0], ids.shape[1] - 1, teacher.config.vocab_size), float("nan"))
    with torch.no_grad():
        for b, s in enumerate(seqs):
            logits = teacher(torch.tensor([s])).logits[0, :-1].float()
            out[b, :len(s) - 1] = torch.log_softmax(logits, -1)
    return out
