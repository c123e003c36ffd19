"""The engine: what runs generations on the invoker's instances, behind the one interface the
routes use (:class:`Engine`): submit a request, get the stream of its messages.

The engine is :class:`~invoker.engine.batching.BatchEngine`: continuous batching in every
instance, its iterations decided by :mod:`invoker.engine.scheduler` (FastServe's skip-join MLFQ,
FCFS, or run to completion, per function), over the packed forward pass and per-sequence KV
caches of :mod:`invoker.engine.kv`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from invoker.instances import LoadedInstance
from sllm.messages import GenerateRequest, StreamMessage


class Engine(Protocol):
    async def submit(self, instance: LoadedInstance, request: GenerateRequest
                     ) -> AsyncGenerator[StreamMessage, None]:
        """Start a generation of ``request`` on ``instance``; its messages, as they come.
        Closing the iterator early (the client went away) cancels the generation.

        Raises:
            SllmError: before the stream, for a request that cannot run (InvalidRequest,
                PromptTooLong: the prompt does not fit the model).
        """
        ...


__all__ = ["Engine", "StreamMessage"]
