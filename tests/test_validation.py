"""Bad input raises a clear ValueError/TypeError naming the argument, before any work."""

from __future__ import annotations

import pytest
import torch

from eaopd_mp import EntropyAwareOPDLoss, entropy_aware_opd_loss, fused_linear_eaopd_loss

Z, Y = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
H, W, TH, TW = torch.randn(2, 3, 5), torch.randn(11, 5), torch.randn(2, 3, 4), torch.randn(11, 4)


def _fused(**kw):
    args = dict(teacher_hidden=TH, teacher_weight=TW)
    args.update(kw)
    h, w = args.pop("h", H), args.pop("w", W)
    return fused_linear_eaopd_loss(h, w, **args)


LOGITS_CASES = [
    (dict(teacher_logits=torch.randn(2, 3, 12)), ValueError, r"student_logits shape \(2, 3, 11\)"),
    (dict(student_logits=torch.randint(0, 5, (2, 3, 11))), TypeError, "student_logits.*floating"),
    (dict(teacher_logits=[1.0]), TypeError, "teacher_logits must be a torch.Tensor"),
    (dict(labels=torch.ones(3, 2)), ValueError, r"labels shape \(3, 2\) != token shape \(2, 3\)"),
    (dict(labels=[1, 0]), TypeError, "labels must be a torch.Tensor"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature must be a real number"),
    (dict(h_max=0.0), ValueError, "h_max must be > 0"),
    (dict(h_max=-1.0), ValueError, "h_max must be > 0"),
    (dict(h_max=float("nan")), ValueError, "h_max must be finite"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(chunk_size=0), ValueError, "chunk_size must be > 0"),
    (dict(chunk_size=2.5), TypeError, "chunk_size must be an int"),
    (dict(gate="cosine"), ValueError, "gate must be one of"),
    (dict(gate="fixed", fkl_weight=1.5), ValueError, r"fkl_weight must be in \[0, 1\]"),
    (dict(gate="fixed", h_max=2.0), ValueError, "h_max does not apply to gate='fixed'"),
    (dict(gate="threshold", gate_threshold=-0.1), ValueError, "gate_threshold must be >= 0"),
    (dict(gate="threshold", fkl_coef=-1.0), ValueError, "fkl_coef must be >= 0"),
    (dict(fkl_weight=0.5), ValueError, "fkl_weight does not apply to gate='linear'"),
    (dict(gate="threshold", fkl_weight=0.5), ValueError, "does not apply to gate='threshold'"),
]


@pytest.mark.parametrize("kw,exc,match", LOGITS_CASES)
def test_logits_in_bad_input(kw, exc, match):
    kw = dict(kw)
    z, y = kw.pop("student_logits", Z), kw.pop("teacher_logits", Y)
    with pytest.raises(exc, match=match):
        entropy_aware_opd_loss(z, y, **kw)


FUSED_CASES = [
    (dict(h=torch.randn(2, 3, 6)), ValueError, r"student_hidden width 6 .* student_weight width 5"),
    (dict(w=torch.randn(11, 5, 1)), ValueError, r"student_weight must be \(vocab, hidden\)"),
    (dict(h=H.double()), TypeError, "student_hidden dtype torch.float64 != student_weight"),
    (dict(student_bias=torch.randn(10)), ValueError, r"student_bias shape \(10,\) != \(11,\)"),
    (dict(teacher_hidden=None, teacher_weight=None), ValueError, "teacher is missing"),
    (dict(teacher_logits=Y), ValueError, "not both"),
    (dict(teacher_weight=None), ValueError, "must be given together"),
    (dict(teacher_weight=torch.randn(12, 4)), ValueError, "teacher_weight vocab 12"),
    (dict(teacher_hidden=torch.randn(2, 4, 4)), ValueError, r"teacher_hidden token shape \(2, 4\)"),
    (dict(teacher_hidden=torch.randn(2, 3, 3)), ValueError, "teacher_hidden width 3"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(2, 3, 10)),
     ValueError, r"teacher_logits shape \(2, 3, 10\) != \(2, 3, 11\)"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_logits=Y,
          teacher_bias=torch.randn(11)), ValueError, "teacher_bias only applies"),
    (dict(labels=torch.ones(6)), ValueError, r"labels shape \(6,\) != token shape \(2, 3\)"),
    (dict(temperature=-2), ValueError, "temperature"),
    (dict(reduction=None), ValueError, "reduction"),
    (dict(h=torch.randint(0, 3, (2, 3, 5))), TypeError, "student_hidden must be a floating"),
    (dict(labels=torch.ones(2, 3, device="meta")), ValueError, "same device"),
]


@pytest.mark.parametrize("kw,exc,match", FUSED_CASES)
def test_fused_bad_input(kw, exc, match):
    with pytest.raises(exc, match=match):
        _fused(**kw)


def test_errors_come_before_any_work(monkeypatch):
    """Validation runs before the driver is reached."""
    import eaopd_mp.plan as plan_mod

    def boom(*a, **k):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(plan_mod, "run", boom)
    with pytest.raises(ValueError):
        _fused(temperature=0.0)
    with pytest.raises(ValueError):
        entropy_aware_opd_loss(Z, Y, reduction="bad")


def test_module_validates_too():
    with pytest.raises(ValueError, match="reduction"):
        EntropyAwareOPDLoss(reduction="bad")(Z, Y)


@pytest.mark.parametrize("labels,match", [
    (torch.tensor([[1, -100, 0], [1, 1, 0]]), "not token ids"),
    (torch.tensor([[1, 2, 0], [1, 1, 0]]), "not token ids"),
    (torch.tensor([[1.0, float("nan"), 0.0], [1.0, 1.0, 0.0]]), "finite and >= 0"),
    (torch.tensor([[1.0, -0.5, 0.0], [1.0, 1.0, 0.0]]), "finite and >= 0"),
])
def test_labels_are_a_mask_not_token_ids(labels, match):
    with pytest.raises(ValueError, match=match):
        entropy_aware_opd_loss(Z, Y, labels=labels)
    with pytest.raises(ValueError, match=match):
        _fused(labels=labels)


def test_integer_and_bool_masks_equal_float():
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])
    want = entropy_aware_opd_loss(Z, Y, labels=mask.float(), reduction="sum")
    for m in (mask, mask.bool(), mask.to(torch.int32)):
        torch.testing.assert_close(entropy_aware_opd_loss(Z, Y, labels=m, reduction="sum"), want)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="unknown option.*temprature"):
        entropy_aware_opd_loss(Z, Y, temprature=2.0)


# ---------------------------------------------------------------- issue 18: empty dims

EMPTY_CASES = [  # shapes the kernels cannot take: a ValueError naming the argument first
    (lambda: entropy_aware_opd_loss(torch.randn(2, 3, 0), torch.randn(2, 3, 0)),
     r"student_logits has an empty vocabulary dim \(shape \(2, 3, 0\)\)"),
    (lambda: entropy_aware_opd_loss(torch.randn(2, 0), teacher_topk_logprobs=torch.zeros(2, 1),
                                    teacher_topk_indices=torch.zeros(2, 1, dtype=torch.long)),
     r"student_logits has an empty vocabulary dim \(shape \(2, 0\)\)"),
    (lambda: _fused(w=torch.randn(0, 5), teacher_weight=torch.randn(0, 4)),
     r"student_weight has an empty vocabulary dim \(shape \(0, 5\)\)"),
    (lambda: _fused(teacher_weight=torch.randn(0, 4), vocab_size=3),
     r"vocab_size 3 > teacher_weight vocabulary width 0"),
    (lambda: _fused(h=torch.randn(2, 3, 0), w=torch.randn(11, 0)),
     r"student_weight is empty \(shape \(11, 0\)\)"),
    (lambda: _fused(teacher_hidden=torch.randn(2, 3, 0), teacher_weight=torch.randn(11, 0)),
     r"teacher_weight is empty \(shape \(11, 0\)\)"),
    (lambda: entropy_aware_opd_loss(Z, teacher_topk_logprobs=torch.zeros(2, 3, 0),
                                    teacher_topk_indices=torch.zeros(2, 3, 0, dtype=torch.long)),
     "1 <= k <= vocabulary size 11, got k=0"),
]


@pytest.mark.parametrize("call,match", EMPTY_CASES)
def test_empty_dims_raise_before_any_work(monkeypatch, call, match):
    """An empty vocabulary or hidden dim is refused by name before the op runs (main
    failed inside the compiled kernel, flipping it to eager for the whole process)."""
    import eaopd_mp.plan as plan_mod

    def boom(*a, **k):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(plan_mod, "run", boom)
    with pytest.raises(ValueError, match=match):
        call()


# An empty vocabulary shard on one tensor-parallel rank is legitimate (a DTensor Shard(0) of
# fewer rows than ranks), and an empty vocabulary on every rank is refused on every rank:
# tests/test_tp_agreement.py.


# ------------------------------------------------------- issue 18: extreme option values

EXTREME_OPTIONS = [
    (dict(temperature=1e-320), "temperature must be in"),  # 1/x is inf
    (dict(temperature=1e-7), "temperature must be in"),
    (dict(temperature=1e7), "temperature must be in"),
    (dict(h_max=1e-320), "h_max must be in"),
    (dict(h_max=1e300), "h_max must be in"),
    (dict(student_logit_scale=1e300), "student_logit_scale must be in"),  # main: NaN
    (dict(teacher_logit_scale=1e-300), "teacher_logit_scale must be in"),
    (dict(student_softcap=1e-300), "student_softcap must be in"),
    (dict(teacher_softcap=1e300), "teacher_softcap must be in"),
    (dict(gate="threshold", fkl_coef=1e300), "fkl_coef must be in"),
]


@pytest.mark.parametrize("kw,match", EXTREME_OPTIONS)
def test_extreme_option_values_raise_at_construction(kw, match):
    """Options whose reciprocal is not finite, or that overflow the float32 compute, raise
    a ValueError naming them when the options are built (module or call)."""
    with pytest.raises(ValueError, match=match):
        EntropyAwareOPDLoss(**kw)
    with pytest.raises(ValueError, match=match):
        entropy_aware_opd_loss(Z, Y, **kw)


@pytest.mark.parametrize("kw", [dict(temperature=1e-6), dict(temperature=1e6),
                                dict(h_max=1e-6), dict(h_max=1e6),
                                dict(student_logit_scale=1e6, teacher_logit_scale=1e-6),
                                dict(student_softcap=1e-6, teacher_softcap=1e6),
                                dict(gate="threshold", fkl_coef=1e6)])
def test_option_bounds_are_inclusive_and_finite(kw, eager):
    """At the bounds the loss and its gradient are finite on ordinary logits (the same
    call at 1e300 gave NaN on main). Eager kernels: the maths, not the compiler."""
    z = Z.clone().requires_grad_()
    loss = entropy_aware_opd_loss(z, Y, **kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), (kw, loss)
