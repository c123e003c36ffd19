"""Stop sequences in a stream of text: where the generated text must end, found while it is
streamed, also when a stop string spans several tokens.

:class:`StopMatcher` takes each token's text and answers what may be sent now: the text before
the first stop string once one appears (the stream then ends, the stop string itself not sent,
as OpenAI does), else everything but the longest tail that could still begin a stop string,
which it holds until the next text shows whether it does.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Finds stop strings in streamed text.

    Args:
        stops: the stop strings, non-empty.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """The text that may be sent after ``text`` arrived, and whether a stop string ended
        the stream (the text then stops before it)."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The text held back, once the stream ends otherwise."""
        held, self.held = self.held, ""
        return held
