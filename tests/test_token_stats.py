"""``return_stats="token"``: per-token statistics on every path, against float64 formulas
written here (``torch.distributions.Categorical``, ``log_softmax``, ``torch.gather``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical

from dist_utils import spawn
from eaopd_mp import entropy_aware_opd_loss, fused_linear_eaopd_loss
from eaopd_mp.parallel import fused_linear_vocab_parallel_eaopd_loss
from formulas import close, gate_weights

DENSE = ("teacher_entropy", "fkl_weight", "rkl_weight", "kl_fwd", "kl_rev")


def dense_formula(z, y, tau, **gate):
    """Per-token ``{name: (...)}`` in float64 from the logits ``(..., V)``."""
    z, y = z.double(), y.double()
    s, t = F.log_softmax(z / tau, -1), F.log_softmax(y / tau, -1)
    ent = Categorical(logits=y).entropy()
    a, b = gate_weights(ent, z.shape[-1], **gate)
    return {"teacher_entropy": ent, "fkl_weight": a, "rkl_weight": b,
            "kl_fwd": (t.exp() * (t - s)).sum(-1), "kl_rev": (s.exp() * (s - t)).sum(-1)}


def _check(got: dict, want: dict, mask: torch.Tensor, rtol=1e-5):
    assert set(want) <= set(got)
    for name, w in want.items():
        g = got[name]
        assert g.shape == mask.shape and not g.requires_grad, name
        close(g.double(), torch.where(mask.bool(), w, torch.zeros_like(w)), rtol=rtol,
              msg=f"{name}: ")


@pytest.mark.parametrize("gate", [{}, {"gate": "threshold", "gate_threshold": 2.5,
                                       "fkl_coef": 0.5}])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_dense_logits_and_fused(eager, gate, reduction, tau):
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(3, 5, 12, generator=g), torch.randn(41, 12, generator=g)
    th, tw = torch.randn(3, 5, 9, generator=g), torch.randn(41, 9, generator=g) * 1.5
    mask = (torch.rand(3, 5, generator=g) > 0.3).float()
    want = dense_formula(h @ w.T, th @ tw.T, tau, **gate)
    opts = dict(labels=mask, temperature=tau, reduction=reduction, return_stats="token",
                **gate)
    _, stats = entropy_aware_opd_loss((h @ w.T).requires_grad_(), th @ tw.T, **opts)
    _check(stats["token"], want, mask)
    _, stats = fused_linear_eaopd_loss(h.requires_grad_(), w, teacher_hidden=th,
                                       teacher_weight=tw, chunk_size=4, **opts)
    _check(stats["token"], want, mask)
    # The means are those of the per-token values over the kept tokens.
    for name in DENSE:
        close(stats[name], stats["token"][name].sum() / mask.sum())


def test_compiled_kernels_give_the_same_token_stats():
    """The compiled chunk kernels (the default), float32 vs the float64 formula."""
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(4, 6, 300, generator=g) * 3, torch.randn(4, 6, 300, generator=g) * 3
    mask = torch.ones(4, 6)
    mask[0, :2] = 0
    _, stats = entropy_aware_opd_loss(z.requires_grad_(), y, labels=mask, h_max=3.0,
                                      return_stats="token")
    _check(stats["token"], dense_formula(z.detach(), y, 1.0, h_max=3.0), mask)


def topk_formula(z, ids, lp, tau, tail):
    """The served teacher's and the student's mass on the ids, float64."""
    s = F.log_softmax(z.double() / tau, -1)
    return {"teacher_topk_mass": lp.double().exp().sum(-1),
            "student_topk_mass": s.gather(-1, ids).exp().sum(-1)}


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "truncate"])
def test_topk_masses(eager, tail):
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(2, 7, 53, generator=g) * 2, torch.randn(2, 7, 53, generator=g) * 2
    lp, ids = torch.log_softmax(y, -1).topk(6)
    mask = (torch.rand(2, 7, generator=g) > 0.25).float()
    _, stats = entropy_aware_opd_loss(z.requires_grad_(), teacher_topk_logprobs=lp,
                                      teacher_topk_indices=ids, labels=mask, temperature=0.8,
                                      topk_tail=tail, return_stats="token")
    _check(stats["token"], topk_formula(z.detach(), ids, lp, 0.8, tail), mask)
    assert set(stats["token"]) == {*DENSE, "teacher_topk_mass", "student_topk_mass"}


def test_several_teachers_dense_and_topk(eager):
    """Tokens routed to a dense and a served teacher: each token's statistics are its
    teacher's; the top-k masses are 0 on the dense teacher's tokens."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(10, 31, generator=g)
    y = torch.randn(10, 31, generator=g) * 2
    index = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 0])
    lp, ids = torch.log_softmax(y[index == 1], -1).topk(4)
    _, stats = entropy_aware_opd_loss(
        z.requires_grad_(), [y[index == 0], None], teacher_topk_logprobs=[None, lp],
        teacher_topk_indices=[None, ids], teacher_index=index, return_stats="token")
    tok = stats["token"]
    dense = dense_formula(z.detach()[index == 0], y[index == 0], 1.0)
    for name in DENSE:
        close(tok[name][index == 0].double(), dense[name], msg=name)
    masses = topk_formula(z.detach()[index == 1], ids, lp, 1.0, "bucket")
    for name, w in masses.items():
        close(tok[name][index == 1].double(), w, msg=name)
        assert (tok[name][index == 0] == 0).all()


def test_return_stats_values_are_checked():
    with pytest.raises(TypeError, match='return_stats must be True, False or "token"'):
        entropy_aware_opd_loss(torch.randn(2, 5), torch.randn(2, 5), return_stats="tokens")
    with pytest.raises(TypeError, match="return_stats"):
        entropy_aware_opd_loss(torch.randn(2, 5), torch.randn(2, 5), return_stats=1)


def _tp_body(rank, world, h, w, th, tw, mask, lp, ids, out):
    """TP: this rank's vocabulary shard of both heads (and, under sequence parallelism,
    its sequence slice), dense and served teachers; the per-token statistics must be the
    whole row's."""
    rows = w.shape[0] // world
    cols = slice(rank * rows, (rank + 1) * rows)
    seq = h.shape[0] // world
    for served in (False, True):
        for sp in (False, True):
            mine = slice(rank * seq, (rank + 1) * seq) if sp else slice(None)
            teacher = (dict(teacher_topk_logprobs=lp, teacher_topk_indices=ids) if served
                       else dict(teacher_hidden=th[mine], teacher_weight=tw[cols]))
            _, stats = fused_linear_vocab_parallel_eaopd_loss(
                h[mine].clone().requires_grad_(), w[cols].clone().requires_grad_(),
                labels=mask, tp_group=torch.distributed.group.WORLD, sequence_parallel=sp,
                temperature=0.9, return_stats="token", **teacher)
            torch.save(stats["token"], f"{out}/{served}-{sp}-rank{rank}.pt")
    # DTensor TP, hidden states sharded along token dim 1 (moved first inside, and back).
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    hd = distribute_tensor(h.transpose(0, 1).contiguous(), mesh, [Shard(0)])  # (2, 6, H)
    thd = distribute_tensor(th.transpose(0, 1).contiguous(), mesh, [Shard(0)])
    hd, thd = hd.redistribute(mesh, [Shard(1)]), thd.redistribute(mesh, [Shard(1)])
    _, stats = fused_linear_eaopd_loss(
        hd, distribute_tensor(w, mesh, [Shard(0)]), teacher_hidden=thd,
        teacher_weight=distribute_tensor(tw, mesh, [Shard(0)]), labels=mask.T.contiguous(),
        temperature=0.9, return_stats="token")
    torch.save(stats["token"], f"{out}/dtensor-rank{rank}.pt")


def test_tensor_parallel_token_stats(tmp_path):
    """TP = 2, with and without sequence parallelism, a dense and a served teacher."""
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(6, 2, 10, generator=g), torch.randn(46, 10, generator=g)
    th, tw = torch.randn(6, 2, 7, generator=g), torch.randn(46, 7, generator=g) * 2
    mask = (torch.rand(6, 2, generator=g) > 0.3).float()
    y = th @ tw.T
    lp, ids = torch.log_softmax(y, -1).topk(5)
    spawn(_tp_body, 2, h, w, th, tw, mask, lp, ids, str(tmp_path))
    z = h @ w.T
    for served in (False, True):
        for sp in (False, True):
            got = [torch.load(tmp_path / f"{served}-{sp}-rank{r}.pt") for r in range(2)]
            for name in got[0]:  # every rank reports the same per-token statistics
                torch.testing.assert_close(got[0][name], got[1][name], rtol=0, atol=0)
            want = topk_formula(z, ids, lp, 0.9, "bucket") if served else \
                dense_formula(z, y, 0.9)
            _check(got[0], want, mask)
            assert set(got[0]) == ({*DENSE, *want} if served else set(DENSE))
    got = [torch.load(tmp_path / f"dtensor-rank{r}.pt") for r in range(2)]
    want = {k: v.T for k, v in dense_formula(z, y, 0.9).items()}
    _check(got[0], want, mask.T)  # the caller's (2, 6) layout, token dim 1 sharded
    for name in got[0]:
        torch.testing.assert_close(got[0][name], got[1][name], rtol=0, atol=0)
