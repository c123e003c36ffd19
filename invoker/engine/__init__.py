"""The engine: what runs generations on the invoker's instances, behind the one interface the
routes use (:class:`Engine`): submit a request, get the stream of its messages.

The engine is :class:`~invoker.engine.batching.BatchEngine`: continuous batching in every
instance, its iterations decided by :mod:`invoker.engine.scheduler` (FastServe's skip-join MLFQ,
FCFS, or run to completion, per function), over the packed forward pass and per-sequence KV
caches of :mod:`invoker.engine.kv`.
"""

from __future__ import annotations

from typing import Protocol

from invoker.instances import LoadedInstance
from sllm.messages import GenerateRequest, StreamMessage


class MessageStream(Protocol):
    """A generation's messages (an async iterator); closing it early (the client went away)
    cancels it."""

    def __aiter__(self) -> MessageStream: ...

    async def __anext__(self) -> StreamMessage: ...

    async def aclose(self) -> None: ...


class Engine(Protocol):
    async def submit(self, instance: LoadedInstance, request: GenerateRequest) -> MessageStream:
        """Start a generation of ``request`` on ``instance``; its messages, as they come.
        Closing the stream early, read or not (the client went away), cancels the generation.

        Raises:
            SllmError: before the stream, for a request that cannot run (InvalidRequest,
                PromptTooLong: the prompt does not fit the model).
        """
        ...


__all__ = ["Engine", "MessageStream", "StreamMessage"]
