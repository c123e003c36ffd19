"""The decode loop: one prompt in, a stream of generated tokens out.

A :class:`Generation` runs a prefill (one forward pass over the whole prompt, filling a
``DynamicCache``) and then one decode step per token (a forward pass over the last token only),
sampling each next token from the last position's logits. The state is explicit: the prompt
ids, the generated ids, the KV cache and the ids the cache has not seen yet; a generation could
be resumed elsewhere from ``prompt_ids + token_ids`` alone (the first step would then prefill all
of them).

Stopping, checked in this order:

- ``cancel`` set before a step -> ``"cancelled"``;
- an EOS token sampled -> ``"stop"`` (the EOS is neither yielded nor counted);
- ``max_tokens`` generated, or prompt + generated = ``context_window`` -> ``"length"``.

Text: each token's ``text`` is what the :class:`~invoker.detokenizer.IncrementalDetokenizer`
emits for it. A token whose text is still waiting for more bytes (``""`` with a held-back partial
character) is yielded one step late, once the next step shows whether the stream ends; if it
does, the detokenizer's flush is added to that token. So the ``text`` fields always join to
``tokenizer.decode(generated ids, skip_special_tokens=True)``. Tokens whose text is complete are
yielded at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from invoker.detokenizer import IncrementalDetokenizer
from invoker.instance import ModelInstance
from sllm.errors import InvalidRequest, PromptTooLong


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    Attributes:
        max_tokens: the most tokens to generate, >= 1.
        temperature: >= 0; 0 means greedy (argmax), ignoring ``top_p`` and ``seed``.
        top_p: nucleus sampling, in (0, 1]: sample among the most likely tokens whose
            probabilities add up to at least ``top_p``.
        seed: seeds this generation's own ``torch.Generator`` (never the global RNG), so equal
            seeds give equal tokens on the same model and device; None draws a fresh seed.

    Raises:
        InvalidRequest: a field is out of range (``param`` names it).
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidRequest("max_tokens must be an integer", param="max_tokens")
        if self.max_tokens < 1:
            raise InvalidRequest(
                f"max_tokens must be >= 1, not {self.max_tokens}", param="max_tokens"
            )
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise InvalidRequest(
                f"temperature must be a number >= 0, not {self.temperature!r}", param="temperature"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], not {self.top_p!r}", param="top_p")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise InvalidRequest("seed must be an integer", param="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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

    After exhaustion: ``finish_reason`` ("stop", "length" or "cancelled"), ``prompt_tokens``,
    ``completion_tokens``, ``prefill_seconds`` (the prefill forward pass and first sample) and
    ``decode_seconds`` (all later steps). Stopping the iteration early (closing the iterator)
    counts as "cancelled"; an exception from the model leaves ``finish_reason`` None.

    Args:
        instance: the loaded model.
        prompt_ids: the prompt's token ids, from :meth:`ModelInstance.encode`.
        params: sampling parameters.
        cancel: checked before each step; once set, the generation ends with "cancelled".

    Raises:
        InvalidRequest: empty ``prompt_ids``.
        PromptTooLong: the prompt leaves no room in the context window.
    """

    def __init__(
        self,
        instance: ModelInstance,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
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
        self.token_ids: list[int] = []  # generated so far, EOS excluded
        self.limit = min(params.max_tokens, instance.context_window - len(self.prompt_ids))
        self._cancel = cancel or threading.Event()
        self._generator = torch.Generator(device=instance.device)
        if params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(params.seed)
        self._cache = DynamicCache(config=instance.model.config)
        self._uncached: list[int] = list(self.prompt_ids)  # ids the cache has not seen yet
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
        model = self.instance.model
        input_ids = torch.tensor([self._uncached], dtype=torch.long, device=self.instance.device)
        extra = {"logits_to_keep": 1} if self.instance.accepts_logits_to_keep else {}
        with torch.inference_mode():
            out = model(input_ids=input_ids, past_key_values=self._cache, use_cache=True, **extra)
            token = sample(out.logits[0, -1], self.params, self._generator)
        self._cache = out.past_key_values
        return token

    def __iter__(self) -> Iterator[GeneratedToken]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        detokenizer = IncrementalDetokenizer(self.instance.tokenizer)
        held: GeneratedToken | None = None  # a token whose text waits for more bytes
        try:
            while True:
                if self._cancel.is_set():
                    self.finish_reason = "cancelled"
                    break
                prefill = not self.token_ids  # every step but an EOS one adds a token
                started = time.perf_counter()
                token = self.step()
                elapsed = time.perf_counter() - started
                if prefill:
                    self.prefill_seconds = elapsed
                else:
                    self.decode_seconds += elapsed
                if token in self.instance.eos_token_ids:
                    self.finish_reason = "stop"
                    break
                if held is not None:
                    yield held
                    held = None
                self.token_ids.append(token)
                self.completion_tokens = len(self.token_ids)
                self._uncached = [token]
                generated = GeneratedToken(token, detokenizer.push(token), len(self.token_ids) - 1)
                if len(self.token_ids) >= self.limit:
                    self.finish_reason = "length"
                    held = generated
                    break
                if detokenizer.pending:
                    held = generated
                else:
                    yield generated
            if held is not None:
                yield GeneratedToken(held.token_id, held.text + detokenizer.flush(), held.index)
        except GeneratorExit:  # the consumer stopped iterating
            self.finish_reason = self.finish_reason or "cancelled"
            raise
