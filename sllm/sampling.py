"""Sampling parameters: how each next token is picked. Defined once here and used by the manifest
(a function's defaults), the native and OpenAI request models (what a call may override), the
gateway -> invoker wire message and the engine.

- :data:`MaxTokens`, :data:`Temperature`, :data:`TopP`: the bounds, as annotated types;
- :class:`SamplingParams`: the complete set a generation runs with;
- :class:`SamplingOverrides`: what one request sets, unset fields taking the function's
  defaults (:meth:`SamplingOverrides.resolve`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool

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
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: MaxTokens
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    ignore_eos: StrictBool = False

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

    def overrides(self) -> SamplingOverrides:
        """These fields alone (of a request model that inherits them and adds its own)."""
        return SamplingOverrides(**{name: getattr(self, name)
                                    for name in SamplingOverrides.model_fields})

    def resolve(self, defaults: SamplingParams, *, seed: int | None = None) -> SamplingParams:
        """These overrides over ``defaults``; ``seed`` is used when the request set none (the
        gateway draws one, so that a generation resumed elsewhere samples as it would have)."""
        return SamplingParams(
            max_tokens=defaults.max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            seed=self.seed if self.seed is not None else seed if seed is not None else defaults.seed,
            ignore_eos=self.ignore_eos,
        )
