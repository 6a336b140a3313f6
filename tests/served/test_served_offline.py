"""eaopd_mp.served on an offline ``vllm.LLM`` in float32 (``dtype="float32"``), in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by tests/served/run.sh): both of vLLM's output
containers, and the tight comparison the bfloat16 server cannot give. Measured: served vs
in-process float32 at most 7.8e-5 nats, the same top-k id sets at every position."""

from __future__ import annotations

import os

import pytest
import torch

from eaopd_mp import fused_linear_eaopd_loss, served
from eaopd_mp.hf import next_token_mask
from eaopd_mp.options import TOPK_TAILS

TOL = 1e-3


@pytest.fixture(scope="module")
def llm(server):
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0", "run via run.sh"
    from vllm import LLM

    return LLM(model=server["folder"], dtype="float32", enforce_eager=True, max_logprobs=64)


def test_offline_float32_matches_the_model_in_process(llm, batch, reference):
    ids, mask, seqs = batch
    out = served.llm_topk(llm, ids, mask, k=20)
    torch.testing.assert_close(out.mask, next_token_mask(ids, mask, None), rtol=0, atol=0)
    kept = out.mask.bool()
    err = (out.logprobs[kept] - reference[kept].gather(-1, out.ids[kept])).abs()
    top = reference[kept].topk(20, -1)
    same = sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(out.ids[kept], top.indices,
                                                                    strict=True))
    print(f"\n[measured] offline float32 vLLM vs in-process float32: max {err.max():.2e} "
          f"nats, same id set at {same}/{int(kept.sum())} positions")
    assert err.max() <= TOL
    # ids: the same sets, up to float32 ties at the k-th
    at_kth = (top.values[:, -1:] - reference[kept].gather(-1, out.ids[kept])).max()
    assert at_kth <= TOL
    assert same >= kept.sum() - 2


def test_list_and_flat_containers_agree(llm, batch):
    from vllm import SamplingParams

    ids, mask, seqs = batch
    prompts = [{"prompt_token_ids": s} for s in seqs]
    listed = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=20),
                          use_tqdm=False)
    flat = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=20,
                                                flat_logprobs=True), use_tqdm=False)
    assert type(flat[0].prompt_logprobs).__name__ == "FlatLogprobs"
    a = served.parse_request_outputs(listed, ids, mask, k=20)
    b = served.parse_request_outputs(flat, ids, mask, k=20)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0, equal_nan=True)


def test_offline_k_above_max_logprobs_is_refused(llm, batch):
    ids, mask, _ = batch
    with pytest.raises(ValueError, match="k=65 is more than the engine's max_logprobs=64"):
        served.llm_topk(llm, ids, mask, k=65)


@pytest.mark.parametrize("tail", TOPK_TAILS)
def test_loss_from_offline_topk_matches_exact_topk(llm, batch, reference, student_hidden, tail):
    ids, mask, _ = batch
    out = served.llm_topk(llm, ids, mask, k=20)
    exact_lp, exact_ids = torch.nan_to_num(reference).topk(20, -1)
    hidden, weight = student_hidden
    with torch.no_grad():
        got = fused_linear_eaopd_loss(hidden, weight, labels=out.mask, topk_tail=tail,
                                      **out.loss_kwargs())
        want = fused_linear_eaopd_loss(hidden, weight, labels=out.mask, topk_tail=tail,
                                       teacher_topk_logprobs=exact_lp,
                                       teacher_topk_indices=exact_ids)
    rel = abs(got.item() - want.item()) / abs(want.item())
    print(f"\n[measured] {tail}: loss from offline float32 top-20 {got.item():.6f}, exact "
          f"{want.item():.6f}: relative difference {rel:.2e}")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
