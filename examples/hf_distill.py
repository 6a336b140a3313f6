"""On-policy distillation of Hugging Face causal LMs with the entropy-aware loss (CPU or GPU).

    python examples/hf_distill.py [--teacher-steps 150] [--steps 30] [--no-trl]

No download: a Llama-style teacher and a smaller student are built from configs, and the
teacher is first trained briefly on a synthetic language, so that it has something to
teach. Its grammar alternates certain and uncertain next tokens: after an even word
``w{i}`` comes the odd ``w{(3 i + 1) mod 32}`` (the teacher's entropy is near 0 there, the
gate leans on reverse KL), after an odd word ``w{i}`` any of the four even words
``w{i + 1}``, ``w{i + 3}``, ``w{i + 5}``, ``w{i + 7}`` (entropy near log 4, the gate leans
on forward KL). Then the student samples completions with ``model.generate`` and learns from
the teacher on them with :func:`eaopd_mp.hf.eaopd_loss`; each step prints the loss, the
gate statistics and how often the student's completions follow the certain rule. Last,
the same through TRL's trainer (:class:`eaopd_mp.trl.EAOPDDistillationTrainer`).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eaopd_mp import hf

WORDS = 32
PAD, EOS, BOS = WORDS, WORDS + 1, WORDS + 2  # ids 0..31 are the words w0..w31
VOCAB = WORDS + 3


def next_words(prev: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The synthetic grammar: certain after even words, one of four after odd ones."""
    certain = (3 * prev + 1) % WORDS
    uncertain = (prev + 2 * torch.randint(1, 5, prev.shape, generator=g) - 1) % WORDS
    return torch.where(prev % 2 == 0, certain, uncertain)


def sample_text(batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    """``(batch, length)`` ids: BOS, then words of the grammar."""
    out = [torch.full((batch,), BOS), torch.randint(0, WORDS, (batch,), generator=g)]
    while len(out) < length:
        out.append(next_words(out[-1], g))
    return torch.stack(out, dim=1)


def rule_rate(ids: torch.Tensor, start: int) -> float:
    """Share of completion words after an even word that follow the certain rule."""
    prev, nxt = ids[:, start - 1:-1], ids[:, start:]
    even = (prev < WORDS) & (prev % 2 == 0)
    return ((nxt == (3 * prev + 1) % WORDS) & even).sum().item() / max(1, even.sum().item())


def llama(hidden: int, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=PAD)
    return LlamaForCausalLM(config)


def train_teacher(teacher, steps: int, g: torch.Generator) -> None:
    """Next-token cross-entropy on the synthetic language."""
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(steps):
        ids = sample_text(32, 16, g)
        loss = teacher(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"teacher step {step:3d}  cross-entropy {loss.item():.3f}")
    teacher.eval().requires_grad_(False)


def distill(student, teacher, steps: int, g: torch.Generator) -> None:
    """On-policy: the student samples completions, the loss compares it to the teacher."""
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    prompt_len, new = 3, 10
    for step in range(steps):
        prompts = sample_text(16, prompt_len, g)
        with torch.no_grad():
            ids = student.generate(prompts, attention_mask=torch.ones_like(prompts),
                                   do_sample=True, max_new_tokens=new, min_new_tokens=new,
                                   pad_token_id=PAD)
        attn = torch.ones_like(ids)
        completion = torch.zeros_like(ids)
        completion[:, prompt_len:] = 1
        loss, stats = hf.eaopd_loss(student, teacher, ids, attn, completion, reduction="mean",
                                    return_stats=True)
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step:2d}  loss {loss.item():.4f}  H_teacher {stats['teacher_entropy']:.3f}"
              f"  w_fkl {stats['fkl_weight']:.3f}  KL_fwd {stats['kl_fwd']:.3f}"
              f"  KL_rev {stats['kl_rev']:.3f}  rule {rule_rate(ids, prompt_len):.2f}")


def with_trl(teacher, steps: int) -> None:
    """The same distillation through TRL's trainer: prompts in, TRL generates."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, PrinterCallback
    from trl import DistillationConfig

    from eaopd_mp.trl import EAOPDDistillationTrainer

    names = [f"w{i}" for i in range(WORDS)] + ["<pad>", "<eos>", "<bos>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="<eos>", bos_token="<bos>",
                                        padding_side="left")
    prompts = [f"w{i} w{(3 * i + 1) % WORDS}" for i in range(0, WORDS, 2)]
    with tempfile.TemporaryDirectory() as out:
        args = DistillationConfig(output_dir=out, per_device_train_batch_size=8,
                                  max_steps=steps, max_completion_length=8, learning_rate=3e-3,
                                  logging_steps=1, report_to="none", save_strategy="no",
                                  activation_checkpointing=False, disable_tqdm=True,
                                  use_cpu=not torch.cuda.is_available())
        trainer = EAOPDDistillationTrainer(
            model=llama(32, 1), teacher_model=teacher, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            loss_options={"gate": "linear"})
        trainer.remove_callback(PrinterCallback)  # the summary lines below instead
        trainer.train()
    for log in trainer.state.log_history:
        if "loss" in log:
            print(f"TRL step {log['step']}  loss {log['loss']:.4f}  H_teacher "
                  f"{log['eaopd/teacher_entropy']:.3f}  w_fkl {log['eaopd/fkl_weight']:.3f}  "
                  f"completion length {log['completions/mean_length']:.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--trl-steps", type=int, default=3)
    parser.add_argument("--no-trl", action="store_true")
    args = parser.parse_args(argv)
    for flag, value, low in (("--teacher-steps", args.teacher_steps, 0),
                             ("--steps", args.steps, 0), ("--trl-steps", args.trl_steps, 1)):
        if value < low:
            parser.error(f"{flag} must be at least {low}, got {value}")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    teacher, student = llama(64, 2), llama(32, 1)
    train_teacher(teacher, args.teacher_steps, g)
    distill(student, teacher, args.steps, g)
    if not args.no_trl:
        with_trl(teacher, args.trl_steps)


if __name__ == "__main__":
    main()
