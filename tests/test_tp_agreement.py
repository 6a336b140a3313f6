"""Tensor-parallel ranks agree or all raise: ranks given different teachers (a data loader
that does not broadcast within the TP group) raise the same ``ValueError`` on every rank,
on every TP entry point; a rank whose vocabulary shard is empty takes part instead of
raising alone. Three gloo ranks, one spawn, a short collective timeout (a rank left waiting
fails the test instead of hanging it)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import spawn
from eaopd_mp import entropy_aware_opd_loss, fused_linear_eaopd_loss
from eaopd_mp.parallel import fused_linear_vocab_parallel_eaopd_loss, vocab_parallel_eaopd_loss
from formulas import close

WORLD = 3


def _data(vocab=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, th = torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 6, generator=g)
    w, tw = torch.randn(vocab, 8, generator=g), torch.randn(vocab, 6, generator=g) * 1.5
    labels = (torch.rand(5, 2, generator=g) > 0.2).float()
    lp, ids = torch.log_softmax(th @ tw.T, -1).topk(4)
    return h, th, w, tw, labels, lp, ids


def _raises_everywhere(call, match):
    """``call()`` raises ValueError matching ``match`` on this rank; every rank's message is
    the same (gathered)."""
    with pytest.raises(ValueError, match=match) as err:
        call()
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, str(err.value))
    assert len(set(messages)) == 1, messages


def _different_teachers(rank):
    """Each TP entry point, with rank 1's teacher inputs off in one place."""
    h, th, w, tw, labels, lp, ids = _data()
    rows = w.shape[0] // WORLD
    cols = slice(rank * rows, (rank + 1) * rows)
    group = dist.group.WORLD
    other = rank == 1
    bad_lp = lp.clone()
    bad_lp[2, 1, 0] -= 0.25 * other  # one log-prob of one token
    perm_ids = ids.flip(-1) if other else ids  # the same ids in another order
    perm_lp = lp.flip(-1) if other else lp
    bad_ent = torch.rand(5, 2, generator=torch.Generator().manual_seed(rank)) + 1.0
    bad_th = th + 1e-3 * other  # replicated teacher hidden states
    match = "tensor-parallel ranks disagree on teacher fingerprint"

    def fused(**teacher):
        return fused_linear_vocab_parallel_eaopd_loss(
            h.clone().requires_grad_(), w[cols].clone().requires_grad_(), labels=labels,
            tp_group=group, **teacher)

    for teacher in (dict(teacher_topk_logprobs=bad_lp, teacher_topk_indices=ids),
                    dict(teacher_topk_logprobs=perm_lp, teacher_topk_indices=perm_ids),
                    dict(teacher_topk_logprobs=lp, teacher_topk_indices=ids,
                         teacher_entropy=bad_ent),
                    dict(teacher_hidden=bad_th, teacher_weight=tw[cols]),
                    dict(teacher_hidden=th, teacher_weight=tw[cols],
                         teacher_entropy=bad_ent)):
        _raises_everywhere(lambda t=teacher: fused(**t), match)
    z = (h @ w.T)[..., cols].clone().requires_grad_()
    y = (th @ tw.T)[..., cols]
    _raises_everywhere(lambda: vocab_parallel_eaopd_loss(
        z, teacher_topk_logprobs=bad_lp, teacher_topk_indices=ids, tp_group=group), match)
    _raises_everywhere(lambda: vocab_parallel_eaopd_loss(
        z, y, teacher_entropy=bad_ent, tp_group=group), match)
    # Several teachers: a routed top-k teacher's rows differ on one rank.
    index = torch.zeros(5, 2, dtype=torch.int64)
    index[::2] = 1
    n1 = int(index.sum())
    lp1, ids1 = lp[index == 1], ids[index == 1]
    _raises_everywhere(lambda: fused(
        teacher_hidden=[th[index == 0], None], teacher_weight=[tw[cols], None],
        teacher_topk_logprobs=[None, lp1 - 0.1 * other * (torch.arange(n1) == 0)[:, None]],
        teacher_topk_indices=[None, ids1], teacher_index=index), match)
    # Megatron's loss function ([s, b] tokens, megatron's [b, s] loss mask).
    from eaopd_mp.megatron import eaopd_loss_func

    _raises_everywhere(lambda: eaopd_loss_func(
        h.clone().requires_grad_(), w[cols].clone().requires_grad_(), None, None,
        labels.T.contiguous(), tp_group=group, teacher_topk_logprobs=bad_lp,
        teacher_topk_indices=ids), match)
    # DTensor TP: plain (replicated) top-k tensors beside a Shard(0) head.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    _raises_everywhere(lambda: fused_linear_eaopd_loss(
        distribute_tensor(h, mesh, [Replicate()]), distribute_tensor(w, mesh, [Shard(0)]),
        teacher_topk_logprobs=bad_lp, teacher_topk_indices=ids, labels=labels), match)
    # The same teacher on every rank still runs, and equals one device.
    ref = fused_linear_eaopd_loss(h, w, teacher_topk_logprobs=lp, teacher_topk_indices=ids,
                                  labels=labels)
    close(fused(teacher_topk_logprobs=lp, teacher_topk_indices=ids), ref)


def _empty_shard(rank):
    """V = 4 over 3 ranks as a DTensor Shard(0) lays it out (torch.chunk: 2 + 2 + 0 rows):
    the rank with no row takes part in every collective; loss and gradients equal one
    device's, for the fused and the logits-in paths, dense and served teachers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    h, th, w, tw, labels, _, _ = _data(vocab=4)
    lp, ids = torch.log_softmax(th @ tw.T, -1).topk(2)
    wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    assert wd.to_local().shape[0] == (0 if rank == 2 else 2)
    for teacher, ref_teacher in (
            (dict(teacher_hidden=distribute_tensor(th, mesh, [Replicate()]),
                  teacher_weight=distribute_tensor(tw, mesh, [Shard(0)])),
             dict(teacher_hidden=th, teacher_weight=tw)),
            (dict(teacher_topk_logprobs=lp, teacher_topk_indices=ids),) * 2):
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        ref = fused_linear_eaopd_loss(hr, wr, labels=labels, reduction="sum", **ref_teacher)
        ref.backward()
        hd = distribute_tensor(h, mesh, [Replicate()]).requires_grad_()
        wd.grad = None
        loss = fused_linear_eaopd_loss(hd, wd, labels=labels, reduction="sum", **teacher)
        loss.backward()
        close(loss, ref.detach())
        close(wd.grad.full_tensor(), wr.grad, msg="grad W: ")
        close(hd.grad.full_tensor(), hr.grad, msg="grad h: ")
    # Every rank's shard empty: the same ValueError everywhere.
    _raises_everywhere(lambda: fused_linear_vocab_parallel_eaopd_loss(
        h, w[:0], teacher_hidden=th, teacher_weight=tw[:0], tp_group=dist.group.WORLD),
        "the vocabulary is empty: shards of width 0 on 3 ranks")
    _raises_everywhere(lambda: vocab_parallel_eaopd_loss(
        (h @ w.T)[..., :0], (th @ tw.T)[..., :0], tp_group=dist.group.WORLD),
        "the vocabulary is empty")
    z, y = h @ w.T, th @ tw.T
    zr = z.clone().requires_grad_()
    ref = entropy_aware_opd_loss(zr, y, labels=labels, reduction="sum")
    ref.backward()
    zd = distribute_tensor(z, mesh, [Shard(2)]).requires_grad_()
    loss = entropy_aware_opd_loss(zd, distribute_tensor(y, mesh, [Shard(2)]), labels=labels,
                                  reduction="sum")
    loss.backward()
    close(loss, ref.detach())
    close(zd.grad.full_tensor(), zr.grad, msg="grad z: ")


def _body(rank, world):
    failures = []
    for name, case in (("different teachers", _different_teachers),
                       ("empty vocabulary shard", _empty_shard)):
        try:
            case(rank)
        except Exception as exc:  # noqa: BLE001 - reported below with its name
            failures.append((name, exc))
    if failures:
        raise AssertionError(f"rank {rank}: {[n for n, _ in failures]}") from failures[0][1]


def test_three_ranks():
    spawn(_body, WORLD, timeout_s=60)
