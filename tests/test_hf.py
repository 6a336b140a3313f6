"""eaopd_mp.hf on tiny random-init transformers models built from configs (no download).

For each architecture, ``eaopd_mp.hf.eaopd_loss`` equals ``entropy_aware_opd_loss`` on
the models' own ``.logits`` (shifted, masked, cut to the shared vocabulary) in loss and in
the gradient of every student parameter (float32, rtol 1e-5).
"""

from __future__ import annotations

import pytest
import torch
import transformers  # in the dev extra: a missing install fails, not skips

from eaopd_mp import entropy_aware_opd_loss, hf
from formulas import close

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.4,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (model class, config class, config kwargs). initializer_range=0.4 gives logits of
# a few units, so a cap of 2-3 and a scale of 0.25 change them (checked below).
ARCHS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(vocab_size=61)),
    "qwen2_tied": ("Qwen2ForCausalLM", "Qwen2Config", dict(vocab_size=64,
                                                           tie_word_embeddings=True)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(vocab_size=64, head_dim=16,
                                                         final_logit_softcapping=2.0)),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        vocab_size=64, head_dim=16, final_logit_softcapping=3.0)),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict(vocab_size=64, logit_scale=0.25)),
    "phi_bias": ("PhiForCausalLM", "PhiConfig", dict(vocab_size=70)),  # lm_head has a bias
}


def make_model(name: str, seed: int = 0):
    cls, cfg_cls, kw = ARCHS[name]
    config = getattr(transformers, cfg_cls)(**COMMON, **kw)
    config._attn_implementation = "eager"  # Gemma 2 soft-caps attention: no sdpa
    torch.manual_seed(seed)
    return getattr(transformers, cls)(config).float()


def _batch(vocab=60, seed=0):
    """Left-padded prompts + completions, as TRL's trainers make them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # left padding
    attn[1, :1] = 0
    ids[attn == 0] = 0
    comp = torch.zeros_like(ids)
    comp[:, 6:] = 1  # completion: the last 5 tokens
    comp[2, 9:] = 0  # a completion padded after its end
    attn[2, 9:] = 0
    return ids, attn, comp


# (student, teacher): every architecture is a student once; teachers of another family and
# vocabulary size (61 vs 64, 64 vs 70), soft-capped and scaled teachers.
PAIRS = [("llama", "qwen2_tied"), ("qwen2_tied", "phi_bias"), ("gemma2", "cohere"),
         ("gemma3_text", "gemma2"), ("cohere", "llama"), ("phi_bias", "gemma3_text")]


def _reference(student, teacher, ids, attn, comp, **opts):
    """entropy_aware_opd_loss on the models' own logits, shifted, masked, vocab cut."""
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    z = student(input_ids=ids, attention_mask=attn).logits[:, :-1, :vocab]
    with torch.no_grad():
        y = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1, :vocab]
    labels = (comp * attn)[:, 1:].float()
    return entropy_aware_opd_loss(z, y, labels=labels, **opts)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("student_name,teacher_name", PAIRS)
def test_eaopd_loss_equals_loss_on_model_logits(eager, student_name, teacher_name):
    student, teacher = make_model(student_name, 0), make_model(teacher_name, 1)
    ids, attn, comp = _batch()
    opts = dict(temperature=0.9, reduction="sum", return_stats=True)
    loss, stats = hf.eaopd_loss(student, teacher, ids, attn, comp, **opts)
    loss.backward()
    got = _grads(student)
    student.zero_grad(set_to_none=True)
    ref, ref_stats = _reference(student, teacher, ids, attn, comp, **opts)
    ref.backward()
    want = _grads(student)
    close(loss, ref)
    for key in ("teacher_entropy", "fkl_weight", "kl_fwd", "kl_rev", "tokens"):
        close(stats[key], ref_stats[key], msg=f"{key}: ")
    assert got and got.keys() == want.keys()
    for name in want:
        close(got[name], want[name], msg=f"{student_name} <- {teacher_name} grad {name}: ")
    assert all(p.grad is None for p in teacher.parameters())


def test_none_reduction(eager):
    """reduction="none": (B, T - 1) per-position losses and their recompute backward."""
    student, teacher = make_model("gemma2", 0), make_model("cohere", 1)
    ids, attn, comp = _batch()
    loss = hf.eaopd_loss(student, teacher, ids, attn, comp, reduction="none")
    assert loss.shape == (3, 10)
    g = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)
    loss.backward(g)
    got = _grads(student)
    student.zero_grad(set_to_none=True)
    ref = _reference(student, teacher, ids, attn, comp, reduction="none")
    ref.backward(g)
    close(loss, ref)
    for name, want in _grads(student).items():
        close(got[name], want, msg=f"grad {name}: ")


def test_bf16_models_against_fp32(eager):
    """bfloat16 copies of the models: close to the float32 loss and gradients."""
    student, teacher = make_model("gemma2", 0), make_model("cohere", 1)
    ids, attn, comp = _batch()
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        s, t = student.to(dtype), teacher.to(dtype)
        s.zero_grad(set_to_none=True)
        loss = hf.eaopd_loss(s, t, ids, attn, comp)
        loss.backward()
        assert loss.dtype == torch.float32
        results.append((loss.detach(), s.lm_head.weight.grad.float(),
                        s.model.layers[0].mlp.up_proj.weight.grad.float()))
    (l32, *g32), (l16, *g16) = results
    torch.testing.assert_close(l16, l32, rtol=3e-2, atol=3e-2)
    for got, want in zip(g16, g32, strict=True):
        assert (got - want).norm() <= 0.05 * want.norm()


@pytest.mark.parametrize("name,softcap,scale,tied", [
    ("llama", None, 1.0, False), ("qwen2_tied", None, 1.0, True), ("gemma2", 2.0, 1.0, True),
    ("gemma3_text", 3.0, 1.0, True), ("cohere", None, 0.25, True), ("phi_bias", None, 1.0, False),
])
def test_lm_head_reads_model_and_config(name, softcap, scale, tied):
    model = make_model(name)
    head = hf.lm_head(model)
    assert head.softcap == softcap and head.logit_scale == scale
    assert head.vocab_size == model.config.vocab_size == head.weight.shape[0]
    assert (head.weight is model.get_input_embeddings().weight) == tied
    assert (head.bias is not None) == (name == "phi_bias")
    ids, attn, _ = _batch()
    with torch.no_grad():
        h = hf.last_hidden_state(model, ids, attn)
        x = h @ head.weight.T + (0 if head.bias is None else head.bias)
        logits = x * scale if softcap is None else torch.tanh(x * scale / softcap) * softcap
        want = model(input_ids=ids, attention_mask=attn).logits
    close(logits, want)
    if softcap is not None or scale != 1.0:  # the transform matters on these logits
        assert (x - want).abs().max() > 0.5


def test_head_options_are_read_not_given():
    student, teacher = make_model("llama"), make_model("gemma2")
    ids, attn, comp = _batch()
    with pytest.raises(TypeError, match="student_softcap come.*from the models' configs"):
        hf.eaopd_loss(student, teacher, ids, attn, comp, student_softcap=3.0)
    with pytest.raises(ValueError, match=r"completion_mask shape \(3, 10\) != input_ids shape"):
        hf.eaopd_loss(student, teacher, ids, attn, comp[:, 1:])


def test_lm_head_refuses_a_backbone():
    model = make_model("llama")
    with pytest.raises(TypeError, match="LlamaModel has no output layer"):
        hf.lm_head(model.model)


@pytest.mark.parametrize("routing", [[1, 0, 1], [0, 0, 0]])
def test_several_teachers_per_sequence(eager, routing):
    """teachers=[...] with a (B,) teacher_index: each sequence scored by its own teacher
    (another family, another padded vocabulary, one with a bias; one with no sequence):
    the loss on the models' own logits, each teacher's rows taken from its own forward
    over the whole batch; per-teacher statistics."""
    student = make_model("llama", 0)
    teachers = [make_model("qwen2_tied", 1), make_model("phi_bias", 2)]
    ids, attn, comp = _batch()
    index = torch.tensor(routing)
    opts = dict(temperature=0.9, reduction="sum", return_stats=True)
    loss, stats = hf.eaopd_loss(student, None, ids, attn, comp, teachers=teachers,
                                teacher_index=index, **opts)
    loss.backward()
    got = _grads(student)
    student.zero_grad(set_to_none=True)
    z = student(input_ids=ids, attention_mask=attn).logits[:, :-1, :61]
    labels = (comp * attn)[:, 1:].float()
    with torch.no_grad():
        ys = [t(input_ids=ids, attention_mask=attn).logits[:, :-1, :61] for t in teachers]
    ref = sum(entropy_aware_opd_loss(z[index == j], ys[j][index == j],
                                     labels=labels[index == j], **opts)[0]
              for j in range(2) if bool((index == j).any()))
    ref.backward()
    close(loss, ref)
    for name, want in _grads(student).items():
        close(got[name], want, msg=f"grad {name}: ")
    for j, mine in enumerate(stats["per_teacher"]):
        assert float(mine["tokens"]) == float(labels[index == j].sum())
    with pytest.raises(ValueError, match=r"teacher_index must be an integer tensor of shape"):
        hf.eaopd_loss(student, None, ids, attn, comp, teachers=teachers,
                      teacher_index=torch.tensor([0, 1]))
