"""Driving one instance's batching engine (:class:`invoker.engine.batching.InstanceEngine`)
from a test: an engine for the duration of a ``with``, one sequence's stream collected, and the
same synchronously (a fresh event loop) for fixtures and plain tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from invoker.engine.batching import InstanceEngine
from invoker.instance import ModelInstance
from sllm.manifest import Scheduling
from sllm.messages import DoneMessage, MigratedMessage, StreamMessage, TokenMessage
from sllm.sampling import SamplingParams

BUDGET = 64 << 20
"""Bytes of KV cache an engine here may use (plenty for the tiny models)."""


@contextlib.contextmanager
def engine(instance: ModelInstance, budget: int = BUDGET, *,
           moving: Callable[[], bool] = lambda: False, **scheduling: Any
           ) -> Iterator[InstanceEngine]:
    """An engine over ``instance`` (``scheduling``: :class:`Scheduling`'s fields), closed at the
    end."""
    eng = InstanceEngine(instance, "test", Scheduling(**scheduling), budget, moving=moving)
    try:
        yield eng
    finally:
        eng.close()


@dataclass
class Generated:
    """One sequence's stream, to its end."""

    messages: list[StreamMessage]

    def __post_init__(self) -> None:
        first = self.tokens[0].index if self.tokens else 0
        assert [t.index for t in self.tokens] == list(range(first, first + len(self.tokens)))

    @property
    def tokens(self) -> list[TokenMessage]:
        return [m for m in self.messages if isinstance(m, TokenMessage)]

    @property
    def ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    @property
    def done(self) -> DoneMessage:
        """The stream's DoneMessage (it must end with one)."""
        last = self.messages[-1]
        assert isinstance(last, DoneMessage), last
        return last

    @property
    def migrated(self) -> MigratedMessage:
        """The stream's MigratedMessage (it must end with one)."""
        last = self.messages[-1]
        assert isinstance(last, MigratedMessage), last
        return last

    @property
    def finish_reason(self) -> str:
        """The DoneMessage's reason, or "migrated"."""
        return "migrated" if isinstance(self.messages[-1], MigratedMessage) else \
            self.done.finish_reason


async def collect(stream: AsyncGenerator[StreamMessage, None]) -> Generated:
    """Every message of ``stream``."""
    return Generated([m async for m in stream])


async def generate(eng: InstanceEngine, prompt_ids: list[int], params: SamplingParams,
                   **resume: Any) -> Generated:
    """One sequence through ``eng`` (``resume``: ``open``'s ``resumed``, ``emitted`` and
    ``prepared``), collected; call on the event loop."""
    _, stream = eng.open(prompt_ids, params, **resume)
    return await collect(stream)


def generate_alone(instance: ModelInstance, prompt_ids: list[int], params: SamplingParams,
                   **resume: Any) -> Generated:
    """Blocking: :func:`generate` on an engine of its own, in an event loop of its own (for
    fixtures and tests outside the event loop)."""
    with engine(instance) as eng:
        return asyncio.run(generate(eng, prompt_ids, params, **resume))
