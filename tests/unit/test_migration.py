"""Token-based migration at the level of one sequence in an instance's batching engine: a
sequence resumed from its tokens (with or without a KV cache prepared in rounds) continues
exactly as it would have, the source stops at a token boundary when told and ends its stream
with every token, and the destination's sessions check what they are given. The end-to-end
protocol (invokers, gateway, controller) is in ``test_e2e_migration.py``.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from invoker.generation import extend_cache, token_seed
from invoker.instance import ModelInstance
from invoker.migration import Sessions, Target
from sllm.errors import Conflict, InvalidRequest
from sllm.messages import DoneMessage, MigratedMessage, PrefillRequest, TokenMessage
from sllm.sampling import SamplingParams
from tests.helpers.engine import collect, engine, generate, generate_alone
from tests.helpers.kv_rounds import prefill_in_two_rounds
from tests.helpers.tiny_model import make_tiny_llama

N = 40  # tokens generated; seed 0's tiny model does not emit EOS within them


@pytest.fixture(scope="module")
def instance() -> ModelInstance:
    model, tokenizer = make_tiny_llama(seed=0)
    return ModelInstance.from_model(model, tokenizer)


@pytest.fixture(scope="module")
def prompt_ids(instance: ModelInstance) -> list[int]:
    return instance.encode(prompt="The quick brown fox", raw=True)


@pytest.fixture(scope="module")
def reference(instance: ModelInstance, prompt_ids: list[int]) -> tuple[list[int], str]:
    got = generate_alone(instance, prompt_ids, SamplingParams(max_tokens=N))
    assert got.finish_reason == "length" and len(got.ids) == N
    return got.ids, got.text


@pytest.mark.parametrize("at", [0, 1, N // 2, N - 2, N - 1])
@pytest.mark.parametrize("prepared", [False, True])
async def test_greedy_resume_continues_exactly(instance: ModelInstance, prompt_ids: list[int],
                                               reference: tuple[list[int], str], at: int,
                                               prepared: bool) -> None:
    """Moved after ``at`` tokens (before the first, in the middle, a few before the end), with
    the KV cache recomputed in two rounds or not at all: same tokens, same text."""
    ids, text = reference
    cache, cached = None, 0
    if prepared:  # two rounds, as a destination's session computes them (the last id left out)
        full = [*prompt_ids, *ids[:at]]
        cache, cached = prefill_in_two_rounds(instance, full)
        assert cached == len(full) - 1
    with engine(instance) as eng:
        got = await generate(eng, prompt_ids, SamplingParams(max_tokens=N), resumed=ids[:at],
                             emitted=at, prepared=(cache, cached))
        # a prepared cache is not prefilled again: only the last id and the tokens after it
        positions = 1 if prepared else len(prompt_ids) + at
        assert eng.counters.prompt_tokens == positions
    assert ids[:at] + got.ids == ids
    assert got.tokens[0].index == at
    assert got.finish_reason == "length" and got.done.completion_tokens == N
    first_text = instance.tokenizer.decode(ids[:at], skip_special_tokens=True)
    assert first_text + got.text == text


async def test_a_resumed_sequence_prefilled_in_chunks_continues_exactly(
        instance: ModelInstance, prompt_ids: list[int], reference: tuple[list[int], str]) -> None:
    ids, _ = reference
    budget = len(prompt_ids) - 3  # the first chunk ends inside the prompt
    with engine(instance, maxBatchTokens=budget) as eng:
        got = await generate(eng, prompt_ids, SamplingParams(max_tokens=N), resumed=ids[:7],
                             emitted=7)
    assert ids[:7] + got.ids == ids


async def test_tokens_the_client_did_not_receive_are_sent_again(
        instance: ModelInstance, prompt_ids: list[int], reference: tuple[list[int], str]) -> None:
    ids, _ = reference
    with engine(instance) as eng:
        got = await generate(eng, prompt_ids, SamplingParams(max_tokens=N), resumed=ids[:10],
                             emitted=7)
    assert got.ids == ids[7:] and got.tokens[0].index == 7


async def test_resumed_text_joins_across_incomplete_characters(instance: ModelInstance,
                                                               prompt_ids: list[int]) -> None:
    """Sampled tokens of a byte-level vocabulary often split a character, so a token may reach
    the client with no text yet, or still be held back when the sequence moves. Moved after
    every token, held one back or not, the client's text is that of the whole generation."""
    params = SamplingParams(max_tokens=N, temperature=1.5, seed=7)
    with engine(instance) as eng:
        whole = await generate(eng, prompt_ids, params)
        ids, tokens = whole.ids, whole.tokens
        assert len(ids) == N
        assert any(t.text == "" for t in tokens)  # the case arises
        cases = [(emitted, held) for emitted in range(N) for held in (0, 1)]
        rests = [await generate(eng, prompt_ids, params, resumed=ids[: emitted + held],
                                emitted=emitted) for emitted, held in cases]
    for (emitted, held), rest in zip(cases, rests, strict=True):
        sent = "".join(t.text for t in tokens[:emitted])
        assert sent + rest.text == whole.text, (emitted, held)


async def test_sampling_with_a_seed_resumes_the_same_draws(instance: ModelInstance,
                                                           prompt_ids: list[int]) -> None:
    params = SamplingParams(max_tokens=N, temperature=1.0, seed=1234)
    with engine(instance) as eng:
        ids = (await generate(eng, prompt_ids, params)).ids
        rest = (await generate(eng, prompt_ids, params, resumed=ids[:15], emitted=15)).ids
        other = (await generate(eng, prompt_ids, SamplingParams(max_tokens=N, temperature=1.0,
                                                                seed=1235))).ids
    assert ids[:15] + rest == ids
    assert other != ids
    assert token_seed(1234, 0) != token_seed(1234, 1) != token_seed(1235, 1)


async def test_handoff_stops_at_a_token_boundary_with_every_token(
        instance: ModelInstance, prompt_ids: list[int], reference: tuple[list[int], str]) -> None:
    """Handed over once the client has five tokens: the stream ends with a MigratedMessage
    naming the target and carrying every token generated (one held back for its incomplete
    character included), and a destination resumed from it finishes the uninterrupted run."""
    ids, text = reference
    params = SamplingParams(max_tokens=N)
    with engine(instance) as eng:
        run, stream = eng.open(prompt_ids, params)
        got: list[TokenMessage] = []
        async for msg in stream:
            if isinstance(msg, TokenMessage):
                got.append(msg)
                if len(got) == 5:
                    run.hand_over(Target("http://destination", "inst-2", "sess-1"))
            else:
                last = msg
        assert isinstance(last, MigratedMessage), last
        assert await run.ended == "migrated"
        moved = last.token_ids
        assert 5 <= len(moved) < N and moved == ids[: len(moved)]
        assert [t.token_id for t in got] in (moved, moved[:-1])  # a held token is not sent
        assert (last.invoker_url, last.instance_id, last.session, last.reason) == (
            "http://destination", "inst-2", "sess-1", "migrated")
        assert last.prompt_tokens == len(prompt_ids) and last.prefill_seconds > 0
        rest = await generate(eng, prompt_ids, params, resumed=moved, emitted=len(got))
    assert [t.token_id for t in got] + rest.ids == ids
    assert "".join(t.text for t in got) + rest.text == text
    assert rest.done.completion_tokens == N


async def test_a_finish_wins_over_a_handoff(instance: ModelInstance, prompt_ids: list[int]) -> None:
    with engine(instance) as eng:
        run, stream = eng.open(prompt_ids, SamplingParams(max_tokens=3))
        got: list[TokenMessage] = []
        async for msg in stream:
            if isinstance(msg, TokenMessage):
                got.append(msg)
                if msg.index == 2:
                    run.hand_over(Target())  # after the last token: the sequence is done anyway
            else:
                last = msg
        assert isinstance(last, DoneMessage) and last.finish_reason == "length"
        assert len(got) == 3
        # length is checked before a handoff: a sequence resumed with all its tokens finishes
        run, stream = eng.open(prompt_ids, SamplingParams(max_tokens=3), resumed=[9, 8, 7],
                               emitted=2)
        run.hand_over(Target())
        resumed = await collect(stream)
    assert resumed.ids == [7] and resumed.done.finish_reason == "length"
    assert resumed.done.completion_tokens == 3


async def test_resume_rejects_an_emitted_count_beyond_its_tokens(
        instance: ModelInstance, prompt_ids: list[int]) -> None:
    with engine(instance) as eng:
        with pytest.raises(InvalidRequest) as caught:
            eng.open(prompt_ids, SamplingParams(max_tokens=N), resumed=[1, 2], emitted=3)
        assert caught.value.param == "resume"
        window = instance.context_window
        with pytest.raises(InvalidRequest):  # prompt + moved tokens overflow the window
            eng.open(prompt_ids, SamplingParams(max_tokens=N),
                     resumed=[5] * (window - len(prompt_ids) + 1))


@pytest.mark.parametrize("case", ["short", "whole"])
async def test_resume_rejects_a_prepared_cache_that_does_not_fit(
        instance: ModelInstance, prompt_ids: list[int], case: str) -> None:
    if case == "short":  # the cache covers 2 positions, not 3
        prepared = (extend_cache(instance, None, prompt_ids[:2]), 3)
    else:  # nothing left to feed the first step
        prepared = (extend_cache(instance, None, prompt_ids), len(prompt_ids))
    with engine(instance) as eng, pytest.raises(InvalidRequest):
        await asyncio.wait_for(
            generate(eng, prompt_ids, SamplingParams(max_tokens=N), prepared=prepared), 2)


def test_sessions_extend_in_order_and_match_the_tokens(instance: ModelInstance,
                                                       prompt_ids: list[int]) -> None:
    sessions = Sessions()
    lock = threading.Lock()
    first = sessions.prefill("i", instance, lock, PrefillRequest(session="s", start=0,
                                                                 ids=prompt_ids))
    assert first.cached == len(prompt_ids) - 1
    with pytest.raises(Conflict):  # a round that skips positions
        sessions.prefill("i", instance, lock, PrefillRequest(session="s", start=1, ids=[5]))
    with pytest.raises(Conflict):  # a session of another instance
        sessions.prefill("j", instance, lock, PrefillRequest(session="s", start=len(prompt_ids),
                                                             ids=[5]))
    with pytest.raises(Conflict):  # an unknown session that does not start at 0
        sessions.prefill("i", instance, lock, PrefillRequest(session="t", start=3, ids=[5]))
    assert sessions.take("s", "i", [9, *prompt_ids]) == (None, 0)  # other tokens: not used
    sessions.prefill("i", instance, lock, PrefillRequest(session="u", start=0, ids=prompt_ids))
    cache, cached = sessions.take("u", "i", [*prompt_ids, 7, 8])
    assert cache is not None and cached == len(prompt_ids) - 1
    assert sessions.take("u", "i", prompt_ids) == (None, 0)  # taken once
    sessions.prefill("i", instance, lock, PrefillRequest(session="v", start=0, ids=prompt_ids))
    assert sessions.expire(ttl_s=0.0) == ["v"]
