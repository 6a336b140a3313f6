"""How :mod:`eaopd_mp.megatron` chooses between megatron-core's ``output_processor`` hook
and the private fallback, on stand-in models (no megatron import, no processes).

The real models are checked in ``test_megatron.py`` and ``test_megatron_schedule.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import eaopd_mp.megatron as em
from eaopd_mp.megatron import (
    Batch,
    EaopdOutput,
    eaopd_forward_step,
    eaopd_output_processor,
    gpt_forward,
    gpt_hidden_states,
    hidden_states_processor,
    read_batch,
    teacher_hidden_states,
    teacher_list,
    teacher_routing,
    uses_output_processor,
)

B, S, H = 2, 3, 4


class HookedGPT(torch.nn.Module):
    """``GPTModel.forward``'s signature since megatron-core 0.19: runs the processor on the
    last stage (here: on ``hidden``, the stand-in for the decoder's output)."""

    post_process = True
    share_embeddings_and_output_weights = False

    def __init__(self, hidden):
        super().__init__()
        self.hidden, self.output_layer, self.calls = hidden, torch.nn.Linear(H, 6), []
        self.config = SimpleNamespace(use_mup=False, mup_output_mult=1.0)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None,
                labels=None, *, loss_mask=None, packed_seq_params=None, padding_mask=None,
                output_processor=None, output_processor_context=None):
        self.calls.append((input_ids, position_ids, attention_mask, loss_mask))
        return output_processor(hidden_states=self.hidden, output_layer=self.output_layer,
                                output_weight=None, labels=labels, loss_mask=loss_mask,
                                context=output_processor_context, config=self.config)


class OldGPT(torch.nn.Module):
    """``GPTModel`` of megatron-core 0.16: no hook; ``_preprocess`` + ``decoder``."""

    post_process = True
    share_embeddings_and_output_weights = False
    mtp_process = False

    def __init__(self, hidden):
        super().__init__()
        self.hidden, self.output_layer = hidden, torch.nn.Linear(H, 6)
        self.config = SimpleNamespace()
        self.decoder = lambda hidden_states, **kw: hidden_states
        self.compute_language_model_loss = None

    def forward(self, input_ids, position_ids, attention_mask, labels=None, *,
                loss_mask=None):
        raise AssertionError("the fallback must not call forward")

    def _preprocess(self, input_ids, position_ids, packed_seq_params=None):
        return self.hidden, None, None, None, None, None


class Wrapper(torch.nn.Module):
    """megatron's DDP / Float16Module: the model is ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def _inputs():
    tokens = torch.zeros(B, S, dtype=torch.long)
    return tokens, tokens.clone(), None


def test_decided_by_forward_signature_through_wrappers():
    hidden = torch.randn(S, B, H)
    assert uses_output_processor(HookedGPT(hidden))
    assert uses_output_processor(Wrapper(Wrapper(HookedGPT(hidden))))
    assert not uses_output_processor(OldGPT(hidden))
    assert not uses_output_processor(Wrapper(OldGPT(hidden)))


def test_hook_path_passes_processor_context_and_loss_mask():
    hidden = torch.randn(S, B, H)
    model = HookedGPT(hidden)
    tokens, pos, attn = _inputs()
    mask, ctx, seen = torch.ones(B, S), object(), {}

    def processor(**kwargs):
        seen.update(kwargs)
        return "out"
    assert gpt_forward(Wrapper(model), tokens, pos, attn, processor, context=ctx,
                       loss_mask=mask) == "out"
    assert len(model.calls) == 1 and model.calls[0][3] is mask
    assert seen["context"] is ctx and seen["loss_mask"] is mask
    assert seen["hidden_states"] is hidden
    assert gpt_hidden_states(model, tokens, pos, attn) is hidden


def test_fallback_calls_processor_with_the_hooks_keywords():
    hidden = torch.randn(S, B, H)
    model = OldGPT(hidden)
    tokens, pos, attn = _inputs()
    mask, ctx, seen = torch.ones(B, S), object(), {}

    def processor(**kwargs):
        seen.update(kwargs)
        return "out"
    assert gpt_forward(Wrapper(model), tokens, pos, attn, processor, context=ctx,
                       loss_mask=mask) == "out"
    assert seen["hidden_states"] is hidden and seen["output_layer"] is model.output_layer
    assert seen["output_weight"] is None and seen["loss_mask"] is mask
    assert seen["context"] is ctx and seen["config"] is model.config
    assert seen["packed_seq_params"] is None and seen["input_ids"] is tokens
    assert gpt_hidden_states(model, tokens, pos, attn) is hidden
    model.post_process = False  # not the last pipeline stage: the hidden states, unprocessed
    assert gpt_forward(model, tokens, pos, attn, processor) is hidden


def test_fallback_refuses_multi_token_prediction_and_unknown_models():
    tokens, pos, attn = _inputs()
    model = OldGPT(torch.randn(S, B, H))
    model.mtp_process = True
    with pytest.raises(NotImplementedError, match="multi-token prediction"):
        gpt_hidden_states(model, tokens, pos, attn)
    with pytest.raises(NotImplementedError, match="no output_processor hook"):
        gpt_hidden_states(torch.nn.Linear(2, 2), tokens, pos, attn)


def test_processors_refuse_mup_output_scaling():
    hidden = torch.randn(S, B, H)
    config = SimpleNamespace(use_mup=True, mup_output_mult=0.5)
    with pytest.raises(NotImplementedError, match="MuP"):
        hidden_states_processor(hidden_states=hidden, config=config)
    out = EaopdOutput(None, None, teacher_topk_logprobs=None)
    with pytest.raises(NotImplementedError, match="MuP"):
        eaopd_output_processor(hidden_states=hidden, output_layer=None, loss_mask=None,
                               context=out, config=config)
    config.mup_output_mult = 1.0  # MuP without output scaling changes nothing here
    assert hidden_states_processor(hidden_states=hidden, config=config) is hidden


def test_eaopd_output_checks_before_the_forward():
    with pytest.raises(TypeError, match="sets reduction"):
        EaopdOutput(None, None, reduction="mean")
    out = EaopdOutput(None, None)
    with pytest.raises(RuntimeError, match="did not run eaopd_output_processor"):
        out.loss_func(torch.zeros(()))
    with pytest.raises(ValueError, match="loss_mask"):
        eaopd_output_processor(hidden_states=torch.randn(S, B, H), output_layer=None,
                               loss_mask=None, context=out)


# ------------------------------------------------------------------- several teachers


def _same(batch):
    return batch


def _never(**kwargs):
    raise AssertionError("no schedule may run on bad input")


def _mapping(index, b=B, s=S, packed=None):
    tokens = torch.zeros(b, s, dtype=torch.long)
    return dict(tokens=tokens, position_ids=tokens.clone(), attention_mask=None,
                loss_mask=torch.ones(b, s), packed_seq_params=packed, teacher_index=index)


def test_teacher_routing_layouts(monkeypatch):
    """Every teacher_index layout becomes this context-parallel rank's ``[b, s]``: per
    sequence, per token of this rank, per token of the whole sequence (megatron's
    zig-zag chunks: rank 1 of 2 holds positions 2..5 of 8), per packed sequence."""
    monkeypatch.setattr(em.layouts, "context_parallel_layout", lambda group=None: (2, 1))
    b, s = 2, 4
    route = lambda index, packed=None: teacher_routing(  # noqa: E731
        read_batch(_same, _mapping(index, b, s, packed)), 3)
    assert route(torch.tensor([2, 0])).tolist() == [[2] * 4, [0] * 4]
    mine = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 0]])
    assert route(mine).tolist() == mine.tolist()
    whole = torch.arange(8).remainder(3).expand(2, 8)
    assert route(whole).tolist() == [[2, 0, 1, 2]] * 2
    packed = SimpleNamespace(cu_seqlens_q=torch.tensor([0, 3, 7]),
                             cu_seqlens_q_padded=torch.tensor([0, 4, 8]))
    # sequences [0, 4) and [4, 8) cut in 4 chunks each: rank 1 holds 1, 2, 5, 6
    assert teacher_routing(read_batch(_same, _mapping(torch.tensor([2, 1]), 1, 4, packed)),
                           3).tolist() == [[2, 2, 1, 1]]


def test_teacher_routing_refuses_bad_input(monkeypatch):
    monkeypatch.setattr(em.layouts, "context_parallel_layout", lambda group=None: (2, 0))
    batch = lambda index: read_batch(_same, _mapping(index))  # noqa: E731
    with pytest.raises(ValueError, match=r"teacher_index values must be in \[0, 2\) \(2 "
                       r"teachers\), got \[2, 5\]"):
        teacher_routing(batch(torch.tensor([[0, 2, 5], [0, 0, 1]])), 2)
    with pytest.raises(ValueError, match=r"teacher_index shape \(2, 4\) fits none of \[2\] "
                       r"\(one teacher per sequence\), \[2, 3\] .* or \[2, 6\]"):
        teacher_routing(batch(torch.zeros(2, 4, dtype=torch.long)), 2)
    with pytest.raises(TypeError, match="teacher_index must hold integer .* torch.float32"):
        teacher_routing(batch(torch.zeros(2)), 2)
    with pytest.raises(ValueError, match=r"several teachers \(2\): get_batch must return a "
                       "mapping with teacher_index"):
        teacher_routing(batch(None), 2)


def test_batches_and_teacher_lists_are_checked_before_any_work(monkeypatch):
    monkeypatch.setattr(em.teachers, "_model_parallel_groups", lambda: [])  # no megatron import
    monkeypatch.setattr(em.layouts, "context_parallel_layout", lambda group=None: (1, 0))
    with pytest.raises(ValueError, match=r"mapping without position_ids, loss_mask"):
        read_batch(_same, dict(tokens=torch.zeros(1, 2)))
    with pytest.raises(ValueError, match="got 6 values"):
        read_batch(_same, (None,) * 6)
    assert read_batch(_same, (1, 2, 3, 4)) == Batch(1, 2, 3, 4, None, None)
    a, b, c = (HookedGPT(torch.randn(S, B, H)) for _ in range(3))
    assert teacher_list(a) is None and teacher_list([a, b]) is None  # one teacher's chunks
    assert teacher_list([[a], b]) == [[a], [b]]
    with pytest.raises(ValueError, match=r"teachers differ in model chunks: \[1, 2\]"):
        teacher_list([[a], [b, c]])
    with pytest.raises(ValueError, match="teacher 1: an empty list of model chunks"):
        teacher_list([[a], []])
    shapes = dict(num_microbatches=1, seq_length=S, micro_batch_size=B)
    with pytest.raises(ValueError, match="a list of 2 model chunks .* one iterator .* "
                       r"\[\[teacher_0\], \[teacher_1\], \.\.\.\]"):
        teacher_hidden_states(_never, [a, b], iter([]), next, **shapes)
    with pytest.raises(ValueError, match=r"each teacher has 2 model chunks but data_iterator "
                       r"is 1 iterator"):
        teacher_hidden_states(_never, [[a, b], [c, a]], iter([]), next, **shapes)
    with pytest.raises(ValueError, match=r"teacher_index values must be in \[0, 2\)"):
        teacher_hidden_states(_never, [[a], [b]], iter([_mapping(torch.tensor([0, 2]))]),
                              next, **shapes)
    # one teacher: a routing to another one is an error, all-zero is fine
    step = eaopd_forward_step(next, a, [torch.randn(S, B, H)])
    with pytest.raises(ValueError, match="one teacher model was given"):
        step(iter([_mapping(torch.tensor([0, 1]))]), a)
    with pytest.raises(ValueError, match=r"teacher_hidden must hold one list per teacher "
                       r"\(2 teachers, .*\), got 1 entries"):
        eaopd_forward_step(next, [[a], [b]], [[]])
    with pytest.raises(TypeError, match="not teacher_index"):
        eaopd_forward_step(next, [[a], [b]], [[], []], teacher_index=torch.zeros(2))


def test_routed_rows_in_token_order():
    """Each teacher gets its routed tokens' rows in ``[s, b]`` token order; a teacher
    without hidden states (no token) an empty ``[0, h_j]``; one without tokens in a
    micro-batch it has hidden states for an empty selection."""
    s, b = 3, 2
    index = torch.tensor([[0, 1], [1, 1], [0, 1]])  # [s, b]
    t = [HookedGPT(None) for _ in range(3)]
    h0, h1 = torch.randn(s, b, 5), torch.randn(s, b, 7)
    rows, gather = em.teachers._routed_teacher_hidden([h0, h1, None], index, [[x] for x in t],
                                             False, None, 0)
    assert not gather
    torch.testing.assert_close(rows[0], torch.stack([h0[0, 0], h0[2, 0]]))
    torch.testing.assert_close(rows[1], torch.stack([h1[0, 1], h1[1, 0], h1[1, 1],
                                                     h1[2, 1]]))
    assert rows[2].shape == (0, H)
    with pytest.raises(RuntimeError, match="teacher 1 has no hidden states for micro-batch 4 "
                       "but get_batch routes 4 tokens to it"):
        em.teachers._routed_teacher_hidden([h0, None, None], index, [[x] for x in t], False,
                                           None, 4)


def test_several_served_teachers_are_not_cut_again(monkeypatch):
    """Under context parallelism a served teacher's whole-sequence tensor is cut to this
    rank's chunks; several teachers' lists (their routed rows of this rank) pass as given."""
    monkeypatch.setattr(em.layouts, "context_parallel_layout", lambda group=None: (2, 1))
    lp = torch.arange(8.0).view(8, 1, 1)
    rows = [torch.zeros(3, 2), None]
    out = em.loss._slice_served_teacher(dict(teacher_topk_logprobs=lp, teacher_entropy=rows,
                                        temperature=2.0), 4, None, None)
    assert out["teacher_topk_logprobs"].view(-1).tolist() == [2.0, 3.0, 4.0, 5.0]
    assert out["teacher_entropy"] is rows and out["temperature"] == 2.0
