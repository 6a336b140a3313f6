"""How :mod:`eaopd_mp.megatron` chooses between megatron-core's ``output_processor`` hook
and the private fallback, on stand-in models (no megatron import, no processes).

The real models are checked in ``test_megatron.py`` and ``test_megatron_schedule.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from eaopd_mp.megatron import (
    EaopdOutput,
    eaopd_output_processor,
    gpt_forward,
    gpt_hidden_states,
    hidden_states_processor,
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
