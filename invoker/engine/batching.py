"""The batching engine: continuous batching with iteration-level scheduling inside each
instance (Orca's iteration-level scheduling; FastServe's skip-join MLFQ, Wu et al., arXiv
2305.05920, as one of the scheduler's policies).

Each loaded instance gets one :class:`InstanceEngine`: a thread that loops over iterations.
Every iteration

1. takes in the sequences submitted since the last one, and lets go of those that ended
   (length, a cancelled client, a handoff to another instance);
2. asks the scheduler (:class:`~invoker.engine.scheduler.Scheduler`, pure) which sequences run
   and how many positions of each: prefill chunks of new or resumed sequences together with
   the decodes of running ones, under the token budget, the batch size and the KV budget;
3. runs one forward pass over all of them packed into one row
   (:func:`~invoker.engine.kv.forward_packed`), each sequence attending to its own KV cache;
4. samples the next token of each sequence whose chunk reached its last known id, with the
   sequence's own parameters (its penalties and ``min_tokens``,
   :func:`invoker.generation.penalise`, then temperature, top-k and top-p) and generator (seeded per token, as
   :func:`invoker.generation.token_seed` says, so a seeded sequence draws the same tokens alone
   or batched, here or after a migration), and hands it to the sequence's stream (with its log
   probability and the most likely alternatives', from the raw logits, when the request asks).

Sequences join and leave between iterations. A sequence the scheduler does not choose waits
with its KV cache (preempted at an iteration boundary), unless the KV budget needs its memory:
then it recomputes its cache when it runs again.

A sequence stops, in this order of precedence: ``max_tokens`` generated, or prompt + generated
filling the context window -> ``"length"``; its client gone (the stream closed) ->
``"cancelled"``; a handoff -> a :class:`~sllm.messages.MigratedMessage`; an EOS sampled, or
its text reaching one of its ``stop`` strings (:mod:`invoker.stops`: the text ends before it) ->
``"stop"``. The first three are checked at each iteration boundary (length also as soon as a
token is sampled), EOS when it is sampled; the EOS is neither sent nor counted, unless the
request sets ``ignore_eos`` (then it is sent and counted like any other token, and stops
nothing).

Each token's text is what the :class:`~invoker.detokenizer.IncrementalDetokenizer` emits for it.
A token whose character is still incomplete (its text ``""`` with bytes held back) is sent one
step late, once the next step shows whether the stream ends; where it ends, the detokenizer's
flush is appended to that token's text, so the texts join to ``tokenizer.decode(token ids,
skip_special_tokens=True)``. A resumed sequence first sends again the tokens the client has not
received (from ``emitted`` on), with no forward pass, its detokenizer primed with the others.

A handoff (live migration, :mod:`invoker.migration`, or an unload) ends the sequence's stream
with a :class:`~sllm.messages.MigratedMessage` carrying every token generated; a token held back
for its character is not sent (the destination sends it). A migration rebuilds the sequence's
cache on the destination, where the resumed sequence takes the prepared cache
(:meth:`invoker.migration.Sessions.take`). While its instance migrates away, sequences that have
not started stay held (they are handed over right after the running ones).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from invoker.detokenizer import IncrementalDetokenizer
from invoker.engine.kv import (
    PackedBatch,
    SequenceKV,
    enable,
    forward_packed,
)
from invoker.engine.scheduler import Scheduler, Step
from invoker.generation import penalise, sample, token_seed
from invoker.instance import ModelInstance
from invoker.instances import LoadedInstance
from invoker.migration import Run, Sessions, Target
from invoker.stops import StopMatcher
from sllm.errors import InstanceNotFound, InternalError, InvalidRequest, PromptTooLong, SllmError
from sllm.manifest import Scheduling
from sllm.messages import (
    DoneMessage,
    ErrorBody,
    ErrorMessage,
    GenerateRequest,
    MigratedMessage,
    StreamMessage,
    TokenLogprob,
    TokenLogprobs,
    TokenMessage,
)
from sllm.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class EngineCounters:
    """What one instance's engine has done (for ``/metrics``; tokens are positions computed or
    tokens sampled)."""

    iterations: int = 0
    iteration_seconds: float = 0.0
    prompt_tokens: int = 0  # positions prefilled (a recompute counts again)
    generation_tokens: int = 0  # tokens sampled
    finished: int = 0
    cancelled: int = 0
    shared_tokens: int = 0  # prompt positions copied from a sibling instead of computed


class Sequence:
    """One generation inside an instance's engine: its ids, its KV cache, its stream.

    Attributes:
        prompt_ids, token_ids: the prompt and the tokens generated so far (resumed ones
            included; EOS never among them); read by a migration's source (:class:`Run`).
    """

    def __init__(self, run: Run, prompt_ids: Sequence_[int], params: SamplingParams, limit: int,
                 kv: SequenceKV, post: _Post, resumed: list[int], emitted: int,
                 arrived: float, tokenizer: Any,
                 resumed_logprobs: Sequence_[TokenLogprobs] | None = None) -> None:
        self.run = run
        self.tokenizer = tokenizer
        self.prompt_ids = tuple(prompt_ids)
        self.prompt_key = hash(self.prompt_ids)  # once: a long prompt's hash is not cheap
        self.params = params
        self.limit = limit  # tokens it may generate (max_tokens, or what the context leaves)
        self.kv = kv
        self.post = post
        self.token_ids: list[int] = list(resumed)
        # one per token when the request asks for log probabilities (else None)
        self.logprobs: list[TokenLogprobs] | None = (
            None if params.logprobs is None else list(resumed_logprobs or ()))
        self.emitted = emitted
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=kv.device)
        self.cancel = threading.Event()
        self.arrived = arrived
        self.started_at: float | None = None
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.sampled = 0  # tokens sampled here
        self.detokenizer: IncrementalDetokenizer | None = None
        self.stops = StopMatcher(params.stop) if params.stop else None
        self.stopped = False  # a stop string ended it (found among resumed tokens)
        self.held: TokenMessage | None = None  # a token whose text waits for more

    def ids(self, start: int, n: int) -> list[int]:
        """Ids ``[start, start + n)`` of prompt + generated."""
        p = len(self.prompt_ids)
        full = self.prompt_ids[start:start + n] if start < p else ()
        return [*full, *self.token_ids[max(0, start - p):max(0, start + n - p)]]

    def emit(self, token: int, index: int) -> bool:
        """Hand a token to the stream: one step late while its text is incomplete (a partial
        character, or a tail that may begin a stop string). Returns whether a stop string ended
        the text (the token is sent with the text before it)."""
        assert self.detokenizer is not None
        text = self.detokenizer.push(token)
        hit = False
        if self.stops is not None:
            text, hit = self.stops.push(text)
        msg = TokenMessage(index=index, token_id=token, text=text,
                           logprobs=None if self.logprobs is None else self.logprobs[index])
        if self.held is not None:
            self.post(self.held)
            self.held = None
        if hit:
            self.post(msg)
        elif self.detokenizer.pending or (self.stops is not None and self.stops.held):
            self.held = msg
        else:
            self.post(msg)
        return hit

    def tail(self) -> str:
        """The text held back, once the stream ends for another reason than a stop string."""
        assert self.detokenizer is not None
        text = self.detokenizer.flush()
        if self.stops is None:
            return text
        text, hit = self.stops.push(text)
        return text if hit else text + self.stops.flush()

    def start(self) -> None:
        """Replay the resumed tokens: those the client has go through the detokenizer, the
        rest are sent again."""
        self.detokenizer = IncrementalDetokenizer(self.tokenizer)
        for token in self.token_ids[: self.emitted]:
            text = self.detokenizer.push(token)
            if self.stops is not None:
                self.stops.push(text)
        for index in range(self.emitted, len(self.token_ids)):
            if self.emit(self.token_ids[index], index):
                self.stopped = True
                return


class _Post:
    """Posts a sequence's messages to its asyncio queue from the engine's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 queue: asyncio.Queue[StreamMessage | None]) -> None:
        self._loop = loop
        self._queue = queue

    def __call__(self, msg: StreamMessage | None) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, msg)


class InstanceEngine:
    """The iteration loop of one loaded instance (module docstring).

    Args:
        instance: the loaded model.
        name: the instance's id (for errors and the thread's name).
        scheduling: its function's scheduling.
        kv_budget_bytes: what its KV caches may take.
        moving: whether the instance migrates away now (sequences not started then wait).
    """

    def __init__(self, instance: ModelInstance, name: str, scheduling: Scheduling,
                 kv_budget_bytes: int, moving: Callable[[], bool] = lambda: False) -> None:
        self.instance = instance
        self.name = name
        self._moving = moving
        enable(instance.model)
        self._shape = instance.kv_shape
        self.kv_budget_bytes = kv_budget_bytes
        self.scheduler = Scheduler(scheduling,
                                   max(0, kv_budget_bytes) // instance.kv_bytes_per_token)
        self.counters = EngineCounters()
        self._pieces: dict[int, str] = {}
        self._cond = threading.Condition()
        self._incoming: list[Sequence] = []
        self._seqs: dict[str, Sequence] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"sllm-engine-{name}",
                                        daemon=True)
        self._thread.start()

    # --- the event loop's side ---------------------------------------------------------------------

    def open(self, prompt_ids: list[int], params: SamplingParams, *,
             resumed: Sequence_[int] = (), emitted: int = 0,
             prepared: tuple[DynamicCache | None, int] = (None, 0),
             resumed_logprobs: Sequence_[TokenLogprobs] | None = None,
             ) -> tuple[Run, SequenceStream]:
        """Queue a sequence for the next iteration (call on the event loop); its run (what a
        migration moves) and its stream. Closing the stream early cancels the sequence.

        Args:
            prompt_ids: the prompt's token ids.
            params: its sampling parameters.
            resumed: tokens generated before it moved here; the client has the first
                ``emitted``.
            prepared: a KV cache a migration prepared and the positions it covers.
            resumed_logprobs: the resumed tokens' log probabilities, one each (required when
                ``params.logprobs`` is set and tokens are resumed).

        Raises:
            InvalidRequest: no prompt; resumed tokens overflowing the context; a sequence whose
                KV cache can never fit the instance's budget (the numbers in the message).
            PromptTooLong: the prompt leaves no room in the context window.
            InstanceNotFound: the engine was closed (its instance unloaded).
        """
        inst = self.instance
        window = inst.context_window
        if not prompt_ids:
            raise InvalidRequest("the prompt has no tokens", param="prompt")
        if len(prompt_ids) >= window:
            raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; the context window "
                                f"is {window}", param="prompt")
        if len(prompt_ids) + len(resumed) > window:
            raise InvalidRequest("the moved tokens overflow the context window", param="resume")
        if not 0 <= emitted <= len(resumed):
            raise InvalidRequest(f"emitted must be in [0, {len(resumed)}]", param="resume")
        if params.logprobs is not None and resumed and (
                resumed_logprobs is None or len(resumed_logprobs) != len(resumed)):
            raise InvalidRequest("the moved tokens need their log probabilities, one each",
                                 param="resume")
        limit = min(params.max_tokens, window - len(prompt_ids))
        positions = len(prompt_ids) + limit
        if not self.scheduler.fits(positions):
            raise InvalidRequest(
                f"the request needs up to {positions} tokens of KV cache "
                f"({positions * inst.kv_bytes_per_token} bytes); the instance's budget is "
                f"{self.kv_budget_bytes} bytes ({self.scheduler.kv_tokens} tokens): lower "
                f"max_tokens or shorten the prompt", param="max_tokens")
        loop = asyncio.get_running_loop()
        run = Run(list(prompt_ids), loop)
        queue: asyncio.Queue[StreamMessage | None] = asyncio.Queue()
        kv = SequenceKV(self._shape, positions, inst.model.dtype, inst.device)
        seq = Sequence(run, prompt_ids, params, limit, kv, _Post(loop, queue), list(resumed),
                       emitted, time.monotonic(), inst.tokenizer, resumed_logprobs)
        cache, cached = prepared
        if cache is not None and cached:
            known = len(prompt_ids) + len(resumed)
            if not 0 < cached < known or cache.get_seq_length() != cached:
                raise InvalidRequest(f"the prepared KV cache ({cache.get_seq_length()} positions, "
                                     f"{cached} declared) does not fit the {known} ids: at least "
                                     f"the last one must be left to compute", param="resume")
            kv.copy_from(cache, cached)
        with self._cond:
            if self._closing:
                raise InstanceNotFound(f"instance {self.name!r} was unloaded")
            self._incoming.append(seq)
            self._cond.notify()
        return run, SequenceStream(seq, queue)

    def close(self) -> None:
        """Blocking: stop the loop after its current iteration; sequences still in it are
        handed over (when they were) or end with an error. After this the engine does not
        touch the model."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # --- the engine's thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._incoming or self._seqs or self._closing):
                    self._cond.wait()
                incoming, self._incoming = self._incoming, []
                closing = self._closing
            for seq in incoming:
                self._take(seq)
            self._settle()
            if closing:
                for seq in list(self._seqs.values()):
                    if seq.run.handed_over:
                        self._leave(seq, "migrated")
                    else:
                        self._fail(seq, InstanceNotFound(f"instance {self.name!r} was unloaded"))
                return
            if not self._seqs:
                continue
            moving = self._moving()
            waiting = self._share()
            for seq_id, seq in self._seqs.items():
                self.scheduler.jobs[seq_id].held = (
                    moving and seq.run.generation is None) or seq_id in waiting
            step = self.scheduler.decide(time.monotonic())
            if not step.run:
                with self._cond:  # nothing can run (all held): wait for a change
                    self._cond.wait(0.05)
                continue
            try:
                self._iterate(step)
            except Exception as e:  # a torch failure: the batch's sequences end, the engine goes on
                log.exception("iteration failed on instance %s", self.name)
                err = InternalError(f"generation failed: {type(e).__name__}: {e}")
                for seq_id, _ in step.run:
                    if seq_id in self._seqs:
                        self._fail(self._seqs[seq_id], err)

    def _take(self, seq: Sequence) -> None:
        known = len(seq.prompt_ids) + len(seq.token_ids)
        self.scheduler.add(seq.run.id, seq.arrived, known, seq.kv.limit)
        if seq.kv.length:
            self.scheduler.seed_cache(seq.run.id, seq.kv.length)
        self._seqs[seq.run.id] = seq
        seq.start()

    def _share(self) -> set[str]:
        """Sequences of one prompt share its prefill (the choices of an ``n`` > 1 request, or
        the same prompt sent again): a sequence without a cache takes the first ``P - 1``
        positions of its ``P``-token prompt from a sibling's cache that holds them, once the
        KV budget admits it, and computes only the last prompt position itself (whose logits
        it samples with its own parameters). While a sibling that came earlier has not
        prefilled those positions yet, a sequence that has not started waits for it rather
        than compute them too. Returns the ids of the sequences that wait."""
        donors: dict[int, Sequence] = {}
        for seq in self._seqs.values():
            if len(seq.prompt_ids) > 1 and seq.kv.length >= len(seq.prompt_ids) - 1:
                donors.setdefault(seq.prompt_key, seq)
        waiting: set[str] = set()
        first: set[int] = set()  # prompts with a sibling that computes them
        for seq in self._seqs.values():  # in the order they came
            prompt, shared = seq.prompt_key, len(seq.prompt_ids) - 1
            if shared < 1 or seq.kv.data is not None:
                first.add(prompt)
                continue
            donor = donors.get(prompt)
            if donor is not None and donor.prompt_ids == seq.prompt_ids:
                if self.scheduler.admits(seq.run.id):
                    seq.kv.copy_prefix(donor.kv, shared)
                    self.scheduler.seed_cache(seq.run.id, shared)
                    self.counters.shared_tokens += shared
            elif prompt in first and seq.started_at is None:
                waiting.add(seq.run.id)
            else:
                first.add(prompt)
        return waiting

    def _settle(self) -> None:
        """End the sequences that stop before the next step (the module docstring's order:
        length, cancel, handoff)."""
        for seq in list(self._seqs.values()):
            if seq.stopped:
                self._done(seq, "stop")
            elif len(seq.token_ids) >= seq.limit:
                self._finish(seq, "length")
            elif seq.cancel.is_set():
                self.counters.cancelled += 1
                self._leave(seq, "cancelled")
            elif seq.run.handed_over:
                self._leave(seq, "migrated")

    def _iterate(self, step: Step) -> None:
        for seq_id in step.drop:
            self._seqs[seq_id].kv.drop()
        seqs = [self._seqs[seq_id] for seq_id, _ in step.run]
        counts = [n for _, n in step.run]
        ids: list[int] = []
        keep: list[int] = []
        sampling: list[Sequence] = []
        now = time.monotonic()
        for seq, n in zip(seqs, counts, strict=True):
            start = seq.kv.length
            ids += seq.ids(start, n)
            if start + n == len(seq.prompt_ids) + len(seq.token_ids):  # its last known id
                keep.append(len(ids) - 1)
                sampling.append(seq)
            if seq.started_at is None:
                seq.started_at = now
                seq.run.generation = seq
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = forward_packed(self.instance.model, ids,
                                    PackedBatch([s.kv for s in seqs], counts), keep)
            tokens = [self._sample(seq, row) for seq, row in zip(sampling, logits, strict=True)]
            logprobs = [self._logprobs(row, token, seq.params.logprobs)
                        if seq.params.logprobs is not None else None
                        for seq, row, token in zip(sampling, logits, tokens, strict=True)]
        seconds = time.perf_counter() - t0
        self.scheduler.account(step, seconds, time.monotonic())
        self.counters.iterations += 1
        self.counters.iteration_seconds += seconds
        self.counters.prompt_tokens += sum(n for seq, n in zip(seqs, counts, strict=True)
                                           if seq.sampled == 0 or n > 1)  # not a decode
        for seq in seqs:
            if seq.sampled == 0:
                seq.prefill_seconds += seconds
            else:
                seq.decode_seconds += seconds
        for seq, token, lp in zip(sampling, tokens, logprobs, strict=True):
            seq.sampled += 1
            self.counters.generation_tokens += 1
            if token in self.instance.eos_token_ids and not seq.params.ignore_eos:
                self._finish(seq, "stop")
                continue
            seq.token_ids.append(token)
            if seq.logprobs is not None and lp is not None:
                seq.logprobs.append(lp)
            self.scheduler.generated(seq.run.id)
            if seq.emit(token, len(seq.token_ids) - 1):
                self._done(seq, "stop")
            elif len(seq.token_ids) >= seq.limit:
                self._finish(seq, "length")

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        if not seq.params.greedy:
            seq.generator.manual_seed(token_seed(seq.seed, len(seq.token_ids)))
        logits = penalise(logits, seq.params, seq.prompt_ids, seq.token_ids,
                          self.instance.eos_token_ids)
        return sample(logits, seq.params, seq.generator)

    def _logprobs(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
        """``token``'s log probability under one position's raw logits (shape (vocab,)) and
        the ``top`` most likely tokens', most likely first."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        best = torch.topk(lp, top) if top else None
        pairs = [] if best is None else zip(best.indices.tolist(), best.values.tolist(),
                                            strict=True)
        return TokenLogprobs(
            logprob=float(lp[token]), token=self._piece(token),
            top=[TokenLogprob(token_id=i, token=self._piece(i), logprob=v) for i, v in pairs])

    def _piece(self, token: int) -> str:
        """A token's text alone (cached per id)."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.instance.tokenizer.decode([token])
        return text

    def _remove(self, seq: Sequence, reason: str) -> None:
        self._seqs.pop(seq.run.id, None)
        self.scheduler.remove(seq.run.id)
        seq.kv.drop()
        seq.run.end(reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.held is not None:
            held = seq.held
            seq.post(held.model_copy(update={"text": held.text + seq.tail()}))
            seq.held = None
        self._done(seq, reason)

    def _leave(self, seq: Sequence, reason: str) -> None:
        if reason == "migrated":  # a held token is the destination's to send
            target = seq.run.target or Target(reason="preempted")
            seq.post(MigratedMessage(
                token_ids=list(seq.token_ids), prompt_tokens=len(seq.prompt_ids),
                logprobs=None if seq.logprobs is None else list(seq.logprobs),
                prefill_seconds=seq.prefill_seconds, decode_seconds=seq.decode_seconds,
                invoker_url=target.invoker_url, instance_id=target.instance_id,
                session=target.session, reason=target.reason))
            self._remove(seq, reason)
            seq.post(None)
            return
        self._finish(seq, reason)

    def _done(self, seq: Sequence, reason: str) -> None:
        self.counters.finished += 1
        seq.post(DoneMessage(
            finish_reason=reason, prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.token_ids), prefill_seconds=seq.prefill_seconds,
            decode_seconds=seq.decode_seconds,
            queued_seconds=(seq.started_at or time.monotonic()) - seq.arrived))
        self._remove(seq, reason)
        seq.post(None)

    def _fail(self, seq: Sequence, err: SllmError) -> None:
        seq.post(ErrorMessage(error=ErrorBody(**err.to_body()["error"])))
        self._remove(seq, "error")
        seq.post(None)


class BatchEngine:
    """The invoker's engine (:class:`invoker.engine.Engine`): one :class:`InstanceEngine` per
    loaded instance, started by its first generation and stopped when it is unloaded.

    Args:
        sessions: the KV caches prepared for generations migrating here.
    """

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions
        self.engines: dict[str, InstanceEngine] = {}

    def engine(self, inst: LoadedInstance) -> InstanceEngine:
        """The instance's engine (started on first use)."""
        eng = self.engines.get(inst.instance_id)
        if eng is None:
            eng = self.engines[inst.instance_id] = InstanceEngine(
                inst.instance, inst.instance_id, inst.scheduling, inst.kv_budget_bytes,
                moving=lambda: inst.moving is not None)

            def stop() -> None:
                eng.close()
                self.engines.pop(inst.instance_id, None)
            inst.stoppers.append(stop)
        return eng

    async def submit(self, instance: LoadedInstance, request: GenerateRequest
                     ) -> SequenceStream:
        """See :meth:`invoker.engine.Engine.submit`."""
        if instance.closed:
            raise InstanceNotFound(f"instance {instance.instance_id!r} was unloaded")
        given = request.input
        messages = [m.model_dump() for m in given.messages] if given.messages is not None else None
        prompt_ids = await asyncio.to_thread(
            instance.instance.encode, prompt=given.prompt, messages=messages, raw=given.raw)
        resumed: list[int] = []
        emitted = 0
        prepared: tuple[DynamicCache | None, int] = (None, 0)
        resumed_logprobs = None
        if request.resume is not None:
            resumed, emitted = list(request.resume.token_ids), request.resume.emitted
            resumed_logprobs = request.resume.logprobs
            if request.resume.session is not None:
                prepared = self._sessions.take(request.resume.session, instance.instance_id,
                                               [*prompt_ids, *resumed])
        run, stream = self.engine(instance).open(prompt_ids, request.sampling, resumed=resumed,
                                                 emitted=emitted, prepared=prepared,
                                                 resumed_logprobs=resumed_logprobs)
        if instance.moving is not None:  # assigned before the migration began: follow the others
            run.hand_over(Target(instance.moving.to_url, instance.moving.to_instance))
        instance.runs[run.id] = run
        stream.on_end.append(lambda: instance.runs.pop(run.id, None))
        return stream


class SequenceStream:
    """A sequence's messages, as they come (an async iterator). Closing it (``aclose``), read or
    not, cancels the sequence: it leaves the engine at the next iteration boundary."""

    def __init__(self, seq: Sequence, queue: asyncio.Queue[StreamMessage | None]) -> None:
        self._seq = seq
        self._queue = queue
        self._ended = False
        self.on_end: list[Callable[[], object]] = []  # called once, when it ends or is closed

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._seq.cancel.set()  # (nothing left to cancel when it ended by itself)
            for callback in self.on_end:
                callback()

    def __aiter__(self) -> SequenceStream:
        return self

    async def __anext__(self) -> StreamMessage:
        if self._ended:
            raise StopAsyncIteration
        msg = await self._queue.get()
        if msg is None:
            self._end()
            raise StopAsyncIteration
        return msg

    async def aclose(self) -> None:
        self._end()
