"""The batching engine on the tiny random-weight llama: sequences batched in one instance give
what each gives alone, and the policies order them as they say.

``model.generate`` on one prompt alone is the reference for greedy decoding.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from invoker.engine.batching import InstanceEngine
from invoker.instance import ModelInstance
from sllm.errors import InvalidRequest
from sllm.messages import TokenMessage
from sllm.sampling import SamplingParams
from tests.helpers.engine import collect, engine
from tests.helpers.tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def instance() -> ModelInstance:
    model, tokenizer = make_tiny_llama(seed=0, max_position_embeddings=512)
    return ModelInstance.from_model(model, tokenizer)


def reference(instance: ModelInstance, prompt: list[int], n: int) -> list[int]:
    out = instance.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n)
    return [int(t) for t in out[0, len(prompt):]]


PROMPTS = [list(range(5, 5 + n)) for n in (3, 40, 7, 90, 1, 25, 60, 12)]


async def test_eight_batched_sequences_each_pick_the_tokens_of_generate_alone(
        instance: ModelInstance) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    want = [reference(instance, p, 24) for p in PROMPTS]
    # a token budget of 32: the long prompts are prefilled in chunks, beside the others' decodes
    with engine(instance, policy="fcfs", maxBatch=8, maxBatchTokens=32) as eng:
        got = await asyncio.gather(*(collect(eng.open(p, params)[1]) for p in PROMPTS))
        assert eng.counters.iterations < 8 * 24  # they ran together
    assert [m.ids for m in got] == want
    assert all(m.done.finish_reason == "length" for m in got)


async def test_a_seeded_sampled_sequence_draws_the_same_tokens_alone_and_batched(
        instance: ModelInstance) -> None:
    params = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    with engine(instance, policy="fcfs") as eng:
        alone = (await collect(eng.open(PROMPTS[1], params)[1])).ids
        others = SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)
        batched = await asyncio.gather(collect(eng.open(PROMPTS[1], params)[1]),
                                       *(collect(eng.open(p, others)[1]) for p in PROMPTS[2:6]))
    assert batched[0].ids == alone and len(alone) == 30


async def test_under_mlfq_a_burst_of_short_jobs_finishes_before_a_long_one(
        instance: ModelInstance) -> None:
    finished: list[str] = []

    async def job(name: str, eng: InstanceEngine, prompt: list[int], n: int) -> None:
        await collect(eng.open(prompt, SamplingParams(max_tokens=n, ignore_eos=True))[1])
        finished.append(name)

    # level 0 has a quantum of 20 ms, level 1 of 2 s: the short jobs come once the long one has
    # used its 20 ms and moved down, join level 0 (a 3-token prefill takes far less than 20 ms)
    # and preempt it; a batch of one makes it a strict order
    with engine(instance, policy="mlfq", maxBatch=1, quantum=0.02, quantumRatio=100) as eng:
        long = asyncio.create_task(job("long", eng, PROMPTS[3], 300))
        while eng.scheduler.counters.demotions == 0:
            await asyncio.sleep(0.001)
        assert not long.done()
        await asyncio.gather(*(job(f"short{i}", eng, PROMPTS[0], 5) for i in range(4)))
        assert not long.done()
        await long
        assert eng.scheduler.counters.preemptions >= 1
    assert finished[-1] == "long"


async def test_run_to_completion_runs_one_sequence_after_another(instance: ModelInstance) -> None:
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    with engine(instance, policy="run-to-completion") as eng:
        first, second = await asyncio.gather(collect(eng.open(PROMPTS[0], params)[1]),
                                             collect(eng.open(PROMPTS[2], params)[1]))
        assert eng.counters.iterations == 40
    assert second.done.queued_seconds >= first.done.prefill_seconds + first.done.decode_seconds
    assert second.ids == reference(instance, PROMPTS[2], 20)


async def test_a_client_that_goes_away_frees_its_slot(instance: ModelInstance) -> None:
    with engine(instance, policy="fcfs") as eng:
        _, stream = eng.open(PROMPTS[1], SamplingParams(max_tokens=400, ignore_eos=True))
        async for msg in stream:
            if isinstance(msg, TokenMessage) and msg.index == 3:
                break
        await stream.aclose()
        while eng.counters.cancelled == 0:
            await asyncio.sleep(0.01)
        sampled = eng.counters.generation_tokens
        await asyncio.sleep(0.2)
        assert eng.counters.generation_tokens == sampled < 400  # nothing computed for it since
        assert eng.scheduler.jobs == {} and eng.scheduler.used == 0


async def test_a_request_whose_cache_can_never_fit_is_refused_with_the_numbers(
        instance: ModelInstance) -> None:
    with engine(instance, budget=100 * 2 * 2 * 2 * 16 * 4) as eng:  # 100 tokens of KV cache
        with pytest.raises(InvalidRequest, match=r"needs up to 140 tokens .*\(100 tokens\)") as e:
            eng.open(list(range(5, 45)), SamplingParams(max_tokens=100))
        assert e.value.param == "max_tokens"
        # one that fits runs
        msgs = await collect(eng.open(list(range(5, 45)), SamplingParams(max_tokens=50))[1])
        assert msgs.done.completion_tokens > 0


async def test_sequences_that_overflow_the_kv_budget_together_take_turns(
        instance: ModelInstance) -> None:
    """Each fits alone, not all at once: some wait or recompute, all finish with the tokens
    of generate alone."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    prompts = PROMPTS[:4]
    with engine(instance, budget=256 * 512, policy="fcfs") as eng:  # 256 tokens: 512 bytes each
        got = await asyncio.gather(*(collect(eng.open(p, params)[1]) for p in prompts))
        assert eng.scheduler.used == 0
    assert [m.ids for m in got] == [reference(instance, p, 30) for p in prompts]


async def test_log_probabilities_are_the_models_raw_distribution_alone_and_batched(
        instance: ModelInstance) -> None:
    """Each token's logprob and top 5 equal the log-softmax of ``generate``'s raw logits at that
    step, for a sequence batched with others that ask for none."""
    prompt, n = PROMPTS[3], 12
    out = instance.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, output_logits=True,
                                  return_dict_in_generate=True)
    want = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
    params = SamplingParams(max_tokens=n, ignore_eos=True, logprobs=5)
    plain = SamplingParams(max_tokens=n, ignore_eos=True)
    with engine(instance, policy="fcfs", maxBatchTokens=32) as eng:
        got, *others = await asyncio.gather(collect(eng.open(prompt, params)[1]),
                                            *(collect(eng.open(p, plain)[1]) for p in PROMPTS[:3]))
    assert got.ids == [int(t) for t in out.sequences[0, len(prompt):]]
    for tok, lp in zip(got.tokens, want, strict=True):
        assert tok.logprobs is not None
        assert tok.logprobs.logprob == pytest.approx(float(lp[tok.token_id]), abs=1e-4)
        best = torch.topk(lp, 5)
        assert [t.token_id for t in tok.logprobs.top] == best.indices.tolist()
        assert [t.logprob for t in tok.logprobs.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert tok.logprobs.top[0].token == instance.tokenizer.decode([best.indices[0].item()])
    assert all(t.logprobs is None for o in others for t in o.tokens)


async def test_resumed_tokens_are_sent_again_with_the_log_probabilities_they_came_with(
        instance: ModelInstance) -> None:
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2)
    with engine(instance, policy="fcfs") as eng:
        first = await collect(eng.open(PROMPTS[2], params)[1])
        lps = [t.logprobs for t in first.tokens]
        resumed = await collect(eng.open(PROMPTS[2], params, resumed=first.ids[:5], emitted=3,
                                         resumed_logprobs=lps[:5])[1])
        with pytest.raises(InvalidRequest, match="log probabilities"):
            eng.open(PROMPTS[2], params, resumed=first.ids[:5], emitted=3)
    assert resumed.ids == first.ids[3:]
    assert [t.logprobs for t in resumed.tokens[:2]] == lps[3:5]
    assert [t.logprobs.logprob for t in resumed.tokens[2:]] == pytest.approx(
        [lp.logprob for lp in lps[5:]], abs=1e-4)


async def test_sequences_of_one_prompt_share_its_prefill_and_draw_as_they_would_alone(
        instance: ModelInstance) -> None:
    """Four seeded sequences of one 90-token prompt (an n=4 request): the prompt is computed
    once, each of the others computes only its last position, and each draws the tokens it
    draws alone."""
    prompt = PROMPTS[3]
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=s, ignore_eos=True)
              for s in range(4)]
    with engine(instance, policy="mlfq", maxBatchTokens=32) as eng:
        alone = [(await collect(eng.open(prompt, p)[1])).ids for p in params]
        before = eng.counters.prompt_tokens
        got = await asyncio.gather(*(collect(eng.open(prompt, p)[1]) for p in params))
        assert eng.counters.prompt_tokens - before == len(prompt) + 3
        assert eng.counters.shared_tokens == 3 * (len(prompt) - 1)
    assert [g.ids for g in got] == alone
    assert len({tuple(a) for a in alone}) == 4  # the seeds drew apart
