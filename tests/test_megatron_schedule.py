"""The EAOPD loss inside megatron-core's training machinery, against one process.

One 4-process gloo launch (every process imports megatron-core, ~6 s each) runs three
layouts in turn: TP=2 (DP=2), PP=2 (DP=2) and TP=2 x PP=2 with sequence parallelism
(DP=1). Each does one step of ``examples/megatron_distill.py``'s wiring, minus the
optimizer update: megatron ``DistributedDataParallel`` + ``get_megatron_optimizer`` +
the config hooks (``setup_training``), the teacher's ``forward_only`` schedule
(:func:`eaopd_mp.megatron.teacher_hidden_states`) and the student's schedule with
:func:`eaopd_mp.megatron.eaopd_forward_step` over 3 micro-batches per data-parallel rank.

The reference is computed in one process (rank 0, re-initialised at TP=1, PP=1) on the
gathered weights: full GPTModels' logits cut to the real vocabulary, the single-device
:func:`eaopd_mp.entropy_aware_opd_loss` summed over every micro-batch of every
data-parallel rank, divided by the total number of loss tokens. Every rank's ``main_grad``
(after the schedule's ``finalize_model_grads``) must equal its shard of the reference
gradient, and the logged loss the reference loss. Loss masks give every micro-batch and
data-parallel rank a different token count, so averaging per micro-batch or per rank
instead of per token would fail (checked: those means differ from the per-token one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from dist_utils import merge_replicas, spawn  # noqa: E402
from eaopd_mp import entropy_aware_opd_loss  # noqa: E402
from eaopd_mp.megatron import (  # noqa: E402
    eaopd_forward_step,
    eaopd_output_processor,
    hidden_states_processor,
    output_layer_weight,
    teacher_hidden_states,
    uses_output_processor,
)
from megatron_paths import EXPECT_HOOK, MEGATRON_VERSION, spy_postprocess  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")

REAL_VOCAB, PADDED_VOCAB = 30, 32
SEQ, MICRO_BATCH, MICRO_BATCHES, LAYERS = 8, 2, 3, 2
WORLD = 4
LAYOUTS = (  # tp, pp, sequence_parallel
    (2, 1, False),
    (1, 2, False),
    (2, 2, True),
)


def _close(actual, expected, rtol=1e-5, atol=1e-6, msg=""):
    """fp32 closeness relative to the largest reference value (sums reordered by the
    tensor-parallel all-reduces and the per-token scaling)."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol + rtol * scale,
                               msg=lambda m: f"{msg}: {m}")


def _global_batch(dp_size):
    """``dp_size * MICRO_BATCHES`` micro-batches of ``[MICRO_BATCH, SEQ]`` tokens and 0/1
    loss masks with distinct token counts; the same on every rank. Micro-batch ``i`` draws
    its tokens from the first ``4 + 4 i`` of the vocabulary, so the mean loss differs from
    micro-batch to micro-batch (and from rank to rank)."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.stack([torch.randint(min(4 + 4 * i, REAL_VOCAB), (MICRO_BATCH, SEQ),
                                        generator=g)
                          for i in range(dp_size * MICRO_BATCHES)])
    masks = torch.zeros(tokens.shape)
    for i in range(masks.shape[0]):
        n = 3 + 2 * i  # 3, 5, 7, ... of the 16 positions
        masks[i].view(-1)[torch.randperm(MICRO_BATCH * SEQ, generator=g)[:n]] = 1.0
    return tokens, masks


def _global_name(name, layer_offset):
    return re.sub(r"^decoder\.layers\.(\d+)\.",
                  lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)


def _tp_full(model, value, parallel_state, layers=LAYERS):
    """``{global name: value(param) gathered over the tensor-parallel group}`` for this
    pipeline stage (layer numbers offset to the whole model's)."""
    group = parallel_state.get_tensor_model_parallel_group()
    offset = parallel_state.get_pipeline_model_parallel_rank() * (
        layers // parallel_state.get_pipeline_model_parallel_world_size())
    out = {}
    for name, param in model.named_parameters():
        t = value(param).detach().contiguous()
        if getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, t, group=group)
            t = torch.cat(parts, dim=param.partition_dim)
        out[_global_name(name, offset)] = t.clone()
    return out


def _reference(megatron_cpu, student_state, teacher_state, tokens, masks, dp_size):
    """Single-process loss and gradients on the gathered models (rank 0, TP=1, PP=1)."""
    student = megatron_cpu.tiny_gpt(PADDED_VOCAB, 16, LAYERS, 2, SEQ)
    teacher = megatron_cpu.tiny_gpt(PADDED_VOCAB, 24, LAYERS, 2, SEQ)
    student.load_state_dict(student_state, strict=True)
    teacher.load_state_dict(teacher_state, strict=True)
    attn = megatron_cpu.causal_mask(SEQ, torch.device("cpu"))
    sums = []
    for t, m in zip(tokens, masks, strict=True):
        pos = megatron_cpu.positions(t)
        z = student(t, pos, attn)[..., :REAL_VOCAB]  # [b, s, V]
        with torch.no_grad():
            y = teacher(t, pos, attn)[..., :REAL_VOCAB]
        sums.append(entropy_aware_opd_loss(z, y, labels=m, reduction="sum"))
    loss = torch.stack(sums).sum() / masks.sum()
    loss.backward()
    sums = torch.stack(sums).detach()
    per_rank = sums.view(dp_size, -1).sum(1) / masks.view(dp_size, -1).sum(1)
    return dict(
        loss=loss.detach(),
        grads={name: p.grad.clone() for name, p in student.named_parameters()},
        # what averaging per micro-batch, or per data-parallel rank, would give
        micro_mean=(sums / masks.sum(dim=(1, 2))).mean(),
        rank_mean=per_rank.mean(),
    )


def _step_worker(rank, world):
    sys.path.insert(0, EXAMPLES)
    import megatron_distill
    from megatron.core import parallel_state

    import megatron_cpu

    for tp, pp, sp in LAYOUTS:
        megatron_cpu.init_parallel(tp, seed=0, pp_size=pp)
        try:
            _check_layout(rank, tp, pp, sp, parallel_state, megatron_cpu, megatron_distill)
        finally:
            megatron_cpu.destroy_parallel()
    megatron_cpu.init_parallel(2, seed=0, pp_size=2)
    try:
        _check_teachers(rank, parallel_state, megatron_cpu, megatron_distill)
    finally:
        megatron_cpu.destroy_parallel()


def _check_layout(rank, tp, pp, sp, parallel_state, megatron_cpu, megatron_distill):
    where = f"tp={tp} pp={pp} sp={sp} rank {rank}"
    argv = ["--tp", str(tp), "--pp", str(pp), "--seq-len", str(SEQ),
            "--micro-batches", str(MICRO_BATCHES)] + (["--sequence-parallel"] if sp else [])
    args = megatron_distill.parse_args(argv)
    dp_size = WORLD // (tp * pp)
    dp_rank = parallel_state.get_data_parallel_rank()
    last_stage = parallel_state.is_pipeline_last_stage()

    torch.manual_seed(0)
    student = megatron_distill.build_model(args, PADDED_VOCAB, 16, LAYERS, 2)
    teacher = megatron_cpu.tiny_gpt(PADDED_VOCAB, 24, LAYERS, 2, SEQ, sp)
    teacher.requires_grad_(False)
    if last_stage:  # far-from-uniform distributions
        with torch.no_grad():
            output_layer_weight(student).mul_(10.0)
            output_layer_weight(teacher).mul_(25.0)
    student, optimizer = megatron_distill.setup_training(student, args, lr=1e-3)
    config = student.config
    assert config.calculate_per_token_loss and config.no_sync_func == student.no_sync
    assert config.grad_scale_func == optimizer.scale_loss
    assert config.grad_sync_func == student.start_grad_sync

    tokens, masks = _global_batch(dp_size)
    mine = slice(dp_rank * MICRO_BATCHES, (dp_rank + 1) * MICRO_BATCHES)
    batches = [
        dict(tokens=t, position_ids=megatron_cpu.positions(t),
             attention_mask=megatron_cpu.causal_mask(SEQ, t.device), loss_mask=m)
        for t, m in zip(tokens[mine], masks[mine], strict=True)
    ]
    shapes = dict(num_microbatches=MICRO_BATCHES, seq_length=SEQ,
                  micro_batch_size=MICRO_BATCH)
    forward_backward = megatron_distill.get_forward_backward_func()
    hooked = uses_output_processor(student)
    if EXPECT_HOOK is not None:
        assert hooked is EXPECT_HOOK, (MEGATRON_VERSION, where)
    teacher_calls = spy_postprocess(teacher)
    teacher_hidden = teacher_hidden_states(forward_backward, teacher, iter(batches),
                                           megatron_distill.get_batch, **shapes)
    # The teacher's hidden states come out of GPTModel.forward's hook where it exists.
    assert teacher_calls == [hidden_states_processor] * MICRO_BATCHES * hooked, where
    h_local = SEQ // tp if sp else SEQ
    assert len(teacher_hidden) == (MICRO_BATCHES if last_stage else 0), where
    assert all(h.shape == (h_local, MICRO_BATCH, 24) and not h.requires_grad
               for h in teacher_hidden), where

    if pp == 1:  # every rank is a last stage: a missing teacher hidden state is an error
        short = eaopd_forward_step(megatron_distill.get_batch, teacher, teacher_hidden[:1])
        data = iter(batches)
        short(data, student)
        with pytest.raises(RuntimeError, match="more micro-batches than teacher"):
            short(data, student)

    # megatron_distill.train_step without the optimizer update.
    student.zero_grad_buffer()
    optimizer.zero_grad()
    student_calls = spy_postprocess(student.module)
    losses = megatron_distill.forward_backward(
        eaopd_forward_step(megatron_distill.get_batch, teacher, teacher_hidden,
                           sequence_parallel=sp, vocab_size=REAL_VOCAB),
        batches, student, args)
    logged = megatron_distill.reduce_logged(losses)
    assert len(losses) == (MICRO_BATCHES if last_stage else 0), where
    # On the last stage the loss comes out of the student's forward (the hook).
    processor = eaopd_output_processor if last_stage else hidden_states_processor
    assert student_calls == [processor] * MICRO_BATCHES * hooked, where

    # Gather both models' weights; rank 0 computes the reference at TP=1, PP=1.
    states = [None] * WORLD
    dist.all_gather_object(states, (_tp_full(student.module, lambda p: p, parallel_state),
                                    _tp_full(teacher, lambda p: p, parallel_state)))
    main_grads = {name: p.main_grad.clone() for name, p in student.module.named_parameters()}
    partition = {name: (getattr(p, "tensor_model_parallel", False),
                        getattr(p, "partition_dim", None))
                 for name, p in student.module.named_parameters()}
    offset = parallel_state.get_pipeline_model_parallel_rank() * (LAYERS // pp)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    ref = [None]
    if rank == 0:
        ref[0] = _reference(megatron_cpu, merge_replicas(s for s, _ in states),
                            merge_replicas(t for _, t in states), tokens, masks, dp_size)
    dist.broadcast_object_list(ref, src=0)
    ref = ref[0]

    # The test data tells per-token from per-micro-batch and per-rank averaging.
    # (by 100 times the loss tolerance at least)
    means = (ref["loss"].item(), ref["micro_mean"].item(), ref["rank_mean"].item())
    assert abs(means[1] - means[0]) > 1e-3 * means[0], means
    if dp_size > 1:
        assert abs(means[2] - means[0]) > 1e-3 * means[0], means
    if last_stage:
        assert set(logged) == {"eaopd loss", "teacher entropy", "fkl weight", "kl fwd",
                               "kl rev"}, where
        _close(torch.tensor(logged["eaopd loss"]), ref["loss"], msg=f"{where} loss")
    else:
        assert logged == {}, where
    for name, grad in main_grads.items():
        full = ref["grads"][_global_name(name, offset)]
        split, dim = partition[name]
        expected = full.chunk(tp, dim=dim)[tp_rank] if split else full
        _close(grad, expected, msg=f"{where} main_grad {name}")
        assert full.abs().max() > 0, f"{where} {name}: zero reference gradient"


# Several teachers: (hidden size, layers) each; teacher 2 gets no token of the step.
TEACHERS = ((24, LAYERS), (32, 2 * LAYERS), (20, LAYERS))


def _routing():
    """Per micro-batch: one teacher per sequence ([b]); every token to teacher 0 (teacher 1
    skips the micro-batch); per token ([b, s]: the first 3 positions to teacher 1, so the
    two sequence-parallel halves hold different numbers of each teacher's tokens)."""
    per_token = torch.zeros(MICRO_BATCH, SEQ, dtype=torch.long)
    per_token[:, :3] = 1
    return [torch.tensor([0, 1]), torch.tensor([0, 0]), per_token]


def _teachers_reference(megatron_cpu, student_state, teacher_states, tokens, masks, routing):
    """Single process: each token scored by its own teacher's full logits (selected per
    token, cut to the real vocabulary), the single-teacher loss summed, per-token mean."""
    student = megatron_cpu.tiny_gpt(PADDED_VOCAB, 16, LAYERS, 2, SEQ)
    student.load_state_dict(student_state, strict=True)
    teachers = []
    for (hidden, layers), state in zip(TEACHERS[:2], teacher_states, strict=True):
        t = megatron_cpu.tiny_gpt(PADDED_VOCAB, hidden, layers, 2, SEQ)
        t.load_state_dict(state, strict=True)
        teachers.append(t)
    attn = megatron_cpu.causal_mask(SEQ, torch.device("cpu"))
    total = 0.0
    for t, m, r in zip(tokens, masks, routing, strict=True):
        pos = megatron_cpu.positions(t)
        z = student(t, pos, attn)[..., :REAL_VOCAB]
        with torch.no_grad():
            ys = [teacher(t, pos, attn)[..., :REAL_VOCAB] for teacher in teachers]
        route = (r.view(-1, 1) if r.dim() == 1 else r).expand(MICRO_BATCH, SEQ)
        y = torch.where((route == 0).unsqueeze(-1), ys[0], ys[1])
        total = total + entropy_aware_opd_loss(z, y, labels=m, reduction="sum")
    loss = total / masks.sum()
    loss.backward()
    return dict(loss=loss.detach(),
                grads={name: p.grad.clone() for name, p in student.named_parameters()})


def _check_teachers(rank, parallel_state, megatron_cpu, megatron_distill):
    """TP=2 x PP=2 + sequence parallelism, three teachers of different sizes routed per
    sequence and per token (teacher 2 never): the loss and ``main_grad`` equal the
    single-process reference; a teacher no micro-batch routes to never runs."""
    where = f"teachers rank {rank}"
    args = megatron_distill.parse_args(["--tp", "2", "--pp", "2", "--seq-len", str(SEQ),
                                        "--micro-batches", str(MICRO_BATCHES),
                                        "--sequence-parallel"])
    last_stage = parallel_state.is_pipeline_last_stage()
    torch.manual_seed(0)
    student = megatron_distill.build_model(args, PADDED_VOCAB, 16, LAYERS, 2)
    teachers = [megatron_cpu.tiny_gpt(PADDED_VOCAB, h, n, 2, SEQ, True).requires_grad_(False)
                for h, n in TEACHERS]
    if last_stage:
        with torch.no_grad():
            output_layer_weight(student).mul_(10.0)
            for t in teachers:
                output_layer_weight(t).mul_(25.0)
    unused_calls = []
    teachers[2].decoder.register_forward_pre_hook(lambda *a: unused_calls.append(1))
    student, optimizer = megatron_distill.setup_training(student, args, lr=1e-3)
    tokens, masks = _global_batch(1)
    routing = _routing()
    batches = [dict(tokens=t, position_ids=megatron_cpu.positions(t),
                    attention_mask=megatron_cpu.causal_mask(SEQ, t.device), loss_mask=m,
                    teacher_index=r, labels=None)
               for t, m, r in zip(tokens, masks, routing, strict=True)]
    shapes = dict(num_microbatches=MICRO_BATCHES, seq_length=SEQ,
                  micro_batch_size=MICRO_BATCH)
    get_batch = next  # get_batch may return a mapping (with teacher_index)
    forward_backward = megatron_distill.get_forward_backward_func()
    nested = [[t] for t in teachers]
    hidden = teacher_hidden_states(forward_backward, nested, iter(batches), get_batch,
                                   **shapes)
    assert unused_calls == [], where
    if last_stage:
        kinds = [[None if h is None else tuple(h.shape) for h in per] for per in hidden]
        assert kinds == [[(SEQ // 2, MICRO_BATCH, 24)] * 3,
                         [(SEQ // 2, MICRO_BATCH, 32), None, (SEQ // 2, MICRO_BATCH, 32)],
                         [None] * 3], (where, kinds)
    else:
        assert hidden == [[], [], []], where

    student.zero_grad_buffer()
    optimizer.zero_grad()
    losses = megatron_distill.forward_backward(
        eaopd_forward_step(get_batch, nested, hidden, sequence_parallel=True,
                           vocab_size=REAL_VOCAB),
        batches, student, args)
    if last_stage:
        per_teacher = {j: torch.stack([x[f"teacher {j} kl fwd"] for x in losses]).sum(0)
                       for j in range(3)}
        assert per_teacher[2].tolist() == [0.0, 0.0], where  # no token: a [0, 0] pair
        assert per_teacher[0][1] + per_teacher[1][1] == masks.sum(), where
    logged = megatron_distill.reduce_logged(losses)

    states = [None] * WORLD
    dist.all_gather_object(states, (
        _tp_full(student.module, lambda p: p, parallel_state),
        [_tp_full(t, lambda p: p, parallel_state, n)
         for t, (_, n) in zip(teachers[:2], TEACHERS[:2], strict=True)]))
    main_grads = {name: p.main_grad.clone() for name, p in student.module.named_parameters()}
    partition = {name: (getattr(p, "tensor_model_parallel", False),
                        getattr(p, "partition_dim", None))
                 for name, p in student.module.named_parameters()}
    offset = parallel_state.get_pipeline_model_parallel_rank() * (LAYERS // 2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    ref = [None]
    if rank == 0:
        ref[0] = _teachers_reference(
            megatron_cpu, merge_replicas(s for s, _ in states),
            [merge_replicas(t[j] for _, t in states) for j in range(2)],
            tokens, masks, routing)
    dist.broadcast_object_list(ref, src=0)
    ref = ref[0]
    if last_stage:
        _close(torch.tensor(logged["eaopd loss"]), ref["loss"], msg=f"{where} loss")
    for name, grad in main_grads.items():
        full = ref["grads"][_global_name(name, offset)]
        split, dim = partition[name]
        expected = full.chunk(2, dim=dim)[tp_rank] if split else full
        _close(grad, expected, msg=f"{where} main_grad {name}")


def test_schedule_matches_single_process_tp_pp_sp_dp():
    """TP=2 (DP=2), PP=2 (DP=2), TP=2 x PP=2 + sequence parallelism: loss and every rank's
    ``main_grad`` after one schedule step with megatron DDP, finalize_model_grads and
    ``calculate_per_token_loss`` equal the single-process per-token-mean reference. On
    megatron-core 0.19 every stage's forward (teacher and student) goes through
    ``GPTModel.forward``'s ``output_processor`` hook, the student's last stage computing
    the loss there; on 0.16 none does (the private path)."""
    spawn(_step_worker, WORLD)


def test_adapter_does_not_import_megatron():
    """``import eaopd_mp.megatron`` (all its helpers included) loads no megatron module:
    a fresh interpreter checks ``sys.modules``."""
    code = ("import sys, eaopd_mp.megatron; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
