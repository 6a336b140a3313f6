"""Vocab-parallel paths on gloo process groups against the single-device loss.

Few spawns, each covering a grid: TP=4 on an explicit group, TP=2 through megatron-core's
parallel_state (with sequence parallelism), TP=2 x DP=2.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist

import formulas
from dist_utils import CollectiveCounter, spawn
from eaopd_mp import entropy_aware_opd_loss, fused_linear_eaopd_loss
from eaopd_mp.megatron import eaopd_loss_func
from eaopd_mp.parallel import fused_linear_vocab_parallel_eaopd_loss, vocab_parallel_eaopd_loss
from formulas import close

_close = close


def _data(seed, tokens=(4, 3), hid=8, t_hid=6, width=7, tp=4):
    """The same full-size tensors on every rank (vocab = tp * width)."""
    g = torch.Generator().manual_seed(seed)
    v = tp * width
    h = torch.randn(*tokens, hid, generator=g)
    w = torch.randn(v, hid, generator=g)
    b = torch.randn(v, generator=g)
    th = torch.randn(*tokens, t_hid, generator=g)
    tw = torch.randn(v, t_hid, generator=g) * 1.5
    labels = (torch.rand(tokens, generator=g) > 0.3).float()
    return h, w, b, th, tw, labels


def _grad_out(loss):
    return torch.ones(()) * 0.9 if loss.dim() == 0 else torch.linspace(-1, 1, loss.numel()).view(
        loss.shape)


def _transformed(x, scale, cap):
    """HF's head maths: ``x * logit_scale`` then ``tanh(x / cap) * cap``."""
    x = x * scale
    return x if cap is None else torch.tanh(x / cap) * cap


def _transform_opts(xf):
    return {} if xf is None else dict(zip(
        ("student_logit_scale", "student_softcap", "teacher_logit_scale", "teacher_softcap"),
        xf, strict=True))


def check_fused_case(rank, tp, group, *, reduction, tau, mask, vocab_size, bias, gate,
                     teacher, seed=0, sp=False, chunk=4, xf=None):
    """One fused TP case against the single-device fused loss on the real vocabulary; with
    head transforms ``xf`` (student scale, cap, teacher scale, cap), against the logits-in
    loss on logits transformed with plain torch ops (gradients through their autograd)."""
    h, w, b, th, tw, labels = _data(seed, tp=tp)
    width = w.shape[0] // tp
    real = vocab_size or w.shape[0]
    labels = labels if mask else None
    shard = slice(rank * width, (rank + 1) * width)
    opts = dict(labels=labels, temperature=tau, reduction=reduction, chunk_size=chunk, **gate)
    s_bias = b if bias else None

    hl = (h.chunk(tp, 0)[rank] if sp else h).clone().requires_grad_()
    wl, bl = w[shard].clone().requires_grad_(), b[shard].clone().requires_grad_()
    t_kw = dict(teacher_hidden=th.chunk(tp, 0)[rank] if sp else th, teacher_weight=tw[shard]) \
        if teacher == "linear" else dict(teacher_logits=(th @ tw.T)[..., shard])
    loss = fused_linear_vocab_parallel_eaopd_loss(
        hl, wl, student_bias=bl if bias else None, tp_group=group, vocab_size=vocab_size,
        sequence_parallel=sp, **t_kw, **opts, **_transform_opts(xf))
    loss.backward(_grad_out(loss))

    hr, wr, br = h.clone().requires_grad_(), w[:real].clone().requires_grad_(), \
        b[:real].clone().requires_grad_()
    if xf is None:
        ref = fused_linear_eaopd_loss(hr, wr, student_bias=br if bias else None,
                                      teacher_logits=(th @ tw.T)[..., :real], **opts)
    else:
        z = _transformed(hr @ wr.T + (br if bias else 0.0), *xf[:2])
        ref = entropy_aware_opd_loss(z, _transformed((th @ tw.T)[..., :real], *xf[2:]), **opts)
    ref.backward(_grad_out(ref))
    tag = f"[{reduction} tau={tau} mask={mask} V={vocab_size} bias={bias} {gate} {teacher} " \
        f"xf={xf}] "
    _close(loss, ref, msg=tag)
    _close(hl.grad, hr.grad.chunk(tp, 0)[rank] if sp else hr.grad, msg=tag + "grad h ")
    want_w = torch.zeros_like(w)
    want_w[:real] = wr.grad
    _close(wl.grad, want_w[shard], msg=tag + "grad W ")
    if bias:
        want_b = torch.zeros_like(b)
        want_b[:real] = br.grad
        _close(bl.grad, want_b[shard], msg=tag + "grad b ")
    del s_bias


def check_logits_case(rank, tp, group, *, reduction, tau, mask, vocab_size, gate, seed=0,
                      xf=None):
    """Logits-in TP against the single-device logits-in loss on the gathered logits (with
    head transforms ``xf``, on the gathered logits transformed with plain torch ops)."""
    h, w, _, th, tw, labels = _data(seed, tp=tp)
    width = w.shape[0] // tp
    real = vocab_size or w.shape[0]
    z_full, y_full = h @ w.T, th @ tw.T
    shard = slice(rank * width, (rank + 1) * width)
    opts = dict(labels=labels if mask else None, temperature=tau, reduction=reduction, **gate)
    z = z_full[..., shard].clone().requires_grad_()
    loss = vocab_parallel_eaopd_loss(z, y_full[..., shard], tp_group=group,
                                     vocab_size=vocab_size, chunk_size=3, **opts,
                                     **_transform_opts(xf))
    with CollectiveCounter() as counter:
        loss.backward(_grad_out(loss))
    assert counter.calls == [], "logits-in backward must not communicate"
    zr = z_full[..., :real].clone().requires_grad_()
    zt, yt = zr, y_full[..., :real]
    if xf is not None:
        zt, yt = _transformed(zt, *xf[:2]), _transformed(yt, *xf[2:])
    ref = entropy_aware_opd_loss(zt, yt, **opts)
    gate_kw = {"gate": "linear", **gate}
    per_tok = formulas.per_token(zt.detach(), yt, temperature=tau,
                                 **{k: v for k, v in gate_kw.items() if k != "gate"},
                                 gate=gate_kw["gate"])
    want_loss = formulas.reduce(per_tok, opts["labels"], reduction)
    _close(loss.double(), want_loss, msg="independent formula: ")
    ref.backward(_grad_out(ref))
    _close(loss, ref)
    want = torch.zeros_like(z_full)
    want[..., :real] = zr.grad
    _close(z.grad, want[..., shard])


def _topk_teacher(seed, tokens, real, width, tp, k=6):
    """A served teacher over the real vocabulary whose ids land on every rank, on each
    rank's first and last columns, and next to the padding (id real - 1)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in tokens:
        n *= d
    ids = torch.stack([torch.randperm(real, generator=g)[:k] for _ in range(n)])
    edges = sorted({real - 1, 0, *(r * width for r in range(tp) if r * width < real),
                    *(r * width - 1 for r in range(1, tp) if r * width - 1 < real)})
    for i in range(min(n, len(edges))):  # token i holds edge i (distinct ids kept)
        if edges[i] not in ids[i]:
            ids[i, 0] = edges[i]
    y = torch.randn(n, real, generator=g) * 2
    lp = torch.log_softmax(y, -1).gather(1, ids)
    return lp.view(*tokens, k), ids.view(*tokens, k)


def check_topk_case(rank, tp, group, *, reduction, tau, vocab_size, tail, seed=0, sp=False,
                    fused=True, chunk=4, gate=None, minus_inf=False):
    """Top-k teacher on vocabulary shards (fused, or logits-in with backward counted at
    zero collectives) against the single-device top-k loss on the real vocabulary.
    ``minus_inf``: served log-probs of -inf (slot 0 of every other token: the shard-edge
    ids), with a ``gate`` that weights the infinite reverse KL 0; gradients finite."""
    h, w, b, _, _, labels = _data(seed, tp=tp)
    width = w.shape[0] // tp
    real = vocab_size or w.shape[0]
    shard = slice(rank * width, (rank + 1) * width)
    lp, ids = _topk_teacher(seed, h.shape[:-1], real, width, tp)
    if minus_inf:
        lp.view(-1, lp.shape[-1])[::2, 0] = float("-inf")
    opts = dict(labels=labels, temperature=tau, reduction=reduction, chunk_size=chunk,
                teacher_topk_logprobs=lp, teacher_topk_indices=ids, topk_tail=tail,
                **(gate or {}))
    wl = w[shard].clone().requires_grad_()
    if fused:
        hl = (h.chunk(tp, 0)[rank] if sp else h).clone().requires_grad_()
        loss = fused_linear_vocab_parallel_eaopd_loss(
            hl, wl, tp_group=group, vocab_size=vocab_size, sequence_parallel=sp, **opts)
        loss.backward(_grad_out(loss))
    else:
        z = (h @ w.T)[..., shard].clone().requires_grad_()
        loss = vocab_parallel_eaopd_loss(z, tp_group=group, vocab_size=vocab_size, **opts)
        with CollectiveCounter() as counter:
            loss.backward(_grad_out(loss))
        assert counter.calls == [], "logits-in backward must not communicate"
    hr, wr = h.clone().requires_grad_(), w[:real].clone().requires_grad_()
    ref = fused_linear_eaopd_loss(hr, wr, **opts)
    ref.backward(_grad_out(ref))
    tag = f"[top-k {tail} {reduction} tau={tau} V={vocab_size} sp={sp} fused={fused} " \
        f"{gate} -inf={minus_inf}] "
    _close(loss, ref, msg=tag)
    if minus_inf:
        grads = (hl.grad, wl.grad) if fused else (z.grad,)
        assert all(torch.isfinite(g).all() for g in grads), tag
    want_w = torch.zeros_like(w)
    want_w[:real] = wr.grad
    if fused:
        _close(hl.grad, hr.grad.chunk(tp, 0)[rank] if sp else hr.grad, msg=tag + "grad h ")
        _close(wl.grad, want_w[shard], msg=tag + "grad W ")
    else:
        want_z = torch.zeros(*h.shape[:-1], w.shape[0])
        zr = (h @ w[:real].T).clone().requires_grad_()
        ref_z = entropy_aware_opd_loss(zr, **opts)
        ref_z.backward(_grad_out(ref_z))
        want_z[..., :real] = zr.grad
        _close(z.grad, want_z[..., shard], msg=tag + "grad z ")


def _check_topk_loss_func(rank, tp, sp, seed):
    """megatron's loss_func with a served teacher ([s, b, k], full sequence): the summed
    loss and token count of the single-device top-k loss."""
    h, w, _, _, _, labels = _data(seed, tp=tp)  # h: [s=4, b=3, H]
    width = w.shape[0] // tp
    lp, ids = _topk_teacher(seed, h.shape[:-1], 13, width, tp)
    wl = w[rank * width:(rank + 1) * width].clone().requires_grad_()
    hl = (h.chunk(tp, 0)[rank] if sp else h).clone().requires_grad_()
    loss, num, _ = eaopd_loss_func(hl, wl, None, None, labels.t(), sequence_parallel=sp,
                                   vocab_size=13, teacher_topk_logprobs=lp,
                                   teacher_topk_indices=ids, temperature=1.5)
    ref = fused_linear_eaopd_loss(h, w[:13], teacher_topk_logprobs=lp, teacher_topk_indices=ids,
                                  labels=labels, reduction="sum", temperature=1.5)
    _close(loss, ref, msg="loss_func top-k: ")
    assert int(num) == int(labels.sum())


def _check_entropy_override(rank, world, group):
    """teacher_entropy with dense shards (logits-in, fused sum with padding) equals the
    single-device loss with the same entropy."""
    h, w, _, th, tw, labels = _data(7, tp=world)
    width = w.shape[0] // world
    shard = slice(rank * width, (rank + 1) * width)
    ent = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) * 3  # all ranks
    y = th @ tw.T
    opts = dict(labels=labels, temperature=1.3, teacher_entropy=ent, chunk_size=4)
    got = vocab_parallel_eaopd_loss((h @ w.T)[..., shard], y[..., shard], tp_group=group,
                                    reduction="none", **opts)
    _close(got, entropy_aware_opd_loss(h @ w.T, y, reduction="none", **opts))
    wl = w[shard].clone().requires_grad_()
    loss = fused_linear_vocab_parallel_eaopd_loss(h, wl, teacher_hidden=th,
                                                  teacher_weight=tw[shard], tp_group=group,
                                                  vocab_size=25, reduction="sum", **opts)
    loss.backward()
    wr = w[:25].clone().requires_grad_()
    ref = fused_linear_eaopd_loss(h, wr, teacher_hidden=th, teacher_weight=tw[:25],
                                  reduction="sum", **opts)
    ref.backward()
    _close(loss, ref)
    want = torch.zeros_like(w)
    want[:25] = wr.grad
    _close(wl.grad, want[shard])


def _check_topk_collectives(rank, world, group):
    """Top-k forward: the header + ONE all-gather per chunk (k + 2 numbers per token)."""
    h, w, _, _, _, _ = _data(1, tokens=(10,), tp=world)
    width = w.shape[0] // world
    lp, ids = _topk_teacher(1, (10,), w.shape[0], width, world)
    hl, wl = h.clone().requires_grad_(), w[rank * width:(rank + 1) * width].clone()
    with CollectiveCounter() as fwd:
        fused_linear_vocab_parallel_eaopd_loss(
            hl, wl.requires_grad_(), teacher_topk_logprobs=lp, teacher_topk_indices=ids,
            tp_group=group, reduction="sum", chunk_size=4)
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") \
        else "all_gather_into_tensor"
    assert fwd.calls == [gather] * (1 + 3), fwd.calls
    bad = ids.clone()
    if rank == 1:
        bad[2, 1] = bad[2, 0]  # one rank's ids repeat: every rank raises, none hangs
    with pytest.raises(ValueError, match="ranks disagree on .*teacher ids invalid"):
        fused_linear_vocab_parallel_eaopd_loss(
            h, wl.detach(), teacher_topk_logprobs=lp, teacher_topk_indices=bad,
            tp_group=group)
    kw = dict(teacher_topk_indices=ids, tp_group=group)
    over = lp.clone()
    over[3] = over[3] + 2.0  # probabilities summing to e (logits by mistake)
    with pytest.raises(ValueError, match="ranks disagree on .*teacher log-probs invalid"):
        fused_linear_vocab_parallel_eaopd_loss(h, wl.detach(), **kw,
                                               teacher_topk_logprobs=over if rank else lp)
    with pytest.raises(ValueError, match="teacher_topk_logprobs must be log-prob.*token 3"):
        fused_linear_vocab_parallel_eaopd_loss(h, wl.detach(), teacher_topk_logprobs=over, **kw)
    tails = ("bucket", "renormalize", "truncate")
    with pytest.raises(ValueError, match="ranks disagree on topk_tail"):
        fused_linear_vocab_parallel_eaopd_loss(h, wl.detach(), teacher_topk_logprobs=lp, **kw,
                                               topk_tail=tails[rank % 3])


GATES = [{}, {"h_max": 1.1}, {"gate": "threshold", "gate_threshold": 2.5},
         {"gate": "fixed", "fkl_weight": 0.3}]


def _tp4_worker(rank, world):
    group = dist.new_group(list(range(world)))
    grid = itertools.product(["batchmean", "sum", "mean", "none"], [1.0, 0.7], [False, True])
    for i, (reduction, tau, mask) in enumerate(grid):
        gate = GATES[i % len(GATES)]
        vocab_size = 25 if i % 2 else None  # 28 padded to 25: the last shard has 4 real
        check_fused_case(rank, world, group, reduction=reduction, tau=tau, mask=mask,
                         vocab_size=vocab_size, bias=bool(i % 3), gate=gate,
                         teacher="linear" if i % 4 < 2 else "logits")
        check_logits_case(rank, world, group, reduction=reduction, tau=tau, mask=mask,
                          vocab_size=vocab_size, gate=gate)
    # A rank holding only padding (vocab 20 of 28: rank 3 has no real column).
    check_fused_case(rank, world, group, reduction="sum", tau=0.8, mask=True, vocab_size=20,
                     bias=True, gate={}, teacher="linear")
    _check_transforms(rank, world, group)
    topk_grid = [("sum", 1.0, 25, "bucket", True), ("none", 1.5, 25, "bucket", False),
                 ("mean", 1.5, None, "renormalize", True), ("none", 1.0, 20, "bucket", True),
                 ("batchmean", 1.0, 25, "renormalize", False),
                 ("sum", 1.5, 25, "truncate", True), ("none", 1.0, 20, "truncate", True),
                 ("mean", 1.0, None, "truncate", False)]
    for reduction, tau, vocab_size, tail, fused in topk_grid:
        check_topk_case(rank, world, group, reduction=reduction, tau=tau,
                        vocab_size=vocab_size, tail=tail, fused=fused)
    for i, (tail, reduction, fused) in enumerate([("bucket", "sum", True),
                                                  ("renormalize", "none", False),
                                                  ("bucket", "none", True),
                                                  ("renormalize", "sum", False)]):
        check_topk_case(rank, world, group, reduction=reduction, tau=1.0, vocab_size=25,
                        tail=tail, fused=fused, gate=FORWARD_ONLY[i % 2], minus_inf=True)
    _check_minus_inf_teacher(rank, world, group)
    _check_topk_collectives(rank, world, group)
    _check_entropy_override(rank, world, group)
    _check_collectives(rank, world, group)
    _check_disagreement(rank, world, group)
    _check_mask_disagreement(rank, world, group)
    _check_non_finite(rank, world, group)
    _check_routed(rank, world, group)


# ---------------------------------------------------------------- several teachers


def _routed_teachers(seed, tokens, tp, real, sp=False, rank=0, k=5, third="logits"):
    """Three teachers (dense head of its own hidden width, served top-k, given logits or
    with ``third="linear"`` another dense head) over per-token routing: this rank's
    shards, and the single-device tensors on the real vocabulary. Under ``sp``,
    per-sequence routing (dim 1 of [s, b]) so that each rank's slice of a dense teacher's
    hidden states is well defined."""
    g = torch.Generator().manual_seed(seed)
    if sp:
        index = (torch.arange(tokens[1]) % 3)[None, :].expand(tokens).contiguous()
    else:
        index = torch.randint(0, 3, tokens, generator=g)
    width = 7
    v = tp * width
    shard = slice(rank * width, (rank + 1) * width)
    n = [int((index == j).sum()) for j in range(3)]
    if sp:
        th = torch.randn(tokens[0], int((index[0] == 0).sum()), 5, generator=g)
    else:
        th = torch.randn(n[0], 5, generator=g)
    tw = torch.randn(v, 5, generator=g) * 1.5
    ids = torch.stack([torch.randperm(real, generator=g)[:k] for _ in range(n[1])])
    lp = torch.log_softmax(torch.randn(n[1], real, generator=g) * 2, -1).gather(1, ids)
    y = torch.randn(n[2], v, generator=g) * 2
    local = dict(teacher_hidden=[th.chunk(tp, 0)[rank] if sp else th, None, None],
                 teacher_weight=[tw[shard], None, None],
                 teacher_topk_logprobs=[None, lp, None], teacher_topk_indices=[None, ids, None],
                 teacher_logits=[None, None, y[:, shard]])
    full = dict(teacher_hidden=[th, None, None], teacher_weight=[tw[:real], None, None],
                teacher_topk_logprobs=[None, lp, None], teacher_topk_indices=[None, ids, None],
                teacher_logits=[None, None, y[:, :real]])
    if third == "linear":  # a second dense head, hidden width 3
        th2 = torch.randn(*(th.shape[:-1] if sp else (n[2],)), 3, generator=g)
        tw2 = torch.randn(v, 3, generator=g)
        for d in (local, full):
            del d["teacher_logits"]
        local["teacher_hidden"][2] = th2.chunk(tp, 0)[rank] if sp else th2
        local["teacher_weight"][2] = tw2[shard]
        full["teacher_hidden"][2], full["teacher_weight"][2] = th2, tw2[:real]
    return index, local, full


def check_routed_case(rank, tp, group, *, reduction, vocab_size, sp=False, seed=0, chunk=4,
                      loss_func=False):
    """Three routed teachers of mixed forms on vocabulary shards (fused, logits-in, or
    megatron's loss_func) against the single-device routed loss (itself checked against
    the float64 formula in test_multi_teacher), loss, gradients and per-teacher stats."""
    h, w, b, _, _, labels = _data(seed, tp=tp)
    width = w.shape[0] // tp
    real = vocab_size or w.shape[0]
    shard = slice(rank * width, (rank + 1) * width)
    index, local, full = _routed_teachers(seed, h.shape[:-1], tp, real, sp, rank,
                                          third="linear" if loss_func else "logits")
    opts = dict(labels=labels, temperature=1.3, reduction=reduction, chunk_size=chunk)
    hr, wr = h.clone().requires_grad_(), w[:real].clone().requires_grad_()
    ref, ref_stats = fused_linear_eaopd_loss(hr, wr, teacher_index=index, return_stats=True,
                                             **full, **opts)
    ref.backward(_grad_out(ref))
    wl = w[shard].clone().requires_grad_()
    hl = (h.chunk(tp, 0)[rank] if sp else h).clone().requires_grad_()
    stats = None
    if loss_func:
        loss, num, logged = eaopd_loss_func(
            hl, wl, local.pop("teacher_hidden"), local.pop("teacher_weight"), labels.t(),
            sequence_parallel=sp, vocab_size=vocab_size, teacher_index=index,
            temperature=1.3, chunk_size=chunk, **local)
        assert int(num) == int(labels.sum())
        for j, want in enumerate(ref_stats["per_teacher"]):
            _close(logged[f"teacher {j} kl fwd"],
                   torch.stack([want["kl_fwd"] * want["tokens"], want["tokens"]]))
    else:
        loss, stats = fused_linear_vocab_parallel_eaopd_loss(
            hl, wl, tp_group=group, vocab_size=vocab_size, sequence_parallel=sp,
            teacher_index=index, return_stats=True, **local, **opts)
    loss.backward(_grad_out(loss))
    tag = f"[routed {reduction} V={vocab_size} sp={sp} loss_func={loss_func}] "
    _close(loss, ref, msg=tag)
    _close(hl.grad, hr.grad.chunk(tp, 0)[rank] if sp else hr.grad, msg=tag + "grad h ")
    want_w = torch.zeros_like(w)
    want_w[:real] = wr.grad
    _close(wl.grad, want_w[shard], msg=tag + "grad W ")
    if stats is not None:
        for mine, want in zip(stats["per_teacher"], ref_stats["per_teacher"], strict=True):
            for key, value in want.items():
                _close(mine[key], value, msg=tag + f"stats {key} ")
    if sp or loss_func:
        return
    # logits-in on the same shards: the dense teachers as logits shards
    th = full["teacher_hidden"][0]
    zl = (h @ w.T)[..., shard].clone().requires_grad_()
    dense0 = local["teacher_hidden"][0] @ local["teacher_weight"][0].T
    got = vocab_parallel_eaopd_loss(
        zl, [dense0, None, local["teacher_logits"][2]], tp_group=group,
        vocab_size=vocab_size, teacher_index=index,
        teacher_topk_logprobs=local["teacher_topk_logprobs"],
        teacher_topk_indices=local["teacher_topk_indices"], **opts)
    with CollectiveCounter() as counter:
        got.backward(_grad_out(got))
    assert counter.calls == [], "logits-in backward must not communicate"
    _close(got, ref, msg=tag + "logits-in ")
    zr = (h @ w[:real].T).clone().requires_grad_()
    ref_z = entropy_aware_opd_loss(
        zr, [th @ full["teacher_weight"][0].T, None, full["teacher_logits"][2]],
        teacher_index=index, teacher_topk_logprobs=full["teacher_topk_logprobs"],
        teacher_topk_indices=full["teacher_topk_indices"], **opts)
    ref_z.backward(_grad_out(ref_z))
    want_z = torch.zeros(*h.shape[:-1], w.shape[0])
    want_z[..., :real] = zr.grad
    _close(zl.grad, want_z[..., shard], msg=tag + "logits-in grad z ")


def _check_routed_collectives_and_disagreement(rank, world, group):
    """Several teachers: the header + ONE all-gather per chunk (chunks never straddle two
    teachers); ranks that route differently, or a row count that does not match the
    routing, make every rank raise."""
    h, w, _, _, _, _ = _data(3, tokens=(10,), tp=world)
    width = w.shape[0] // world
    shard = slice(rank * width, (rank + 1) * width)
    index = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0, 1, 0])  # 6 + 4 tokens: 2 + 1 chunks of 4
    y = torch.randn(10, w.shape[0])
    kw = dict(teacher_logits=[y[index == 0][:, shard], y[index == 1][:, shard]],
              tp_group=group, reduction="sum", chunk_size=4)
    with CollectiveCounter() as fwd:
        fused_linear_vocab_parallel_eaopd_loss(h, w[shard].clone().requires_grad_(),
                                               teacher_index=index, **kw)
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") \
        else "all_gather_into_tensor"
    assert fwd.calls == [gather] * (1 + 3), fwd.calls
    other = index.clone()
    if rank == 1:
        other[[0, 1]] = other[[1, 0]]  # same counts, different tokens
    with pytest.raises(ValueError, match="ranks disagree on routing fingerprint"):
        fused_linear_vocab_parallel_eaopd_loss(h, w[shard], teacher_index=other, **kw)
    short = dict(kw, teacher_logits=[kw["teacher_logits"][0][1:], kw["teacher_logits"][1]])
    with pytest.raises(ValueError, match="teacher 0: teacher_logits has 5 token rows but "
                                         "teacher_index routes 6"):
        fused_linear_vocab_parallel_eaopd_loss(h, w[shard], teacher_index=index, **short)


def _check_routed(rank, world, group):
    for i, reduction in enumerate(["sum", "none", "batchmean"]):
        check_routed_case(rank, world, group, reduction=reduction,
                          vocab_size=25 if i % 2 == 0 else None, seed=30 + i)
    _check_routed_collectives_and_disagreement(rank, world, group)


# (student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap)
TRANSFORMS = [(1.0, 3.0, 1.0, None), (0.5, None, 1.0, 4.0), (0.7, 2.5, 1.3, 5.0)]


def _check_transforms(rank, world, group):
    """Softcap and logit scale on the vocab-parallel paths: both gradient modes, every gate,
    padded vocabulary, both teacher forms (eager kernels; compiled in the megatron spawn)."""
    cases = itertools.product(TRANSFORMS, [("batchmean", 1.0), ("none", 0.7), ("sum", 1.0)])
    for i, (xf, (reduction, tau)) in enumerate(cases):
        vocab_size = 25 if i % 2 else None
        check_fused_case(rank, world, group, reduction=reduction, tau=tau, mask=True,
                         vocab_size=vocab_size, bias=bool(i % 2), gate=GATES[i % len(GATES)],
                         teacher=("linear", "logits")[i % 2], xf=xf, seed=20 + i)
        if i % 3 == 0:
            check_logits_case(rank, world, group, reduction=reduction, tau=tau, mask=True,
                              vocab_size=vocab_size, gate=GATES[i % len(GATES)], xf=xf)


# Gates whose weight on the reverse KL is exactly 0 (issue 22): fixed at 1, linear clamped.
FORWARD_ONLY = [{"gate": "fixed", "fkl_weight": 1.0}, {"h_max": 0.01}]


def _minus_inf_teacher(y, width, one_hot):
    """Teacher logits with -inf: both sides of the first shard boundary (token 0), all of
    rank 1's columns (token 1), all but one column on rank 1 (token 2: one-hot; or two-hot
    with one on rank 0, so that its entropy is log 2 and not 0), every third column
    (token 3), the last column (token 4)."""
    y = y.clone()
    y[0, width - 1:width + 1] = float("-inf")
    y[1, width:2 * width] = float("-inf")
    y[2, :] = float("-inf")
    y[2, width + 2] = 0.0
    if not one_hot:
        y[2, 1] = 0.0
    y[3, ::3] = float("-inf")
    y[4, -1] = float("-inf")
    return y


def _check_minus_inf_teacher(rank, world, group, gates=FORWARD_ONLY):
    """A teacher -inf where the student has mass under a gate weighting the reverse KL
    (+inf) 0: logits-in and fused (teacher logits), both gradient modes, with a mask,
    against the float64 formula (F.kl_div over the kept columns); gradients finite. (A
    one-hot teacher has entropy 0: the linear gate gives its reverse KL weight 1.)"""
    h, w, _, th, tw, labels = _data(8, tokens=(6,), tp=world)
    width = w.shape[0] // world
    shard = slice(rank * width, (rank + 1) * width)
    labels[:5] = 1.0  # the -inf rows are kept
    for gate in gates:
        y = _minus_inf_teacher(th @ tw.T, width, one_hot=gate.get("gate") == "fixed")
        for reduction in ("sum", "none"):
            zd = (h @ w.T).double().requires_grad_()
            want = formulas.reduce(formulas.per_token(zd, y, **gate), labels, reduction)
            want.backward(_grad_out(want).double())
            want_h, want_w = zd.grad @ w.double(), (zd.grad.T @ h.double())[shard]
            opts = dict(tp_group=group, labels=labels, reduction=reduction, chunk_size=4,
                        **gate)
            z = (h @ w.T)[:, shard].clone().requires_grad_()
            loss = vocab_parallel_eaopd_loss(z, y[:, shard], **opts)
            loss.backward(_grad_out(loss))
            hl, wl = h.clone().requires_grad_(), w[shard].clone().requires_grad_()
            fused = fused_linear_vocab_parallel_eaopd_loss(hl, wl, teacher_logits=y[:, shard],
                                                           **opts)
            fused.backward(_grad_out(fused))
            tag = f"[-inf teacher {gate} {reduction}] "
            for got, g in ((loss, z.grad), (fused, hl.grad), (fused, wl.grad)):
                assert torch.isfinite(got).all() and torch.isfinite(g).all(), tag
            _close(loss.double(), want.detach(), msg=tag)
            _close(z.grad.double(), zd.grad[:, shard], msg=tag + "grad z ")
            _close(fused.double(), want.detach(), msg=tag + "fused ")
            _close(hl.grad.double(), want_h, msg=tag + "fused grad h ")
            _close(wl.grad.double(), want_w, msg=tag + "fused grad W ")


def _check_collectives(rank, world, group):
    """Forward: a header + ONE all-gather per chunk. Backward: one all-reduce (fused)."""
    h, w, _, th, tw, _ = _data(1, tokens=(10,), tp=world)
    width = w.shape[0] // world
    shard = slice(rank * width, (rank + 1) * width)
    for reduction, chunk in (("sum", 4), ("none", 3)):
        hl, wl = h.clone().requires_grad_(), w[shard].clone().requires_grad_()
        with CollectiveCounter() as fwd:
            loss = fused_linear_vocab_parallel_eaopd_loss(
                hl, wl, teacher_hidden=th, teacher_weight=tw[shard], tp_group=group,
                reduction=reduction, chunk_size=chunk)
        with CollectiveCounter() as bwd:
            loss.sum().backward()
        n_chunks = -(-10 // chunk)
        gather = "all_gather_single" if hasattr(dist, "all_gather_single") \
            else "all_gather_into_tensor"
        assert fwd.calls == [gather] * (1 + n_chunks), fwd.calls
        assert bwd.calls == ["all_reduce"], bwd.calls
    _check_sp_none_collectives(rank, world, group)


def _check_sp_none_collectives(rank, world, group):
    """Sequence parallelism, reduction="none": the forward gathers each hidden tensor once
    and keeps it; the recomputing backward's only collective is the reduce-scatter of the
    hidden gradient (no second all-gather), and its gradients match the gathered call's."""
    h, w, _, th, tw, _ = _data(3, tokens=(4 * world,), tp=world)
    width = w.shape[0] // world
    shard = slice(rank * width, (rank + 1) * width)
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") \
        else "all_gather_into_tensor"
    scatter = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") \
        else "reduce_scatter_tensor"
    hl, wl = h.chunk(world, 0)[rank].clone().requires_grad_(), w[shard].clone().requires_grad_()
    with CollectiveCounter() as fwd:
        loss = fused_linear_vocab_parallel_eaopd_loss(
            hl, wl, teacher_hidden=th.chunk(world, 0)[rank], teacher_weight=tw[shard],
            tp_group=group, reduction="none", chunk_size=3, sequence_parallel=True)
    with CollectiveCounter() as bwd:
        loss.backward(_grad_out(loss))
    n_chunks = -(-4 * world // 3)
    assert fwd.calls == [gather] * (3 + n_chunks), fwd.calls  # header, h, h_t, chunks
    assert bwd.calls == [scatter], bwd.calls
    hr, wr = h.clone().requires_grad_(), w[shard].clone().requires_grad_()
    ref = fused_linear_vocab_parallel_eaopd_loss(
        hr, wr, teacher_hidden=th, teacher_weight=tw[shard], tp_group=group,
        reduction="none", chunk_size=3)
    ref.backward(_grad_out(ref))
    _close(loss, ref)
    _close(hl.grad, hr.grad.chunk(world, 0)[rank], msg="grad h ")
    _close(wl.grad, wr.grad, msg="grad W ")


def _check_disagreement(rank, world, group):
    """Ranks with different token counts or shard widths all raise, none hangs."""
    h, w, _, th, tw, _ = _data(2, tokens=(6,), tp=world)
    n = 6 if rank else 5
    with pytest.raises(ValueError, match="ranks disagree on tokens"):
        fused_linear_vocab_parallel_eaopd_loss(h[:n], w[:7], teacher_hidden=th[:n],
                                               teacher_weight=tw[:7], tp_group=group)
    width = 7 if rank else 6
    with pytest.raises(ValueError, match="shard width"):
        vocab_parallel_eaopd_loss(torch.randn(4, width), torch.randn(4, width),
                                  tp_group=group)
    with pytest.raises(ValueError, match="ranks disagree on student_softcap"):
        vocab_parallel_eaopd_loss(torch.randn(4, 7), torch.randn(4, 7), tp_group=group,
                                  student_softcap=30.0 if rank else None)


def _check_mask_disagreement(rank, world, group):
    """Same kept count but a different mask, or different weights: every rank raises."""
    h, w, _, th, tw, _ = _data(4, tokens=(8,), tp=world)
    width = w.shape[0] // world
    shard = slice(rank * width, (rank + 1) * width)
    kw = dict(teacher_hidden=th, teacher_weight=tw[shard], tp_group=group)
    same_count = torch.zeros(8)
    same_count[[rank % 2, 4]] = 1.0  # two kept tokens everywhere, not the same ones
    with pytest.raises(ValueError, match="ranks disagree on mask"):
        fused_linear_vocab_parallel_eaopd_loss(h, w[shard], labels=same_count, **kw)
    # {0, 4, 5} and {1, 2, 6}: same count, sum and sum of squares of the positions (the
    # moment fingerprint's blind spot; issue 18).
    moments = torch.zeros(8)
    moments[[0, 4, 5] if rank % 2 else [1, 2, 6]] = 1.0
    with pytest.raises(ValueError, match="ranks disagree on mask fingerprint"):
        fused_linear_vocab_parallel_eaopd_loss(h, w[shard], labels=moments, **kw)
    weights = torch.ones(8)
    weights[3] = 1.0 + (rank == 1)
    with pytest.raises(ValueError, match="ranks disagree on mask sum"):
        vocab_parallel_eaopd_loss((h @ w.T)[:, shard], (th @ tw.T)[:, shard], labels=weights,
                                  tp_group=group)


def _check_non_finite(rank, world, group):
    """NaN/+inf in a kept token, or a teacher row with no finite entry on any shard, gives
    that token NaN on every rank, as on one device; a masked broken token does not leak."""
    h, w, _, th, tw, _ = _data(5, tokens=(6,), tp=world)
    width = w.shape[0] // world
    shard = slice(rank * width, (rank + 1) * width)
    z, y = h @ w.T, th @ tw.T
    y[0, 3] = float("nan")               # on rank 0's shard only
    z[1, width + 1] = float("inf")       # on rank 1's shard only
    y[2] = float("-inf")                 # no finite teacher entry anywhere
    y[3, :width] = float("-inf")         # rank 0's shard empty: fine
    z[3, :width] = float("-inf")
    y[4, -1] = float("-inf")             # teacher -inf where the student has mass: +inf
    got = vocab_parallel_eaopd_loss(z[:, shard], y[:, shard], tp_group=group,
                                    reduction="none", chunk_size=4)
    want = entropy_aware_opd_loss(z, y, reduction="none")
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    assert torch.isnan(got[:3]).all() and torch.isinf(got[4])
    ok = ~torch.isnan(want)
    _close(got[ok], want[ok])
    labels = torch.ones(6)
    labels[:3] = 0.0
    zl = z[:, shard].clone().requires_grad_()
    loss = vocab_parallel_eaopd_loss(zl, y[:, shard], tp_group=group, labels=labels,
                                     reduction="sum")
    loss.backward()
    _close(loss, entropy_aware_opd_loss(z, y, labels=labels, reduction="sum"))
    assert torch.isfinite(zl.grad[:4]).all()


def _check_compiled(rank, world, group):
    """Both vocab-parallel functions and megatron's loss_func inside a user's compiled
    step (default mode), every gate between them, reductions "mean" and "none", labels
    and return_stats: the same loss, statistics and gradients as eager."""
    h, w, _, th, tw, labels = _data(6, tp=world)
    width = w.shape[0] // world
    shard = slice(rank * width, (rank + 1) * width)
    torch.manual_seed(0)  # the same layer on every rank
    lin = torch.nn.Linear(h.shape[-1], h.shape[-1])

    def fused(x, wl, reduction, gate):
        return fused_linear_vocab_parallel_eaopd_loss(
            lin(x), wl, teacher_hidden=th, teacher_weight=tw[shard], labels=labels,
            tp_group=group, reduction=reduction, return_stats=True, chunk_size=5, **gate)

    def logits(x, wl, reduction, gate):
        return vocab_parallel_eaopd_loss(lin(x) @ wl.T, (th @ tw.T)[..., shard], labels=labels,
                                         tp_group=group, reduction=reduction, chunk_size=5,
                                         **gate)

    def loss_func(x, wl, reduction, gate):
        loss, num, logged = eaopd_loss_func(lin(x), wl, th, tw[shard], labels.t(),
                                            tp_group=group, chunk_size=5, **gate)
        return loss, {"n": num.float(), **logged}

    cases = [(fused, "mean", GATES[1]), (fused, "none", GATES[2]), (logits, "mean", GATES[3]),
             (logits, "none", GATES[0]), (loss_func, "sum", GATES[2])]
    for fn, reduction, gate in cases:
        results = []
        for step in (fn, torch.compile(fn)):
            wl = w[shard].clone().requires_grad_()
            lin.zero_grad(set_to_none=True)
            out = step(h, wl, reduction, gate)
            loss, stats = out if isinstance(out, tuple) else (out, {})
            loss.backward(_grad_out(loss))
            results.append([loss.detach(), wl.grad, lin.weight.grad,
                            *(v for v in stats.values() if isinstance(v, torch.Tensor))])
        for a, b_ in zip(*results, strict=True):
            _close(a, b_, msg=f"compiled {fn.__name__} {reduction} {gate}: ")


def test_tp4_explicit_group():
    spawn(_tp4_worker, 4)


# --------------------------------------------------------------------- megatron-core


def _megatron_worker(rank, world, tp, use_sp, compile_check):
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank()
        group = None  # megatron-core's tensor-parallel group
        # The general cases run eagerly: compiled kernels are the same functions (the
        # single-device tests compare them with eager), and each compiled graph costs
        # seconds per rank. The compile check then compiles one case per shard kernel.
        os.environ["EAOPD_COMPILE"] = "0"
        for i, reduction in enumerate(["batchmean", "none", "sum"]):
            check_fused_case(tp_rank, tp, group, reduction=reduction, tau=0.9, mask=True,
                             vocab_size=13 if i == 1 else None, bias=i == 2, gate=GATES[i],
                             teacher="linear", seed=10 + dp_rank, sp=use_sp)
        _check_topk_loss_func(tp_rank, tp, use_sp, 10 + dp_rank)
        check_routed_case(tp_rank, tp, group, reduction="sum", vocab_size=13, sp=use_sp,
                          seed=10 + dp_rank, loss_func=True)
        # A -inf teacher under a zero reverse-KL weight (tp_group=None is megatron's group).
        _check_minus_inf_teacher(tp_rank, tp, group, gates=FORWARD_ONLY[1:])
        check_topk_case(tp_rank, tp, group, reduction="sum", tau=1.0, vocab_size=13,
                        tail="bucket", seed=10 + dp_rank, sp=use_sp, gate=FORWARD_ONLY[1],
                        minus_inf=True)
        os.environ["EAOPD_COMPILE"] = "1" if compile_check else "0"
        # The top-k shard kernels (partial, shard_grad; compiled under the compile check).
        check_topk_case(tp_rank, tp, group, reduction="sum", tau=1.5, vocab_size=13,
                        tail="bucket", seed=10 + dp_rank, sp=use_sp)
        if compile_check:  # the compiled dense shard kernels with head transforms
            # (partial_x, shard_grad_x; "none"'s backward kernel is the one-device grad_x,
            # compiled in test_head_transforms), the logits-in path, a user's compiled step
            check_fused_case(tp_rank, tp, group, reduction="batchmean", tau=0.9, mask=True,
                             vocab_size=13, bias=True, gate={}, teacher="linear",
                             seed=10 + dp_rank, sp=use_sp, xf=(0.7, 2.5, 1.3, 5.0))
            check_logits_case(tp_rank, tp, group, reduction="mean", tau=1.0, mask=True,
                              vocab_size=None, gate={}, seed=dp_rank)
            _check_compiled(tp_rank, tp, None)
    finally:
        parallel_state.destroy_model_parallel()


def test_tp2_megatron_sequence_parallel():
    """TP=2 through parallel_state with sequence parallelism, compiled kernels."""
    pytest.importorskip("megatron.core")
    spawn(_megatron_worker, 2, 2, True, True, compile_=True)


def test_tp2_dp2_megatron():
    """Two TP=2 groups side by side, each with its own data."""
    pytest.importorskip("megatron.core")
    spawn(_megatron_worker, 4, 2, False, False)


def _splitmix64(x: int) -> int:
    """splitmix64 written from its definition, on Python ints."""
    m = 2**64
    z = x * 0x9E3779B97F4A7C15 % m
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % m
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % m
    return z ^ (z >> 31)


def test_mask_fingerprint_has_no_collisions_on_small_masks():
    """Single process (a property of the function): every 0/1 mask of up to 10 tokens, and
    2000 random weight vectors in {0, 1, 2, 3} over 16 tokens, get distinct fingerprints
    unless the masks are equal."""
    from eaopd_mp.tp import mask_fingerprint
    for n in range(1, 11):
        masks = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)))
        prints = {tuple(mask_fingerprint(m, n)) for m in masks}
        assert len(prints) == len(masks), f"{len(masks) - len(prints)} collisions at n={n}"
    assert mask_fingerprint(None, 9) == mask_fingerprint(torch.ones(9), 9)
    g = torch.Generator().manual_seed(0)
    weights = torch.randint(0, 4, (2000, 16), generator=g).unique(dim=0).float()
    prints = {tuple(mask_fingerprint(w, 16)) for w in weights}
    assert len(prints) == len(weights)


def test_position_hashes_are_splitmix64():
    """The fingerprint's per-position numbers are splitmix64, bit for bit (so every rank
    and device computes the same ones)."""
    from eaopd_mp.tp import position_hashes
    want = [(_splitmix64(i + 1) >> 11) * 2.0**-53 for i in range(64)]
    assert position_hashes(32).flatten().tolist() == want


def test_default_group_needs_megatron_initialised():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="not initialised|not installed"):
        fused_linear_vocab_parallel_eaopd_loss(h, w, teacher_logits=torch.randn(3, 5))
