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

from dist_utils import spawn
from eaopd_mp import engines, entropy_aware_opd_loss, fused_linear_eaopd_loss, hf, layouts
from formulas import close

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHS = {"llama": ("LlamaForCausalLM", "LlamaConfig", dict(vocab_size=61)),
         "qwen2_tied": ("Qwen2ForCausalLM", "Qwen2Config",
                        dict(vocab_size=64, tie_word_embeddings=True))}


def make_model(name: str, seed: int, **over):
    import transformers  # here: the 4-rank spawn does not need it

    cls, cfg_cls, kw = ARCHS[name]
    config = getattr(transformers, cfg_cls)(**{**COMMON, **kw, **over})
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
    _check_summed(loss, student, ref, world, mp)
    assert all(p.grad is None for p in teacher.parameters())


def _check_summed(loss, student, ref, world, mp):
    """This rank's summed ``loss`` (all-reduced) and the student's FSDP2 gradients against
    the one-process ``ref = (loss, {name: grad})``: FSDP2 averages over the ranks (see
    the module docstring). fp32 at rtol 1e-5; the bf16 policy against the float32
    reference at bf16 tolerance (one process with bf16 models: 1.9% at most here)."""
    total = loss.detach().clone()
    dist.all_reduce(total)
    want_loss, want = ref
    grads = {n: p.grad.full_tensor() for n, p in student.named_parameters()}
    assert grads.keys() == want.keys()
    if not mp:
        assert loss.dtype == torch.float32
        close(total, want_loss)
        for name, g in want.items():
            close(grads[name], g / world, msg=f"grad {name}: ")
    else:
        torch.testing.assert_close(total, want_loss, rtol=3e-2, atol=3e-2)
        for name, g in want.items():
            assert grads[name].dtype == torch.float32  # the sharded fp32 master gradient
            assert (grads[name] - g / world).norm() <= 0.05 * (g / world).norm(), name


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


# Two teachers of different sizes (hidden 32 and 24, untied and tied heads); the global
# batch's 4 sequences are split 2 + 2 over the ranks, so ROUTINGS route them differently on
# each rank: [0, 0 | 1, 1] leaves each rank without a sequence for one teacher, and
# [1, 0 | 1, 1] gives rank 0 both teachers and rank 1 none for teacher 0.
ROUTINGS = ((0, 0, 1, 1), (1, 0, 1, 1))


def _teachers():
    return [make_model("llama", 1), make_model("qwen2_tied", 2, hidden_size=24)]


def _hf_routed_reference(routing, opts, grad=None):
    """One process, the global batch, unsharded models: loss and student gradients."""
    student = make_model("llama", 0)
    ids, attn, comp = _batch()
    loss = hf.eaopd_loss(student, None, ids, attn, comp, teachers=_teachers(),
                         teacher_index=torch.tensor(routing), **opts)
    loss.backward(grad)
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


def fsdp_teachers_case(rank, world, mesh, routing, reshard, mp, ref):
    """hf.eaopd_loss(student, teachers=[...], teacher_index=...) on fully_shard'ed models,
    this rank's rows (a rank may have no sequence for a teacher: it must still take part
    in that teacher's all-gathers, else the other rank hangs)."""
    student = _shard(make_model("llama", 0), mesh, reshard, mp)
    teachers = [_shard(t.requires_grad_(False), mesh, reshard, mp) for t in _teachers()]
    ids, attn, comp = _batch()
    n = len(ids) // world
    rows = slice(rank * n, (rank + 1) * n)
    index = torch.tensor(routing)[rows]
    loss, stats = hf.eaopd_loss(student, None, ids[rows], attn[rows], comp[rows],
                                teachers=teachers, teacher_index=index, reduction="sum",
                                chunk_size=4, return_stats=True)
    loss.backward()
    _check_summed(loss, student, ref, world, mp)
    for j, mine in enumerate(stats["per_teacher"]):  # a teacher without sequences: 0 tokens
        mask = hf.next_token_mask(ids[rows], attn[rows], comp[rows])[index == j]
        assert float(mine["tokens"]) == float(mask.sum())
    assert all(p.grad is None for t in teachers for p in t.parameters())


def fsdp_none_teachers_case(rank, world, mesh, routing, ref):
    """Several teachers with reduction="none" under FSDP2 (every root resharding after
    forward): the backward recomputes from every teacher head kept for it."""
    student = _shard(make_model("llama", 0), mesh, True, False)
    teachers = [_shard(t.requires_grad_(False), mesh, True, False) for t in _teachers()]
    ids, attn, comp = _batch()
    n = len(ids) // world
    rows = slice(rank * n, (rank + 1) * n)
    loss = hf.eaopd_loss(student, None, ids[rows], attn[rows], comp[rows], teachers=teachers,
                         teacher_index=torch.tensor(routing)[rows], reduction="none",
                         chunk_size=4)
    g = torch.linspace(0.5, 1.5, ids.shape[0] * (ids.shape[1] - 1)).view(len(ids), -1)
    loss.backward(g[rows])
    want_loss, want = ref
    close(loss.detach(), want_loss[rows])
    for name, w in want.items():  # FSDP2 averages over the ranks
        close(student.get_parameter(name).grad.full_tensor(), w / world, msg=f"grad {name}: ")


def layers_only_case(rank, world, routing, ref):
    """A teacher whose decoder layers are fully_shard-ed but whose root and head are not (a
    valid FSDP2 layout): its forward all-gathers, so a rank with no sequence for it must run
    it too. Its layers live on a process group with a 5 s timeout, and the ranks compare
    their collective counts on the default group afterwards, so a rank that skips it makes
    this case fail on both ranks (gloo times out the peer's all-gather) instead of hanging
    the spawn. The student and teacher 0 are plain (each rank's gradient is its own)."""
    import datetime

    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from dist_utils import CollectiveCounter

    group = dist.new_group(timeout=datetime.timedelta(seconds=5))
    mesh = DeviceMesh.from_group(group, "cpu")
    student = make_model("llama", 0)
    teachers = [t.requires_grad_(False) for t in _teachers()]
    for layer in teachers[1].model.layers:
        fully_shard(layer, mesh=mesh)
    assert not engines.owners(teachers[1], teachers[1].lm_head)  # root and head: plain
    assert layouts.is_sharded(teachers[1]) and not layouts.is_sharded(teachers[0])
    ids, attn, comp = _batch()
    n = len(ids) // world
    rows = slice(rank * n, (rank + 1) * n)
    error, counter = None, CollectiveCounter()
    try:
        with counter:
            loss = hf.eaopd_loss(student, None, ids[rows], attn[rows], comp[rows],
                                 teachers=teachers, teacher_index=torch.tensor(routing)[rows],
                                 reduction="sum", chunk_size=4)
    except RuntimeError as exc:  # old code: the peer's all-gather timed out
        error = exc
    table = [None] * world  # both ranks meet here, whatever happened on `group`
    dist.all_gather_object(table, (error is None, len(counter.calls)))
    if error is not None:
        raise error
    assert all(ok for ok, _ in table), table
    assert len({calls for _, calls in table}) == 1 and table[0][1] > 0, table
    loss.backward()
    flat = torch.cat([loss.detach().reshape(1)] + [p.grad.reshape(-1)
                                                   for p in student.parameters()])
    dist.all_reduce(flat)  # the ranks' losses and gradients summed: the global batch's
    want_loss, want = ref
    close(flat[0], want_loss)
    offset = 1
    for name, p in student.named_parameters():
        close(flat[offset:offset + p.numel()].view(p.shape), want[name], msg=f"grad {name}: ")
        offset += p.numel()


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
    """engines.head_eaopd_loss on a user's own FSDP2 model: the head in the root's group, or
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
    loss = engines.head_eaopd_loss(student.head, student(x[rows]), model=student,
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


def _trl_hook(student, teacher, rows, routing=None):
    """TRL's compute_loss path for EAOPDDistillationTrainer's hook: the hook routed through
    the student wrapper's forward by TRL's own _ForwardRedirection. The trainer object is
    made without __init__ (accelerate cannot run FSDP on CPU: its state sets
    DistributedType.FSDP only for the GPU-class distributed types, never MULTI_CPU)."""
    from types import SimpleNamespace

    from trl.models.utils import _ForwardRedirection

    from eaopd_mp.options import LossOptions
    from eaopd_mp.trl import EAOPDDistillationTrainer

    trainer = EAOPDDistillationTrainer.__new__(EAOPDDistillationTrainer)
    teachers = teacher if isinstance(teacher, list) else [teacher]
    trainer.teacher_model, trainer.teacher_models = teachers[0], teachers
    trainer.teacher_names = [f"t{j}" for j in range(len(teachers))]
    trainer.model_kwarg_keys = ("input_ids", "attention_mask", "logits_to_keep")
    trainer._is_vlm = False
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m, is_main_process=True)
    trainer.args = SimpleNamespace(report_to=[])
    trainer.state = SimpleNamespace(global_step=0)
    trainer.loss_options = LossOptions.build(dict(reduction="sum", return_stats=True,
                                                  temperature=0.9, chunk_size=4))
    ids, attn, comp = _batch()
    inputs = dict(prompt_ids=ids[rows, :4], prompt_mask=attn[rows, :4],
                  completion_ids=ids[rows, 4:], completion_mask=(comp * attn)[rows, 4:])
    if routing is not None:
        inputs["teacher_index"] = torch.tensor(routing)[rows]
    num_items = (comp * attn)[:, 4:].sum()  # the global count, as TRL passes it
    loss, _, _ = _ForwardRedirection()(student, student, trainer._compute_loss, student, inputs,
                                       num_items)
    return loss


def trl_case(rank, world, mesh, routing=None):
    """EAOPDDistillationTrainer's loss hook on FSDP2-wrapped student and teacher (or two
    teachers routed per example, ``routing``), against the same hook on one process and the
    global batch."""
    def teachers():
        return _teachers() if routing else make_model("qwen2_tied", 1)

    ref_s = make_model("llama", 0)
    ref = _trl_hook(ref_s, teachers(), slice(None), routing)
    ref.backward()
    student = _shard(make_model("llama", 0), mesh, True, False)
    teacher = teachers()
    if routing:
        teacher = [_shard(t.requires_grad_(False), mesh, True, False) for t in teacher]
    else:
        teacher = _shard(teacher.requires_grad_(False), mesh, True, False)
    n = 4 // world
    loss = _trl_hook(student, teacher, slice(rank * n, (rank + 1) * n), routing)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    close(total, ref.detach())
    for name, p in ref_s.named_parameters():
        close(student.get_parameter(name).grad.full_tensor(), p.grad / world,
              msg=f"grad {name}: ")


# --------------------------------------------------------------------------- DTensor TP


def _tp_data(seed=0, vocab=61, rows=2):
    """Full tensors, the same on every rank: (B, T) = (rows, 4) tokens, V = 61 (uneven over
    2: 31 + 30 rows, torch.chunk's layout)."""
    g = torch.Generator().manual_seed(seed)
    h, th = torch.randn(rows, 4, 8, generator=g), torch.randn(rows, 4, 6, generator=g)
    w, tw = torch.randn(vocab, 8, generator=g), torch.randn(vocab, 6, generator=g) * 1.5
    b = torch.randn(vocab, generator=g)
    labels = (torch.rand(rows, 4, generator=g) > 0.3).float()
    return h, th, w, tw, b, labels


def _grad_out(loss):
    return torch.tensor(0.9) if loss.dim() == 0 else torch.linspace(-1, 1, loss.numel()).view(
        loss.shape)


def tp_fused_case(mesh, placement, reduction, teacher, bias):
    """fused_linear_eaopd_loss on DTensors: weights Shard(0), hidden ``placement``."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    h, th, w, tw, b, labels = _tp_data()
    opts = dict(labels=labels, reduction=reduction, chunk_size=3, temperature=0.9)
    hr, wr, br = (x.clone().requires_grad_() for x in (h, w, b))
    t_ref, t_kw = {}, {}
    hd = distribute_tensor(h, mesh, [placement]).requires_grad_()
    wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    bd = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
    if teacher == "linear":
        t_ref = dict(teacher_hidden=th, teacher_weight=tw)
        t_kw = dict(teacher_hidden=distribute_tensor(th, mesh, [placement]),
                    teacher_weight=distribute_tensor(tw, mesh, [Shard(0)]))
    elif teacher == "logits":
        y = th @ tw.T
        t_ref = dict(teacher_logits=y)
        t_kw = dict(teacher_logits=distribute_tensor(y, mesh, [Shard(2)]))
    else:  # a served top-k teacher, replicated (plain tensors)
        lp, ids = torch.log_softmax(th @ tw.T, -1).topk(5, -1)
        t_ref = t_kw = dict(teacher_topk_logprobs=lp, teacher_topk_indices=ids)
    ref = fused_linear_eaopd_loss(hr, wr, student_bias=br if bias else None, **t_ref, **opts)
    ref.backward(_grad_out(ref))
    loss = fused_linear_eaopd_loss(hd, wd, student_bias=bd if bias else None, **t_kw, **opts)
    assert type(loss) is torch.Tensor  # plain, the same on every rank
    loss.backward(_grad_out(loss))
    close(loss, ref.detach())
    assert wd.grad.placements == (Shard(0),) and hd.grad.placements == (placement,)
    close(wd.grad.full_tensor(), wr.grad, msg="grad W: ")
    close(hd.grad.full_tensor(), hr.grad, msg="grad h: ")
    if bias:
        close(bd.grad.full_tensor(), br.grad, msg="grad b: ")
    assert isinstance(placement, (Replicate, Shard))


def tp_logits_case(mesh, reduction, topk):
    """entropy_aware_opd_loss on vocabulary-sharded DTensor logits (uneven shards)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    h, th, w, tw, _, labels = _tp_data(1)
    z, y = (h @ w.T), (th @ tw.T)
    zr = z.clone().requires_grad_()
    zd = distribute_tensor(z, mesh, [Shard(2)]).requires_grad_()
    opts = dict(labels=labels, reduction=reduction, chunk_size=3)
    if topk:
        lp, ids = torch.log_softmax(y, -1).topk(4, -1)
        t_ref = t_kw = dict(teacher_topk_logprobs=lp, teacher_topk_indices=ids)
    else:
        t_ref, t_kw = dict(teacher_logits=y), dict(teacher_logits=distribute_tensor(
            y, mesh, [Shard(2)]))
    ref = entropy_aware_opd_loss(zr, **t_ref, **opts)
    ref.backward(_grad_out(ref))
    loss = entropy_aware_opd_loss(zd, **t_kw, **opts)
    loss.backward(_grad_out(loss))
    close(loss, ref.detach())
    assert zd.grad.placements == (Shard(2),)
    close(zd.grad.full_tensor(), zr.grad, msg="grad z: ")


def tp_teachers_case(mesh, placement, reduction):
    """fused_linear_eaopd_loss on DTensors with two teachers: a dense one (its own hidden
    width, head Shard(0) with the student's uneven 31 + 30 rows) and a served top-k one.
    Replicate(): routed per token; Shard(1) (sequence parallelism): per sequence over 4
    sequences routed [0, 1, 1, 0] (each teacher has two, interleaved, so a wrong order of a
    teacher's own sequences or tokens shows), the dense teacher's hidden states (its
    sequences) sharded along the sequence like the student's."""
    from torch.distributed.tensor import Shard, distribute_tensor

    sp = isinstance(placement, Shard)
    h, th, w, tw, b, labels = _tp_data(2, rows=4 if sp else 2)
    if sp:
        index = torch.tensor([[0], [1], [1], [0]]).expand(4, 4)
    else:
        index = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])
    dense, topk = index == 0, index == 1
    lp, ids = torch.log_softmax(th[topk] @ tw.T * 0.7, -1).topk(5, -1)
    t_h = th[dense]
    if sp:  # each teacher's own (sequences, T, ...) shape
        t_h, lp, ids = (x.view(2, 4, -1) for x in (t_h, lp, ids))
    opts = dict(labels=labels, reduction=reduction, chunk_size=3, teacher_index=index,
                teacher_topk_logprobs=[None, lp], teacher_topk_indices=[None, ids])
    hr, wr, br = (x.clone().requires_grad_() for x in (h, w, b))
    ref = fused_linear_eaopd_loss(hr, wr, student_bias=br, teacher_hidden=[t_h, None],
                                  teacher_weight=[tw, None], **opts)
    ref.backward(_grad_out(ref))
    hd = distribute_tensor(h, mesh, [placement]).requires_grad_()
    wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    bd = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
    loss = fused_linear_eaopd_loss(
        hd, wd, student_bias=bd, teacher_hidden=[distribute_tensor(t_h, mesh, [placement]),
                                                 None],
        teacher_weight=[distribute_tensor(tw, mesh, [Shard(0)]), None], **opts)
    assert type(loss) is torch.Tensor
    loss.backward(_grad_out(loss))
    close(loss, ref.detach())
    assert wd.grad.placements == (Shard(0),) and hd.grad.placements == (placement,)
    close(wd.grad.full_tensor(), wr.grad, msg="grad W: ")
    close(hd.grad.full_tensor(), hr.grad, msg="grad h: ")
    close(bd.grad.full_tensor(), br.grad, msg="grad b: ")


def tp_logits_teachers_case(mesh, reduction):
    """entropy_aware_opd_loss on vocabulary-sharded DTensor logits with two teachers routed
    per token: dense logits (Shard(-1), uneven) and a served top-k teacher."""
    from torch.distributed.tensor import Shard, distribute_tensor

    h, th, w, tw, _, labels = _tp_data(3)
    z, y = (h @ w.T), (th @ tw.T)
    index = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 0]])
    lp, ids = torch.log_softmax(y[index == 1], -1).topk(4, -1)
    opts = dict(labels=labels, reduction=reduction, chunk_size=3, teacher_index=index,
                teacher_topk_logprobs=[None, lp], teacher_topk_indices=[None, ids])
    zr = z.clone().requires_grad_()
    ref = entropy_aware_opd_loss(zr, [y[index == 0], None], **opts)
    ref.backward(_grad_out(ref))
    zd = distribute_tensor(z, mesh, [Shard(2)]).requires_grad_()
    loss = entropy_aware_opd_loss(
        zd, [distribute_tensor(y[index == 0], mesh, [Shard(1)]), None], **opts)
    loss.backward(_grad_out(loss))
    close(loss, ref.detach())
    close(zd.grad.full_tensor(), zr.grad, msg="grad z: ")


def tp_refused_case(mesh):
    """Layouts the TP path cannot compute exactly raise TypeError/ValueError naming them."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    h, th, w, tw, _, _ = _tp_data()
    wd = distribute_tensor(w, mesh, [Shard(0)])
    t_kw = dict(teacher_hidden=distribute_tensor(th, mesh, [Replicate()]),
                teacher_weight=distribute_tensor(tw, mesh, [Shard(0)]))
    cases = [
        (TypeError, r"student_weight is a DTensor .*Shard\(dim=1\).*Shard\(0\) over the vocab",
         distribute_tensor(h, mesh, [Replicate()]), distribute_tensor(w, mesh, [Shard(1)])),
        (TypeError, r"student_hidden is a DTensor .*Shard\(dim=2\) on mesh dim 0 is not "
         r"supported.*no sharding along the hidden dim",
         distribute_tensor(h, mesh, [Shard(2)]), wd),
        (TypeError, r"student_hidden is a DTensor .*Partial",
         DTensor.from_local(h, mesh, [Partial()]), wd),
        (TypeError, r"student_weight is a DTensor .*Partial",
         distribute_tensor(h, mesh, [Replicate()]),
         DTensor.from_local(w, mesh, [Partial()])),
        (ValueError, r"token dim 1 of size 3 does not split evenly",
         distribute_tensor(h[:, :3].contiguous(), mesh, [Shard(1)]), wd),
    ]
    for exc, pattern, hd, w_ in cases:
        kw = dict(t_kw)
        if exc is ValueError:
            kw["teacher_hidden"] = distribute_tensor(th[:, :3].contiguous(), mesh, [Shard(1)])
        with pytest.raises(exc, match=pattern):
            fused_linear_eaopd_loss(hd, w_, **kw)
    with pytest.raises(ValueError, match="student_hidden is a plain tensor .* differs across"):
        # e.g. an FSDP2 weight (Shard(0) over data-parallel ranks) read outside its forward
        fused_linear_eaopd_loss(h + dist.get_rank(), wd, **t_kw)
    with pytest.raises(TypeError, match="teacher_weight is a plain tensor"):
        fused_linear_eaopd_loss(distribute_tensor(h, mesh, [Replicate()]), wd,
                                teacher_hidden=th, teacher_weight=tw)
    # Several teachers: a head with other rows (62 = 31 + 31 beside 31 + 30: only one rank's
    # shard differs) raises on every rank, naming the teacher.
    index = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])
    tw62 = torch.cat([tw, tw[:1]])
    two = [th[index == j] for j in range(2)]
    with pytest.raises(ValueError, match=r"teacher_weight\[1\] has 62 rows and "
                       r"student_weight 61"):
        fused_linear_eaopd_loss(distribute_tensor(h, mesh, [Replicate()]), wd,
                                teacher_hidden=two, teacher_index=index,
                                teacher_weight=[distribute_tensor(x, mesh, [Shard(0)])
                                                for x in (tw, tw62)])
    with pytest.raises(TypeError, match=r"teacher_weight\[0\] is a plain tensor"):
        fused_linear_eaopd_loss(distribute_tensor(h, mesh, [Replicate()]), wd,
                                teacher_hidden=two, teacher_index=index,
                                teacher_weight=[tw, distribute_tensor(tw, mesh, [Shard(0)])])
    # Vocabulary widths of dense teacher logits and biases, against the head's 61 rows: 62
    # (31 + 31) differs from 61 (31 + 30) on rank 1's shard only, yet raises on every rank.
    hr = distribute_tensor(h, mesh, [Replicate()])
    y62 = distribute_tensor(torch.randn(2, 4, 62), mesh, [Shard(2)])
    b62 = distribute_tensor(torch.randn(62), mesh, [Shard(0)])
    b61 = distribute_tensor(torch.randn(61), mesh, [Shard(0)])
    twd = distribute_tensor(tw, mesh, [Shard(0)])
    with pytest.raises(ValueError, match=r"teacher_logits has global shape \(2, 4, 62\) but "
                       r"student_weight has 61 rows"):
        fused_linear_eaopd_loss(hr, wd, teacher_logits=y62)
    with pytest.raises(ValueError, match=r"teacher_logits\[1\] has global shape \(3, 62\)"):
        fused_linear_eaopd_loss(hr, wd, teacher_hidden=[two[0], None], teacher_index=index,
                                teacher_weight=[twd, None],
                                teacher_logits=[None, distribute_tensor(
                                    torch.randn(3, 62), mesh, [Shard(1)])])
    with pytest.raises(ValueError, match=r"student_bias has global shape \(62,\)"):
        fused_linear_eaopd_loss(hr, wd, student_bias=b62, **t_kw)
    with pytest.raises(ValueError, match=r"teacher_bias\[1\] has global shape \(62,\)"):
        fused_linear_eaopd_loss(hr, wd, student_bias=b61, teacher_hidden=two,
                                teacher_index=index, teacher_weight=[twd, twd],
                                teacher_bias=[b61, b62])
    with pytest.raises(TypeError, match=r"student_bias is a plain tensor of shape \(61,\)"):
        fused_linear_eaopd_loss(hr, wd, student_bias=torch.randn(61), **t_kw)


def _two_ranks(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    cases = _Failures(rank)
    # The Llama student under all four reshard x bf16-policy combinations; the tied Qwen2
    # student under two (each setting once).
    grid = {("llama", "qwen2_tied"): ((True, False), (True, True), (False, False), (False, True)),
            ("qwen2_tied", "llama"): ((True, False), (False, True))}
    for (s_name, t_name), combos in grid.items():
        ref = _hf_reference(s_name, t_name, dict(reduction="sum", chunk_size=4))
        for reshard, mp in combos:
            cases.run(f"fsdp2 {s_name}<-{t_name} reshard={reshard} bf16={mp}",
                      fsdp_hf_case, rank, world, mesh, s_name, t_name, reshard, mp, ref)
    g = torch.linspace(0.5, 1.5, 4 * 8).view(4, 8)
    ref = _hf_reference("llama", "qwen2_tied", dict(reduction="none", chunk_size=4), g)
    cases.run("fsdp2 reduction=none", fsdp_none_case, rank, world, mesh, ref)
    for head_unit in (False, True):
        cases.run(f"head_eaopd_loss head_unit={head_unit}", helper_case, rank, world, mesh,
                  head_unit)
    cases.run("trl hook under fsdp2", trl_case, rank, world, mesh)
    # Several teachers: each routing once, fp32 (reshard) and the bf16 policy (no reshard).
    for routing, (reshard, mp) in zip(ROUTINGS, ((True, False), (False, True)), strict=True):
        ref = _hf_routed_reference(routing, dict(reduction="sum", chunk_size=4))
        cases.run(f"fsdp2 teachers={routing} reshard={reshard} bf16={mp}",
                  fsdp_teachers_case, rank, world, mesh, routing, reshard, mp, ref)
        if routing == ROUTINGS[0]:  # rank 0 has no sequence for teacher 1
            cases.run(f"fsdp2 layers-only teacher, teachers={routing}", layers_only_case,
                      rank, world, routing, ref)
    ref = _hf_routed_reference(ROUTINGS[1], dict(reduction="none", chunk_size=4), g)
    cases.run(f"fsdp2 teachers={ROUTINGS[1]} reduction=none", fsdp_none_teachers_case, rank,
              world, mesh, ROUTINGS[1], ref)
    cases.run("trl hook under fsdp2, two teachers", trl_case, rank, world, mesh, ROUTINGS[1])
    _tp_cases(cases, mesh)
    cases.check()


def _tp_cases(cases, mesh):
    from torch.distributed.tensor import Replicate, Shard

    # Every hidden placement x every reduction; the teacher form rotates so that each
    # placement meets all three forms and each reduction at least two.
    forms = ("linear", "logits", "topk")
    for i, placement in enumerate((Replicate(), Shard(0), Shard(1))):
        for j, reduction in enumerate(("batchmean", "sum", "mean", "none")):
            teacher = forms[(i + j) % 3]
            cases.run(f"tp fused hidden={placement} {reduction} teacher={teacher}",
                      tp_fused_case, mesh, placement, reduction, teacher, j % 2 == 1)
    for reduction in ("batchmean", "sum", "mean", "none"):
        for topk in (False, True):
            cases.run(f"tp logits {reduction} topk={topk}", tp_logits_case, mesh, reduction,
                      topk)
    for placement, reduction in ((Replicate(), "sum"), (Shard(1), "none")):
        cases.run(f"tp fused two teachers hidden={placement} {reduction}", tp_teachers_case,
                  mesh, placement, reduction)
    cases.run("tp logits two teachers", tp_logits_teachers_case, mesh, "mean")
    cases.run("tp refused layouts", tp_refused_case, mesh)


def test_two_ranks():
    """FSDP2 (hf.eaopd_loss, the public helper, the TRL trainer's hook) and DTensor TP at 2
    ranks, one spawn."""
    spawn(_two_ranks, 2)


# --------------------------------------------------------------------------- FSDP2 x TP


def _fsdp_tp(rank, world):
    """2 x 2 mesh (dp, tp) as torchtitan builds it: the head ColwiseParallel over tp (vocab
    37 = 19 + 18 rows, uneven), then fully_shard over dp. The loss runs inside the root's
    forward (head_eaopd_loss), where the head is a tp-only DTensor Shard(0)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 5, generator=g)
    labels = (torch.rand(4, 3, generator=g) > 0.3).float()
    cases = _Failures(rank)

    def case(reduction):
        ref_s, ref_t = _Tiny(37, 8, 0), _Tiny(37, 6, 1)
        kw = dict(labels=labels, reduction=reduction, chunk_size=2)
        ref = fused_linear_eaopd_loss(ref_s(x), ref_s.head.weight, student_bias=ref_s.head.bias,
                                      teacher_hidden=ref_t(x).detach(),
                                      teacher_weight=ref_t.head.weight.detach(),
                                      teacher_bias=ref_t.head.bias.detach(), **kw)
        grad = torch.linspace(0.5, 1.5, 12).view(4, 3)
        ref.backward(None if reduction != "none" else grad)
        models = []
        for m in (_Tiny(37, 8, 0), _Tiny(37, 6, 1).requires_grad_(False)):
            parallelize_module(m, mesh["tp"], {"head": ColwiseParallel()})
            fully_shard(m.body, mesh=mesh["dp"])
            fully_shard(m, mesh=mesh["dp"])
            models.append(m)
        student, teacher = models
        dp = mesh["dp"].get_local_rank()
        rows = slice(dp * 2, dp * 2 + 2)
        loss = engines.head_eaopd_loss(
            student.head, student(x[rows]), model=student, teacher_head=teacher.head,
            teacher_hidden=teacher(x[rows]), teacher_model=teacher,
            **dict(kw, labels=labels[rows]))
        loss.backward(None if reduction != "none" else grad[rows])
        if reduction == "none":
            close(loss.detach(), ref.detach()[rows])
        else:
            total = loss.detach().clone()
            dist.all_reduce(total, group=mesh["dp"].get_group())
            # batchmean: each dp rank divides by its 2 rows, the reference by all 4
            close(total, ref.detach() if reduction == "sum" else ref.detach() * 2)
        # FSDP2 averages over dp (2 ranks); batchmean's per-rank 1/2 cancels that
        div = 1 if reduction == "batchmean" else 2
        for name, p in ref_s.named_parameters():
            close(student.get_parameter(name).grad.full_tensor(), p.grad / div,
                  msg=f"grad {name}: ")

    def teachers_case():
        """Two teachers (hidden 6 and 4) routed per token; dp rank 0 routes none to
        teacher 1 and still enters its forward (head_eaopd_loss enters every teacher)."""
        index = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 1], [1, 1, 0]])
        ref_s, ref_ts = _Tiny(37, 8, 0), [_Tiny(37, 6, 1), _Tiny(37, 4, 2)]
        kw = dict(reduction="sum", chunk_size=2)
        ref = fused_linear_eaopd_loss(
            ref_s(x), ref_s.head.weight, student_bias=ref_s.head.bias,
            teacher_hidden=[t(x)[index == j].detach() for j, t in enumerate(ref_ts)],
            teacher_weight=[t.head.weight.detach() for t in ref_ts],
            teacher_bias=[t.head.bias.detach() for t in ref_ts], teacher_index=index,
            labels=labels, **kw)
        ref.backward()
        models = []
        for m in (_Tiny(37, 8, 0), _Tiny(37, 6, 1).requires_grad_(False),
                  _Tiny(37, 4, 2).requires_grad_(False)):
            parallelize_module(m, mesh["tp"], {"head": ColwiseParallel()})
            fully_shard(m.body, mesh=mesh["dp"])
            fully_shard(m, mesh=mesh["dp"])
            models.append(m)
        student, teachers = models[0], models[1:]
        dp = mesh["dp"].get_local_rank()
        rows = slice(dp * 2, dp * 2 + 2)
        mine = index[rows]
        loss = engines.head_eaopd_loss(
            student.head, student(x[rows]), model=student,
            teacher_head=[t.head for t in teachers],
            teacher_hidden=[t(x[rows])[mine == j] for j, t in enumerate(teachers)],
            teacher_model=teachers, teacher_index=mine, labels=labels[rows], **kw)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=mesh["dp"].get_group())
        close(total, ref.detach())
        for name, p in ref_s.named_parameters():  # FSDP2 averages over dp (2 ranks)
            close(student.get_parameter(name).grad.full_tensor(), p.grad / 2,
                  msg=f"grad {name}: ")

    for reduction in ("sum", "none"):  # batchmean: the 2-rank TP grid
        cases.run(f"fsdp2 x tp {reduction}", case, reduction)
    cases.run("fsdp2 x tp two teachers", teachers_case)
    cases.check()


def test_four_ranks_fsdp2_x_tp():
    """FSDP2 x TP on a 2 x 2 mesh, one spawn."""
    spawn(_fsdp_tp, 4)


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
    assert engines.run_in_forward(model, lambda a: a + 1, 1) == 2
    assert engines.owners(model, model) == []
    assert not layouts.is_sharded(model) and not layouts.is_sharded(None)
    assert not layouts.any_dtensor(torch.randn(2), None)
    assert entropy_aware_opd_loss is not None


def test_head_loss_teacher_lists_must_match():
    """head_eaopd_loss with teacher_model a list but teacher_head one head (or None) names
    the arguments and counts instead of failing in zip()."""
    student, t0, t1 = _Tiny(37, 8, 0), _Tiny(37, 6, 1), _Tiny(37, 4, 2)
    x = torch.randn(2, 3, 5)
    kw = dict(labels=torch.ones(2, 3), teacher_index=torch.zeros(2, 3, dtype=torch.long))
    for head in (t0.head, None):
        with pytest.raises(ValueError, match=r"teacher_model is a list of 2 entries but "
                           r"teacher_head is (one head|None)"):
            engines.head_eaopd_loss(student.head, student(x), teacher_head=head,
                                    teacher_hidden=t0(x), teacher_model=[t0, t1], **kw)
    with pytest.raises(ValueError, match=r"teacher_hidden is a list of 2 entries but "
                       r"teacher_head is one head"):
        engines.head_eaopd_loss(student.head, student(x), teacher_head=t0.head,
                                teacher_hidden=[t0(x), t1(x)], **kw)
    with pytest.raises(ValueError, match=r"teacher_head has 2 entries, teacher_hidden 2 and "
                       r"teacher_model 3"):
        engines.head_eaopd_loss(student.head, student(x), teacher_head=[t0.head, t1.head],
                                teacher_hidden=[t0(x), t1(x)], teacher_model=[t0, t1, t1],
                                **kw)
