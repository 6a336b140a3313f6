"""eaopd_mp.served's parsing, on answers recorded from a real vLLM 0.32 (tests/fixtures/served/,
written by tests/served/record_fixtures.py; never edited by hand: the few altered answers
below are altered here, in the test, and say how). The same client against a running server:
tests/served/ (make test-served)."""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from eaopd_mp import entropy_aware_opd_loss, served
from eaopd_mp.hf import next_token_mask
from eaopd_mp.options import TOPK_TAILS

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "served"
K = 5
PAD = 2


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def completions():
    return load("completions_k5.json")


def padded(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` ids and attention mask of ``seqs``, padded on ``side``."""
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), PAD, dtype=torch.int64)
    mask = torch.zeros(len(seqs), length, dtype=torch.int64)
    for b, s in enumerate(seqs):
        where = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[b, where] = torch.tensor(s)
        mask[b, where] = 1
    return ids, mask


def expected_position(entry: dict, k: int) -> tuple[list[float], set[int]]:
    """The oracle: the k largest log-probs among all of a position's entries (the scored
    token's extra entry is never among them unless it belongs there), and their ids."""
    pairs = sorted(((v["logprob"], int(i)) for i, v in entry.items()), reverse=True)[:k]
    return [v for v, _ in pairs], {i for _, i in pairs}


def test_fixture_holds_both_entry_kinds(completions):
    """The recorded answer has positions whose scored token is inside the top 5 (5 entries)
    and outside (6 entries), a null first position and a one-token sequence."""
    sizes = [len(e) for c in completions["response"]["choices"]
             for e in c["prompt_logprobs"] if e is not None]
    assert K in sizes and K + 1 in sizes and set(sizes) == {K, K + 1}
    firsts = [c["prompt_logprobs"][0] for c in completions["response"]["choices"]]
    assert firsts == [None, None, None]
    assert [len(p) for p in completions["request"]["prompt"]][-1] == 1


@pytest.mark.parametrize("side", ["right", "left"])
def test_completions_aligned_with_next_token_positions(completions, side):
    seqs = completions["request"]["prompt"]
    ids, mask = padded(seqs, side)
    out = served.parse_completions(completions["response"], ids, mask, k=K)
    assert out.logprobs.shape == out.ids.shape == (3, ids.shape[1] - 1, K)
    assert out.logprobs.dtype == torch.float32 and out.ids.dtype == torch.int64
    torch.testing.assert_close(out.mask, next_token_mask(ids, mask, None), rtol=0, atol=0)
    for b, (seq, choice) in enumerate(zip(seqs, completions["response"]["choices"],
                                          strict=True)):
        start = 0 if side == "right" else ids.shape[1] - len(seq)
        for j in range(1, len(seq)):
            values, id_set = expected_position(choice["prompt_logprobs"][j], K)
            t = start + j - 1  # position t holds the distribution of token t + 1 = seq[j]
            assert out.logprobs[b, t].tolist() == pytest.approx(values, abs=0, rel=1e-7)
            assert set(out.ids[b, t].tolist()) == id_set
    kept = out.mask.bool()
    assert torch.isnan(out.logprobs[~kept]).all()
    assert not torch.isnan(out.logprobs[kept]).any()
    assert (out.ids[~kept] == torch.arange(K)).all()


def test_left_and_right_padding_give_the_same_numbers_per_sequence(completions):
    seqs = completions["request"]["prompt"]
    right = served.parse_completions(completions["response"], *padded(seqs, "right"), k=K)
    left = served.parse_completions(completions["response"], *padded(seqs, "left"), k=K)
    length = right.mask.shape[1]
    for b, seq in enumerate(seqs):
        n = len(seq) - 1
        r, lf = slice(0, n), slice(length - n, length)
        assert torch.equal(right.logprobs[b, r], left.logprobs[b, lf])
        assert torch.equal(right.ids[b, r], left.ids[b, lf])
    assert right.mask[2].sum() == 0  # the one-token sequence predicts nothing


def test_smaller_k_is_the_top_of_the_answer(completions):
    seqs = completions["request"]["prompt"]
    ids, mask = padded(seqs, "right")
    five = served.parse_completions(completions["response"], ids, mask, k=K)
    two = served.parse_completions(completions["response"], ids, mask, k=2)
    kept = five.mask.bool()
    assert torch.equal(two.logprobs[kept], five.logprobs[kept][:, :2])


@pytest.mark.parametrize("tail", TOPK_TAILS)
def test_loss_accepts_the_served_numbers_and_never_reads_padding(completions, tail):
    """The loss's own validation accepts the recorded bf16 server numbers; padded positions
    (NaN) are never read: the loss equals the loss over the real positions alone."""
    seqs = completions["request"]["prompt"]
    ids, mask = padded(seqs, "left")
    out = served.parse_completions(completions["response"], ids, mask, k=K)
    vocab = 49152
    torch.manual_seed(0)
    student = torch.randn(*out.mask.shape, vocab, requires_grad=True)
    full = entropy_aware_opd_loss(student, labels=out.mask, reduction="sum", topk_tail=tail,
                                  **out.loss_kwargs())
    kept = out.mask.bool()
    alone = entropy_aware_opd_loss(student[kept], teacher_topk_logprobs=out.logprobs[kept],
                                   teacher_topk_indices=out.ids[kept], reduction="sum",
                                   topk_tail=tail)
    assert torch.isfinite(full)
    torch.testing.assert_close(full, alone, rtol=1e-6, atol=1e-5)
    unmasked = entropy_aware_opd_loss(student, reduction="sum", topk_tail=tail,
                                      **out.loss_kwargs())
    assert torch.isnan(unmasked)  # forgetting the mask is loud, not silently wrong


def test_offline_outputs_list_and_flat_match_their_own_entries():
    """Offline ``LLM.generate`` outputs, recorded in both of vLLM's containers (a list of
    ``{id: Logprob}`` and ``FlatLogprobs``), rebuilt here as plain objects with the recorded
    attributes."""
    data = load("generate_k5.json")["outputs"]
    seqs = [o["prompt_token_ids"] for o in data]
    ids, mask = padded(seqs, "right")
    listed = [SimpleNamespace(prompt_token_ids=o["prompt_token_ids"], prompt_logprobs=[
        None if e is None else {i: SimpleNamespace(logprob=v, rank=r) for i, v, r in e}
        for e in o["prompt_logprobs"]]) for o in data]
    flat = [SimpleNamespace(prompt_token_ids=o["prompt_token_ids"],
                            prompt_logprobs=SimpleNamespace(**o["flat_prompt_logprobs"]))
            for o in data]
    a = served.parse_request_outputs(listed, ids, mask, k=K)
    b = served.parse_request_outputs(flat, ids, mask, k=K)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0, equal_nan=True)
    for bi, o in enumerate(data):
        for j in range(1, len(o["prompt_token_ids"])):
            entry = {str(i): {"logprob": v} for i, v, _ in o["prompt_logprobs"][j]}
            values, id_set = expected_position(entry, K)
            assert a.logprobs[bi, j - 1].tolist() == pytest.approx(values, abs=0, rel=1e-7)
            assert set(a.ids[bi, j - 1].tolist()) == id_set
    # the flat container keeps the duplicate of an in-top-k scored token: k + 1 always
    spans = zip(data[0]["flat_prompt_logprobs"]["start_indices"],
                data[0]["flat_prompt_logprobs"]["end_indices"], strict=True)
    assert {e - s for s, e in spans} == {0, K + 1}


# ---------------------------------------------------------------- what is refused

def test_fewer_entries_than_k_names_max_logprobs(completions):
    ids, mask = padded(completions["request"]["prompt"], "right")
    with pytest.raises(ValueError, match=r"fewer than k=6.*max_logprobs"):
        served.parse_completions(completions["response"], ids, mask, k=6)


def test_server_refusal_of_k_names_max_logprobs():
    data = load("completions_max_logprobs.json")
    assert data["status"] == 400
    ids, mask = padded(data["request"]["prompt"], "right")
    with pytest.raises(ValueError, match=r"k=65 is more than the server's max_logprobs "
                                         r"\(start vllm serve with --max-logprobs 65"):
        served.parse_completions(data["response"], ids, mask, k=65)


def test_temperature_other_than_vllms_is_refused(completions):
    ids, mask = padded(completions["request"]["prompt"], "right")
    with pytest.raises(ValueError, match=r"temperature=0.7: vLLM's prompt_logprobs are the "
                                         r"teacher at temperature 1.0"):
        served.parse_completions(completions["response"], ids, mask, k=K, temperature=0.7)
    out = served.parse_completions(completions["response"], ids, mask, k=K, temperature=1)
    assert out.loss_kwargs()["temperature"] == 1.0
    with pytest.raises(TypeError, match="temperature must be a number"):
        served.parse_completions(completions["response"], ids, mask, k=K, temperature="1")


def test_answer_for_other_tokens_is_refused(completions):
    seqs = copy.deepcopy(completions["request"]["prompt"])
    seqs[1][5] += 1
    with pytest.raises(ValueError, match="sequence 1: the server scored other tokens"):
        served.parse_completions(completions["response"], *padded(seqs, "right"), k=K)
    answer = copy.deepcopy(completions["response"])  # without return_token_ids
    for c in answer["choices"]:
        c["prompt_token_ids"] = None
    with pytest.raises(ValueError, match=r"sequence 1 position 5: the scored token \d+ is "
                                         "not among"):
        served.parse_completions(answer, *padded(seqs, "right"), k=K)
    seqs = copy.deepcopy(completions["request"]["prompt"])
    seqs[0] = seqs[0][:-1]
    with pytest.raises(ValueError, match="40 prompt_logprobs entries for 41 real tokens|"
                                         "scored other tokens"):
        served.parse_completions(completions["response"], *padded(seqs, "right"), k=K)


def test_malformed_answers_are_refused(completions):
    ids, mask = padded(completions["request"]["prompt"], "right")
    fewer = copy.deepcopy(completions["response"])
    fewer["choices"].pop()
    with pytest.raises(ValueError, match="2 choices for 3 sequences"):
        served.parse_completions(fewer, ids, mask, k=K)
    missing = copy.deepcopy(completions["response"])
    missing["choices"][0]["prompt_logprobs"] = None
    with pytest.raises(ValueError, match="sequence 0: no prompt_logprobs"):
        served.parse_completions(missing, ids, mask, k=K)
    first = copy.deepcopy(completions["response"])
    first["choices"][0]["prompt_logprobs"][0] = first["choices"][0]["prompt_logprobs"][1]
    with pytest.raises(ValueError, match="the first position has entries"):
        served.parse_completions(first, ids, mask, k=K)
    with pytest.raises(TypeError, match="response must be the decoded JSON"):
        served.parse_completions("{}", ids, mask, k=K)


def test_logits_under_the_logprobs_name_are_refused(completions):
    """What a server started with --logprobs-mode raw_logits sends: every number shifted by
    the log-normaliser (altered here: +5 on every recorded value)."""
    answer = copy.deepcopy(completions["response"])
    for c in answer["choices"]:
        for e in c["prompt_logprobs"]:
            for v in (e or {}).values():
                v["logprob"] += 5.0
    ids, mask = padded(completions["request"]["prompt"], "right")
    with pytest.raises(ValueError, match="not log-probabilities.*--logprobs-mode raw_logits"):
        served.parse_completions(answer, ids, mask, k=K)


def test_scored_token_tied_with_the_kth_is_dropped_by_id(completions):
    """vLLM ranks the scored token by counting strictly larger log-probs, so one tied with
    the k-th, outside the top k, carries a rank <= k (duplicate). Altered here: the scored
    token of a recorded 6-entry position given the k-th's value and rank."""
    answer = copy.deepcopy(completions["response"])
    seq = completions["request"]["prompt"][0]
    entries = answer["choices"][0]["prompt_logprobs"]
    j = next(j for j in range(1, len(seq)) if len(entries[j]) == K + 1)
    kth = next(v for v in entries[j].values() if v["rank"] == K)
    entries[j][str(seq[j])].update(logprob=kth["logprob"], rank=K)
    ids, mask = padded(completions["request"]["prompt"], "right")
    out = served.parse_completions(answer, ids, mask, k=K)
    expected = sorted(int(i) for i, v in entries[j].items() if int(i) != seq[j])
    assert sorted(out.ids[0, j - 1].tolist()) == expected


def test_bad_batches_are_refused_before_any_request(completions):
    ids, mask = padded(completions["request"]["prompt"], "right")
    holes = mask.clone()
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="sequence 0: its real tokens are not one contiguous"):
        served.completions_request(ids, holes, k=K, model="m")
    with pytest.raises(ValueError, match="attention_mask shape"):
        served.completions_request(ids, mask[:, 1:], k=K, model="m")
    with pytest.raises(ValueError, match="integer token ids"):
        served.completions_request(ids.float(), mask, k=K, model="m")
    with pytest.raises(ValueError, match="k must be >= 1"):
        served.completions_request(ids, mask, k=0, model="m")
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="sequence 1 has no real token"):
        served.completions_request(ids, empty, k=K, model="m")
    body = served.completions_request(ids, mask, k=K, model="m")
    assert body["prompt"] == completions["request"]["prompt"]
    assert body["prompt_logprobs"] == K and body["return_token_ids"] is True


# ---------------------------------------------------------------- the HTTP helper, no server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_is_a_clear_error(completions):
    ids, mask = padded(completions["request"]["prompt"], "right")
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(served.ServedTeacherError, match="no answer from .*/v1/completions for "
                                                        "the batch of 3 sequences"):
        served.served_topk(url, ids, mask, k=K, model="m", timeout=5)


def test_a_server_that_never_answers_times_out(completions):
    """A socket that listens and never answers (a hung server): the timeout ends the wait."""
    ids, mask = padded(completions["request"]["prompt"], "right")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(1)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        with pytest.raises(served.ServedTeacherError, match="timed out"):
            served.served_topk(url, ids, mask, k=K, model="m", timeout=0.5)


def test_temperature_refused_before_the_request(completions):
    ids, mask = padded(completions["request"]["prompt"], "right")
    url = f"http://127.0.0.1:{_free_port()}"  # never contacted
    with pytest.raises(ValueError, match="temperature=0.7"):
        served.served_topk(url, ids, mask, k=K, model="m", temperature=0.7)


# ---------------------------------------------------------------- the module itself

def test_import_is_light():
    code = ("import sys, eaopd_mp.served; print(sorted(m for m in ('vllm', 'transformers', "
            "'requests', 'httpx', 'aiohttp', 'openai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_public_objects_have_docstrings():
    import inspect

    for name in served.__all__:
        obj = getattr(served, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert (obj.__doc__ or "").strip(), name
            for attr, member in vars(obj).items():
                if callable(member) and not attr.startswith("_"):
                    assert (member.__doc__ or "").strip(), f"{name}.{attr}"
