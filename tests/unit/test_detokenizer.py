"""Incremental detokenization on the tiny byte-level BPE tokenizer (its 256 byte tokens make
partial UTF-8 characters common in random id sequences)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from transformers import PreTrainedTokenizerFast

from invoker.detokenizer import IncrementalDetokenizer
from tests.helpers.tiny_model import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def stream(
    tokenizer: PreTrainedTokenizerFast,
    ids: Sequence[int],
    prompt_ids: Sequence[int] | None = None,
) -> list[str]:
    """Every piece the detokenizer emits for ``ids``, the flush last."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    return [detokenizer.push(i) for i in ids] + [detokenizer.flush()]


def test_random_id_sequences_join_to_the_full_decode(tokenizer: PreTrainedTokenizerFast) -> None:
    rng = random.Random(0)
    partial = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd"]
    assert partial  # the vocabulary has tokens that hold half a character
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        ids += rng.sample(partial, 2)  # make sure some sequences end mid-character
        rng.shuffle(ids)
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_character_split_over_byte_tokens_comes_out_whole_with_its_last_byte(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    text = "caf\u00e9 \u65e5\u672c\u8a9e \u2713"
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert "" in pieces[:-1]  # some token completed nothing
    assert all("\ufffd" not in p for p in pieces)


def test_flush_returns_a_dangling_partial_character(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("ok \u65e5")[:-1]  # drop the last byte of the 3-byte character
    detokenizer = IncrementalDetokenizer(tokenizer)
    pushed = "".join(detokenizer.push(i) for i in ids)
    assert detokenizer.pending
    tail = detokenizer.flush()
    assert tail.endswith("\ufffd")
    assert pushed + tail == tokenizer.decode(ids)
    assert not detokenizer.pending
    assert detokenizer.flush() == ""


def test_special_tokens_are_skipped(tokenizer: PreTrainedTokenizerFast) -> None:
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = [start, *tokenizer.encode("Paris"), end, *tokenizer.encode(" is nice")]
    assert "".join(stream(tokenizer, ids)) == "Paris is nice"


def test_prompt_context_is_not_emitted(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = tokenizer.encode("The capital of France is")
    generated = tokenizer.encode(" Paris, caf\u00e9.")
    out = "".join(stream(tokenizer, generated, prompt_ids=prompt))
    assert out == " Paris, caf\u00e9."
