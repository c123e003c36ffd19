"""The serial engine: one generation at a time per instance, each to completion (run to
completion: the baseline the FastServe issue measures continuous batching against).

Each generation runs in a worker thread (:class:`~invoker.generation.Generation`: a prefill,
then one decode step per token) once it holds its instance's lock; its messages cross to the
event loop through a queue. A generation waiting for the lock that is handed over meanwhile (a
migration or an unload, :class:`~invoker.migration.Run`) leaves at once with nothing to stop,
and none starts while its instance migrates away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator

from invoker.generation import Generation, Resume
from invoker.instances import LoadedInstance
from invoker.migration import Run, Sessions, Target
from sllm.errors import InstanceNotFound, InternalError, SllmError
from sllm.messages import (
    DoneMessage,
    ErrorBody,
    ErrorMessage,
    GenerateRequest,
    MigratedMessage,
    StreamMessage,
    TokenMessage,
)
from sllm.sampling import SamplingParams

log = logging.getLogger(__name__)

LOCK_POLL_S = 0.05
"""Seconds between two checks of a generation waiting for its instance: whether it was handed
over (a migration or an unload) meanwhile."""


class SerialEngine:
    """Runs each instance's generations one after another.

    Args:
        sessions: the KV caches prepared for generations migrating here (a resumed request
            names its session).
    """

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    async def submit(self, instance: LoadedInstance, request: GenerateRequest
                     ) -> AsyncGenerator[StreamMessage, None]:
        """See :meth:`invoker.engine.Engine.submit`."""
        given = request.input
        messages = [m.model_dump() for m in given.messages] if given.messages is not None else None
        prompt_ids = await asyncio.to_thread(
            instance.instance.encode, prompt=given.prompt, messages=messages, raw=given.raw
        )
        resume = None
        if request.resume is not None:
            cache, cached = (None, 0)
            if request.resume.session is not None:
                cache, cached = self._sessions.take(request.resume.session, instance.instance_id,
                                                    [*prompt_ids, *request.resume.token_ids])
            resume = Resume(request.resume.token_ids, request.resume.emitted, cache, cached)
        loop = asyncio.get_running_loop()
        run = Run(prompt_ids, loop)
        if instance.moving is not None:  # assigned before the migration began: follow the others
            run.hand_over(Target(instance.moving.to_url, instance.moving.to_instance))
        instance.runs[run.id] = run
        queue: asyncio.Queue[StreamMessage | None] = asyncio.Queue()
        cancel = threading.Event()
        worker = loop.run_in_executor(None, _run_generation, instance, run, request.sampling,
                                      resume, cancel, loop, queue)
        return _stream(instance, run, queue, cancel, worker)


async def _stream(instance: LoadedInstance, run: Run, queue: asyncio.Queue[StreamMessage | None],
                  cancel: threading.Event, worker: asyncio.Future[None]
                  ) -> AsyncGenerator[StreamMessage, None]:
    try:
        while (msg := await queue.get()) is not None:
            yield msg
    finally:
        cancel.set()  # the client went away, or we are done: stop the worker
        instance.runs.pop(run.id, None)
        worker.add_done_callback(lambda f: f.exception())


def _run_generation(
    inst: LoadedInstance, run: Run, params: SamplingParams, resume: Resume | None,
    cancel: threading.Event, loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[StreamMessage | None],
) -> None:
    """Worker thread: run one generation and post its messages to ``queue`` (None at the end)."""
    def post(msg: StreamMessage | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, msg)

    reason = "error"
    try:
        # waiting for the instance (another generation runs on it): one handed over meanwhile
        # leaves at once, with nothing to stop; none starts while the instance migrates away
        acquired = False
        while not run.handed_over:
            if inst.lock.acquire(timeout=LOCK_POLL_S):
                if inst.moving is None or run.handed_over:
                    acquired = True
                    break
                inst.lock.release()
                time.sleep(LOCK_POLL_S)
        with contextlib.ExitStack() as held:
            if acquired:
                held.callback(inst.lock.release)
            if run.handed_over:
                reason = "migrated"
                moved = list(resume.token_ids) if resume is not None else []
                post(_migrated(run, moved, 0.0, 0.0))
                return
            if inst.closed:
                raise InstanceNotFound(f"instance {inst.instance_id!r} was unloaded")
            gen = Generation(inst.instance, run.prompt_ids, params, cancel=cancel,
                             handoff=run.handoff, resume=resume)
            run.generation = gen
            for tok in gen:
                post(TokenMessage(index=tok.index, token_id=tok.token_id, text=tok.text))
            reason = gen.finish_reason or "stop"
            if reason == "migrated":
                post(_migrated(run, gen.token_ids, gen.prefill_seconds, gen.decode_seconds))
                return
            post(DoneMessage(
                finish_reason=reason, prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens, prefill_seconds=gen.prefill_seconds,
                decode_seconds=gen.decode_seconds,
            ))
    except SllmError as e:
        post(ErrorMessage(error=ErrorBody(**e.to_body()["error"])))
    except Exception as e:  # a bug or a torch failure: report it in the stream, never hang
        log.exception("generation failed")
        err = InternalError(f"generation failed: {type(e).__name__}: {e}")
        post(ErrorMessage(error=ErrorBody(**err.to_body()["error"])))
    finally:
        run.end(reason)
        post(None)


def _migrated(run: Run, token_ids: list[int], prefill_s: float, decode_s: float) -> MigratedMessage:
    target = run.target or Target(reason="preempted")
    return MigratedMessage(
        token_ids=list(token_ids), prompt_tokens=len(run.prompt_ids), prefill_seconds=prefill_s,
        decode_seconds=decode_s, invoker_url=target.invoker_url, instance_id=target.instance_id,
        session=target.session, reason=target.reason,
    )
