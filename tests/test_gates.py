"""Each gate against its formula written here with F.kl_div, on every single-device path.

The vocab-parallel paths are checked against the same formulas in test_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import formulas
from eaopd_mp import (
    EntropyAwareOPDLoss,
    FusedLinearEAOPDLoss,
    entropy_aware_opd_loss,
    fused_linear_eaopd_loss,
    reference_eaopd_loss,
)
from formulas import close

GATES = [
    dict(gate="linear", h_max=2.2),
    dict(gate="threshold", gate_threshold=2.9, fkl_coef=0.7),
    dict(gate="threshold"),  # the paper's tau = 0.8, alpha = 1
    dict(gate="fixed", fkl_weight=0.25),
]


def _inputs():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(3, 6, 10, generator=g), torch.randn(29, 10, generator=g) * 0.8
    th, tw = torch.randn(3, 6, 8, generator=g), torch.randn(29, 8, generator=g)
    tw[:5] *= 4.0  # a spread of teacher entropies around the thresholds
    return h, w, th, tw


def _formula(z, y, gate_kw, tau):
    kw = {k: v for k, v in gate_kw.items() if k != "gate"}
    return formulas.per_token(z, y, temperature=tau, gate=gate_kw["gate"], **kw)


@pytest.mark.parametrize("gate_kw", GATES, ids=lambda g: str(g))
@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_gate_formula_every_single_device_path(gate_kw, tau):
    h, w, th, tw = _inputs()
    z, y = h @ w.T, th @ tw.T
    want = _formula(z, y, gate_kw, tau)
    hg = h.clone().requires_grad_()
    # autograd through the independent float64 formula gives the reference gradient
    hr = h.double().clone().requires_grad_()
    _formula(hr @ w.double().T, y.double(), gate_kw, tau).sum().backward()
    paths = {
        "reference": lambda: reference_eaopd_loss(z, y, temperature=tau, reduction="none",
                                                  **gate_kw),
        "logits": lambda: entropy_aware_opd_loss(z, y, temperature=tau, reduction="none",
                                                 **gate_kw),
        "module": lambda: EntropyAwareOPDLoss(temperature=tau, reduction="none",
                                              **gate_kw)(z, y),
        "fused": lambda: fused_linear_eaopd_loss(hg, w, teacher_hidden=th, teacher_weight=tw,
                                                 temperature=tau, reduction="none",
                                                 chunk_size=5, **gate_kw),
        "fused_module": lambda: FusedLinearEAOPDLoss(temperature=tau, reduction="none",
                                                     **gate_kw)(hg, w, teacher_logits=y),
    }
    for name, run in paths.items():
        got = run()
        close(got.double(), want, msg=f"{name}: ")
        if name.startswith("fused"):
            hg.grad = None
            got.sum().backward()
            close(hg.grad.double(), hr.grad, msg=f"{name} grad: ")


def test_threshold_gate_switches_on_entropy():
    """Below the threshold only reverse KL counts, at or above it both do."""
    z = torch.randn(2, 16)
    y = torch.stack([torch.randn(16) * 20, torch.zeros(16)])  # peaked, uniform teacher
    loss, stats = entropy_aware_opd_loss(z, y, gate="threshold", gate_threshold=0.8,
                                         reduction="none", return_stats=True)
    s, t = F.log_softmax(z, -1), F.log_softmax(y, -1)
    rkl = F.kl_div(t, s, log_target=True, reduction="none").sum(-1)
    fkl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    close(loss, torch.stack([rkl[0], rkl[1] + fkl[1]]))
    assert stats["gate"] == "threshold" and stats["gate_threshold"] == 0.8
    close(stats["fkl_weight"], torch.tensor(0.5))
    close(stats["rkl_weight"], torch.tensor(1.0))


@pytest.mark.parametrize("weight,name", [(0.0, "reverse"), (1.0, "forward")])
def test_fixed_extremes_are_plain_kl(weight, name):
    z, y = torch.randn(4, 5, 23) * 2, torch.randn(4, 5, 23) * 2
    s, t = F.log_softmax(z / 1.3, -1), F.log_softmax(y / 1.3, -1)
    kl = F.kl_div(t, s, log_target=True, reduction="sum") if name == "reverse" else \
        F.kl_div(s, t, log_target=True, reduction="sum")
    got = entropy_aware_opd_loss(z, y, gate="fixed", fkl_weight=weight, temperature=1.3,
                                 reduction="sum")
    close(got, kl)


def test_default_gate_is_the_seed_linear_gate():
    z, y = torch.randn(3, 4, 31), torch.randn(3, 4, 31) * 3
    close(entropy_aware_opd_loss(z, y), entropy_aware_opd_loss(z, y, gate="linear",
                                                               h_max=float(torch.log(
                                                                   torch.tensor(31.0)))))
    close(entropy_aware_opd_loss(z, y).double(),
          formulas.reduce(formulas.per_token(z, y), reduction="batchmean"))


@pytest.mark.parametrize("gate_kw", GATES, ids=lambda g: str(g))
def test_stats_report_the_gate(gate_kw):
    z, y = torch.randn(2, 9), torch.randn(2, 9)
    _, stats = entropy_aware_opd_loss(z, y, return_stats=True, **gate_kw)
    assert stats["gate"] == gate_kw["gate"]
    for key, value in gate_kw.items():
        if key != "gate":
            assert stats[key] == pytest.approx(value)
