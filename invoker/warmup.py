"""Start-up warm-up: pay the invoker's one-time costs before it registers, not on the first cold
start. A fresh Python process spends over a second the first time it builds and runs a model
(importing the architecture's modules and the tokenizer classes, torch's lazy kernel set-up);
every later load skips it. The warm-up builds a one-layer llama from a config (random weights,
nothing read from disk), runs a prefill and a decode step, and imports the tokenizer classes.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def warm_up() -> float:
    """Run the warm-up (blocking; a second or two on first use). Returns its wall time (s)."""
    t0 = time.perf_counter()
    import torch
    from transformers import (
        AutoModelForCausalLM,
        DynamicCache,
        LlamaConfig,
        PreTrainedTokenizerFast,  # noqa: F401 - imported for its side effect
    )

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)  # the path instances are built on
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.inference_mode():
        cache = DynamicCache(config=config)
        out = model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        model(input_ids=nxt, past_key_values=cache, use_cache=True)
    seconds = time.perf_counter() - t0
    log.info("warm-up done in %.2f s", seconds)
    return seconds
