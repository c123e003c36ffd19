"""The CUDA path in one process: an imported checkpoint loaded onto ``cuda:0`` from the SSD and
DRAM tiers, a model instance built around the device buffer, greedy and sampled decoding through
its batching engine, and a sequence resumed from its tokens (the destination side of a live
migration). Skipped without a
CUDA device; run on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from invoker.instance import ModelInstance
from invoker.warmup import warm_up
from sllm.sampling import SamplingParams
from store.checkpoint.loader import LoadedCheckpoint, load_checkpoint
from store.dram_pool import DramPool
from store.importer import import_model
from store.model_store import ModelStore
from tests.helpers.engine import collect, engine, generate_alone
from tests.helpers.kv_rounds import prefill_in_two_rounds
from tests.helpers.tiny_model import make_tiny_llama, save_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda:0"
N = 40  # tokens generated; seed 0's tiny model does not emit EOS within them
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama (seed 0) imported into a model store, as ``sllm model import`` does."""
    root = tmp_path_factory.mktemp("cuda")
    hf = save_tiny_llama(root / "hf", seed=0)
    store = ModelStore(root / "store")
    import_model(str(hf), store, name="tiny")
    return store.path("tiny")


@pytest.fixture(scope="module")
def reference() -> LlamaForCausalLM:
    """The same model, moved to the GPU by torch: what ``model.generate`` there produces."""
    model, _ = make_tiny_llama(seed=0)
    return model.to(DEVICE)


def instance_on_cuda(checkpoint: Path, pool: DramPool | None = None) -> tuple[
        ModelInstance, LoadedCheckpoint]:
    loaded = load_checkpoint(checkpoint, device=DEVICE, pool=pool)
    return ModelInstance.from_tensors(checkpoint, loaded.tensors, device=DEVICE), loaded


def greedy_reference(model: LlamaForCausalLM, prompt_ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids], device=DEVICE), do_sample=False,
                         max_new_tokens=N, eos_token_id=None)
    return [int(t) for t in out[0, len(prompt_ids):]]


def test_both_tiers_load_onto_the_device_and_decode_as_generate_does(
        checkpoint: Path, reference: LlamaForCausalLM) -> None:
    pool = DramPool(64 << 20)
    for tier in ("ssd", "dram"):
        instance, loaded = instance_on_cuda(checkpoint, pool)
        assert loaded.tier == tier and loaded.buffer.is_cuda
        assert loaded.lease is None  # the device holds its own copy; the pool entry stays cached
        low = loaded.buffer.data_ptr()
        high = low + loaded.buffer.numel()
        for name, param in instance.model.named_parameters():
            assert param.is_cuda and low <= param.data_ptr() < high, name  # no copy was made
        assert instance.model.model.rotary_emb.inv_freq.is_cuda
        prompt_ids = instance.encode(prompt=PROMPT, raw=True)
        got = generate_alone(instance, prompt_ids, SamplingParams(max_tokens=N, ignore_eos=True))
        assert got.finish_reason == "length"
        assert got.ids == greedy_reference(reference, prompt_ids)
    assert [(e.label, e.refs) for e in pool.entries()] == [("tiny", 0)]


def test_weights_on_the_device_equal_the_source_model(
        checkpoint: Path, reference: LlamaForCausalLM) -> None:
    instance, _ = instance_on_cuda(checkpoint)
    want = reference.state_dict()
    for name, tensor in instance.model.state_dict().items():
        assert torch.equal(tensor, want[name]), name


def test_sampling_on_the_device_is_reproducible_per_seed(checkpoint: Path) -> None:
    instance, _ = instance_on_cuda(checkpoint)
    prompt_ids = instance.encode(prompt=PROMPT, raw=True)

    def draw(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=N, temperature=1.0, top_p=0.9, seed=seed,
                                ignore_eos=True)
        return generate_alone(instance, prompt_ids, params).ids

    first = draw(1234)
    assert draw(1234) == first
    assert draw(1235) != first


@pytest.mark.parametrize("prepared", [False, True])
def test_a_resumed_generation_continues_exactly_on_the_device(
        checkpoint: Path, prepared: bool) -> None:
    """Token-based migration's destination (ServerlessLLM §5): given the tokens so far, with the
    KV cache recomputed in rounds beforehand or at resume, the engine generates what the source
    would."""
    instance, _ = instance_on_cuda(checkpoint)
    prompt_ids = instance.encode(prompt=PROMPT, raw=True)
    params = SamplingParams(max_tokens=N, ignore_eos=True)
    ids = generate_alone(instance, prompt_ids, params).ids
    at = N // 2
    cache, cached = None, 0
    if prepared:
        cache, cached = prefill_in_two_rounds(instance, [*prompt_ids, *ids[:at]])
    rest = generate_alone(instance, prompt_ids, params, resumed=ids[:at], emitted=at,
                          prepared=(cache, cached)).ids
    assert ids[:at] + rest == ids


def test_the_start_up_warm_up_runs_on_the_device() -> None:
    """The invoker's warm-up builds, runs and samples from a model on its own device, in every
    dtype a checkpoint is imported in."""
    assert warm_up(DEVICE) > 0
    assert torch.cuda.is_initialized()


def test_sequences_batched_on_the_device_each_decode_as_generate_alone(
        checkpoint: Path, reference: LlamaForCausalLM) -> None:
    """Six prompts of different lengths, two of them the same (their prefill shared), batched
    in one engine on the GPU under mlfq with a small token budget (prefills chunked beside the
    decodes): each sequence's greedy tokens are generate's on that prompt alone, and each
    token's log probability is the log-softmax of generate's logits there."""
    instance, _ = instance_on_cuda(checkpoint)
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 90, 12, 90, 60)]
    params = SamplingParams(max_tokens=N, ignore_eos=True, logprobs=3)

    async def run() -> list:  # type: ignore[type-arg]
        with engine(instance, policy="mlfq", maxBatchTokens=32) as eng:
            got = await asyncio.gather(*(collect(eng.open(p, params)[1]) for p in prompts))
            assert eng.counters.shared_tokens == 89
            return got

    got = asyncio.run(run())
    for prompt, seq in zip(prompts, got, strict=True):
        out = reference.generate(torch.tensor([prompt], device=DEVICE), do_sample=False,
                                 max_new_tokens=N, eos_token_id=None, output_logits=True,
                                 return_dict_in_generate=True)
        assert seq.ids == [int(t) for t in out.sequences[0, len(prompt):]]
        for tok, logits in zip(seq.tokens, out.logits, strict=True):
            lp = torch.log_softmax(logits[0].float(), -1)
            assert tok.logprobs is not None
            assert tok.logprobs.logprob == pytest.approx(float(lp[tok.token_id]), abs=1e-3)
