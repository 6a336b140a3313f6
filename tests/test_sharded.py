"""Sharded models on gloo (CPU, explicit ``init_device_mesh("cpu", ...)``): FSDP2, DTensor
tensor parallelism, FSDP2 x TP, and the refused layouts.

One spawn per world size runs all of its cases (names in the failure message). Every case
compares the loss and the gradients against one process on the same global batch.

Gradient convention under FSDP2 (PyTorch issue #162338 reports gloo summing where NCCL
averages): the references below expect FSDP2's documented *average* over the data-parallel
ranks, i.e. each parameter's ``.grad.full_tensor()`` equals ``grad(sum_r loss_r) / world``
for per-rank ``reduction="sum"`` losses; a silent change to summing fails them (by a factor
of ``world``).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import transformers

from dist_utils import spawn
from eaopd_mp import entropy_aware_opd_loss, fused_linear_eaopd_loss, hf, sharded
from formulas import close

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHS = {"llama": ("LlamaForCausalLM", "LlamaConfig", dict(vocab_size=61)),
         "qwen2_tied": ("Qwen2ForCausalLM", "Qwen2Config",
                        dict(vocab_size=64, tie_word_embeddings=True))}


def make_model(name: str, seed: int):
    cls, cfg_cls, kw = ARCHS[name]
    config = getattr(transformers, cfg_cls)(**COMMON, **kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return getattr(transformers, cls)(config).float()


def _batch(rows=4, seq=9, vocab=60):
    """Left-padded prompts + completions (``rows`` divisible by the ranks)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (rows, seq), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0
    attn[3, :1] = 0
    ids[attn == 0] = 0
    comp = torch.zeros_like(ids)
    comp[:, 4:] = 1
    comp[1, 7:] = 0
    return ids, attn, comp


class _Failures:
    """Runs named cases; raises once with every failing name (and the first traceback)."""

    def __init__(self, rank):
        self.rank, self.failed, self.first = rank, [], None

    def run(self, name, fn, *args):
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported below, with its name
            self.failed.append(name)
            self.first = self.first or exc

    def check(self):
        if self.failed:
            raise AssertionError(f"rank {self.rank}: failed cases {self.failed}") from self.first


def _shard(model, mesh, reshard, mp):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mp else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    return model


def _hf_reference(s_name, t_name, opts, grad=None):
    """One process, the global batch: loss, and every student parameter's gradient."""
    student, teacher = make_model(s_name, 0), make_model(t_name, 1)
    ids, attn, comp = _batch()
    loss = hf.eaopd_loss(student, teacher, ids, attn, comp, **opts)
    loss.backward(grad)
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


def fsdp_hf_case(rank, world, mesh, s_name, t_name, reshard, mp, ref):
    """hf.eaopd_loss on fully_shard'ed student and teacher, this rank's rows."""
    student = _shard(make_model(s_name, 0), mesh, reshard, mp)
    teacher = _shard(make_model(t_name, 1).requires_grad_(False), mesh, reshard, mp)
    ids, attn, comp = _batch()
    rows = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
    loss = hf.eaopd_loss(student, teacher, ids[rows], attn[rows], comp[rows], reduction="sum",
                         chunk_size=4)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    want_loss, want = ref
    grads = {n: p.grad.full_tensor() for n, p in student.named_parameters()}
    assert grads.keys() == want.keys()
    if not mp:
        assert loss.dtype == torch.float32
        close(total, want_loss)
        for name, g in want.items():  # FSDP2 averages over the ranks (see the docstring)
            close(grads[name], g / world, msg=f"grad {name}: ")
    else:  # the bf16 policy against the float32 reference, at bf16 tolerance (one process
        # with bf16 models: 1.9% at most, on these models)
        torch.testing.assert_close(total, want_loss, rtol=3e-2, atol=3e-2)
        for name, g in want.items():
            assert grads[name].dtype == torch.float32  # the sharded fp32 master gradient
            assert (grads[name] - g / world).norm() <= 0.05 * (g / world).norm(), name
    assert all(p.grad is None for p in teacher.parameters())


def fsdp_none_case(rank, world, mesh, ref):
    """reduction="none" under FSDP2 with both roots resharding after forward: the backward
    recomputes from the head the pre-backward hook gathered again."""
    student = _shard(make_model("llama", 0), mesh, True, False)
    teacher = _shard(make_model("qwen2_tied", 1).requires_grad_(False), mesh, True, False)
    ids, attn, comp = _batch()
    n = len(ids) // world
    rows = slice(rank * n, (rank + 1) * n)
    loss = hf.eaopd_loss(student, teacher, ids[rows], attn[rows], comp[rows], reduction="none",
                         chunk_size=4)
    g = torch.linspace(0.5, 1.5, ids.shape[0] * (ids.shape[1] - 1)).view(len(ids), -1)
    loss.backward(g[rows])
    want_loss, want = ref
    close(loss.detach(), want_loss[rows])
    for name, w in want.items():
        close(student.get_parameter(name).grad.full_tensor(), w / world, msg=f"grad {name}: ")


class _Tiny(torch.nn.Module):
    """A plain-PyTorch LM: ``head(body(x))``."""

    def __init__(self, vocab, hidden, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.Tanh())
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.body(x)


def helper_case(rank, world, mesh, head_unit):
    """sharded.head_eaopd_loss on a user's own FSDP2 model: the head in the root's group, or
    its own FSDP unit that stays gathered (NeMo Automodel's layout)."""
    from torch.distributed.fsdp import fully_shard

    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 5, generator=g)
    labels = (torch.rand(4, 3, generator=g) > 0.3).float()
    ref_s, ref_t = _Tiny(37, 8, 0), _Tiny(37, 6, 1)
    ref = fused_linear_eaopd_loss(ref_s(x), ref_s.head.weight, student_bias=ref_s.head.bias,
                                  teacher_hidden=ref_t(x).detach(),
                                  teacher_weight=ref_t.head.weight.detach(),
                                  teacher_bias=ref_t.head.bias.detach(), labels=labels,
                                  reduction="sum", chunk_size=2)
    ref.backward()
    student, teacher = _Tiny(37, 8, 0), _Tiny(37, 6, 1).requires_grad_(False)
    for m in (student, teacher):
        if head_unit:
            fully_shard(m.head, mesh=mesh, reshard_after_forward=False)
        fully_shard(m.body, mesh=mesh)
        fully_shard(m, mesh=mesh)
    n = len(x) // world
    rows = slice(rank * n, (rank + 1) * n)
    loss = sharded.head_eaopd_loss(student.head, student(x[rows]), model=student,
                                   teacher_head=teacher.head, teacher_hidden=teacher(x[rows]),
                                   teacher_model=teacher, labels=labels[rows], reduction="sum",
                                   chunk_size=2)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    close(total, ref.detach())
    for name, p in ref_s.named_parameters():
        close(student.get_parameter(name).grad.full_tensor(), p.grad / world,
              msg=f"grad {name}: ")


def _two_ranks(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    cases = _Failures(rank)
    for s_name, t_name in (("llama", "qwen2_tied"), ("qwen2_tied", "llama")):
        ref = _hf_reference(s_name, t_name, dict(reduction="sum", chunk_size=4))
        for reshard in (True, False):
            for mp in (False, True):
                cases.run(f"fsdp2 {s_name}<-{t_name} reshard={reshard} bf16={mp}",
                          fsdp_hf_case, rank, world, mesh, s_name, t_name, reshard, mp, ref)
    g = torch.linspace(0.5, 1.5, 4 * 8).view(4, 8)
    ref = _hf_reference("llama", "qwen2_tied", dict(reduction="none", chunk_size=4), g)
    cases.run("fsdp2 reduction=none", fsdp_none_case, rank, world, mesh, ref)
    for head_unit in (False, True):
        cases.run(f"head_eaopd_loss head_unit={head_unit}", helper_case, rank, world, mesh,
                  head_unit)
    cases.check()


def test_two_ranks():
    """FSDP2 (hf.eaopd_loss, the public helper) at 2 ranks, one spawn."""
    spawn(_two_ranks, 2)


# --------------------------------------------------------------------------- refused layouts


def test_zero3_empty_weight_is_named():
    w = torch.nn.Parameter(torch.empty(0))
    w.ds_id, w.ds_status, w.ds_shape = 3, "NOT_AVAILABLE", (64, 8)
    h = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"ZeRO-3 .*full shape \(64, 8\).*head_eaopd_loss"):
        fused_linear_eaopd_loss(h, w, teacher_logits=torch.randn(2, 64))
    with pytest.raises(ValueError, match="student_weight is empty"):
        fused_linear_eaopd_loss(h, torch.empty(0), teacher_logits=torch.randn(2, 64))


def test_fsdp1_flat_param_is_named():
    w = torch.nn.Parameter(torch.randn(64, 8))
    w._is_flat_param = True
    with pytest.raises(TypeError, match="FSDP1 FlatParameter.*fully_shard"):
        fused_linear_eaopd_loss(torch.randn(2, 8), w, teacher_logits=torch.randn(2, 64))


def test_plain_models_unchanged():
    """Unsharded models take no redirection: run_in_forward is the plain call."""
    model = torch.nn.Linear(2, 2)
    assert sharded.run_in_forward(model, lambda a: a + 1, 1) == 2
    assert sharded.owners(model, model) == []
    assert not sharded.any_dtensor(torch.randn(2), None)
    assert entropy_aware_opd_loss is not None
