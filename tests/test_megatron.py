"""The Megatron-LM integration (:mod:`eaopd_mp.megatron`) on real megatron-core GPTModels.

Two multi-process tests only (every process imports megatron-core, ~6 s each):

* a TP=2 gloo test of ``gpt_hidden_states`` + ``output_layer_weight`` + ``eaopd_loss_func``
  and of ``gpt_forward`` + ``eaopd_output_processor`` (the loss from the model's forward,
  through megatron-core's ``output_processor`` hook where it exists) on tiny
  padded-vocabulary GPTs, with and without sequence parallelism, against the
  single-device :func:`eaopd_mp.entropy_aware_opd_loss` on the gathered logits;
* ``examples/megatron_distill.py`` run end to end under ``torch.distributed.run``
  (4 processes, TP=2 x PP=2 with sequence parallelism).

``test_megatron_schedule.py`` checks megatron-core's schedule step against one process.

The vocab-parallel loss functions themselves are covered by ``test_parallel.py``.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from dist_utils import spawn  # noqa: E402
from eaopd_mp import entropy_aware_opd_loss  # noqa: E402
from eaopd_mp.megatron import (  # noqa: E402
    EaopdOutput,
    eaopd_loss_func,
    eaopd_output_processor,
    gpt_forward,
    gpt_hidden_states,
    hidden_states_processor,
    output_layer_weight,
    uses_output_processor,
)
from megatron_paths import EXPECT_HOOK, MEGATRON_VERSION, spy_postprocess  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")

REAL_VOCAB, PADDED_VOCAB = 30, 32
SEQ, BATCH = 8, 2
LOGGED = {"eaopd loss", "teacher entropy", "fkl weight", "kl fwd", "kl rev"}
STAT_OF = {"teacher entropy": "teacher_entropy", "fkl weight": "fkl_weight",
           "kl fwd": "kl_fwd", "kl rev": "kl_rev"}


def _close(actual, expected, rtol=1e-5, atol=1e-6, msg=""):
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol + rtol * scale,
                               msg=lambda m: f"{msg}: {m}")


def _models(megatron_cpu, sequence_parallel):
    """Student (h=16) and teacher (h=24) GPTs from seed 0, so both layouts get the same
    weights; output layers scaled up so the distributions are far from uniform."""
    torch.manual_seed(0)
    student = megatron_cpu.tiny_gpt(PADDED_VOCAB, 16, 1, 2, SEQ, sequence_parallel)
    teacher = megatron_cpu.tiny_gpt(PADDED_VOCAB, 24, 1, 2, SEQ, sequence_parallel)
    teacher.requires_grad_(False)
    with torch.no_grad():
        output_layer_weight(student).mul_(10.0)
        output_layer_weight(teacher).mul_(25.0)
    return student, teacher


def _gather_rows(shard, group):
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.detach().contiguous(), group=group)
    return torch.cat(parts)


def _megatron_worker(rank, world):
    sys.path.insert(0, EXAMPLES)
    from megatron.core import parallel_state

    import megatron_cpu

    device = megatron_cpu.init_parallel(2, seed=0)
    try:
        group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        width = PADDED_VOCAB // 2
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(REAL_VOCAB, (BATCH, SEQ), generator=g).to(device)
        loss_mask = (torch.rand(BATCH, SEQ, generator=g) > 0.3).float().to(device)  # [b, s]
        loss_mask[0, :2] = 0.0
        loss_mask[1, -1] = 1.0
        pos, attn = megatron_cpu.positions(tokens), megatron_cpu.causal_mask(SEQ, device)

        # ---- no sequence parallelism
        student, teacher = _models(megatron_cpu, sequence_parallel=False)
        w_s, w_t = output_layer_weight(student), output_layer_weight(teacher)
        assert w_s is student.output_layer.weight and w_s.shape == (width, 16)
        w_s_full, w_t_full = _gather_rows(w_s, group), _gather_rows(w_t, group)

        hooked = uses_output_processor(student)
        if EXPECT_HOOK is not None:
            assert hooked is EXPECT_HOOK, (MEGATRON_VERSION, hooked)
        with torch.no_grad():
            own_logits = student(tokens, pos, attn, runtime_gather_output=True)  # [b, s, Vp]
        teacher_calls, student_calls = spy_postprocess(teacher), spy_postprocess(student)
        with torch.no_grad():
            t_hidden = gpt_hidden_states(teacher, tokens, pos, attn)
        s_hidden = gpt_hidden_states(student, tokens, pos, attn)
        # The hidden states come out of GPTModel.forward's hook where it exists.
        expected = [hidden_states_processor] if hooked else []
        assert teacher_calls == expected and student_calls == expected, (hooked, student_calls)
        assert s_hidden.shape == (SEQ, BATCH, 16) and t_hidden.shape == (SEQ, BATCH, 24)
        s_hidden.retain_grad()
        # gpt_hidden_states is exactly what the model's own output layer reads.
        _close((s_hidden.detach() @ w_s_full.T).transpose(0, 1), own_logits,
               msg="hidden @ W vs model logits")

        loss_sum, num_tokens, logged = eaopd_loss_func(
            s_hidden, w_s, t_hidden, w_t, loss_mask, vocab_size=REAL_VOCAB)
        loss_sum.backward()

        # Reference: one device, full logits cut to the real vocabulary, [s, b] layout.
        ref_w = w_s_full.clone().requires_grad_()
        ref_h = s_hidden.detach().clone().requires_grad_()
        z = (ref_h @ ref_w.T)[..., :REAL_VOCAB]
        y = (t_hidden @ w_t_full.T)[..., :REAL_VOCAB]
        ref_loss, stats = entropy_aware_opd_loss(
            z, y, labels=loss_mask.T, reduction="sum", return_stats=True)
        ref_loss.backward()
        assert ref_loss.item() > 0.1, "degenerate test data"

        _close(loss_sum, ref_loss, msg="loss_sum")
        assert loss_sum.dtype == torch.float32 and loss_sum.requires_grad
        assert num_tokens.dtype in (torch.int32, torch.int64)
        assert num_tokens.item() == int(loss_mask.sum().item())
        assert set(logged) == LOGGED
        n = float(num_tokens.item())
        for name, pair in logged.items():
            assert pair.shape == (2,) and not pair.requires_grad, name
            assert pair[1].item() == n, name
        _close(logged["eaopd loss"], torch.stack([ref_loss.detach(), torch.tensor(n)]),
               msg="logged loss")
        for name, key in STAT_OF.items():
            _close(logged[name], torch.stack([stats[key] * n, torch.tensor(n)]), msg=name)

        # This rank's weight shard gets its rows of the full gradient (padding rows: 0),
        # and the hidden states the whole (all-reduced) hidden gradient.
        shard = slice(tp_rank * width, (tp_rank + 1) * width)
        _close(w_s.grad, ref_w.grad[shard], msg="weight grad")
        assert ref_w.grad[REAL_VOCAB:].abs().max().item() == 0.0
        assert w_s.grad.abs().max().item() > 0.0
        _close(s_hidden.grad, ref_h.grad, msg="hidden grad")
        assert w_t.grad is None and teacher.output_layer.weight.grad is None
        # ... and flows on into the decoder.
        norm_grad = student.decoder.final_layernorm.weight.grad
        assert norm_grad is not None and norm_grad.abs().max().item() > 0.0

        # The same loss computed by the model's own forward (the output_processor hook on
        # megatron-core >= 0.19, the private path before): same loss, logs and gradients.
        student.zero_grad(set_to_none=True)
        student_calls.clear()
        out = EaopdOutput(t_hidden, w_t, vocab_size=REAL_VOCAB)
        loss_fwd = gpt_forward(student, tokens, pos, attn, eaopd_output_processor,
                               context=out, loss_mask=loss_mask)
        assert student_calls == ([eaopd_output_processor] if hooked else [])
        loss_out, num_out, logged_out = out.loss_func(loss_fwd)
        assert loss_out is loss_fwd and num_out.item() == num_tokens.item()
        loss_fwd.backward()
        _close(loss_fwd, ref_loss, msg="forward-hook loss_sum")
        for name in LOGGED:
            _close(logged_out[name], logged[name], msg=f"forward-hook {name}")
        _close(w_s.grad, ref_w.grad[shard], msg="forward-hook weight grad")
        _close(student.decoder.final_layernorm.weight.grad, norm_grad,
               msg="forward-hook decoder grad")

        # Loss options pass through (gate on the real vocabulary, temperature).
        opts = dict(temperature=2.0, gate="threshold", gate_threshold=1.5, chunk_size=3)
        loss_opt, _, logged_opt = eaopd_loss_func(
            s_hidden.detach(), w_s.detach(), t_hidden, w_t, loss_mask,
            vocab_size=REAL_VOCAB, **opts)
        ref_opt, stats_opt = entropy_aware_opd_loss(
            z.detach(), y, labels=loss_mask.T, reduction="sum", return_stats=True, **opts)
        _close(loss_opt, ref_opt, msg="loss with options")
        _close(logged_opt["fkl weight"][0], stats_opt["fkl_weight"] * n, msg="threshold gate")
        assert abs(loss_opt.item() - loss_sum.item()) > 1e-3 * abs(loss_sum.item())

        # The loss sets reduction / labels / return_stats itself.
        for bad in (dict(reduction="mean"), dict(labels=loss_mask), dict(return_stats=False)):
            with pytest.raises(TypeError, match="sets"):
                eaopd_loss_func(s_hidden, w_s, t_hidden, w_t, loss_mask, **bad)

        # ---- sequence parallelism: same weights, hidden states split along s
        student_sp, teacher_sp = _models(megatron_cpu, sequence_parallel=True)
        _close(output_layer_weight(student_sp), w_s.detach(), rtol=0, atol=0, msg="same init")
        with torch.no_grad():
            t_hidden_sp = gpt_hidden_states(teacher_sp, tokens, pos, attn)
        s_hidden_sp = gpt_hidden_states(student_sp, tokens, pos, attn)
        assert s_hidden_sp.shape == (SEQ // 2, BATCH, 16)
        local = slice(tp_rank * SEQ // 2, (tp_rank + 1) * SEQ // 2)
        _close(s_hidden_sp, s_hidden.detach()[local], msg="SP hidden slice")
        s_hidden_sp.retain_grad()
        w_sp = output_layer_weight(student_sp)
        loss_sp, num_sp, logged_sp = eaopd_loss_func(
            s_hidden_sp, w_sp, t_hidden_sp, output_layer_weight(teacher_sp), loss_mask,
            sequence_parallel=True, vocab_size=REAL_VOCAB)
        loss_sp.backward()
        _close(loss_sp, ref_loss.detach(), msg="SP loss_sum")
        assert num_sp.item() == num_tokens.item()
        for name in LOGGED:
            _close(logged_sp[name], logged[name], msg=f"SP {name}")
        _close(w_sp.grad, w_s.grad, msg="SP weight grad")
        _close(s_hidden_sp.grad, ref_h.grad[local], msg="SP hidden grad")
    finally:
        megatron_cpu.destroy_parallel()


def test_eaopd_loss_func_tp2_gpt_matches_single_device():
    """On TP=2 megatron-core GPTs with a padded vocabulary (30 -> 32), ``eaopd_loss_func``
    on ``gpt_hidden_states`` / ``output_layer_weight`` equals the single-device loss on
    the gathered logits cut to the real vocabulary: loss sum, int token count, every
    logged ``[value * tokens, tokens]`` pair, the weight-shard and hidden gradients, loss
    options passed through; ``reduction=`` etc. raise TypeError; and the same model built
    with sequence parallelism (hidden states split along s) gives the same loss, logs and
    gradients. Also proves ``gpt_hidden_states`` is what the model's output layer reads,
    and that the loss computed inside the model's forward (``gpt_forward`` with
    ``eaopd_output_processor``) gives the same loss, logs and gradients (decoder included).
    Path: on megatron-core 0.19 both come out of ``GPTModel.forward``'s
    ``output_processor`` hook (a spy on ``_postprocess`` sees the processors); on 0.16 the
    private path runs and ``_postprocess`` is never called."""
    spawn(_megatron_worker, 2)


STEP_LINE = re.compile(
    r"^step\s+(\d+) loss (\S+) H_teacher (\S+) w_fkl (\S+) kl_fwd (\S+) kl_rev (\S+) ",
    re.MULTILINE)


@pytest.mark.parametrize("teacher", [[], ["--teacher-topk", "8"]], ids=["full", "topk8"])
def test_megatron_distill_example_learns(teacher):
    """``examples/megatron_distill.py`` runs end to end under ``torch.distributed.run`` on
    4 processes, TP=2 x PP=2 with sequence parallelism (megatron-core's schedule, DDP and
    optimizer; small budget): exit code 0, one ``step N loss X ...`` line per step, all
    values finite, forward-KL weights in [0, 1], and the distillation loss falls: mean of
    the last 3 steps < 0.6 x mean of the first 3. Calibration: 0.43, 0.43 and 0.48 with
    seeds 0, 1, 2; 1.00 with ``--lr 0``; 0.35 with a served top-8 teacher (seed 0)."""
    steps = 16
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "4", os.path.join(EXAMPLES, "megatron_distill.py"),
           "--tp", "2", "--pp", "2", "--sequence-parallel",
           "--steps", str(steps), "--teacher-steps", "40", "--seq-len", "16", *teacher]
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, EAOPD_COMPILE="0")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "tp=2 pp=2 dp=1 sequence_parallel=True" in proc.stdout, out[-4000:]
    rows = STEP_LINE.findall(proc.stdout)
    assert [int(r[0]) for r in rows] == list(range(1, steps + 1)), out[-4000:]
    values = [[float(x) for x in r[1:]] for r in rows]
    assert all(math.isfinite(x) for row in values for x in row), values
    assert all(0.0 <= row[2] <= 1.0 for row in values), values
    losses = [row[0] for row in values]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, (losses, f"{elapsed:.1f}s")
