"""Sampling and the migration destination's prefill; the decode loop itself is the batching
engine's (:mod:`invoker.engine.batching`, which also states the stopping rules and how a
token's text reaches the stream).

- :func:`sample` picks the next token from one position's logits (greedy at temperature 0,
  else temperature and top_p), drawing from the generator it is given. The engine seeds that
  generator per token, from ``(seed, token index)`` by :func:`token_seed`: a seeded sequence
  draws the same tokens alone or batched, here or after a migration.
- :func:`extend_cache` is the prefill a live migration's destination runs ahead of the moved
  sequence (ServerlessLLM §5, :class:`invoker.migration.Sessions`): one forward pass over new
  ids after a ``DynamicCache``, in rounds while the source still generates; the resumed
  sequence then takes the cache (``InstanceEngine.open``'s ``prepared``) and recomputes only
  what it lacks. The continuation is the one the source would have produced: greedy decoding
  depends only on the ids, and a seeded draw only on the seed and the token's index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from invoker.instance import ModelInstance
from sllm.errors import InvalidRequest
from sllm.sampling import SamplingParams

_MASK64 = (1 << 64) - 1


def token_seed(seed: int, index: int) -> int:
    """The generator seed for sampling generated token ``index`` (0-based) of a request seeded
    with ``seed``: splitmix64 of the pair, so neighbouring indexes get unrelated streams.

    Returns:
        An integer in [0, 2**63).
    """
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def extend_cache(instance: ModelInstance, cache: DynamicCache | None, ids: Sequence[int]
                 ) -> DynamicCache:
    """Prefill: run the model over ``ids`` after the positions ``cache`` already holds, and
    return the cache extended by ``len(ids)`` positions (blocking; the caller holds the
    instance). Used by a migration's destination to recompute the KV cache (ServerlessLLM §5).

    Args:
        instance: the loaded model.
        cache: the cache so far (None: empty).
        ids: token ids, at least one.

    Raises:
        InvalidRequest: ``ids`` is empty or overflows the context window.
    """
    if cache is None:
        cache = DynamicCache(config=instance.model.config)
    if not ids:
        raise InvalidRequest("no tokens to prefill")
    if cache.get_seq_length() + len(ids) > instance.context_window:
        raise InvalidRequest("the tokens overflow the context window")
    with torch.inference_mode():
        return _forward(instance, cache, ids).cache


def _forward(instance: ModelInstance, cache: DynamicCache, ids: Sequence[int]) -> Any:
    """One forward pass over ``ids`` after ``cache``, computing the logits of the last position
    only where the model allows it; call under ``torch.inference_mode()``. Returns the model's
    output (``logits`` of shape (1, n, vocab), ``cache``: the KV cache extended by ``len(ids)``
    positions; transformers >= 5.24 names the argument and the field ``cache``, where earlier
    releases said ``past_key_values``)."""
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=instance.device)
    extra = {"logits_to_keep": 1} if instance.accepts_logits_to_keep else {}
    return instance.model(input_ids=input_ids, cache=cache, use_cache=True, **extra)


def penalise(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
             token_ids: Sequence[int], eos_ids: Iterable[int]) -> torch.Tensor:
    """The logits after the request's processors, in transformers' order: the repetition
    penalty over prompt + output (``RepetitionPenaltyLogitsProcessor``), OpenAI's presence and
    frequency penalties over the output, no EOS before ``min_tokens``
    (``MinNewTokensLengthLogitsProcessor``).

    Args:
        logits: shape (vocab,), one position's.
        token_ids: the tokens generated so far (moved ones included), EOS never among them.

    Returns:
        A new float32 tensor of shape (vocab,) (``logits`` itself when nothing applies).
    """
    if not params.penalised:
        return logits
    out = logits.float().clone()
    vocab = out.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*prompt_ids, *token_ids}), dtype=torch.long,
                            device=out.device)
        seen = seen[seen < vocab]
        score = out[seen]
        out[seen] = torch.where(score < 0, score * params.repetition_penalty,
                                score / params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and token_ids:
        counts = torch.bincount(torch.tensor(list(token_ids), dtype=torch.long,
                                             device=out.device), minlength=vocab)[:vocab]
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    if len(token_ids) < params.min_tokens:
        eos = [i for i in eos_ids if i < vocab]
        if eos:
            out[eos] = -float("inf")
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from one position's logits (after :func:`penalise`).

    Args:
        logits: shape (vocab,), any float dtype, on the generator's device.
        params: temperature, top_k and top_p, applied in that order as transformers' warpers
            are (greedy when temperature is 0).
        generator: the source of randomness (unused when greedy).

    Returns:
        The token id.
    """
    if params.greedy:
        return int(torch.argmax(logits).item())
    scaled = logits.float() / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -float("inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep a token when the mass before it is still below top_p (so the first is always kept)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        sorted_probs[drop] = 0.0
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())