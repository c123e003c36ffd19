"""Start-up warm-up: pay the invoker's one-time costs before it registers, not on the first cold
start. A fresh Python process spends over a second the first time it builds and runs a model
(importing the architecture's modules and the tokenizer classes, torch's lazy kernel set-up);
every later load skips it. The warm-up builds a one-layer llama from a config (random weights,
nothing read from disk), runs a prefill and a decode step, samples from the logits, and imports
the tokenizer classes.

On a GPU the first model run also creates the CUDA context and the cuBLAS handles and loads each
kernel's module on its first launch, so there the warm-up runs on the invoker's device, in every
dtype a checkpoint is imported in, and makes one asynchronous copy from page-locked memory on a
side stream, as the checkpoint loader does (what it saves: docs/architecture.md, Decisions).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def warm_up(device: str = "cpu") -> float:
    """Run the warm-up on ``device`` (``"cpu"`` or ``"cuda:N"``; blocking, a second or two on
    first use). Returns its wall time (s).

    Raises:
        RuntimeError: ``device`` is a CUDA device and torch sees none, or torch cannot use it.
    """
    t0 = time.perf_counter()
    import torch
    from transformers import (
        AutoModelForCausalLM,
        DynamicCache,
        LlamaConfig,
        PreTrainedTokenizerFast,  # noqa: F401 - imported for its side effect
    )

    from invoker.generation import sample
    from sllm.sampling import SamplingParams

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"cannot warm up on {device}: torch sees no CUDA device")
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)  # the path instances are built on
    dtypes = [torch.float32] if dev.type == "cpu" else [torch.float32, torch.bfloat16,
                                                          torch.float16]
    generator = torch.Generator(device=dev).manual_seed(0)
    for dtype in dtypes:
        model = AutoModelForCausalLM.from_config(config).to(device=dev, dtype=dtype).eval()
        with torch.inference_mode():
            cache = DynamicCache(config=config)
            out = model(input_ids=torch.tensor([[1, 2, 3]], device=dev), cache=cache,
                        use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            for params in (SamplingParams(max_tokens=1),
                           SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9)):
                sample(out.logits[0, -1], params, generator)
    if dev.type == "cuda":
        host = torch.empty(1 << 20, dtype=torch.uint8).pin_memory()
        stream = torch.cuda.Stream(dev)
        with torch.cuda.stream(stream):
            torch.empty_like(host, device=dev).copy_(host, non_blocking=True)
        stream.synchronize()
    seconds = time.perf_counter() - t0
    log.info("warm-up on %s done in %.2f s", device, seconds)
    return seconds
