"""A real model's inputs for the ``real`` suite: SmolLM2-135M-Instruct's hidden states and head.

The teacher is SmolLM2-135M-Instruct (``examples/smollm2.py``: V = 49,152, H = 576, tied
embeddings), the student the untrained 24-layer copy ``examples/real_opd.py`` starts from
(its decoder layers 0-11 and 18-29). Both read the same real text, this repository's own Markdown
(``README.md``, ``CONTRIBUTING.md``, ``docs/**/*.md`` in sorted order, tokenized and cut into
512-token windows), and the last hidden states of every position (after the final norm:
what the head multiplies) are the inputs: ``hs`` the student's, ``ht`` the teacher's. The
heads are the models' tied embeddings: ``ws`` the student's copy, ``wt`` the teacher's (equal
values, as at the start of a distillation run). ``N`` tokens are the first ``N`` positions;
past the text's length the windows repeat.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import torch
from cases import Case, Inputs, make_inputs

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 512
STUDENT_LAYERS = "0-11,18-29"  # real_opd's default --layers


def corpus_files() -> list[Path]:
    """The Markdown read, in a fixed order."""
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md",
            *sorted((ROOT / "docs").rglob("*.md"))]


@cache
def _models():
    sys.path.insert(0, str(ROOT / "examples"))
    import real_opd
    import smollm2

    teacher, tokenizer = smollm2.load()
    teacher.requires_grad_(False)
    layers = real_opd.parse_layers(STUDENT_LAYERS)
    student = real_opd.make_student(teacher, layers).requires_grad_(False)
    return teacher, student, tokenizer


_WINDOWS: list[tuple[torch.Tensor, torch.Tensor]] = []  # (student, teacher) hidden, per window


@cache
def _token_windows() -> torch.Tensor:
    """``(windows, WINDOW)`` token ids of the corpus (read and tokenized once)."""
    tokenizer = _models()[2]
    text = "\n\n".join(p.read_text() for p in corpus_files())
    ids = torch.tensor(tokenizer(text).input_ids)
    available = len(ids) // WINDOW
    return ids[:available * WINDOW].view(available, WINDOW)


def _hidden(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hs, ws, ht, wt)`` float32 for the first ``tokens`` positions (see the module);
    the windows computed so far are kept, so a sweep runs each model once per window."""
    from eaopd_mp import hf

    teacher, student, _ = _models()
    rows = _token_windows()
    with torch.no_grad():
        while len(_WINDOWS) * WINDOW < tokens:
            row = rows[len(_WINDOWS) % len(rows)][None]
            _WINDOWS.append((hf.last_hidden_state(student, row)[0],
                             hf.last_hidden_state(teacher, row)[0]))
    hs, ht = (torch.cat(side)[:tokens] for side in zip(*_WINDOWS, strict=True))
    return (hs, hf.lm_head(student).weight.detach(), ht, hf.lm_head(teacher).weight.detach())


def smollm2_inputs(case: Case, device: str | None = None) -> Inputs:
    """The case's inputs from SmolLM2 (``case.hidden`` must be 576, ``case.vocab``
    49,152)."""
    hs, ws, ht, wt = _hidden(case.tokens)
    if (case.hidden, case.vocab) != tuple(ws.shape[::-1]):
        raise ValueError(f"the smollm2 inputs are H={ws.shape[1]}, V={ws.shape[0]}, not "
                         f"H={case.hidden}, V={case.vocab}")
    dev, dtype = device or case.device, case.torch_dtype

    def place(t, grad=False):
        return t.to(device=dev, dtype=dtype).requires_grad_(grad)

    return Inputs(place(hs, True), place(ws, True), place(ht), place(wt))


def inputs_for(case: Case, seed: int = 0, device: str | None = None) -> Inputs:
    """Any case's inputs: a real model's for ``source="smollm2"`` (no seed), else
    :func:`cases.make_inputs`' random ones."""
    if case.source == "smollm2":
        return smollm2_inputs(case, device)
    return make_inputs(case, seed, device)
