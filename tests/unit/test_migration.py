"""Token-based migration at the level of one generation and one pair of instances: a
generation resumed from its tokens (with or without a KV cache prepared in rounds) continues
exactly as it would have, the source stops at a token boundary when told, and the destination's
sessions check what they are given. The end-to-end protocol (invokers, gateway, controller) is
in ``test_e2e_migration.py``.
"""

from __future__ import annotations

import threading

import pytest

from invoker.generation import Generation, Resume, extend_cache, token_seed
from invoker.instance import ModelInstance
from invoker.migration import Sessions
from sllm.errors import Conflict, InvalidRequest
from sllm.messages import PrefillRequest
from sllm.sampling import SamplingParams
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


def generate(instance: ModelInstance, prompt_ids: list[int], params: SamplingParams,
             resume: Resume | None = None) -> tuple[Generation, list[int], str]:
    gen = Generation(instance, prompt_ids, params, resume=resume)
    tokens = list(gen)
    assert [t.index for t in tokens] == list(range(tokens[0].index if tokens else 0,
                                                   (tokens[0].index if tokens else 0) + len(tokens)))
    return gen, [t.token_id for t in tokens], "".join(t.text for t in tokens)


@pytest.fixture(scope="module")
def reference(instance: ModelInstance, prompt_ids: list[int]) -> tuple[list[int], str]:
    gen, ids, text = generate(instance, prompt_ids, SamplingParams(max_tokens=N))
    assert gen.finish_reason == "length" and len(ids) == N
    return ids, text


@pytest.mark.parametrize("at", [0, 1, N // 2, N - 2, N - 1])
@pytest.mark.parametrize("prepared", [False, True])
def test_greedy_resume_continues_exactly(instance: ModelInstance, prompt_ids: list[int],
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
    gen, rest, rest_text = generate(instance, prompt_ids, SamplingParams(max_tokens=N),
                                    Resume(ids[:at], emitted=at, cache=cache, cached=cached))
    assert ids[:at] + rest == ids
    assert gen.finish_reason == "length" and gen.completion_tokens == N
    first_text = instance.tokenizer.decode(ids[:at], skip_special_tokens=True)
    assert first_text + rest_text == text


def test_tokens_the_client_did_not_receive_are_yielded_again(
        instance: ModelInstance, prompt_ids: list[int], reference: tuple[list[int], str]) -> None:
    ids, _ = reference
    _, rest, _ = generate(instance, prompt_ids, SamplingParams(max_tokens=N),
                          Resume(ids[:10], emitted=7))
    assert rest == ids[7:]


def test_resumed_text_joins_across_incomplete_characters(instance: ModelInstance,
                                                         prompt_ids: list[int]) -> None:
    """Sampled tokens of a byte-level vocabulary often split a character, so a token may reach
    the client with no text yet, or still be held back when the generation moves. Moved after
    every token, held one back or not, the client's text is that of the whole generation."""
    params = SamplingParams(max_tokens=N, temperature=1.5, seed=7)
    gen = Generation(instance, prompt_ids, params)
    tokens = list(gen)
    ids, text = gen.token_ids, "".join(t.text for t in tokens)
    assert any(t.text == "" for t in tokens)  # the case arises
    for emitted in range(N):
        for held in (0, 1):
            sent = "".join(t.text for t in tokens[:emitted])
            _, _, rest = generate(instance, prompt_ids, params,
                                  Resume(ids[: emitted + held], emitted=emitted))
            assert sent + rest == text, (emitted, held)


def test_sampling_with_a_seed_resumes_the_same_draws(instance: ModelInstance,
                                                     prompt_ids: list[int]) -> None:
    params = SamplingParams(max_tokens=N, temperature=1.0, seed=1234)
    _, ids, _ = generate(instance, prompt_ids, params)
    _, rest, _ = generate(instance, prompt_ids, params, Resume(ids[:15], emitted=15))
    assert ids[:15] + rest == ids
    _, other, _ = generate(instance, prompt_ids, SamplingParams(max_tokens=N, temperature=1.0,
                                                                seed=1235))
    assert other != ids
    assert token_seed(1234, 0) != token_seed(1234, 1) != token_seed(1235, 1)


def test_handoff_stops_at_a_token_boundary(instance: ModelInstance, prompt_ids: list[int],
                                           reference: tuple[list[int], str]) -> None:
    handoff = threading.Event()
    gen = Generation(instance, prompt_ids, SamplingParams(max_tokens=N), handoff=handoff)
    got = []
    for tok in gen:
        got.append(tok.token_id)
        if len(got) == 5:
            handoff.set()
    assert gen.finish_reason == "migrated"
    assert gen.token_ids == reference[0][:5] == got


def test_a_finish_wins_over_a_late_handoff(instance: ModelInstance, prompt_ids: list[int]) -> None:
    handoff = threading.Event()
    gen = Generation(instance, prompt_ids, SamplingParams(max_tokens=3), handoff=handoff)
    for tok in gen:
        if tok.index == 2:
            handoff.set()  # after the last token: the generation is done anyway
    assert gen.finish_reason == "length" and len(gen.token_ids) == 3


def test_resume_rejects_what_does_not_fit(instance: ModelInstance, prompt_ids: list[int]) -> None:
    with pytest.raises(InvalidRequest):
        Generation(instance, prompt_ids, SamplingParams(max_tokens=N), resume=Resume([1, 2], 3))
    cache = extend_cache(instance, None, prompt_ids[:2])
    with pytest.raises(InvalidRequest):  # the cache covers 2 positions, not 3
        Generation(instance, prompt_ids, SamplingParams(max_tokens=N),
                   resume=Resume([], 0, cache=cache, cached=3))
    whole = extend_cache(instance, None, prompt_ids)
    with pytest.raises(InvalidRequest):  # nothing left to feed the first step
        Generation(instance, prompt_ids, SamplingParams(max_tokens=N),
                   resume=Resume([], 0, cache=whole, cached=len(prompt_ids)))


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
