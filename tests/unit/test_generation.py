"""One sequence's stream through an instance's batching engine, and the model instance, on
the tiny random-weight llama.

``model.generate`` is the reference: our greedy stream must pick the same tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from invoker.engine.batching import InstanceEngine
from invoker.instance import ModelInstance
from sllm.errors import CheckpointError, InvalidRequest, PromptTooLong
from sllm.messages import TokenMessage
from sllm.sampling import SamplingParams
from tests.helpers.engine import Generated, collect, engine, generate
from tests.helpers.tiny_model import make_tiny_llama, save_tiny_llama

QUESTION = "What is the capital of France?"
RAW_PROMPT = "The quick brown fox"

Tiny = dict[int, tuple[LlamaForCausalLM, PreTrainedTokenizerFast]]
"""seed -> (model, tokenizer)"""
Instances = dict[int, ModelInstance]
"""seed -> instance wrapping the same model"""


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    return {seed: make_tiny_llama(seed=seed) for seed in (0, 1)}


@pytest.fixture(scope="module")
def instances(tiny: Tiny) -> Instances:
    return {seed: ModelInstance.from_model(m, t) for seed, (m, t) in tiny.items()}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return {
        seed: save_tiny_llama(tmp_path_factory.mktemp(f"tiny{seed}"), seed=seed) for seed in (0, 1)
    }


def reference_greedy(
    model: LlamaForCausalLM, prompt_ids: list[int], n: int, *, ignore_eos: bool = False
) -> list[int]:
    """New tokens of ``model.generate`` (greedy); through EOS when ``ignore_eos``."""
    kw = {"eos_token_id": None} if ignore_eos else {}
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n, **kw)
    return [int(t) for t in out[0, len(prompt_ids) :]]


async def run(instance: ModelInstance, prompt_ids: list[int], params: SamplingParams
              ) -> Generated:
    """One sequence alone on an engine of its own."""
    with engine(instance) as eng:
        return await generate(eng, prompt_ids, params)


def pack_like_loader(
    state: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Copy every tensor's bytes into one uint8 buffer and return views over it, as the
    checkpoint loader does; tensors that share memory (tied weights) share one view."""
    offsets: dict[int, int] = {}
    total = 0
    for tensor in state.values():
        if tensor.data_ptr() not in offsets:
            offsets[tensor.data_ptr()] = total
            total += -(-tensor.numel() * tensor.element_size() // 64) * 64  # 64-byte aligned
    buffer = torch.empty(total, dtype=torch.uint8)
    views: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        ptr = tensor.data_ptr()
        if ptr not in views:
            start = offsets[ptr]
            raw = buffer[start : start + tensor.numel() * tensor.element_size()]
            raw.copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
            views[ptr] = raw.view(tensor.dtype).view(tensor.shape)
        out[name] = views[ptr]
    return buffer, out


# ---- greedy equals model.generate ---------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["chat", "raw"])
async def test_greedy_stream_picks_the_same_tokens_as_generate(
    tiny: Tiny,
    instances: Instances,
    seed: int,
    kind: str,
) -> None:
    model, tokenizer = tiny[seed]
    instance = instances[seed]
    if kind == "chat":
        prompt_ids = instance.encode(prompt=QUESTION)
    else:
        prompt_ids = instance.encode(prompt=RAW_PROMPT, raw=True)
    got = await run(instance, prompt_ids, SamplingParams(max_tokens=40))
    ids = got.ids
    expected = reference_greedy(model, prompt_ids, 40)
    if got.finish_reason == "stop":
        assert ids + [tokenizer.eos_token_id] == expected
    else:
        assert got.finish_reason == "length"
        assert ids == expected
    assert [t.index for t in got.tokens] == list(range(len(ids)))
    assert got.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert (got.done.prompt_tokens, got.done.completion_tokens) == (len(prompt_ids), len(ids))


async def test_eos_finishes_with_stop_and_is_neither_sent_nor_counted(
    tiny: Tiny, instances: Instances
) -> None:
    model, tokenizer = tiny[1]
    prompt_ids = instances[1].encode(prompt=QUESTION)
    got = await run(instances[1], prompt_ids, SamplingParams(max_tokens=100))
    assert got.finish_reason == "stop"
    assert tokenizer.eos_token_id not in got.ids
    assert got.done.completion_tokens == len(got.ids) < 100
    expected = reference_greedy(model, prompt_ids, 100)
    assert got.ids + [tokenizer.eos_token_id] == expected


async def test_ignore_eos_generates_through_eos_to_max_tokens(
    tiny: Tiny, instances: Instances
) -> None:
    model, tokenizer = tiny[1]
    prompt_ids = instances[1].encode(prompt=QUESTION)
    stopped = (await run(instances[1], prompt_ids, SamplingParams(max_tokens=100))).done
    n = stopped.completion_tokens + 5  # the plain run stops at its EOS, before n
    got = await run(instances[1], prompt_ids, SamplingParams(max_tokens=n, ignore_eos=True))
    assert got.finish_reason == "length"
    assert len(got.ids) == got.done.completion_tokens == n
    assert got.ids[stopped.completion_tokens] == tokenizer.eos_token_id  # sent as a token now
    assert got.ids == reference_greedy(model, prompt_ids, n, ignore_eos=True)


async def test_max_tokens_reached_finishes_with_length(instances: Instances) -> None:
    prompt_ids = instances[1].encode(prompt=QUESTION)
    got = await run(instances[1], prompt_ids, SamplingParams(max_tokens=5))
    assert got.finish_reason == "length"
    assert len(got.tokens) == got.done.completion_tokens == 5


async def test_partial_utf8_tokens_stream_empty_text_yet_join_to_the_full_decode(
    tiny: Tiny, instances: Instances
) -> None:
    _, tokenizer = tiny[0]
    prompt_ids = instances[0].encode(prompt=QUESTION)
    with engine(instances[0]) as eng:
        # every cut point, so the stream sometimes ends mid-character (the held-back token then
        # comes last, with the flush)
        runs = await asyncio.gather(*(generate(eng, prompt_ids, SamplingParams(max_tokens=n))
                                      for n in range(1, 41)))
    for got in runs:
        assert got.text == tokenizer.decode(got.ids, skip_special_tokens=True)
    # seed 0 really produces partial byte tokens, held back as ""
    assert any(tokenizer.decode([i]) == "\ufffd" for i in runs[-1].ids)
    assert any(t.text == "" for t in runs[-1].tokens)


async def test_timings_are_measured(instances: Instances) -> None:
    prompt_ids = instances[0].encode(prompt=QUESTION)
    done = (await run(instances[0], prompt_ids, SamplingParams(max_tokens=4))).done
    assert done.prefill_seconds > 0
    assert done.decode_seconds > 0


async def test_one_engine_runs_sequences_one_after_another(instances: Instances) -> None:
    prompt_ids = instances[0].encode(prompt=QUESTION)
    params = SamplingParams(max_tokens=10)
    with engine(instances[0]) as eng:
        first = await generate(eng, prompt_ids, params)
        second = await generate(eng, prompt_ids, params)
    assert first.tokens == second.tokens and len(first.tokens) == 10


# ---- from_tensors: the loader's buffer becomes the parameters -----------------------------------


@pytest.mark.parametrize("seed", [0, 1])
async def test_from_tensors_uses_the_loader_buffer_without_copying_and_matches_generate(
    tiny: Tiny, model_dirs: dict[int, Path], seed: int
) -> None:
    model, tokenizer = tiny[seed]
    buffer, tensors = pack_like_loader(model.state_dict())
    instance = ModelInstance.from_tensors(model_dirs[seed], tensors)
    low, high = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    for name, param in instance.model.named_parameters(remove_duplicate=False):
        assert low <= param.data_ptr() < high, name
        assert param.data_ptr() == tensors[name].data_ptr(), name
    assert instance.model.lm_head.weight is instance.model.model.embed_tokens.weight
    assert not instance.model.training

    prompt_ids = instance.encode(prompt=QUESTION)
    got = await run(instance, prompt_ids, SamplingParams(max_tokens=40))
    expected = reference_greedy(model, prompt_ids, 40)
    stop = [tokenizer.eos_token_id] if got.finish_reason == "stop" else []
    assert got.ids + stop == expected


def test_from_tensors_rebuilds_rotary_inv_freq_on_the_device(
    tiny: Tiny, model_dirs: dict[int, Path]
) -> None:
    model, _ = tiny[0]
    _, tensors = pack_like_loader(model.state_dict())
    rotary = ModelInstance.from_tensors(model_dirs[0], tensors).model.model.rotary_emb
    assert rotary.inv_freq.device == torch.device("cpu")
    assert torch.equal(rotary.inv_freq, model.model.rotary_emb.inv_freq)
    assert torch.equal(rotary.original_inv_freq, model.model.rotary_emb.original_inv_freq)


def test_from_tensors_ties_lm_head_when_the_checkpoint_omits_it(
    tiny: Tiny, model_dirs: dict[int, Path]
) -> None:
    model, _ = tiny[0]
    _, tensors = pack_like_loader(model.state_dict())
    del tensors["lm_head.weight"]
    instance = ModelInstance.from_tensors(model_dirs[0], tensors)
    assert instance.model.lm_head.weight is instance.model.model.embed_tokens.weight
    embedding = tensors["model.embed_tokens.weight"]
    assert instance.model.lm_head.weight.data_ptr() == embedding.data_ptr()


@pytest.mark.parametrize("fault", ["missing", "unexpected", "wrong shape"])
def test_from_tensors_rejects_a_checkpoint_that_does_not_fit(
    tiny: Tiny, model_dirs: dict[int, Path], fault: str
) -> None:
    model, _ = tiny[0]
    tensors = dict(model.state_dict())
    if fault == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif fault == "unexpected":
        tensors["model.layers.9.extra.weight"] = torch.zeros(3)
    else:
        tensors["model.norm.weight"] = torch.ones(65)
    with pytest.raises(CheckpointError):
        ModelInstance.from_tensors(model_dirs[0], tensors)


async def test_from_pretrained_loads_a_hugging_face_folder(
    tiny: Tiny, model_dirs: dict[int, Path]
) -> None:
    instance = ModelInstance.from_pretrained(model_dirs[1])
    prompt_ids = instance.encode(prompt=QUESTION)
    got = await run(instance, prompt_ids, SamplingParams(max_tokens=100))
    assert got.finish_reason == "stop"
    expected = reference_greedy(tiny[1][0], prompt_ids, 100)
    assert got.ids + [tiny[1][1].eos_token_id] == expected


def test_eos_ids_gather_every_source_including_lists() -> None:
    model, tokenizer = make_tiny_llama(seed=0)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    instance = ModelInstance.from_model(model, tokenizer)
    assert instance.eos_token_ids == frozenset({tokenizer.eos_token_id, 7})


# ---- sampling -----------------------------------------------------------------------------------


async def sampled(instance: ModelInstance, **kwargs: float | None) -> list[int]:
    params = SamplingParams(max_tokens=20, **kwargs)  # type: ignore[arg-type]
    return (await run(instance, instance.encode(prompt=QUESTION), params)).ids


async def test_the_same_seed_samples_the_same_tokens(instances: Instances) -> None:
    first = await sampled(instances[0], temperature=1.0, seed=42)
    assert first == await sampled(instances[0], temperature=1.0, seed=42)


async def test_different_seeds_sample_different_tokens(instances: Instances) -> None:
    first = await sampled(instances[0], temperature=1.0, seed=1)
    assert first != await sampled(instances[0], temperature=1.0, seed=2)


async def test_top_p_with_temperature_is_reproducible_and_a_tiny_top_p_is_greedy(
    instances: Instances,
) -> None:
    nucleus = await sampled(instances[0], temperature=0.8, top_p=0.9, seed=3)
    assert nucleus == await sampled(instances[0], temperature=0.8, top_p=0.9, seed=3)
    greedy = await sampled(instances[0])
    assert await sampled(instances[0], temperature=1.5, top_p=1e-6, seed=3) == greedy


async def test_sampling_leaves_the_global_rng_alone(instances: Instances) -> None:
    before = torch.get_rng_state()
    await sampled(instances[0], temperature=1.0)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"seed": "7"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_bad_sampling_params_are_refused_naming_the_field(
    kwargs: dict[str, object], param: str
) -> None:
    """The bounds of :mod:`sllm.sampling`, one set for the manifest, both APIs and the engine:
    a request body failing them is a 400 naming ``param`` (the e2e tests)."""
    arguments: dict[str, object] = {"max_tokens": 4, **kwargs}
    with pytest.raises(ValidationError) as caught:
        SamplingParams(**arguments)  # type: ignore[arg-type]
    assert caught.value.errors()[0]["loc"] == (param,)


# ---- stopping early -----------------------------------------------------------------------------


async def wait_for_cancelled(eng: InstanceEngine) -> None:
    while eng.counters.cancelled == 0:
        await asyncio.sleep(0.005)


async def test_closing_the_stream_cancels_between_steps(tiny: Tiny, instances: Instances) -> None:
    """The client goes away after three tokens: the sequence leaves at the next iteration
    boundary, cancelled, and nothing more is computed for it (its DoneMessage has no reader)."""
    model, _ = tiny[0]
    prompt_ids = instances[0].encode(prompt=QUESTION)
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    with engine(instances[0]) as eng:
        _, stream = eng.open(prompt_ids, params)
        got: list[TokenMessage] = []
        async for msg in stream:
            assert isinstance(msg, TokenMessage), msg
            got.append(msg)
            if msg.index == 2:
                break
        await stream.aclose()
        await asyncio.wait_for(wait_for_cancelled(eng), 5)
        drawn = eng.counters.generation_tokens
        await asyncio.sleep(0.1)
        assert eng.counters.generation_tokens == drawn < 200
        assert eng.counters.finished == 1
        assert eng.scheduler.jobs == {} and eng.scheduler.used == 0
    ids = [t.token_id for t in got]
    assert ids == reference_greedy(model, prompt_ids, 3, ignore_eos=True)


async def test_a_sequence_cancelled_while_it_waits_computes_nothing(
    instances: Instances,
) -> None:
    """Run to completion: the second sequence waits for the first; its client gives up before
    it runs, so it is never prefilled, and the first runs on undisturbed."""
    prompt_ids = instances[0].encode(prompt=QUESTION)
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    with engine(instances[0], policy="run-to-completion") as eng:
        first = asyncio.create_task(collect(eng.open(prompt_ids, params)[1]))
        _, stream = eng.open([5, 6, 7], SamplingParams(max_tokens=5))  # arrives second
        waiting = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.01)  # the stream starts and waits for its first message
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await stream.aclose()  # as the invoker's route does when its client goes away
        await asyncio.wait_for(wait_for_cancelled(eng), 5)
        assert not first.done()
        assert len((await first).ids) == 200
        assert eng.counters.generation_tokens == 200  # none for the cancelled one
        assert eng.counters.prompt_tokens == len(prompt_ids)  # nor a prefill


async def test_closing_a_stream_before_reading_it_cancels(instances: Instances) -> None:
    with engine(instances[0]) as eng:
        _, stream = eng.open([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))
        await stream.aclose()
        await asyncio.wait_for(wait_for_cancelled(eng), 2)


async def test_generation_is_clipped_to_the_context_window(
    tiny: Tiny,
) -> None:
    model, tokenizer = tiny[0]
    instance = ModelInstance.from_model(model, tokenizer, context_window=40)
    prompt_ids = instance.encode(prompt=QUESTION)
    got = await run(instance, prompt_ids, SamplingParams(max_tokens=100))
    assert got.finish_reason == "length"
    assert len(prompt_ids) + len(got.ids) == 40


# ---- prompts ------------------------------------------------------------------------------------


def test_a_plain_prompt_is_a_single_user_message_unless_raw(
    tiny: Tiny, instances: Instances
) -> None:
    _, tokenizer = tiny[0]
    instance = instances[0]
    chat = instance.encode(messages=[{"role": "user", "content": QUESTION}])
    assert instance.encode(prompt=QUESTION) == chat
    assert tokenizer.decode(chat).endswith("<|im_start|>assistant\n")
    assert instance.encode(prompt=QUESTION, raw=True) == tokenizer.encode(QUESTION)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": " \n\t"}, "prompt"),
        ({"prompt": "", "raw": True}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": " "}]},
            "messages[1].content",
        ),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ],
)
def test_bad_prompts_are_refused_naming_the_field(
    instances: Instances, kwargs: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        instances[0].encode(**kwargs)  # type: ignore[arg-type]
    assert type(caught.value) is InvalidRequest
    assert caught.value.param == param


def test_a_prompt_that_fills_the_context_window_is_too_long(instances: Instances) -> None:
    window = instances[0].context_window
    with pytest.raises(PromptTooLong) as caught:
        instances[0].encode(prompt="fox " * window, raw=True)
    assert str(window) in caught.value.message
    assert str(len(instances[0].tokenizer.encode("fox " * window))) in caught.value.message


async def test_the_engine_refuses_prompt_ids_that_leave_no_room(instances: Instances) -> None:
    window = instances[0].context_window
    with engine(instances[0]) as eng:
        with pytest.raises(PromptTooLong):
            eng.open([5] * window, SamplingParams(max_tokens=1))
        with pytest.raises(InvalidRequest) as caught:
            eng.open([], SamplingParams(max_tokens=1))
        assert caught.value.param == "prompt"
        # one position short of the window leaves room for one token
        got = await collect(eng.open([5] * (window - 1), SamplingParams(max_tokens=5))[1])
        assert got.finish_reason in ("length", "stop") and len(got.ids) <= 1
