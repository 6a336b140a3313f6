"""DeepSpeed ZeRO-3, one rank: eaopd_mp.hf.eaopd_loss on engines whose parameters are
partitioned to ``numel() == 0``, against the unsharded computation (fp32, rtol 1e-5).

DeepSpeed is in the dev extra, so ``make test`` runs the cpu case (gloo, ``DS_ACCELERATOR=cpu``);
``make gpu-check`` runs the cuda case (bench/gpu_check.sh).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from dist_utils import spawn
from formulas import close

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (pip install deepspeed)")


def _zero3(rank, world, device):
    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed
    import test_sharded as T
    from deepspeed.utils import safe_get_full_grad

    from eaopd_mp import hf

    if device == "cpu":
        # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce (C++, minutes on 2
        # cores) at init; one rank never reduces across processes, and gloo is exact.
        # (importlib: the package's attribute "torch" is torch itself, not the submodule)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
    ids, attn, comp = (x.to(device) for x in T._batch())
    g = torch.linspace(0.5, 1.5, 4 * 8, device=device).view(4, 8)
    for reduction in ("sum", "none"):
        opts = dict(reduction=reduction, chunk_size=4)
        ref_s = T.make_model("llama", 0).to(device)
        ref = hf.eaopd_loss(ref_s, T.make_model("qwen2_tied", 1).to(device), ids, attn, comp,
                            **opts)
        ref.backward(None if reduction == "sum" else g)
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                  "zero_allow_untested_optimizer": True,
                  "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
        student = T.make_model("llama", 0).to(device)
        engine, *_ = deepspeed.initialize(model=student, config=config,
                                          model_parameters=student.parameters())
        teacher = T.make_model("qwen2_tied", 1).to(device).requires_grad_(False)
        t_engine, *_ = deepspeed.initialize(model=teacher, config={
            "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
        assert student.lm_head.weight.numel() == 0  # partitioned: the case this is about
        with pytest.raises(ValueError, match="ZeRO-3 partitioned parameter"):
            hf.fused_linear_eaopd_loss(torch.randn(2, 32, device=device),
                                       student.lm_head.weight,
                                       teacher_logits=torch.randn(2, 61, device=device))
        loss = hf.eaopd_loss(engine, t_engine, ids, attn, comp, **opts)
        if reduction == "sum":
            engine.backward(loss)
        else:
            loss.backward(g)
        close(loss.detach(), ref.detach())
        for name, p in student.named_parameters():
            close(safe_get_full_grad(p), ref_s.get_parameter(name).grad,
                  msg=f"{reduction}: grad {name}: ")
    # Several teachers (two sizes, two engines): every teacher engine's forward entered,
    # nested, and every teacher head gathered for the one call.
    index = torch.tensor([1, 1, 0, 1], device=device)
    ref_s = T.make_model("llama", 0).to(device)
    teachers = [T.make_model("llama", 1), T.make_model("qwen2_tied", 2, hidden_size=24)]
    opts = dict(reduction="sum", chunk_size=4, teacher_index=index)
    ref = hf.eaopd_loss(ref_s, None, ids, attn, comp, **opts,
                        teachers=[t.to(device) for t in teachers])
    ref.backward()
    student = T.make_model("llama", 0).to(device)
    engine, *_ = deepspeed.initialize(model=student, config=config,
                                      model_parameters=student.parameters())
    engines = [deepspeed.initialize(model=t.requires_grad_(False), config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})[0]
        for t in (T.make_model("llama", 1).to(device),
                  T.make_model("qwen2_tied", 2, hidden_size=24).to(device))]
    loss = hf.eaopd_loss(engine, None, ids, attn, comp, teachers=engines, **opts)
    engine.backward(loss)
    close(loss.detach(), ref.detach())
    for name, p in student.named_parameters():
        close(safe_get_full_grad(p), ref_s.get_parameter(name).grad,
              msg=f"teachers: grad {name}: ")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_zero3_one_rank(device, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (make gpu-check runs this case)")
    monkeypatch.setenv("DS_ACCELERATOR", device)
    spawn(_zero3, 1, device)
