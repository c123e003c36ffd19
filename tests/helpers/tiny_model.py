"""Small random-weight llama models for tests, built offline from a transformers config.

The tokenizer is a byte-level BPE trained on a few sentences at build time (no hub access), with a
ChatML chat template like SmolLM2's, so chat and completion prompts work as on the real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "Serverless functions start on demand and scale to zero when idle.",
    "Tokens stream back to the client one by one as they are generated.",
    "Cold starts load the checkpoint; warm starts reuse a loaded instance.",
    "héllo wörld, naïve café: unicode text ✓ 日本語",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab ~300) with ChatML special tokens and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, tie_word_embeddings: bool = True,
    hidden_size: int = 64, num_hidden_layers: int = 2, max_position_embeddings: int = 256,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A 2-layer llama (hidden 64) with random weights and its tokenizer.

    Args:
        seed: seeds torch before the weights are drawn, so equal seeds give equal models.
        dtype: the parameters' dtype.
        tie_word_embeddings: share the input embedding with the LM head, as SmolLM2 does.
        hidden_size, num_hidden_layers: larger values make a slower model (its MLP is twice
            the hidden size), for tests that need a generation to last.
        max_position_embeddings: the context window (tokens).
    """
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.3,  # larger than default so greedy output varies token to token
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    return model, tokenizer


def save_tiny_llama(path: Path, **kwargs: object) -> Path:
    """Write a tiny llama as a Hugging Face model folder (config.json, model.safetensors,
    tokenizer files) at ``path``; keyword arguments go to :func:`make_tiny_llama`."""
    model, tokenizer = make_tiny_llama(**kwargs)  # type: ignore[arg-type]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
