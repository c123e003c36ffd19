"""Sampling parameters: how each next token is picked. Defined once here and used by the manifest
(a function's defaults), the native and OpenAI request models (what a call may override), the
gateway -> invoker wire message and the engine.

- :data:`MaxTokens`, :data:`Temperature`, :data:`TopP`, :data:`TopK`, :data:`Penalty`,
  :data:`RepetitionPenalty`, :data:`MinTokens`, :data:`Stop`, :data:`TopLogprobs`: the bounds,
  as annotated types;
- :class:`SamplingParams`: the complete set a generation runs with;
- :class:`SamplingOverrides`: what one request sets, unset fields taking the function's
  defaults (:meth:`SamplingOverrides.resolve`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

MAX_TOKENS_LIMIT = 32768
"""The most tokens one request may ask for (the context window may cut it shorter)."""

# strict: a bool or a string is refused, never read as a number (True is not 1 token)
MaxTokens = Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS_LIMIT)]
"""Tokens to generate at most, 1 to :data:`MAX_TOKENS_LIMIT`."""

Temperature = Annotated[float, Field(strict=True, ge=0.0, le=2.0, allow_inf_nan=False)]
"""Softmax temperature in [0, 2]; 0 is greedy decoding (argmax)."""

TopP = Annotated[float, Field(strict=True, gt=0.0, le=1.0, allow_inf_nan=False)]
"""Nucleus sampling mass in (0, 1]: sample among the most likely tokens whose probabilities add
up to at least this."""

Seed = Annotated[int, Field(strict=True)]
"""Any integer; the generator is seeded per token from it (64 bits of it count)."""

TopK = Annotated[int, Field(strict=True, ge=-1)]
"""Sample among the ``k`` most likely tokens; 0 or -1 turns it off (transformers' ``top_k``,
vLLM's -1)."""

Penalty = Annotated[float, Field(strict=True, ge=-2.0, le=2.0, allow_inf_nan=False)]
"""OpenAI's presence and frequency penalties, in [-2, 2]."""

RepetitionPenalty = Annotated[float, Field(strict=True, gt=0.0, le=10.0, allow_inf_nan=False)]
"""transformers' (CTRL's) repetition penalty, in (0, 10]; 1 is none."""

MinTokens = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS_LIMIT)]
"""Tokens to generate before an EOS may end the generation."""

MAX_STOPS = 4
"""Stop sequences one request may give (OpenAI's limit)."""

Stop = Annotated[tuple[Annotated[str, Field(min_length=1, max_length=256)], ...],
                 Field(max_length=MAX_STOPS)]
"""Up to :data:`MAX_STOPS` non-empty strings; the text ends before the first one generated."""


MAX_TOP_LOGPROBS = 20
"""The most alternatives a token's log probabilities may list (OpenAI's limit)."""

TopLogprobs = Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)]
"""How many of the most likely tokens to list beside each generated token's log probability."""


def _stops(v: Any) -> Any:
    """OpenAI's ``stop`` is a string or a list of strings (or null)."""
    return (v,) if isinstance(v, str) else tuple(v) if isinstance(v, list) else v


class SamplingParams(BaseModel):
    """How to pick each next token: what a generation runs with.

    Attributes:
        max_tokens: the most tokens to generate.
        temperature: 0 means greedy (argmax), ignoring ``top_p`` and ``seed``.
        top_p: nucleus sampling (see :data:`TopP`).
        seed: seeds the generation's own ``torch.Generator`` (never the global RNG), per token
            (``invoker.generation.token_seed``), so equal seeds give equal tokens on the same model
            and device, also across a migration; None draws a fresh seed.
        ignore_eos: keep generating past an EOS token (it is then an ordinary token), so the
            generation has exactly ``max_tokens`` tokens unless the context window ends it
            first; for benchmarks and tests that need a fixed output length (vLLM's
            ``ignore_eos``).
        top_k: sample among the ``top_k`` most likely tokens (0 or -1: all), before ``top_p``.
        repetition_penalty: every token of the prompt and of the output so far has its logit
            divided by it when positive, multiplied when negative (transformers'
            ``RepetitionPenaltyLogitsProcessor``); applies to greedy decoding too.
        presence_penalty, frequency_penalty: OpenAI's: each token's logit less
            ``frequency_penalty`` times its count in the output so far and ``presence_penalty``
            if it is there at all.
        min_tokens: no EOS before this many tokens (transformers'
            ``MinNewTokensLengthLogitsProcessor``).
        stop: the generation ends (``"stop"``) once its text holds one of these; the text ends
            before it.
        logprobs: None: no log probabilities; ``k``: each generated token comes with its log
            probability (natural log) and the ``k`` most likely tokens' at that position. They
            are the model's own distribution: the log-softmax of its logits before penalties,
            temperature, top-k and top-p (vLLM's default, ``raw_logprobs``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: MaxTokens
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    ignore_eos: StrictBool = False
    top_k: TopK = 0
    repetition_penalty: RepetitionPenalty = 1.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    min_tokens: MinTokens = 0
    stop: Stop = ()
    logprobs: TopLogprobs | None = None

    _stop_list = field_validator("stop", mode="before")(_stops)

    @property
    def penalised(self) -> bool:
        """Whether any logits processor applies (else the logits are sampled as they are)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0 or self.min_tokens > 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SamplingOverrides(BaseModel):
    """The sampling fields one request sets; None takes the function's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    ignore_eos: StrictBool = False
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    min_tokens: MinTokens | None = None
    stop: Stop | None = None
    logprobs: TopLogprobs | None = None

    _stop_list = field_validator("stop", mode="before")(_stops)

    def overrides(self, **update: Any) -> SamplingOverrides:
        """These fields alone (of a request model that inherits them and adds its own), with
        ``update`` instead of the fields it names (a request model that spells one otherwise,
        as OpenAI's chat spells ``logprobs``)."""
        fields = {name: getattr(self, name) for name in SamplingOverrides.model_fields}
        return SamplingOverrides(**{**fields, **update})

    def resolve(self, defaults: SamplingParams, *, seed: int | None = None) -> SamplingParams:
        """These overrides over ``defaults``; ``seed`` is used when the request set none (the
        gateway draws one, so that a generation resumed elsewhere samples as it would have)."""
        return SamplingParams(
            max_tokens=defaults.max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            seed=self.seed if self.seed is not None else seed if seed is not None else defaults.seed,
            ignore_eos=self.ignore_eos,
            **{name: getattr(self, name) if getattr(self, name) is not None
               else getattr(defaults, name)
               for name in ("top_k", "repetition_penalty", "presence_penalty",
                            "frequency_penalty", "min_tokens", "stop", "logprobs")},
        )
