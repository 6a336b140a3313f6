"""A served teacher: top-k log-probabilities from a vLLM server, aligned with the loss.

At scale the teacher of on-policy distillation is an inference server: the student samples,
the server scores the samples (``prompt_logprobs``: the teacher's top-k log-probabilities at
every position of a given token sequence) and the loss trains the student on them. This
module turns what vLLM returns for a batch of sequences into the loss's top-k inputs, aligned
with the tokens the loss trains on:

* :func:`completions_request` builds the ``/v1/completions`` body for a padded batch (the
  sequences as token ids, ``prompt_logprobs=k``);
* :func:`parse_completions` reads the server's JSON answer, :func:`parse_request_outputs`
  the ``list[RequestOutput]`` of an offline ``vllm.LLM.generate``;
* :func:`served_topk` posts a batch with the standard library (``urllib``) and parses it.

Each returns a :class:`ServedTopK`: ``(B, T - 1, k)`` float32 log-probabilities and int64 ids
in which position ``t`` holds the teacher's distribution of token ``t + 1`` (the alignment of
:func:`eaopd_mp.hf.next_token_mask`), and the ``(B, T - 1)`` mask of the positions that hold
served numbers; ``**served.loss_kwargs()`` passes them to any loss function or module.

What the server returns, and what is done with it (vLLM 0.32, read from its source and
checked against a running server; ``tests/served/``):

* ``prompt_logprobs[j]`` of a sequence is the teacher's distribution of token ``j`` given the
  tokens before it: a mapping ``id -> {"logprob", "rank"}``. Entry 0 is ``None`` (nothing
  predicts the first token); the position shift is done here.
* An entry holds the top-k ids (ranks 1..k) **and** the scored token itself (its rank
  ``1 + #{ids with a larger log-prob}``): ``k + 1`` entries when that token is outside the
  top k, ``k`` when it is inside. The extra entry is dropped here, by id and rank.
* More than ``max_logprobs`` per position (a server setting, ``--max-logprobs``, 20 by
  default) is refused by the server with HTTP 400; :func:`served_topk` raises a
  ``ValueError`` naming ``max_logprobs``, as does a parse that finds fewer than k entries.
* The numbers are ``log_softmax(logits, dtype=float32)`` of the served model's logits (bf16
  on vLLM's CPU backend), sent as JSON floats (``-inf`` is sent as ``-9999.0``).

Temperature: the one option is ``temperature``, the temperature the loss is called with
(it travels in :meth:`ServedTopK.loss_kwargs`), and the served log-probabilities must be the
teacher at that temperature, because with a top-k teacher the loss divides only the
student's logits (a top-k log-probability cannot be re-tempered without the rest of the
vocabulary). vLLM 0.32 computes prompt log-probabilities from the raw logits whatever the
request's ``temperature`` (:data:`VLLM_PROMPT_TEMPERATURE`), so every ``temperature`` other
than 1.0 is a mismatch and is refused. The student may still *sample* at any temperature:
sampling decides which sequences are scored, not the distributions the loss compares.

Nothing heavy is imported here: ``vllm`` is imported by :func:`llm_topk` only.
"""

from __future__ import annotations

import http.client
import json
import math
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "VLLM_PROMPT_TEMPERATURE",
    "ServedTeacherError",
    "ServedTopK",
    "completions_request",
    "llm_topk",
    "parse_completions",
    "parse_request_outputs",
    "served_topk",
]

#: The temperature vLLM's prompt log-probabilities are at: 1.0, whatever the request says.
#: ``vllm/v1/worker/gpu_model_runner.py`` (``_get_prompt_logprobs_dict``, also used by the
#: CPU runner) scores prompt tokens with ``Sampler.compute_logprobs(logits)``, i.e.
#: ``logits.log_softmax(-1, dtype=float32)``: "prompt tokens skip sampling processors"
#: (temperature, penalties, top-k/top-p), for every ``--logprobs-mode``.
VLLM_PROMPT_TEMPERATURE = 1.0

# vLLM sends a -inf log-probability as this number (clamp_prompt_logprobs: JSON has no -inf).
_JSON_NEG_INF = -9999.0
# A position whose top-k probabilities sum past exp(this) is not log-probabilities (logits
# from --logprobs-mode raw_logits); the loss's own, tighter check runs on what is kept.
_NOT_LOGPROBS = 1e-3


class ServedTeacherError(RuntimeError):
    """The server did not answer a batch (it died, refused the connection, timed out, or
    sent something that is not a complete answer). Nothing of the batch is returned."""


@dataclass(frozen=True)
class ServedTopK:
    """A batch's served top-k teacher, aligned with the loss's next-token positions.

    Attributes:
        logprobs: ``(B, T - 1, k)`` float32: at position ``t`` the teacher's top-k
            log-probabilities of token ``t + 1`` (normalised over the whole vocabulary),
            in decreasing order. NaN where ``mask`` is 0.
        ids: ``(B, T - 1, k)`` int64, the vocabulary ids of ``logprobs`` (distinct per
            position); ``0..k-1`` where ``mask`` is 0.
        mask: ``(B, T - 1)`` float32 0/1: 1 where tokens ``t`` and ``t + 1`` are both real
            (``eaopd_mp.hf.next_token_mask(input_ids, attention_mask, None)``). Multiply it
            by your completion mask: positions where it is 0 must have weight 0 in the loss
            (their NaN makes a loss NaN otherwise).
        temperature: the loss's ``temperature``, at which the served numbers were checked to
            be (see the module docstring).
    """

    logprobs: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    temperature: float

    @property
    def k(self) -> int:
        """The number of served log-probabilities per position."""
        return self.logprobs.shape[-1]

    def loss_kwargs(self) -> dict:
        """``teacher_topk_logprobs``, ``teacher_topk_indices`` and ``temperature`` for any
        loss function or module (pass ``labels`` yourself: ``mask`` times your completion
        mask)."""
        return {"teacher_topk_logprobs": self.logprobs, "teacher_topk_indices": self.ids,
                "temperature": self.temperature}


# ---------------------------------------------------------------- the batch's sequences

def _check_temperature(temperature: object) -> float:
    """The ``temperature`` option, refused where vLLM's prompt log-probs are not at it."""
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if float(temperature) != VLLM_PROMPT_TEMPERATURE:
        raise ValueError(
            f"temperature={temperature}: vLLM's prompt_logprobs are the teacher at temperature "
            f"{VLLM_PROMPT_TEMPERATURE} (the raw logits' log_softmax, whatever the request's "
            "temperature), and with a top-k teacher the loss divides only the student's "
            "logits: the loss would compare the student at this temperature with the teacher "
            "at 1.0. Call the loss with temperature=1.0 (the student may still sample at any "
            "temperature)")
    return float(temperature)


def _spans(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple]:
    """Per sequence ``(start, tokens)``: where its real tokens begin in the padded row and
    the list of them. The real tokens must be one contiguous run (left or right padding)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.is_complex():
        raise ValueError(f"input_ids must be (batch, seq) integer token ids, got shape "
                         f"{tuple(input_ids.shape)} dtype {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must hold at least one sequence of 2 or more positions, "
                         f"got shape {tuple(input_ids.shape)}")
    shape = tuple(input_ids.shape)
    if attention_mask is None:
        real = torch.ones(shape, dtype=torch.bool)
    else:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got "
                            f"{type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"shape {shape}")
        if attention_mask.is_complex() or bool(((attention_mask != 0)
                                                & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must be a 0/1 mask (bool, integer or float)")
        real = attention_mask.detach().cpu() != 0
    ids = input_ids.detach().cpu()
    spans = []
    for b in range(shape[0]):
        where = real[b].nonzero().flatten().tolist()
        if not where:
            raise ValueError(f"sequence {b} has no real token (attention_mask row all 0)")
        start, end = where[0], where[-1] + 1
        if len(where) != end - start:
            raise ValueError(f"sequence {b}: its real tokens are not one contiguous run "
                             "(attention_mask must be left or right padding)")
        tokens = ids[b, start:end].tolist()
        if min(tokens) < 0:
            raise ValueError(f"sequence {b} has a negative token id among its real tokens")
        spans.append((start, tokens))
    return spans


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def completions_request(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        *, k: int, model: str) -> dict:
    """The ``/v1/completions`` JSON body that scores a padded batch with vLLM.

    Args:
        input_ids: ``(B, T)`` integer token ids (the sequences the loss trains on).
        attention_mask: ``(B, T)`` 0/1, 1 on real tokens (left or right padding); None
            means no padding.
        k: log-probabilities per position (``prompt_logprobs``; at most the server's
            ``--max-logprobs``).
        model: the served model's name (``--served-model-name``, or the path it serves).

    Returns:
        A dict: each sequence's real tokens as a token-id prompt (nothing is re-tokenised),
        ``prompt_logprobs=k``, one generated token (``max_tokens`` must be at least 1;
        it is not used), ``return_token_ids`` so the parse checks which tokens were scored.
    """
    k = _check_k(k)
    prompts = [tokens for _, tokens in _spans(input_ids, attention_mask)]
    return {"model": model, "prompt": prompts, "max_tokens": 1, "prompt_logprobs": k,
            "temperature": 1.0, "n": 1, "return_token_ids": True}


# ---------------------------------------------------------------- one position's entries

def _row_json(row: object) -> list | None:
    """One sequence's JSON ``prompt_logprobs`` as per-position ``[(id, logprob, rank)]``
    (string keys, ``{"logprob", "rank", ...}`` values), None for an empty position."""
    if row is None:
        return None
    if not isinstance(row, list):
        raise ValueError(f"prompt_logprobs must be a list, got {type(row).__name__}")
    out = []
    for entry in row:
        if entry is None:
            out.append(None)
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(f"a prompt_logprobs entry must be an object id -> logprob, got "
                             f"{type(entry).__name__}")
        position = []
        for key, value in entry.items():
            if not isinstance(value, Mapping) or "logprob" not in value:
                raise ValueError(f"prompt_logprobs entry {key!r}: expected "
                                 f"{{'logprob': ..., 'rank': ...}}, got {value!r}")
            position.append((int(key), float(value["logprob"]), value.get("rank")))
        out.append(position)
    return out


def _row_offline(row: object) -> list | None:
    """One ``RequestOutput.prompt_logprobs`` as per-position ``[(id, logprob, rank)]``: a list
    of ``{id: Logprob}`` (None first), or a ``vllm.logprobs.FlatLogprobs`` read from its flat
    lists (the scored token and the top-k, the duplicate merged as its mapping view does)."""
    if row is None:
        return None
    if hasattr(row, "start_indices"):  # FlatLogprobs: position 0 is an empty range
        out = []
        for start, end in zip(row.start_indices, row.end_indices, strict=True):
            merged = {}
            for i in range(start, end):
                merged[int(row.token_ids[i])] = (float(row.logprobs[i]), row.ranks[i])
            out.append([(i, lp, rank) for i, (lp, rank) in merged.items()] or None)
        return out
    return [None if entry is None else
            [(int(key), float(value.logprob), value.rank) for key, value in entry.items()]
            for entry in row]


def _topk_of(entries: list, target: int, k: int, where: str) -> list[tuple[int, float]]:
    """The top-k ``(id, logprob)`` of one position, the scored token's extra entry dropped.

    vLLM puts the scored token (rank ``1 + #{larger log-probs}``, which ties can make
    <= k) and the top-m ids (ranks exactly 1..m) in one mapping: m + 1 entries when the
    token is outside the top m, m when inside (the mapping merged the two).
    """
    ids = [e[0] for e in entries]
    if target not in ids:
        raise ValueError(f"{where}: the scored token {target} is not among the server's "
                         "entries: the answer is not for this sequence")
    ranks = [e[2] for e in entries]
    if any(r is None for r in ranks):
        raise ValueError(f"{where}: an entry without a rank: cannot tell the top-k ids from "
                         "the scored token's extra entry")
    top = entries
    if sorted(ranks) != list(range(1, len(entries) + 1)):
        top = [e for e in entries if e[0] != target]
        if sorted(e[2] for e in top) != list(range(1, len(top) + 1)):
            raise ValueError(f"{where}: ranks {sorted(ranks)} are not 1..m plus the scored "
                             "token's: not a vLLM prompt_logprobs entry")
    if len(top) < k:
        raise ValueError(f"{where}: the server returned {len(top)} log-probabilities, fewer "
                         f"than k={k}: the request asked for fewer (prompt_logprobs), or the "
                         f"server's max_logprobs is below k")
    top = sorted(top, key=lambda e: e[2])
    return [(e[0], e[1]) for e in top[:k]]


# ---------------------------------------------------------------- assembling the batch

def _assemble(rows: list, spans: list, shape: tuple, k: int, temperature: float,
              source: str) -> ServedTopK:
    """Place each sequence's served positions at the loss's next-token positions.

    ``rows[b]`` is sequence ``b``'s ``prompt_logprobs`` as per-position ``[(id, logprob,
    rank)]`` (one per real token, the first None); real token ``j`` of a sequence whose
    real tokens start at ``s`` is predicted at position ``s + j - 1``.
    """
    batch, length = shape
    lp = torch.full((batch, length - 1, k), float("nan"), dtype=torch.float32)
    ids = torch.arange(k, dtype=torch.int64).expand(batch, length - 1, k).clone()
    mask = torch.zeros(batch, length - 1, dtype=torch.float32)
    for b, ((start, tokens), row) in enumerate(zip(spans, rows, strict=True)):
        if row is None:
            raise ValueError(f"{source} sequence {b}: no prompt_logprobs (the request must "
                             "ask for them: prompt_logprobs=k)")
        if len(row) != len(tokens):
            raise ValueError(f"{source} sequence {b}: {len(row)} prompt_logprobs entries for "
                             f"{len(tokens)} real tokens: the answer is not for this batch")
        if row[0]:
            raise ValueError(f"{source} sequence {b}: the first position has entries; vLLM "
                             "leaves it empty (nothing predicts the first token)")
        if len(tokens) < 2:
            continue
        served_ids, served_lp = [], []
        for j in range(1, len(tokens)):
            if not row[j]:
                raise ValueError(f"{source} sequence {b} position {j}: no entries")
            top = _topk_of(row[j], tokens[j], k, f"{source} sequence {b} position {j}")
            served_ids.append([i for i, _ in top])
            served_lp.append([v for _, v in top])
        positions = slice(start, start + len(tokens) - 1)
        ids[b, positions] = torch.tensor(served_ids, dtype=torch.int64)
        lp[b, positions] = torch.tensor(served_lp, dtype=torch.float64).to(torch.float32)
        mask[b, positions] = 1.0
    _check_logprobs(lp, mask, source)
    return ServedTopK(lp, ids, mask, temperature)


def _check_logprobs(lp: torch.Tensor, mask: torch.Tensor, source: str) -> None:
    """Refuse numbers that are not log-probabilities (a server run with
    ``--logprobs-mode raw_logits`` sends logits under the same name)."""
    kept = lp[mask.bool()].double()
    if kept.numel() == 0:
        return
    total = torch.logsumexp(kept, dim=-1)
    bad = total > _NOT_LOGPROBS
    if bool(bad.any()):
        worst = float(total.max())
        raise ValueError(f"{source}: the served numbers are not log-probabilities (top-k "
                         f"probabilities sum to {math.exp(min(worst, 700.0)):.6g} at "
                         f"{int(bad.sum())} position(s)): a server started with "
                         "--logprobs-mode raw_logits or processed_logits sends logits; "
                         "start it with the default raw_logprobs")


# ---------------------------------------------------------------- the two formats

def parse_completions(response: Mapping, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *, k: int,
                      temperature: float = 1.0) -> ServedTopK:
    """The loss's top-k inputs from vLLM's ``/v1/completions`` JSON answer.

    Args:
        response: the decoded JSON of the request :func:`completions_request` built for
            the same ``input_ids`` and ``attention_mask`` (one choice per sequence, each with
            ``prompt_logprobs``), or an error answer (raised as below).
        input_ids, attention_mask: ``(B, T)``, as given to :func:`completions_request`.
        k: the top-k to return; the answer must hold at least ``k`` per position.
        temperature: the loss's temperature; only ``VLLM_PROMPT_TEMPERATURE`` (1.0) is
            what vLLM serves (see the module docstring).

    Returns:
        :class:`ServedTopK` with ``(B, T - 1, k)`` float32 log-probs and int64 ids.

    Raises:
        ValueError: the server refused ``k`` (naming ``max_logprobs``), fewer than ``k``
            entries came back, the answer is for other tokens, or is not log-probabilities.
    """
    k = _check_k(k)
    temperature = _check_temperature(temperature)
    spans = _spans(input_ids, attention_mask)
    if not isinstance(response, Mapping):
        raise TypeError(f"response must be the decoded JSON (a dict), got "
                        f"{type(response).__name__}")
    if "error" in response:
        _raise_error_answer(response, k)
    choices = response.get("choices")
    if not isinstance(choices, list) or len(choices) != len(spans):
        got = len(choices) if isinstance(choices, list) else "no"
        raise ValueError(f"the answer holds {got} choices for {len(spans)} sequences (one "
                         "prompt per sequence, n=1)")
    choices = sorted(choices, key=lambda c: c.get("index", 0))
    for b, (choice, (_, tokens)) in enumerate(zip(choices, spans, strict=True)):
        scored = choice.get("prompt_token_ids")
        if scored is not None and list(scored) != tokens:
            raise ValueError(f"completions sequence {b}: the server scored other tokens than "
                             "the sequence's (prompt_token_ids differ)")
    rows = [_row_json(c.get("prompt_logprobs")) for c in choices]
    return _assemble(rows, spans, tuple(input_ids.shape), k, temperature, "completions")


def parse_request_outputs(outputs: Sequence, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, *, k: int,
                          temperature: float = 1.0) -> ServedTopK:
    """The loss's top-k inputs from an offline ``vllm.LLM.generate`` on the batch.

    Args:
        outputs: the ``list[vllm.RequestOutput]`` of ``llm.generate`` on each sequence's real
            tokens (``{"prompt_token_ids": ...}``), in batch order, with
            ``SamplingParams(prompt_logprobs=k' >= k, max_tokens=1)``; ``prompt_logprobs``
            a list of ``{id: Logprob}`` or a ``FlatLogprobs`` (``flat_logprobs=True``).
        input_ids, attention_mask, k, temperature: as :func:`parse_completions`.

    Returns:
        :class:`ServedTopK`, as :func:`parse_completions`.
    """
    k = _check_k(k)
    temperature = _check_temperature(temperature)
    spans = _spans(input_ids, attention_mask)
    outputs = list(outputs)
    if len(outputs) != len(spans):
        raise ValueError(f"{len(outputs)} outputs for {len(spans)} sequences")
    for b, (out, (_, tokens)) in enumerate(zip(outputs, spans, strict=True)):
        scored = getattr(out, "prompt_token_ids", None)
        if scored is not None and list(scored) != tokens:
            raise ValueError(f"generate sequence {b}: prompt_token_ids differ from the "
                             "sequence's real tokens")
    rows = [_row_offline(getattr(o, "prompt_logprobs", None)) for o in outputs]
    return _assemble(rows, spans, tuple(input_ids.shape), k, temperature, "generate")


def _raise_error_answer(answer: Mapping, k: int, status: int | None = None) -> None:
    """Raise the right error for a vLLM error answer (``{"error": {"message", "param"}}``)."""
    error = answer.get("error")
    message = error.get("message", "") if isinstance(error, Mapping) else str(error)
    param = error.get("param") if isinstance(error, Mapping) else None
    if "max allowed" in message and param in ("prompt_logprobs", "logprobs", None):
        raise ValueError(f"k={k} is more than the server's max_logprobs (start vllm serve "
                         f"with --max-logprobs {k} or more, or ask for a smaller k); the "
                         f"server said: {message}")
    raise ServedTeacherError(f"the server refused the batch (HTTP {status}): {message}")


# ---------------------------------------------------------------- HTTP and offline helpers

def served_topk(url: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *, k: int, model: str, temperature: float = 1.0,
                timeout: float = 120.0) -> ServedTopK:
    """Score a batch on a vLLM server and return the loss's top-k inputs (stdlib only).

    Args:
        url: the server's base URL (``http://127.0.0.1:8000``; ``/v1/completions`` is
            appended unless already there).
        input_ids, attention_mask, k, temperature: as :func:`parse_completions`.
        model: the served model's name.
        timeout: seconds to wait for the connection and for the answer.

    Returns:
        :class:`ServedTopK`, only once the whole answer has arrived and parsed.

    Raises:
        ValueError: ``k`` above the server's ``max_logprobs``, or a bad answer (see
            :func:`parse_completions`).
        ServedTeacherError: no complete answer (server down or killed mid-request,
            connection reset, timeout, truncated or non-JSON body, other HTTP errors).
            Nothing is returned, so a training step that scores first takes no step.
    """
    temperature = _check_temperature(temperature)
    body = completions_request(input_ids, attention_mask, k=k, model=model)
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/v1/completions"):
        endpoint += "/v1/completions"
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            decoded = json.loads(text)
        except ValueError:
            decoded = {"error": {"message": text}}
        _raise_error_answer(decoded if isinstance(decoded, Mapping) else {"error": text},
                            k, e.code)
    except (http.client.HTTPException, OSError) as e:  # URLError, resets, timeouts
        raise ServedTeacherError(f"no answer from {endpoint} for the batch of "
                                 f"{input_ids.shape[0]} sequences: {type(e).__name__}: {e} "
                                 "(the server died, is not running, or timed out; nothing "
                                 "was returned)") from e
    try:
        decoded = json.loads(raw)
    except ValueError as e:
        raise ServedTeacherError(f"{endpoint} sent {len(raw)} bytes that are not JSON "
                                 "(a truncated answer?); nothing was returned") from e
    return parse_completions(decoded, input_ids, attention_mask, k=k, temperature=temperature)


def llm_topk(llm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             k: int, temperature: float = 1.0) -> ServedTopK:
    """Score a batch with an offline ``vllm.LLM`` (imports ``vllm``) and parse it.

    Args:
        llm: a ``vllm.LLM``.
        input_ids, attention_mask, k, temperature: as :func:`parse_completions`.

    Returns:
        :class:`ServedTopK`, as :func:`parse_request_outputs`.

    Raises:
        ValueError: ``k`` above the engine's ``max_logprobs`` (checked before generating).
    """
    from vllm import SamplingParams  # only when used

    k = _check_k(k)
    temperature = _check_temperature(temperature)
    limit = llm.llm_engine.model_config.max_logprobs
    if limit != -1 and k > limit:
        raise ValueError(f"k={k} is more than the engine's max_logprobs={limit} (create the "
                         f"LLM with max_logprobs={k} or more)")
    spans = _spans(input_ids, attention_mask)
    prompts = [{"prompt_token_ids": tokens} for _, tokens in spans]
    params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1.0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return parse_request_outputs(outputs, input_ids, attention_mask, k=k,
                                 temperature=temperature)
