"""Long context in megatron-core: context parallelism (CP), packed sequences (THD) and
interleaved (virtual) pipeline stages, each against one process on the same global batch.

One 4-process gloo launch runs every case (each process imports megatron-core once):

* CP=2 x DP=2, CP=2 x TP=2 with sequence parallelism, CP=2 x PP=2; the dense teacher and a
  served top-k teacher given for the whole sequence; ``calculate_per_token_loss`` on (and,
  at CP=2 x DP=2 with the dense teacher, off).
* Packed sequences: 3 sequences of different lengths in one THD row (with padding between
  them) against the same sequences padded to one row each, without CP (DP=4, dense
  teacher) and with CP=2 (x DP=2, dense and top-k teachers).
* PP=2 with 2 virtual stages per rank (the interleaved schedule) on the real GPTModel.

Every case runs one step of ``examples/megatron_distill.py``'s wiring without the
optimizer update (megatron DDP, ``get_megatron_optimizer``, the config hooks, the real
``get_forward_backward_func()`` schedule and ``finalize_model_grads``); the logged loss and
every rank's ``main_grad`` must equal a single-process reference (rank 0, TP=PP=CP=1, the
gathered weights, :func:`eaopd_mp.entropy_aware_opd_loss` on full logits).

megatron-core's local attention refuses CP and THD without Transformer Engine, so the CP
and THD cases use a GPTModel whose layers have no attention (norm + MLP + residual,
``megatron_cpu.block_spec(attention=False)``): every layer is position-wise, so any split
of the tokens computes exactly what the whole sequence does, and what is tested is what
this library owns: the loss's token split, divisors, served-teacher slicing and packed
sequence boundaries. Batches are cut for CP with megatron's own
``get_batch_on_this_cp_rank`` (THD: a per-sequence zig-zag written here, as Transformer
Engine's ``thd_get_partitioned_indices`` cuts it).

The data tell the right answer from the likely wrong ones: every micro-batch and CP rank
has its own token count (so a per-rank or per-micro-batch divisor differs from the
per-token one: checked), the teacher's top-k values differ at every position (a wrong
chunk is a wrong loss), and the packed sequences' last tokens are in the loss mask given
(the library must drop them).
"""

from __future__ import annotations

import os
import sys
from functools import partial

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from dist_utils import merge_replicas, spawn  # noqa: E402
from eaopd_mp import entropy_aware_opd_loss  # noqa: E402
from eaopd_mp.megatron import (  # noqa: E402
    context_parallel_index,
    eaopd_forward_step,
    eaopd_loss_func,
    gpt_hidden_states,
    last_model_chunk,
    output_layer_weight,
    packed_loss_mask,
    teacher_hidden_states,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")

REAL_VOCAB, PADDED_VOCAB, TOPK = 30, 32, 5
SEQ, MICRO_BATCH, MICRO_BATCHES, LAYERS = 8, 2, 2, 2
S_HIDDEN, T_HIDDEN = 16, 24
WORLD = 4
CP_LAYOUTS = (  # tp, pp, cp, sequence_parallel
    (1, 1, 2, False),
    (2, 1, 2, True),
    (1, 2, 2, False),
)
# Packed rows: 3 sequences each, placed at PACKED_STARTS (padded to multiples of 2 * cp).
PACKED_STARTS = (0, 8, 16, 20)
PACKED_LENGTHS = ((5, 7, 3), (8, 6, 4))  # per micro-batch
VP_LAYERS, VP_MICRO_BATCHES = 4, 4


def _close(actual, expected, rtol=1e-5, atol=1e-6, msg=""):
    """fp32 closeness relative to the largest reference value."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol + rtol * scale,
                               msg=lambda m: f"{msg}: {m}")


def _zigzag(x, dim, cp, rank, bounds=None):
    """Test-side formula: rank ``rank``'s chunks ``rank`` and ``2 cp - 1 - rank`` of every
    sequence (``bounds``: packed sequence offsets) along ``dim``, concatenated."""
    bounds = bounds or (0, x.shape[dim])
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        chunks = x.narrow(dim, lo, hi - lo).chunk(2 * cp, dim=dim)
        parts += [chunks[rank], chunks[2 * cp - 1 - rank]]
    return torch.cat(parts, dim=dim)


# ----------------------------------------------------------------------------- data


def _dense_batch(n_micro):
    """``n_micro`` micro-batches of ``[MICRO_BATCH, SEQ]`` tokens and 0/1 loss masks (a
    different count for every micro-batch), and served top-k ``[SEQ, b, k]`` log-probs
    and ids for the whole sequence; the same on every rank."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.stack([torch.randint(min(4 + 4 * i, REAL_VOCAB), (MICRO_BATCH, SEQ),
                                        generator=g) for i in range(n_micro)])
    masks = torch.zeros(tokens.shape)
    for i in range(n_micro):
        n = 5 + 2 * i
        masks[i].view(-1)[torch.randperm(MICRO_BATCH * SEQ, generator=g)[:n]] = 1.0
    topk = []
    for _ in range(n_micro):
        logits = 3.0 * torch.randn(SEQ, MICRO_BATCH, REAL_VOCAB, generator=g)
        topk.append(torch.log_softmax(logits, dim=-1).topk(TOPK, dim=-1))
    return tokens, masks, [(lp, ids) for lp, ids in topk]


def _packed_batch(n_micro):
    """``n_micro`` packed rows ``[1, PACKED_STARTS[-1]]`` of 3 sequences each: tokens,
    per-sequence positions, a 0/1 mask over the real tokens (the sequences' last tokens
    included: the library must drop them), ``cu_seqlens`` / ``cu_seqlens_padded``, and a
    served top-k for the whole row."""
    g = torch.Generator().manual_seed(99)
    total = PACKED_STARTS[-1]
    rows = []
    for i in range(n_micro):
        lengths = PACKED_LENGTHS[i % len(PACKED_LENGTHS)]
        tokens = torch.randint(REAL_VOCAB, (1, total), generator=g)
        positions = torch.zeros(1, total, dtype=torch.long)
        mask = torch.zeros(1, total)
        for start, n in zip(PACKED_STARTS[:-1], lengths, strict=True):
            positions[0, start:start + n] = torch.arange(n)
            mask[0, start:start + n] = (torch.rand(n, generator=g) < 0.85).float()
            mask[0, start + n - 1] = 1.0
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        logits = 3.0 * torch.randn(total, 1, REAL_VOCAB, generator=g)
        lp, ids = torch.log_softmax(logits, dim=-1).topk(TOPK, dim=-1)
        rows.append(dict(tokens=tokens, positions=positions, mask=mask, lengths=lengths,
                         cu=cu, cu_padded=torch.tensor(PACKED_STARTS, dtype=torch.int32),
                         topk=(lp, ids)))
    return rows


def _packed_params(row):
    from megatron.core.packed_seq_params import PackedSeqParams
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=row["cu"], cu_seqlens_kv=row["cu"],
                           cu_seqlens_q_padded=row["cu_padded"],
                           cu_seqlens_kv_padded=row["cu_padded"],
                           max_seqlen_q=8, max_seqlen_kv=8)


def get_batch(data_iterator):
    """``(tokens, position_ids, attention_mask, loss_mask[, packed_seq_params])``."""
    b = next(data_iterator)
    out = (b["tokens"], b["position_ids"], b["attention_mask"], b["loss_mask"])
    return out + ((b["packed"],) if "packed" in b else ())


# --------------------------------------------------------------------------- models


def _global_names(module):
    """``{name: global name}``: a chunk's local layer numbers become the whole model's."""
    out = {}
    layers = getattr(getattr(module, "decoder", None), "layers", [])
    for name, _ in module.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(layers[int(parts[2])].layer_number - 1)
        out[name] = ".".join(parts)
    return out


def _tp_full(chunks, value, parallel_state):
    """``{global name: value(param) gathered over the tensor-parallel group}``."""
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for chunk in chunks:
        names = _global_names(chunk)
        for name, param in chunk.named_parameters():
            t = value(param).detach().contiguous()
            if getattr(param, "tensor_model_parallel", False):
                parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, t, group=group)
                t = torch.cat(parts, dim=param.partition_dim)
            out[names[name]] = t.clone()
    return out


def _topk_forward_step(served, *, sequence_parallel):
    """The student's forward step for a served teacher: :func:`eaopd_loss_func` bound to
    the micro-batch's whole-sequence top-k (the library cuts it per CP rank)."""
    remaining = iter(served)

    def forward_step(data_iterator, model):
        batch = get_batch(data_iterator)
        packed = batch[4] if len(batch) == 5 else None
        hidden = gpt_hidden_states(model, *batch[:3], packed_seq_params=packed)
        if not output_layer_is_here(model):
            return hidden, None
        lp, ids = next(remaining)
        return hidden, partial(
            eaopd_loss_func, student_weight=output_layer_weight(model), teacher_hidden=None,
            teacher_weight=None, loss_mask=batch[3], sequence_parallel=sequence_parallel,
            vocab_size=REAL_VOCAB, packed_seq_params=packed, teacher_topk_logprobs=lp,
            teacher_topk_indices=ids)
    return forward_step


def output_layer_is_here(model):
    m = model
    while hasattr(m, "module"):
        m = m.module
    return bool(m.post_process)


# ------------------------------------------------------------------------ reference


def _reference(mc, state, teacher_state, inputs, norm, *, attention, layers):
    """Rank 0, TP=PP=CP=1: ``sum_i w_i * loss_sum_i`` over the reference rows
    ``inputs`` (``(tokens [b, s], positions, mask, topk or None, weight)``) with the full
    models, and its gradients. ``norm`` divides the summed per-token losses."""
    student = mc.tiny_gpt(PADDED_VOCAB, S_HIDDEN, layers, 2, 32, attention=attention)
    student.load_state_dict(state, strict=True)
    teacher = None
    if teacher_state is not None:
        teacher = mc.tiny_gpt(PADDED_VOCAB, T_HIDDEN, layers, 2, 32, attention=attention)
        teacher.load_state_dict(teacher_state, strict=True)
    total, token_sum, tokens = 0.0, 0.0, 0.0
    for t, pos, m, topk, weight in inputs:
        attn = mc.causal_mask(t.shape[1], t.device) if attention else None
        z = student(t, pos, attn)[..., :REAL_VOCAB]  # [b, s, V]
        if topk is None:
            with torch.no_grad():
                y = teacher(t, pos, attn)[..., :REAL_VOCAB]
            per_tok = entropy_aware_opd_loss(z, y, labels=m, reduction="none")
        else:
            lp, ids = (x.transpose(0, 1) for x in topk)  # [s, b, k] -> [b, s, k]
            per_tok = entropy_aware_opd_loss(z, teacher_topk_logprobs=lp,
                                             teacher_topk_indices=ids, labels=m,
                                             reduction="none")
        s = (per_tok * m).sum()
        total = total + weight * s
        token_sum = token_sum + s.detach()
        tokens += m.sum().item()
    (total / norm).backward()
    return dict(loss=(total / norm).detach(), token_mean=token_sum / tokens,
                grads={name: p.grad.clone() for name, p in student.named_parameters()})


# -------------------------------------------------------------------------- workers


def _setup(mc, md, args, chunks, per_token):
    for chunk in chunks:
        chunk.config.calculate_per_token_loss = per_token
    ddp, optimizer = md.setup_training(chunks if len(chunks) > 1 else chunks[0], args, 1e-3)
    ddp = ddp if isinstance(ddp, list) else [ddp]
    for d in ddp:
        d.zero_grad_buffer()
    optimizer.zero_grad()
    return ddp


def _run_and_compare(rank, where, ps, mc, md, *, student, teacher, batches, forward_step,
                     shapes, ref_fn, checks=None):
    """Run the student's schedule; gather weights; compare logged loss and main_grads with
    ``ref_fn(states, teacher_states)`` computed on rank 0 at TP=PP=CP=1."""
    losses = md.get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=student,
        forward_only=False, **shapes)
    logged = md.reduce_logged(losses)
    inner = [d.module for d in student]
    states = [None] * WORLD
    several = isinstance(teacher, list) and isinstance(teacher[0], list)
    t_chunks = [] if teacher is None else (teacher if isinstance(teacher, list) else [teacher])
    dist.all_gather_object(states, (
        _tp_full(inner, lambda p: p, ps),
        [_tp_full(c, lambda p: p, ps) for c in teacher] if several
        else _tp_full(t_chunks, lambda p: p, ps)))
    main_grads = {}
    for chunk in inner:
        names = _global_names(chunk)
        for name, p in chunk.named_parameters():
            main_grads[names[name]] = (p.main_grad.clone(),
                                       getattr(p, "tensor_model_parallel", False),
                                       getattr(p, "partition_dim", None))
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    last = any(output_layer_is_here(c) for c in inner)

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1)
    ref = [None]
    if rank == 0:
        if several:
            t_state = [merge_replicas(t[j] for _, t in states) for j in range(len(teacher))]
        else:
            t_state = merge_replicas(t for _, t in states) if teacher is not None else None
        ref[0] = ref_fn(merge_replicas(s for s, _ in states), t_state)
    dist.broadcast_object_list(ref, src=0)
    ref = ref[0]
    if checks:
        checks(ref)
    if last:
        _close(torch.tensor(logged["eaopd loss"]), ref["token_mean"], msg=f"{where} loss")
        names = {"teacher entropy", "fkl weight", "kl fwd", "kl rev"}
        per_teacher = {f"teacher {j} {k}" for j in range(len(teacher) if several else 0)
                       for k in names}
        assert set(logged) == {"eaopd loss"} | names | per_teacher, where
    else:
        assert logged == {}, where
    for name, (grad, split, dim) in main_grads.items():
        full = ref["grads"][name]
        expected = full.chunk(tp, dim=dim)[tp_rank] if split else full
        _close(grad, expected, msg=f"{where} main_grad {name}")
        assert full.abs().max() > 0, f"{where} {name}: zero reference gradient"


def _cp_case(rank, ps, mc, md, tp, pp, cp, sp, teacher_kind, per_token):
    """CP=2 with DP, TP(+SP) or PP: one step against the single-process reference."""
    where = f"cp={cp} tp={tp} pp={pp} sp={sp} {teacher_kind} per_token={per_token} rank {rank}"
    dp = WORLD // (tp * pp * cp)
    args = md.parse_args(["--tp", str(tp), "--pp", str(pp), "--seq-len", str(SEQ)]
                         + (["--sequence-parallel"] if sp else []))
    torch.manual_seed(0)
    student = mc.tiny_gpt(PADDED_VOCAB, S_HIDDEN, LAYERS, 2, 32, sp, attention=False)
    teacher = None
    if teacher_kind == "dense":
        teacher = mc.tiny_gpt(PADDED_VOCAB, T_HIDDEN, LAYERS, 2, 32, sp,
                              attention=False).requires_grad_(False)
    if ps.is_pipeline_last_stage():
        with torch.no_grad():
            output_layer_weight(student).mul_(10.0)
            if teacher is not None:
                output_layer_weight(teacher).mul_(25.0)
    student = _setup(mc, md, args, [student], per_token)

    tokens, masks, topk = _dense_batch(dp * MICRO_BATCHES)
    dp_rank = ps.get_data_parallel_rank()
    mine = range(dp_rank * MICRO_BATCHES, (dp_rank + 1) * MICRO_BATCHES)
    batches = []
    for i in mine:
        b = mc.cp_batch(dict(tokens=tokens[i].clone(),
                             position_ids=mc.positions(tokens[i]).clone(),
                             loss_mask=masks[i].clone()))
        batches.append(dict(b, attention_mask=None))
    assert batches[0]["tokens"].shape == (MICRO_BATCH, SEQ // cp), where
    shapes = dict(num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH)
    if teacher is not None:
        hidden = teacher_hidden_states(md.get_forward_backward_func(), teacher, iter(batches),
                                       get_batch, **shapes)
        assert all(h.shape == (SEQ // cp // (tp if sp else 1), MICRO_BATCH, T_HIDDEN)
                   for h in hidden), where
        step = eaopd_forward_step(get_batch, teacher, hidden, sequence_parallel=sp,
                                  vocab_size=REAL_VOCAB)
    else:
        step = _topk_forward_step([topk[i] for i in mine], sequence_parallel=sp)
        # Top-k already cut to this rank's length is a layout mismatch, not a guess.
        lp, ids = (x[: SEQ // cp] for x in topk[0])
        with pytest.raises(ValueError, match=r"teacher_topk_logprobs must cover the whole "
                           rf"sequence under context parallelism: \[{SEQ}, \.\.\.\] "
                           rf"\({cp} ranks x {SEQ // cp} tokens of this rank's loss_mask\), "
                           rf"got \({SEQ // cp}, {MICRO_BATCH}, {TOPK}\)"):
            eaopd_loss_func(torch.zeros(SEQ // cp, MICRO_BATCH, S_HIDDEN),
                            torch.zeros(PADDED_VOCAB // tp, S_HIDDEN), None, None,
                            batches[0]["loss_mask"], teacher_topk_logprobs=lp,
                            teacher_topk_indices=ids)

    def ref_fn(state, t_state):
        rows = []
        for i in range(tokens.shape[0]):
            t, m = tokens[i], masks[i]
            k = topk[i] if teacher_kind == "topk" else None
            if per_token:
                rows.append((t, mc.positions(t), m, k, 1.0))
                continue
            # megatron without per-token loss: every (micro-batch, DP rank, CP rank) is
            # averaged over its own tokens, then over micro-batches and DP x CP ranks.
            for r in range(cp):
                local = _zigzag(m, 1, cp, r)
                n = max(local.sum().item(), 1.0)
                cut = torch.zeros_like(m)
                cut[:, context_parallel_index(SEQ, cp, r)] = local
                rows.append((t, mc.positions(t), cut, k, 1.0 / n))
        norm = masks.sum() if per_token else tokens.shape[0] * cp
        return _reference(mc, state, t_state, rows, norm, attention=False, layers=LAYERS)

    def checks(ref):
        # The data tell megatron's per-(micro-batch, CP rank) mean from the per-token one.
        if not per_token:
            loss, mean = ref["loss"].item(), ref["token_mean"].item()
            assert abs(loss - mean) > 1e-3 * mean, (loss, mean)

    _run_and_compare(rank, where, ps, mc, md, student=student, teacher=teacher,
                     batches=iter(batches), forward_step=step, shapes=shapes, ref_fn=ref_fn,
                     checks=checks)


def _packed_case(rank, ps, mc, md, cp, teacher_kind):
    """3 sequences packed in one THD row vs the same sequences padded, one row each."""
    where = f"packed cp={cp} {teacher_kind} rank {rank}"
    dp = WORLD // cp
    total = PACKED_STARTS[-1]
    args = md.parse_args(["--seq-len", str(total)])
    torch.manual_seed(0)
    student = mc.tiny_gpt(PADDED_VOCAB, S_HIDDEN, LAYERS, 2, 32, attention=False)
    teacher = None
    if teacher_kind == "dense":
        teacher = mc.tiny_gpt(PADDED_VOCAB, T_HIDDEN, LAYERS, 2, 32,
                              attention=False).requires_grad_(False)
    with torch.no_grad():
        output_layer_weight(student).mul_(10.0)
        if teacher is not None:
            output_layer_weight(teacher).mul_(25.0)
    student = _setup(mc, md, args, [student], True)

    rows = _packed_batch(dp * MICRO_BATCHES)
    dp_rank, cp_rank = ps.get_data_parallel_rank(), ps.get_context_parallel_rank()
    mine = rows[dp_rank * MICRO_BATCHES:(dp_rank + 1) * MICRO_BATCHES]
    batches = []
    for row in mine:
        cut = (lambda x: _zigzag(x, 1, cp, cp_rank, PACKED_STARTS)) if cp > 1 else (lambda x: x)
        batches.append(dict(tokens=cut(row["tokens"]), position_ids=cut(row["positions"]),
                            attention_mask=None, loss_mask=cut(row["mask"]),
                            packed=_packed_params(row)))
    shapes = dict(num_microbatches=MICRO_BATCHES, seq_length=total, micro_batch_size=1)
    if teacher is not None:
        hidden = teacher_hidden_states(md.get_forward_backward_func(), teacher, iter(batches),
                                       get_batch, **shapes)
        step = eaopd_forward_step(get_batch, teacher, hidden, vocab_size=REAL_VOCAB)
    else:
        step = _topk_forward_step([row["topk"] for row in mine], sequence_parallel=False)

    def ref_fn(state, t_state):
        # Each sequence alone, padded to the longest: its last token and the padding
        # have weight 0 (nothing of the sequence follows them).
        width = max(max(r["lengths"]) for r in rows)
        inputs, count = [], 0.0
        for row in rows:
            for start, n in zip(PACKED_STARTS[:-1], row["lengths"], strict=True):
                t = torch.zeros(1, width, dtype=torch.long)
                m = torch.zeros(1, width)
                t[0, :n] = row["tokens"][0, start:start + n]
                m[0, :n - 1] = row["mask"][0, start:start + n - 1]
                k = None
                if teacher_kind == "topk":
                    lp, ids = (x[start:start + n] for x in row["topk"])
                    pad = width - n
                    k = (torch.cat([lp, lp[:1].expand(pad, -1, -1)]),
                         torch.cat([ids, ids[:1].expand(pad, -1, -1)]))
                inputs.append((t, mc.positions(t), m, k, 1.0))
                count += m.sum().item()
        return _reference(mc, state, t_state, inputs, count, attention=False, layers=LAYERS)

    _run_and_compare(rank, where, ps, mc, md, student=student, teacher=teacher,
                     batches=iter(batches), forward_step=step, shapes=shapes, ref_fn=ref_fn)


def _interleaved_case(rank, ps, mc, md):
    """PP=2 x 2 virtual stages (DP=2) on the real GPTModel (with attention)."""
    where = f"interleaved rank {rank}"
    args = md.parse_args(["--pp", "2", "--seq-len", str(SEQ)])
    torch.manual_seed(0)
    student = mc.tiny_gpt_chunks(PADDED_VOCAB, S_HIDDEN, VP_LAYERS, 2, 32)
    teacher = [c.requires_grad_(False)
               for c in mc.tiny_gpt_chunks(PADDED_VOCAB, T_HIDDEN, VP_LAYERS, 2, 32)]
    if output_layer_is_here(student[-1]):
        with torch.no_grad():
            output_layer_weight(student[-1]).mul_(10.0)
            output_layer_weight(last_model_chunk(teacher)).mul_(25.0)
    student = _setup(mc, md, args, student, True)
    dp = WORLD // 2
    tokens, masks, _ = _dense_batch(dp * VP_MICRO_BATCHES)
    dp_rank = ps.get_data_parallel_rank()
    mine = range(dp_rank * VP_MICRO_BATCHES, (dp_rank + 1) * VP_MICRO_BATCHES)
    batches = [dict(tokens=tokens[i], position_ids=mc.positions(tokens[i]),
                    attention_mask=mc.causal_mask(SEQ, tokens.device), loss_mask=masks[i])
               for i in mine]
    shapes = dict(num_microbatches=VP_MICRO_BATCHES, seq_length=SEQ,
                  micro_batch_size=MICRO_BATCH)
    hidden = teacher_hidden_states(md.get_forward_backward_func(), teacher,
                                   [iter(batches) for _ in teacher], get_batch, **shapes)
    assert len(hidden) == (VP_MICRO_BATCHES if output_layer_is_here(teacher[-1]) else 0)
    step = eaopd_forward_step(get_batch, teacher, hidden, vocab_size=REAL_VOCAB)

    def ref_fn(state, t_state):
        rows = [(tokens[i], mc.positions(tokens[i]), masks[i], None, 1.0)
                for i in range(tokens.shape[0])]
        return _reference(mc, state, t_state, rows, masks.sum(), attention=True,
                          layers=VP_LAYERS)

    _run_and_compare(rank, where, ps, mc, md, student=student, teacher=teacher,
                     batches=[iter(batches) for _ in student], forward_step=step,
                     shapes=shapes, ref_fn=ref_fn)


# -------------------------------------------------------------------- several teachers

TEACHERS = ((T_HIDDEN, 1), (32, 2))  # (hidden size, layers per pipeline stage and chunk)


def _teacher_models(mc, ps, *, attention, chunked=False):
    """Two frozen teachers of different sizes (their chunk lists), output layers scaled."""
    out = []
    for hidden, per_stage in TEACHERS:
        layers = per_stage * ps.get_pipeline_model_parallel_world_size() * (
            ps.get_virtual_pipeline_model_parallel_world_size() or 1)
        build = mc.tiny_gpt_chunks if chunked else (lambda *a, **k: [mc.tiny_gpt(*a, **k)])
        chunks = [c.requires_grad_(False)
                  for c in build(PADDED_VOCAB, hidden, layers, 2, 32, attention=attention)]
        if output_layer_is_here(chunks[-1]):
            with torch.no_grad():
                output_layer_weight(chunks[-1]).mul_(25.0)
        out.append(chunks)
    return out


def _teachers_reference(mc, state, t_states, inputs, norm, *, attention, layers):
    """Rank 0, TP=PP=CP=1: ``inputs`` rows ``(tokens [b, s], positions, mask, routing
    [b, s])``; each token's teacher logits selected by its routing, then the
    single-teacher loss; the summed per-token losses over ``norm``, and gradients."""
    student = mc.tiny_gpt(PADDED_VOCAB, S_HIDDEN, layers, 2, 32, attention=attention)
    student.load_state_dict(state, strict=True)
    teachers = []
    for (hidden, _), t_state in zip(TEACHERS, t_states, strict=True):
        n = len({k.split(".")[2] for k in t_state if k.startswith("decoder.layers.")})
        t = mc.tiny_gpt(PADDED_VOCAB, hidden, n, 2, 32, attention=attention)
        t.load_state_dict(t_state, strict=True)
        teachers.append(t)
    total, tokens = 0.0, 0.0
    for t, pos, m, route in inputs:
        attn = mc.causal_mask(t.shape[1], t.device) if attention else None
        z = student(t, pos, attn)[..., :REAL_VOCAB]
        with torch.no_grad():
            ys = torch.stack([teacher(t, pos, attn)[..., :REAL_VOCAB] for teacher in teachers])
        y = ys.gather(0, route[None, ..., None].expand(1, *z.shape))[0]
        total = total + entropy_aware_opd_loss(z, y, labels=m, reduction="sum")
        tokens += m.sum().item()
    (total / norm).backward()
    return dict(loss=(total / norm).detach(), token_mean=total.detach() / tokens,
                grads={name: p.grad.clone() for name, p in student.named_parameters()})


def _teachers_case(rank, ps, mc, md, kind):
    """Two teachers of different sizes routed by ``get_batch``'s ``teacher_index``:
    ``cp`` (CP=2 x PP=2, per-token routing given for the whole sequence, and cut by
    megatron's ``get_batch_on_this_cp_rank``, one teacher with tokens on one CP rank
    only), ``packed`` (CP=2 x DP=2, one teacher per packed sequence, a teacher with no
    token in a micro-batch), ``interleaved`` (PP=2 x 2 virtual stages, one teacher per
    sequence, teacher counts the interleaved schedule does not accept)."""
    where = f"teachers {kind} rank {rank}"
    attention = kind == "interleaved"
    pp = 1 if kind == "packed" else 2
    seq = PACKED_STARTS[-1] if kind == "packed" else SEQ
    args = md.parse_args(["--pp", str(pp), "--seq-len", str(seq)])
    torch.manual_seed(0)
    vp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    layers = LAYERS * vp
    student = mc.tiny_gpt_chunks(PADDED_VOCAB, S_HIDDEN, layers, 2, 32, attention=attention)
    if output_layer_is_here(student[-1]):
        with torch.no_grad():
            output_layer_weight(student[-1]).mul_(10.0)
    teachers = _teacher_models(mc, ps, attention=attention, chunked=True)
    student = _setup(mc, md, args, student, True)
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n_micro = VP_MICRO_BATCHES if kind == "interleaved" else MICRO_BATCHES
    mine = range(dp_rank * n_micro, (dp_rank + 1) * n_micro)
    inputs, batches = [], []
    if kind == "packed":
        rows = _packed_batch(dp * n_micro)
        routes = [torch.tensor([0, 1, 0]) if i % 2 == 0 else torch.tensor([1, 1, 1])
                  for i in range(len(rows))]
        width = max(max(r["lengths"]) for r in rows)
        for row, route in zip(rows, routes, strict=True):
            for start, n, j in zip(PACKED_STARTS[:-1], row["lengths"], route.tolist(),
                                   strict=True):
                t = torch.zeros(1, width, dtype=torch.long)
                m = torch.zeros(1, width)
                t[0, :n] = row["tokens"][0, start:start + n]
                m[0, :n - 1] = row["mask"][0, start:start + n - 1]
                inputs.append((t, mc.positions(t), m, torch.full_like(t, j)))
        for i in mine:
            row = rows[i]
            cut = lambda x: _zigzag(x, 1, cp, cp_rank, PACKED_STARTS)  # noqa: E731
            batches.append(dict(tokens=cut(row["tokens"]), position_ids=cut(row["positions"]),
                                attention_mask=None, loss_mask=cut(row["mask"]),
                                packed_seq_params=_packed_params(row),
                                teacher_index=routes[i]))
        norm = sum(m.sum() for _, _, m, _ in inputs)
    else:
        tokens, masks, _ = _dense_batch(dp * n_micro)
        routes = []
        for i in range(tokens.shape[0]):
            r = torch.zeros(MICRO_BATCH, SEQ, dtype=torch.long)
            if kind == "cp" and i % 2 == 0:
                r[0, ::3], r[1] = 1, 1  # per token, both CP ranks
            elif kind == "cp":
                r[0, 2:6] = 1  # teacher 1 on CP rank 1's positions only
            elif i % n_micro == 2:
                r[:] = 1  # interleaved: teacher 1 in one micro-batch, teacher 0 in three
            routes.append(r)
            inputs.append((tokens[i], mc.positions(tokens[i]), masks[i], r))
        for i in mine:
            b = dict(tokens=tokens[i].clone(), position_ids=mc.positions(tokens[i]).clone(),
                     loss_mask=masks[i].clone())
            if kind == "cp" and i % 2 == 0:  # the whole sequence's routing: cut here
                b = dict(mc.cp_batch(b), teacher_index=routes[i])
            elif kind == "cp":  # this rank's part, cut by megatron with the tokens
                b = mc.cp_batch(dict(b, teacher_index=routes[i].clone()))
                assert b["teacher_index"].shape == (MICRO_BATCH, SEQ // cp)
            else:  # one teacher per sequence
                b = dict(b, teacher_index=routes[i][:, 0].clone())
            b["attention_mask"] = mc.causal_mask(SEQ, tokens.device) if attention else None
            batches.append(b)
        norm = masks.sum()
    shapes = dict(num_microbatches=n_micro, seq_length=seq,
                  micro_batch_size=1 if kind == "packed" else MICRO_BATCH)
    iterators = (lambda: [iter(batches) for _ in student]) if vp > 1 else \
        (lambda: iter(batches))
    hidden = teacher_hidden_states(md.get_forward_backward_func(), teachers, iterators(),
                                   next, **shapes)
    if output_layer_is_here(teachers[0][-1]):
        ran = [[h is not None for h in per] for per in hidden]
        expected = {"cp": [[True, True], [True, True]],
                    "packed": [[True, False], [True, True]],
                    "interleaved": [[True, True, False, True], [False, False, True, False]]}
        assert ran == expected[kind], (where, ran)
    step = eaopd_forward_step(next, teachers, hidden, vocab_size=REAL_VOCAB)

    def ref_fn(state, t_states):
        return _teachers_reference(mc, state, t_states, inputs, norm, attention=attention,
                                   layers=layers)

    _run_and_compare(rank, where, ps, mc, md, student=student, teacher=teachers,
                     batches=iterators(), forward_step=step, shapes=shapes, ref_fn=ref_fn)


def _worker(rank, world, cases):
    sys.path.insert(0, EXAMPLES)
    import megatron_distill as md
    from megatron.core import parallel_state as ps

    import megatron_cpu as mc

    for case in cases:
        kind, params = case[0], case[1:]
        if kind == "cp":
            tp, pp, cp, sp, teacher_kind, per_token = params
            mc.init_parallel(tp, seed=0, pp_size=pp, cp_size=cp)
            run = partial(_cp_case, rank, ps, mc, md, tp, pp, cp, sp, teacher_kind, per_token)
        elif kind == "packed":
            cp, teacher_kind = params
            mc.init_parallel(1, seed=0, cp_size=cp)
            run = partial(_packed_case, rank, ps, mc, md, cp, teacher_kind)
        elif kind == "teachers":
            sizes = dict(cp=dict(pp_size=2, cp_size=2), packed=dict(cp_size=2),
                         interleaved=dict(pp_size=2, vp_size=2))[params[0]]
            mc.init_parallel(1, seed=0, **sizes)
            run = partial(_teachers_case, rank, ps, mc, md, params[0])
        else:
            mc.init_parallel(1, seed=0, pp_size=2, vp_size=2)
            run = partial(_interleaved_case, rank, ps, mc, md)
        try:
            run()
        finally:
            mc.destroy_parallel()


CASES = (
    [("cp", tp, pp, cp, sp, kind, True) for tp, pp, cp, sp in CP_LAYOUTS
     for kind in ("dense", "topk")]
    + [("cp", 1, 1, 2, False, "dense", False)]
    + [("packed", 1, "dense"), ("packed", 2, "dense"), ("packed", 2, "topk")]
    + [("interleaved",)]
    + [("teachers", kind) for kind in ("cp", "packed", "interleaved")]
)


def test_long_context_matches_single_process():
    """CP=2 x {DP, TP+SP, PP}, packed sequences with and without CP, and interleaved
    PP=2 x 2 virtual stages: loss and every rank's ``main_grad`` after one schedule step
    equal the single-process reference on the same global batch."""
    spawn(_worker, WORLD, CASES)


# ------------------------------------------------------------ single-process helpers


def test_context_parallel_index_zigzag_and_packed():
    """Rank r holds chunks r and 2 cp - 1 - r of every (packed) sequence, in order."""
    assert context_parallel_index(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert context_parallel_index(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert context_parallel_index(12, 1, 0).tolist() == list(range(12))
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    assert context_parallel_index(12, 2, 1, cu_seqlens_padded=cu).tolist() == [1, 2, 6, 7, 8, 9]
    assert context_parallel_index(12, 2, 0, cu_seqlens_padded=cu).tolist() == [0, 3, 4, 5, 10, 11]
    with pytest.raises(ValueError, match="must divide by 4"):
        context_parallel_index(10, 2, 0)
    with pytest.raises(ValueError, match=r"padded sequence lengths \[6, 6\]"):
        context_parallel_index(12, 2, 0, cu_seqlens_padded=torch.tensor([0, 6, 12]))
    with pytest.raises(ValueError, match="from 0 to the packed length 12"):
        context_parallel_index(12, 2, 0, cu_seqlens_padded=torch.tensor([0, 4, 8]))


def test_packed_loss_mask_drops_last_token_and_padding():
    """Sequences of 3 and 2 real tokens at offsets 0 and 4 of an 8-token row: only the
    tokens followed by a token of their own sequence keep their weight."""
    from types import SimpleNamespace
    params = SimpleNamespace(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 3, 5]),
                             cu_seqlens_q_padded=torch.tensor([0, 4, 8]))
    mask = torch.tensor([[1.0, 0.5, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0]])
    out = packed_loss_mask(mask, params)
    assert out.tolist() == [[1.0, 0.5, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0]]
    unpadded = SimpleNamespace(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 3, 8]),
                               cu_seqlens_q_padded=None)
    assert packed_loss_mask(mask, unpadded).tolist() == [[1.0, 0.5, 0, 1, 2, 1, 1, 0]]
    with pytest.raises(ValueError, match=r"loss_mask must be \[1, t\], got \(2, 4\)"):
        packed_loss_mask(mask.view(2, 4), params)
    with pytest.raises(ValueError, match="do not fit a packed row of 6 tokens"):
        packed_loss_mask(mask[:, :6], params)
    with pytest.raises(ValueError, match="qkv_format must be 'thd'"):
        packed_loss_mask(mask, SimpleNamespace(qkv_format="sbhd", cu_seqlens_q=None))
