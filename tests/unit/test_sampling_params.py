"""The OpenAI sampling parameters the engine honours, each against transformers' own logits
processor (or OpenAI's formula) on the same logits, and stop strings across token boundaries."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pydantic import ValidationError
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
)

from invoker.generation import penalise, sample
from invoker.instance import ModelInstance
from invoker.stops import StopMatcher
from sllm.sampling import SamplingOverrides, SamplingParams
from tests.helpers.engine import collect, engine
from tests.helpers.tiny_model import make_tiny_llama

VOCAB = 50
PROMPT = [3, 7, 7, 9]
OUTPUT = [7, 11, 11, 11, 40]


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 3


def test_repetition_penalty_equals_transformers_processor(logits: torch.Tensor) -> None:
    params = SamplingParams(max_tokens=4, repetition_penalty=1.7)
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([PROMPT + OUTPUT]), logits[None].clone())
    assert torch.allclose(penalise(logits, params, PROMPT, OUTPUT, []), want[0])


def test_min_tokens_equals_transformers_processor(logits: torch.Tensor) -> None:
    eos = [2, 5]
    proc = MinNewTokensLengthLogitsProcessor(len(PROMPT), 8, eos)
    for generated in (0, 5, 8):
        params = SamplingParams(max_tokens=20, min_tokens=8)
        ids = torch.tensor([PROMPT + OUTPUT[:generated] + [1] * max(0, generated - 5)])
        want = proc(ids, logits[None].clone())[0]
        got = penalise(logits, params, PROMPT, ids[0, len(PROMPT):].tolist(), eos)
        assert torch.equal(got, want), generated


def test_presence_and_frequency_penalties_follow_openai(logits: torch.Tensor) -> None:
    params = SamplingParams(max_tokens=4, presence_penalty=0.5, frequency_penalty=0.25)
    want = logits.clone()
    for token in set(OUTPUT):
        want[token] -= 0.25 * OUTPUT.count(token) + 0.5
    assert torch.allclose(penalise(logits, params, PROMPT, OUTPUT, []), want)  # prompt not counted


def test_nothing_applies_when_every_penalty_is_neutral(logits: torch.Tensor) -> None:
    assert penalise(logits, SamplingParams(max_tokens=4), PROMPT, OUTPUT, [2]) is logits


def test_top_k_samples_among_transformers_top_k_only(logits: torch.Tensor) -> None:
    params = SamplingParams(max_tokens=4, temperature=1.5, top_k=5)
    allowed = torch.isfinite(TopKLogitsWarper(5)(None, logits[None].clone() / 1.5)[0])
    picks = {sample(logits, params, torch.Generator().manual_seed(s)) for s in range(300)}
    assert picks <= set(torch.nonzero(allowed).flatten().tolist()) and len(picks) > 1
    one = SamplingParams(max_tokens=4, temperature=1.0, top_k=1)
    assert sample(logits, one, torch.Generator()) == int(logits.argmax())


@pytest.mark.parametrize(("field", "value"), [
    ("top_k", -2), ("top_k", 1.5), ("repetition_penalty", 0), ("repetition_penalty", "2"),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("min_tokens", -1),
    ("stop", [""]), ("stop", ["a", "b", "c", "d", "e"]), ("stop", 5)])
def test_bad_values_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        SamplingOverrides(**{field: value})
    assert caught.value.errors()[0]["loc"][0] == field


def test_a_stop_string_is_a_string_or_a_list_and_overrides_the_default() -> None:
    defaults = SamplingParams(max_tokens=4, stop=["x"], top_k=3)
    assert SamplingOverrides(stop="END").resolve(defaults).stop == ("END",)
    assert SamplingOverrides().resolve(defaults).stop == ("x",)
    assert SamplingOverrides(top_k=-1).resolve(defaults).top_k == -1


def test_the_stop_matcher_holds_back_what_may_begin_a_stop_string() -> None:
    m = StopMatcher(["Paris!", "zz"])
    assert [m.push(t) for t in ("The cap", "ital is Pa", "ri")] == [
        ("The cap", False), ("ital is ", False), ("", False)]
    assert m.push("s! Yes") == ("", True)
    m = StopMatcher(["ab"])
    assert (m.push("xa"), m.push("c"), m.flush()) == (("x", False), ("ac", False), "")
    m = StopMatcher(["ab"])
    assert m.push("xa") == ("x", False) and m.flush() == "a"


@pytest.fixture(scope="module")
def instance() -> ModelInstance:
    model, tokenizer = make_tiny_llama(seed=0, max_position_embeddings=512)
    return ModelInstance.from_model(model, tokenizer)


async def test_a_stop_string_across_token_boundaries_ends_the_stream_before_it(
        instance: ModelInstance) -> None:
    """The stop string is cut out of the greedy reference text where it spans two tokens; the
    streamed texts join to the reference's text before it, whichever tokens it falls in."""
    prompt = instance.encode(prompt="What is the capital of France?")
    with engine(instance) as eng:
        ref = await collect(eng.open(prompt, SamplingParams(max_tokens=40, ignore_eos=True))[1])
        texts = [t.text for t in ref.tokens]
        full = ref.text
        # a stop string over the boundary of tokens 10 and 11, and one held back at the end
        cut = len("".join(texts[:11]))
        spanning = full[cut - 2:cut + 2]
        assert len(spanning) == 4 and full.find(spanning) >= 0
        for stops in ([spanning], ["never-there", spanning]):
            out = await collect(eng.open(prompt, SamplingParams(
                max_tokens=40, ignore_eos=True, stop=stops))[1])
            assert out.finish_reason == "stop"
            assert out.text == full[:full.find(spanning)]
        # a tail that only may begin a stop string is sent once the stream ends
        out = await collect(eng.open(prompt, SamplingParams(
            max_tokens=40, ignore_eos=True, stop=[full[-2:] + "\x00"]))[1])
        assert out.text == full and out.finish_reason == "length"


async def test_min_tokens_and_penalties_reach_the_engine(instance: ModelInstance) -> None:
    prompt = instance.encode(prompt="What is the capital of France?")
    with engine(instance) as eng:
        plain, penalised = await asyncio.gather(
            collect(eng.open(prompt, SamplingParams(max_tokens=30, ignore_eos=True))[1]),
            collect(eng.open(prompt, SamplingParams(max_tokens=30, ignore_eos=True,
                                                    repetition_penalty=3.0))[1]))
    assert penalised.ids != plain.ids and len(set(penalised.ids)) >= len(set(plain.ids))


async def test_min_tokens_holds_off_an_eos_in_the_engine() -> None:
    model, tokenizer = make_tiny_llama(seed=1)  # answers with an EOS within 100 tokens
    instance = ModelInstance.from_model(model, tokenizer)
    prompt = instance.encode(prompt="What is the capital of France?")
    with engine(instance) as eng:
        plain = await collect(eng.open(prompt, SamplingParams(max_tokens=100))[1])
        assert plain.finish_reason == "stop"
        n = len(plain.ids) + 5
        held = await collect(eng.open(prompt, SamplingParams(max_tokens=100, min_tokens=n))[1])
    assert len(held.ids) >= n and held.ids[:len(plain.ids)] == plain.ids
