"""The decode loop: one prompt in, a stream of generated tokens out.

A :class:`Generation` runs a prefill (one forward pass over the whole prompt, filling a
``DynamicCache``) and then one decode step per token (a forward pass over the last token only),
sampling each next token from the last position's logits. The state is explicit: the prompt
ids, the generated ids, the KV cache and the ids the cache has not seen yet; a generation could
be resumed elsewhere from ``prompt_ids + token_ids`` alone (the first step would then prefill all
of them).

Stopping, checked before each step in this order:

- ``max_tokens`` generated, or prompt + generated = ``context_window`` -> ``"length"``;
- ``cancel`` set -> ``"cancelled"``;
- ``handoff`` set -> ``"migrated"``: the generation stops at a token boundary so that another
  instance can go on from its tokens (live migration, ServerlessLLM §5); a token whose text was
  held back is not yielded (the destination yields it);
- an EOS token sampled -> ``"stop"`` (the EOS is neither yielded nor counted).

Moving a generation (:class:`Resume`): a generation built with the tokens an earlier one
generated (and, optionally, a KV cache already computed over a prefix of prompt + tokens, by
:func:`extend_cache`) first yields the tokens the client has not received yet, without any
forward pass, then recomputes the KV cache of whatever the cache lacks in one prefill and goes on
decoding. With greedy decoding the continuation is the one the first generation would have
produced; with sampling, each token is drawn from a generator seeded by ``(seed, token index)``
(:func:`token_seed`), so it does not depend on where the earlier tokens were generated either.

Text: each token's ``text`` is what the :class:`~invoker.detokenizer.IncrementalDetokenizer`
emits for it. A token whose text is still waiting for more bytes (``""`` with a held-back partial
character) is yielded one step late, once the next step shows whether the stream ends; if it
does, the detokenizer's flush is added to that token. So the ``text`` fields always join to
``tokenizer.decode(generated ids, skip_special_tokens=True)``. Tokens whose text is complete are
yielded at once.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from invoker.detokenizer import IncrementalDetokenizer
from invoker.instance import ModelInstance
from sllm.errors import InvalidRequest, PromptTooLong
from sllm.sampling import SamplingParams


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token.

    Attributes:
        token_id: the token.
        text: the text this token completes; "" while a multi-byte character is incomplete.
        index: 0-based position among the generated tokens.
    """

    token_id: int
    text: str
    index: int


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


@dataclass
class Resume:
    """Where a moved generation picks up.

    Attributes:
        token_ids: the tokens generated before the move (EOS never among them).
        emitted: how many of them the client has received; the rest are yielded again first.
        cache: a KV cache computed over the first ``cached`` ids of prompt + ``token_ids``
            (by :func:`extend_cache` during a live migration), or None to recompute all.
        cached: positions ``cache`` covers; fewer than prompt + ``token_ids`` (the first step
            feeds the ids after them).
    """

    token_ids: Sequence[int]
    emitted: int
    cache: DynamicCache | None = None
    cached: int = 0


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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from one position's logits.

    Args:
        logits: shape (vocab,), any float dtype, on the generator's device.
        params: temperature and top_p (greedy when temperature is 0).
        generator: the source of randomness (unused when greedy).

    Returns:
        The token id.
    """
    if params.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep a token when the mass before it is still below top_p (so the first is always kept)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        sorted_probs[drop] = 0.0
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


class Generation:
    """Generates tokens for one prompt. A blocking iterator, meant to run in a thread; iterate
    it once. One instance can serve several generations one after another.

    After exhaustion: ``finish_reason`` ("stop", "length", "cancelled" or "migrated"),
    ``prompt_tokens``, ``completion_tokens`` (resumed tokens included), ``prefill_seconds`` (the
    first forward pass, over every id the cache lacks, and its sample) and ``decode_seconds``
    (all later steps). Stopping the iteration early (closing the iterator) counts as
    "cancelled"; an exception from the model leaves ``finish_reason`` None. ``token_ids`` may be
    read from another thread while it runs (a migration's source does).

    Args:
        instance: the loaded model.
        prompt_ids: the prompt's token ids, from :meth:`ModelInstance.encode`.
        params: sampling parameters.
        cancel: checked before each step; once set, the generation ends with "cancelled".
        handoff: checked before each step; once set, the generation ends with "migrated".
        resume: go on from a generation moved here (see :class:`Resume`).

    Raises:
        InvalidRequest: empty ``prompt_ids``; a ``resume`` whose ``emitted`` or cache does not
            fit its tokens.
        PromptTooLong: the prompt leaves no room in the context window.
    """

    def __init__(
        self,
        instance: ModelInstance,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        handoff: threading.Event | None = None,
        resume: Resume | None = None,
    ) -> None:
        if not prompt_ids:
            raise InvalidRequest("the prompt has no tokens", param="prompt")
        if len(prompt_ids) >= instance.context_window:
            raise PromptTooLong(
                f"the prompt has {len(prompt_ids)} tokens; the context window is "
                f"{instance.context_window}",
                param="prompt",
            )
        self.instance = instance
        self.params = params
        self.prompt_ids: tuple[int, ...] = tuple(int(t) for t in prompt_ids)
        self.limit = min(params.max_tokens, instance.context_window - len(self.prompt_ids))
        self._cancel = cancel or threading.Event()
        self._handoff = handoff or threading.Event()
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator(device=instance.device)
        resume = resume or Resume(token_ids=(), emitted=0)
        # generated so far, EOS excluded (a resumed generation starts with the moved tokens)
        self.token_ids: list[int] = [int(t) for t in resume.token_ids]
        if not 0 <= resume.emitted <= len(self.token_ids):
            raise InvalidRequest(f"emitted must be in [0, {len(self.token_ids)}]", param="resume")
        self._emitted = resume.emitted
        full = [*self.prompt_ids, *self.token_ids]
        if len(full) > instance.context_window:
            raise InvalidRequest("the moved tokens overflow the context window", param="resume")
        self._cache = resume.cache if resume.cache is not None else DynamicCache(
            config=instance.model.config)
        cached = resume.cached if resume.cache is not None else 0
        # the next step needs an input, so a prepared cache leaves at least the last id out
        if not 0 <= cached < len(full) or self._cache.get_seq_length() != cached:
            raise InvalidRequest("the moved KV cache does not fit the tokens", param="resume")
        self._uncached: list[int] = full[cached:]  # ids the cache has not seen yet
        self._started = False

        self.finish_reason: str | None = None
        self.prompt_tokens = len(self.prompt_ids)
        self.completion_tokens = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0

    def step(self) -> int:
        """Run one forward pass over the uncached ids and sample the next token.

        Returns:
            The sampled token id (possibly EOS). It is not yet in the cache: the next step
            feeds it.
        """
        if not self.params.greedy:
            self._generator.manual_seed(token_seed(self.seed, len(self.token_ids)))
        with torch.inference_mode():
            out = _forward(self.instance, self._cache, self._uncached)
            token = sample(out.logits[0, -1], self.params, self._generator)
        self._cache = out.cache
        return token

    def __iter__(self) -> Iterator[GeneratedToken]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        # a resumed generation: the tokens the client has are pushed through a fresh
        # detokenizer, which leaves it exactly as the first generation's was (a token delivered
        # with "" because its character was incomplete still waits for its bytes); the rest are
        # yielded again
        detokenizer = IncrementalDetokenizer(self.instance.tokenizer)
        for token in self.token_ids[: self._emitted]:
            detokenizer.push(token)
        held: GeneratedToken | None = None  # a token whose text waits for more bytes
        steps = 0
        try:
            for index in range(self._emitted, len(self.token_ids)):
                token = self.token_ids[index]
                out = GeneratedToken(token, detokenizer.push(token), index)
                if held is not None:
                    yield held
                    held = None
                if detokenizer.pending:
                    held = out
                else:
                    yield out
            self.completion_tokens = len(self.token_ids)
            while True:
                if len(self.token_ids) >= self.limit:
                    self.finish_reason = "length"
                    break
                if self._cancel.is_set():
                    self.finish_reason = "cancelled"
                    break
                if self._handoff.is_set():
                    self.finish_reason = "migrated"
                    return  # a held token is the destination's to yield
                started = time.perf_counter()
                token = self.step()
                elapsed = time.perf_counter() - started
                if steps == 0:
                    self.prefill_seconds = elapsed
                else:
                    self.decode_seconds += elapsed
                steps += 1
                if token in self.instance.eos_token_ids and not self.params.ignore_eos:
                    self.finish_reason = "stop"
                    break
                if held is not None:
                    yield held
                    held = None
                self.token_ids.append(token)
                self.completion_tokens = len(self.token_ids)
                self._uncached = [token]
                generated = GeneratedToken(token, detokenizer.push(token), len(self.token_ids) - 1)
                if detokenizer.pending:
                    held = generated
                else:
                    yield generated
            if held is not None:
                yield GeneratedToken(held.token_id, held.text + detokenizer.flush(), held.index)
        except GeneratorExit:  # the consumer stopped iterating
            self.finish_reason = self.finish_reason or "cancelled"
            raise
