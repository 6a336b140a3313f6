"""eaopd_mp.trl: TRL's DistillationTrainer with this library's loss, on tiny models.

The trainer overrides a TRL-internal hook, so the TRL code it relies on is pinned by hash:
a TRL release that changes it fails here (loudly, not a skip) until eaopd_mp.trl has been
checked against it.
"""

from __future__ import annotations

import hashlib
import inspect

import pytest
import torch
import transformers  # the dev extra installs transformers and TRL: no skip when missing
import trl

from eaopd_mp import hf
from eaopd_mp.trl import EAOPDDistillationTrainer, check_trl
from formulas import close

# sha256 of the source of the DistillationTrainer methods eaopd_mp.trl relies on (TRL
# 1.16.0): the hook it overrides, the one that calls it, and the backbone helper it calls.
PINNED = {
    "_compute_loss": "9fc0021cbcc0b5e90ee09c8afcc998e7c0db3ba2bfbedfa863fd4630c2578013",
    "compute_loss": "e5082879a718304046e810122e1208ff15189bbc14470ee17aea69f3e491b774",
    "_get_last_hidden_state": "12dc17e4ad4b19995ecc4bd1870a53a5f3abd6febc4b90867ffd032b004dfbd3",
}


def _digest(name: str) -> str:
    source = inspect.getsource(getattr(trl.DistillationTrainer, name))
    return hashlib.sha256(source.encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_trl_hooks_are_the_audited_ones(name):
    assert _digest(name) == PINNED[name], (
        f"trl {trl.__version__} changed DistillationTrainer.{name}: re-check "
        "eaopd_mp/trl.py against it, then update PINNED and the [trl] extra's range")


def test_check_trl_refuses_another_hook():
    check_trl()

    class Moved(trl.DistillationTrainer):
        def _compute_loss(self, model, inputs):
            pass

    with pytest.raises(TypeError, match=r"_compute_loss\('self', 'model', 'inputs'\) is not"):
        check_trl(Moved)


def _tokenizer():
    """A word-level tokenizer over 40 ids, built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(37)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        padding_side="left")


def _models():
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0, vocab_size=40)
    torch.manual_seed(0)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    teacher = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        head_dim=16, final_logit_softcapping=3.0, initializer_range=0.3, **common))
    teacher.config._attn_implementation = "eager"
    return student, teacher


class _Recording(EAOPDDistillationTrainer):
    """Records, per step, the trainer's loss and a direct eaopd_mp.hf call on the same
    batch and parameters, normalised as TRL normalises (sum / num_items_in_batch)."""

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        out = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        comp = torch.cat([torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]],
                         dim=1)
        with torch.no_grad():
            direct, stats = hf.eaopd_loss(unwrapped_student, self.teacher_model, ids, attn, comp,
                                          reduction="sum", return_stats=True,
                                          temperature=self.args.temperature)
        self.records.append(dict(loss=out[0].detach(), direct=direct / num_items_in_batch,
                                 num_items=num_items_in_batch, tokens=comp.sum(), stats=stats))
        return out


def test_two_steps_equal_direct_calls(eager, tmp_path):
    from datasets import Dataset

    student, teacher = _models()
    before = student.lm_head.weight.detach().clone()
    prompts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]
    args = trl.DistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
        max_completion_length=5, temperature=0.9, logging_steps=1, report_to="none",
        use_cpu=True, learning_rate=1e-2, save_strategy="no", activation_checkpointing=False)
    trainer = _Recording(model=student, teacher_model=teacher, args=args,
                         train_dataset=Dataset.from_dict({"prompt": prompts}),
                         processing_class=_tokenizer(), loss_options=dict(chunk_size=4))
    trainer.records = []
    trainer.train()

    assert len(trainer.records) == 2
    logs = [log for log in trainer.state.log_history if "loss" in log]
    for rec, log in zip(trainer.records, logs, strict=True):
        close(rec["loss"], rec["direct"])
        assert float(rec["num_items"]) == float(rec["tokens"]) > 0  # TRL's count, one process
        assert log["loss"] == pytest.approx(rec["loss"].item(), rel=1e-5)
        for key in ("teacher_entropy", "fkl_weight", "rkl_weight", "kl_fwd", "kl_rev"):
            assert log[f"eaopd/{key}"] == pytest.approx(rec["stats"][key].item(), rel=1e-5)
        assert log["entropy"] is None  # TRL's student entropy: not computed by this loss
    assert not torch.equal(before, student.lm_head.weight)  # it trained


class _RecordingRouted(EAOPDDistillationTrainer):
    """As :class:`_Recording` with several teachers: the direct call routes by the
    batch's ``teacher_index`` (built by the trainer from the dataset column)."""

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        out = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        comp = torch.cat([torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]],
                         dim=1)
        with torch.no_grad():
            direct, stats = hf.eaopd_loss(unwrapped_student, None, ids, attn, comp,
                                          teachers=self.teacher_models,
                                          teacher_index=inputs["teacher_index"],
                                          reduction="sum", return_stats=True,
                                          temperature=self.args.temperature)
        self.records.append(dict(loss=out[0].detach(), direct=direct / num_items_in_batch,
                                 index=inputs["teacher_index"].tolist(), stats=stats))
        return out


def test_several_teachers_routed_by_a_dataset_column(eager, tmp_path):
    """teacher_model={name: model} + teacher_column: each example scored by the teacher
    its column names (two Llama teachers of different widths); per-teacher logs."""
    from datasets import Dataset

    student, _ = _models()
    common = dict(intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, bos_token_id=2,
                  eos_token_id=1, pad_token_id=0, vocab_size=40, initializer_range=0.3)
    torch.manual_seed(1)
    math_t = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=32, **common))
    code_t = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=48, **common))
    args = trl.DistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
        max_completion_length=4, temperature=0.9, logging_steps=1, report_to="none",
        use_cpu=True, learning_rate=1e-2, save_strategy="no", activation_checkpointing=False)
    data = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"],
                              "data_source": ["math", "code", "math", "code"]})
    trainer = _RecordingRouted(model=student, teacher_model={"math": math_t, "code": code_t},
                               teacher_column="data_source", args=args, train_dataset=data,
                               processing_class=_tokenizer(),
                               loss_options=dict(chunk_size=4))
    trainer.records = []
    trainer.train()
    assert len(trainer.records) == 2
    logs = [log for log in trainer.state.log_history if "loss" in log]
    for rec, log in zip(trainer.records, logs, strict=True):
        assert sorted(rec["index"]) == [0, 0, 1, 1]  # two examples per teacher
        close(rec["loss"], rec["direct"])
        for j, name in enumerate(("math", "code")):
            want = rec["stats"]["per_teacher"][j]["kl_fwd"].item()
            assert log[f"eaopd/{name}/kl_fwd"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="need teacher_column"):
        EAOPDDistillationTrainer(model=student, teacher_model={"math": math_t})


def test_bad_loss_options_raise_before_setup():
    student, teacher = _models()
    with pytest.raises(TypeError, match="reduction are set by the trainer"):
        EAOPDDistillationTrainer(model=student, teacher_model=teacher,
                                 loss_options=dict(reduction="mean"))
    with pytest.raises(TypeError, match="unknown option"):
        EAOPDDistillationTrainer(model=student, teacher_model=teacher,
                                 loss_options=dict(beta=0.5))


def test_teachers_head_transforms_checked_before_any_model_runs():
    """Teachers with different head transforms (Gemma 2's softcap beside Llama's none) are
    refused from their configs: at construction, before TRL's setup, and in the loss hook
    before the student's (or any teacher's) forward, whose collectives a sharded model's
    peers would wait on."""
    from types import SimpleNamespace

    student, gemma = _models()
    llama, _ = _models()
    with pytest.raises(ValueError, match="head transforms differ"):
        EAOPDDistillationTrainer(model=student, teacher_model={"a": llama, "b": gemma},
                                 teacher_column="src")
    trainer = EAOPDDistillationTrainer.__new__(EAOPDDistillationTrainer)
    trainer.teacher_models = [llama, gemma]
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    ran = []
    hooks = [m.register_forward_pre_hook(lambda *a: ran.append(1))
             for m in (student, llama, gemma)]
    ids = torch.ones(2, 3, dtype=torch.long)
    inputs = dict(prompt_ids=ids, prompt_mask=ids, completion_ids=ids, completion_mask=ids,
                  teacher_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="head transforms differ"):
        trainer._compute_loss(student, inputs, None)
    for h in hooks:
        h.remove()
    assert not ran


def test_hf_distill_example_runs(eager, monkeypatch, capsys):
    """examples/hf_distill.py end to end, with few steps: the manual loop and TRL's."""
    import os
    import sys

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "examples"))
    import hf_distill

    monkeypatch.setattr(sys, "argv", ["hf_distill.py", "--teacher-steps", "3", "--steps", "2",
                                      "--trl-steps", "1"])
    hf_distill.main()
    out = capsys.readouterr().out
    assert "teacher step   2" in out and "step  1  loss" in out and "TRL step 1  loss" in out
