"""Incremental detokenization: turn a stream of token ids into a stream of text pieces.

Decoding each token alone is wrong: a byte-level BPE token may carry half of a UTF-8 character,
and SentencePiece decoders drop or add spaces depending on the neighbours. The algorithm (as in
vLLM's ``detokenize_incrementally`` and TGI's ``decode_token``) keeps two offsets into the token
list:

- ``read_offset``: tokens before it have had their text emitted;
- ``prefix_offset``: where a short window of already-emitted tokens starts, decoded again as
  context so the next piece comes out as it would inside the full text.

On each new token it decodes ``tokens[prefix_offset:read_offset]`` (the prefix) and
``tokens[prefix_offset:]`` (the prefix plus the new tokens). If the second is longer and does not
end with U+FFFD (the replacement character that stands for an incomplete UTF-8 sequence), the extra
text is emitted and both offsets move on; otherwise nothing is emitted and the tokens wait for
more bytes. :meth:`IncrementalDetokenizer.flush` emits whatever still waits (with its U+FFFD) at
the end.

Worked example (``é`` split over two byte tokens ``<C3>`` and ``<A9>``)::

    push("caf")  -> "caf"     prefix=0 read=1
    push(<C3>)   -> ""        "caf\\ufffd" ends with U+FFFD: wait
    push(<A9>)   -> "é"       window "caf" + "é"; prefix=1 read=3
    flush()      -> ""

Special tokens are skipped. The concatenation of every output equals
``tokenizer.decode(ids, skip_special_tokens=True)``; tests check it on random id sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import transformers

REPLACEMENT_CHAR = "\ufffd"

CONTEXT_TOKENS = 5
"""Context tokens (the tail of ``prompt_ids``) decoded before the first generated token."""


class IncrementalDetokenizer:
    """Streams the text of one token sequence, piece by piece. Not thread-safe.

    Args:
        tokenizer: the model's tokenizer.
        prompt_ids: tokens that precede the stream (a prompt). Their text is never emitted; the last
            ``CONTEXT_TOKENS`` of them only give the first new tokens their context, so a
            leading space comes out as it would mid-text. Without them the output equals
            ``tokenizer.decode(pushed ids, skip_special_tokens=True)``.
    """

    def __init__(
        self,
        tokenizer: transformers.PreTrainedTokenizerBase,
        prompt_ids: Sequence[int] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        context = list(prompt_ids or [])[-CONTEXT_TOKENS:]
        self._tokens: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    @property
    def pending(self) -> bool:
        """Whether pushed tokens wait for more bytes (their text has not been emitted yet)."""
        return self._read_offset < len(self._tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        self._tokens.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return the text of the tokens still waiting (may contain U+FFFD) and emit nothing more
        for them; "" when none wait."""
        return self._emit(final=True)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._tokens[start:end], skip_special_tokens=True)

    def _emit(self, *, final: bool) -> str:
        if not self.pending:
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return new_text[len(prefix_text) :]
