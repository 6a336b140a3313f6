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


def _padded(seqs, prompts, side, width):
    """``seqs`` padded on ``side`` to ``width``: ids, attention mask, completion mask (the
    tokens after each sequence's prompt)."""
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (seq, prompt) in enumerate(zip(seqs, prompts, strict=True)):
        n = len(seq)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, cols], attn[i, cols] = seq, 1
        comp[i, cols][prompt:] = 1
    return ids, attn, comp


@pytest.mark.parametrize("with_completion", [False, True])
def test_padding_side_does_not_change_the_loss(eager, with_completion):
    """Per-sequence losses (and stats' token count) are the same left-padded,
    right-padded and unpadded (each sequence alone), with and without completion_mask:
    a pad position never predicts the first real token."""
    student, teacher = make_model("llama", 0), make_model("qwen2_tied", 1)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 60, (n,), generator=g) for n in (9, 6, 4)]
    prompts = (4, 2, 1)
    per_seq, tokens = {}, {}
    for side in ("left", "right"):
        ids, attn, comp = _padded(seqs, prompts, side, 9)
        loss, stats = hf.eaopd_loss(student, teacher, ids, attn,
                                    comp if with_completion else None, reduction="none",
                                    return_stats=True)
        per_seq[side], tokens[side] = loss.sum(-1), stats["tokens"]
    alone = []
    for seq, prompt in zip(seqs, prompts, strict=True):
        comp = torch.zeros(1, len(seq), dtype=torch.long)
        comp[0, prompt:] = 1
        alone.append(hf.eaopd_loss(student, teacher, seq[None],
                                   completion_mask=comp if with_completion else None,
                                   reduction="none").sum())
    per_seq["alone"] = torch.stack(alone)
    n_alone = sum(len(s) - max(p, 1) if with_completion else len(s) - 1
                  for s, p in zip(seqs, prompts, strict=True))
    close(per_seq["left"], per_seq["alone"], msg="left vs unpadded: ")
    close(per_seq["right"], per_seq["alone"], msg="right vs unpadded: ")
    assert tokens["left"] == tokens["right"] == n_alone


BAD_MASKS = [
    ("attention_mask", lambda m: m * 2, r"attention_mask must be a 0/1 mask .*\[2"),
    ("attention_mask", lambda m: m.float() * 0.5, r"attention_mask must be a 0/1 mask .*0\.5"),
    ("completion_mask", lambda m: m * 7, r"completion_mask must be a 0/1 mask .*\[7"),
    ("completion_mask", lambda m: torch.where(m.bool(), 5, -100),
     r"completion_mask must be a 0/1 mask .*-100.*labels\.ne\(-100\)"),
    ("completion_mask", lambda m: m.float().masked_fill(m == 0, float("nan")),
     r"completion_mask must be a 0/1 mask .*nan"),
    ("attention_mask", lambda m: m[:, 1:], r"attention_mask shape \(3, 10\) != input_ids"),
]


@pytest.mark.parametrize("name,change,match", BAD_MASKS)
def test_masks_must_be_binary_and_are_checked_before_the_models(name, change, match):
    """attention_mask / completion_mask other than 0/1 raise ValueError naming the mask
    before either model runs; 0/1 masks of every dtype give the same loss."""
    student, teacher = make_model("llama", 0), make_model("qwen2_tied", 1)
    ids, attn, comp = _batch()
    masks = {"attention_mask": attn, "completion_mask": comp}
    masks[name] = change(masks[name])
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1))
             for m in (student, teacher, student.model, teacher.model)]
    with pytest.raises(ValueError, match=match):
        hf.eaopd_loss(student, teacher, ids, **masks)
    for h in hooks:
        h.remove()
    assert calls == []


def test_mask_dtypes_give_the_same_loss(eager):
    student, teacher = make_model("llama", 0), make_model("qwen2_tied", 1)
    ids, attn, comp = _batch()
    want = hf.eaopd_loss(student, teacher, ids, attn, comp)
    for dtype in (torch.bool, torch.int32, torch.float32, torch.bfloat16):
        close(hf.eaopd_loss(student, teacher, ids, attn.to(dtype), comp.to(dtype)), want)


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
    # Out-of-range indices raise before any model runs (a sharded model's forward issues
    # collectives the other ranks would wait on).
    ran = []
    hooks = [m.register_forward_pre_hook(lambda *a: ran.append(1)) for m in (student, *teachers)]
    for bad in ([0, 2, 1], [0, -1, 1]):
        with pytest.raises(ValueError, match=r"teacher_index values must be in \[0, 2\).*got "
                           rf"\[{bad[1]}\]"):
            hf.eaopd_loss(student, None, ids, attn, comp, teachers=teachers,
                          teacher_index=torch.tensor(bad))
    for h in hooks:
        h.remove()
    assert not ran
