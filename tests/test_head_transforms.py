"""Head transforms (softcap, logit scale) and ``vocab_size`` on one device.

Every fused result is checked against the logits-in loss on logits transformed with plain
torch ops, as Gemma2/Cohere write them (``cap * tanh(scale * x / cap)``), in loss and in
the gradients of hidden states, weight and bias, through torch autograd of the transform.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from eaopd_mp import FusedLinearEAOPDLoss, entropy_aware_opd_loss, fused_linear_eaopd_loss
from formulas import close

N, H, HT, V = 10, 8, 6, 23


def _data(seed=0, v_s=V, v_t=V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(v_s, H, generator=g) * 2.0  # large logits: the cap matters
    b = torch.randn(v_s, generator=g)
    th = torch.randn(N, HT, generator=g)
    tw = torch.randn(v_t, HT, generator=g) * 2.5
    tb = torch.randn(v_t, generator=g)
    labels = (torch.rand(N, generator=g) > 0.3).float()
    return h, w, b, th, tw, tb, labels


def transformed(x, scale=1.0, cap=None):
    """HF's maths: ``x * logit_scale`` (Cohere), then ``tanh(x / cap) * cap`` (Gemma2)."""
    x = x * scale
    return x if cap is None else torch.tanh(x / cap) * cap


# (student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap)
TRANSFORMS = [(1.0, 3.0, 1.0, None), (0.5, None, 1.0, 4.0), (0.7, 2.5, 1.3, 5.0),
              (0.25, None, 2.0, None)]
GATES = [{}, {"gate": "threshold", "gate_threshold": 1.5}, {"gate": "fixed", "fkl_weight": 0.3}]


def _opts(xf):
    s_scale, s_cap, t_scale, t_cap = xf
    return dict(student_logit_scale=s_scale, student_softcap=s_cap,
                teacher_logit_scale=t_scale, teacher_softcap=t_cap)


def _grad_out(loss):
    return torch.linspace(-1, 1, loss.numel()).view(loss.shape) if loss.dim() else None


def check_fused(xf, *, reduction, gate, teacher, bias, tau=1.0, mask=True, chunk=4, seed=0,
                eager_reference=False):
    """Fused (transforms inside) == logits-in on the transformed logits, loss and grads.

    ``eager_reference``: the reference runs the eager kernels (only the fused call is
    compiled: the plain kernels' compilation is tested elsewhere)."""
    h, w, b, th, tw, tb, labels = _data(seed)
    s_scale, s_cap, t_scale, t_cap = xf
    opts = dict(labels=labels if mask else None, reduction=reduction, temperature=tau, **gate)
    params = [h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    hs, ws, bs = params
    t_raw = th @ tw.T + tb
    t_kw = dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb) if teacher == "linear" \
        else dict(teacher_logits=t_raw)
    loss = fused_linear_eaopd_loss(hs, ws, student_bias=bs if bias else None, chunk_size=chunk,
                                   **t_kw, **opts, **_opts(xf))
    loss.backward(_grad_out(loss))
    got = [loss.detach(), hs.grad, ws.grad, bs.grad]

    ref_params = [p.detach().clone().requires_grad_() for p in (h, w, b)]
    hr, wr, br = ref_params
    z = transformed(hr @ wr.T + (br if bias else 0.0), s_scale, s_cap)
    y = transformed(t_raw, t_scale, t_cap)
    with pytest.MonkeyPatch.context() as mp:
        if eager_reference:
            mp.setenv("EAOPD_COMPILE", "0")
        ref = entropy_aware_opd_loss(z, y, **opts)
        ref.backward(_grad_out(ref))
    want = [ref.detach(), hr.grad, wr.grad, br.grad]
    tag = f"[{xf} {reduction} {gate} {teacher} bias={bias} tau={tau}] "
    for name, a, b_ in zip(("loss", "grad h", "grad W", "grad b"), got, want, strict=True):
        if name == "grad b" and not bias:
            assert a is None
            continue
        close(a, b_, msg=tag + name + ": ")


def test_transforms_fused_grid_eager(eager):
    """Every transform x gate x gradient mode x teacher form (eager kernels: fast)."""
    grid = itertools.product(TRANSFORMS, GATES, ["batchmean", "none", "sum"])
    for i, (xf, gate, reduction) in enumerate(grid):
        check_fused(xf, reduction=reduction, gate=gate, teacher=("linear", "logits")[i % 2],
                    bias=bool(i % 3), tau=(1.0, 0.7)[i % 2 == 0], mask=i % 4 != 1)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_transforms_fused_compiled(reduction):
    """The compiled *_x kernels of one device, both gradient modes (the gates and the
    transform combinations are the same code, covered eagerly above; a graph costs
    seconds)."""
    check_fused((0.7, 2.5, 1.3, 5.0), reduction=reduction, gate={}, teacher="linear",
                bias=True, eager_reference=True)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck_transforms_float64(eager, reduction):
    """The chained closed form (tanh derivative, scale) against finite differences."""
    h, w, b, th, tw, tb, labels = (x.double()[:4] if x.shape[0] == N else x.double()
                                   for x in _data(7, v_s=9, v_t=9))
    h, w, b = (x.clone().requires_grad_() for x in (h, w, b))

    def f(h, w, b):
        return fused_linear_eaopd_loss(h, w, student_bias=b, teacher_hidden=th,
                                       teacher_weight=tw, teacher_bias=tb, labels=labels,
                                       reduction=reduction, chunk_size=3, temperature=0.8,
                                       **_opts((0.7, 2.5, 1.3, 5.0)))

    assert torch.autograd.gradcheck(f, (h, w, b))


def test_bf16_against_fp32_with_transforms(eager):
    """bfloat16 heads with a soft-cap and a scale: close to the float32 logits-in loss."""
    h0, w0, b0, th, tw, tb, labels = (x.bfloat16() for x in _data(8))
    h, w, b = (x.clone().requires_grad_() for x in (h0, w0, b0))
    xf = (0.7, 2.5, 1.3, 5.0)
    loss = fused_linear_eaopd_loss(h, w, student_bias=b, teacher_hidden=th, teacher_weight=tw,
                                   teacher_bias=tb, labels=labels, chunk_size=4, **_opts(xf))
    hr, wr, br = (x.float().requires_grad_() for x in (h0, w0, b0))
    ref = entropy_aware_opd_loss(transformed(hr @ wr.T + br, 0.7, 2.5),
                                 transformed(th.float() @ tw.float().T + tb.float(), 1.3, 5.0),
                                 labels=labels.float())
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=3e-2)
    loss.backward()
    ref.backward()
    for got, want in ((h.grad, hr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).norm() <= 0.05 * want.norm()


def test_transforms_apply_to_given_logits(eager):
    """Logits-in: the options transform the given logits, gradient chained to them."""
    _, _, _, _, _, _, labels = _data()
    g = torch.Generator().manual_seed(3)
    x, xt = torch.randn(N, V, generator=g) * 6, torch.randn(N, V, generator=g) * 6
    xf = (0.7, 2.5, 1.3, 5.0)
    a = x.clone().requires_grad_()
    loss = entropy_aware_opd_loss(a, xt, labels=labels, **_opts(xf))
    loss.backward()
    r = x.clone().requires_grad_()
    ref = entropy_aware_opd_loss(transformed(r, 0.7, 2.5), transformed(xt, 1.3, 5.0),
                                 labels=labels)
    ref.backward()
    close(loss, ref)
    close(a.grad, r.grad)


def test_identity_transform_is_bitwise_plain(eager):
    """Scale 1 and no cap run the plain kernels: the same bits as before the options."""
    h, w, b, th, tw, tb, labels = _data()
    kw = dict(teacher_hidden=th, teacher_weight=tw, labels=labels, chunk_size=4)
    assert torch.equal(fused_linear_eaopd_loss(h, w, **kw),
                       fused_linear_eaopd_loss(h, w, student_logit_scale=1.0, **kw))


def test_softcap_bounds_the_logits_the_loss_sees(eager):
    """A huge raw logit is capped: the loss equals the one on ``cap * sign``."""
    z = torch.zeros(1, 4)
    z[0, 0] = 1e6
    y = torch.zeros(1, 4)
    got = entropy_aware_opd_loss(z, y, student_softcap=2.0)
    want = entropy_aware_opd_loss(torch.tensor([[2.0, 0, 0, 0]]), y)
    close(got, want)


def test_nan_in_nan_out_with_softcap(eager):
    h, w, b, th, tw, tb, _ = _data()
    h[2, 0] = float("nan")
    out = fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw, reduction="none",
                                  student_softcap=3.0, teacher_softcap=3.0)
    assert torch.isnan(out[2]) and torch.isfinite(out[torch.arange(N) != 2]).all()


def test_transforms_in_a_compiled_step():
    """The transformed fused loss inside a user's compiled step (fullgraph) == eager."""
    h, w0, b0, th, tw, tb, labels = _data(1)
    torch.manual_seed(1)
    lin = torch.nn.Linear(H, H)
    loss_fn = FusedLinearEAOPDLoss(student_softcap=3.0, teacher_logit_scale=0.8,
                                   teacher_softcap=4.0, return_stats=True, chunk_size=4)

    def step(x, w, b):
        return loss_fn(lin(x), w, student_bias=b, teacher_hidden=th, teacher_weight=tw,
                       teacher_bias=tb, labels=labels)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        lin.zero_grad(set_to_none=True)
        loss, stats = fn(h, w, b)
        loss.backward()
        results.append([loss.detach(), w.grad, b.grad, lin.weight.grad, stats["fkl_weight"]])
    for a, b_ in zip(*results, strict=True):
        close(a, b_)


# ------------------------------------------------------------------------------ vocab_size


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("teacher", ["linear", "logits"])
def test_vocab_size_with_different_head_sizes(eager, reduction, teacher):
    """Student 27 rows, teacher 31, vocab_size 23: the loss of the first 23 columns, no
    gradient past them, h_max = log(23)."""
    h, w, b, th, tw, tb, labels = _data(4, v_s=27, v_t=31)
    hs, ws, bs = (x.clone().requires_grad_() for x in (h, w, b))
    t_kw = dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb) if teacher == "linear" \
        else dict(teacher_logits=th @ tw.T + tb)
    loss = fused_linear_eaopd_loss(hs, ws, student_bias=bs, labels=labels, vocab_size=V,
                                   reduction=reduction, chunk_size=3, student_softcap=3.0,
                                   **t_kw)
    loss.backward(_grad_out(loss))
    hr, wr, br = (x.clone().requires_grad_() for x in (h, w[:V], b[:V]))
    z = transformed(hr @ wr.T + br, cap=3.0)
    ref = entropy_aware_opd_loss(z, (th @ tw.T + tb)[:, :V], labels=labels, reduction=reduction,
                                 h_max=math.log(V))
    ref.backward(_grad_out(ref))
    close(loss, ref)
    close(hs.grad, hr.grad)
    close(ws.grad[:V], wr.grad)
    close(bs.grad[:V], br.grad)
    assert not ws.grad[V:].any() and not bs.grad[V:].any()


def test_vocab_size_logits_in(eager):
    g = torch.Generator().manual_seed(5)
    z, y = torch.randn(N, 30, generator=g), torch.randn(N, 26, generator=g)
    zs = z.clone().requires_grad_()
    loss, stats = entropy_aware_opd_loss(zs, y, vocab_size=20, return_stats=True)
    loss.backward()
    zr = z[:, :20].clone().requires_grad_()
    ref = entropy_aware_opd_loss(zr, y[:, :20])
    ref.backward()
    close(loss, ref)
    close(zs.grad[:, :20], zr.grad)
    assert not zs.grad[:, 20:].any()
    assert stats["h_max"] == pytest.approx(math.log(20))


@pytest.mark.parametrize("call,match", [
    (lambda h, w, th, tw: fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw),
     r"teacher_weight vocab 31 .* != student_weight vocab 27 .*pass vocab_size"),
    (lambda h, w, th, tw: fused_linear_eaopd_loss(h, w, teacher_logits=th @ tw.T),
     r"teacher_logits shape \(10, 31\) != \(10, 27\) .*pass vocab_size"),
    (lambda h, w, th, tw: entropy_aware_opd_loss(h @ w.T, th @ tw.T),
     r"student_logits shape \(10, 27\) != teacher_logits shape \(10, 31\) .*pass vocab_size"),
    (lambda h, w, th, tw: fused_linear_eaopd_loss(h, w, teacher_hidden=th, teacher_weight=tw,
                                                  vocab_size=28),
     "vocab_size 28 > student_weight vocabulary width 27"),
    (lambda h, w, th, tw: entropy_aware_opd_loss(h @ w.T, th @ tw.T, vocab_size=30),
     "vocab_size 30 > student_logits vocabulary width 27"),
    (lambda h, w, th, tw: fused_linear_eaopd_loss(h, w, teacher_logits=(th @ tw.T)[:, :20],
                                                  vocab_size=25),
     "vocab_size 25 > teacher_logits vocabulary width 20"),
    (lambda h, w, th, tw: fused_linear_eaopd_loss(h, w, teacher_logits=th @ tw.T,
                                                  vocab_size=0),
     "vocab_size must be > 0"),
])
def test_vocab_size_errors(call, match):
    h, w, _, th, tw, _, _ = _data(v_s=27, v_t=31)
    with pytest.raises(ValueError, match=match):
        call(h, w, th, tw)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(student_softcap=0.0), ValueError, "student_softcap must be finite and > 0"),
    (dict(teacher_softcap=-1.0), ValueError, "teacher_softcap must be finite and > 0"),
    (dict(teacher_softcap=float("inf")), ValueError, "teacher_softcap must be finite"),
    (dict(student_logit_scale=0.0), ValueError, "student_logit_scale must be finite and > 0"),
    (dict(teacher_logit_scale=float("nan")), ValueError, "teacher_logit_scale must be finite"),
    (dict(student_softcap=True), TypeError, "student_softcap must be a real number"),
    (dict(vocab_size=3.0), TypeError, "vocab_size must be an int"),
])
def test_transform_option_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        entropy_aware_opd_loss(torch.randn(2, 5), torch.randn(2, 5), **kw)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_transforms_with_a_given_teacher_entropy(reduction):
    """teacher_entropy= with head transforms: the transformed kernels still run (the
    override path picks them too), equal to the logits-in loss on transformed logits."""
    h0, w0, b, th, tw, tb, labels = _data(3)
    xf = TRANSFORMS[2]
    entropy = torch.rand(N) * 3
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss = fused_linear_eaopd_loss(h, w, student_bias=b, teacher_hidden=th, teacher_weight=tw,
                                   teacher_bias=tb, labels=labels, reduction=reduction,
                                   teacher_entropy=entropy, chunk_size=4, **_opts(xf))
    hr, wr = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    z = transformed(hr @ wr.T + b, xf[0], xf[1])
    y = transformed(th @ tw.T + tb, xf[2], xf[3])
    ref = entropy_aware_opd_loss(z, y, labels=labels, reduction=reduction,
                                 teacher_entropy=entropy)
    close(loss, ref)
    loss.backward(_grad_out(loss))
    ref.backward(_grad_out(ref))
    close(h.grad, hr.grad)
    close(w.grad, wr.grad)


def test_transforms_with_a_topk_teacher_are_refused():
    h, w, *_ = _data()
    lp = torch.log_softmax(torch.randn(N, V), -1).topk(4, -1)
    with pytest.raises(ValueError, match="not supported with a top-k teacher"):
        fused_linear_eaopd_loss(h, w, teacher_topk_logprobs=lp.values,
                                teacher_topk_indices=lp.indices, student_softcap=3.0)
