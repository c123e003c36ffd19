"""SSE framing and parsing are each other's inverse."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sllm.sse import aparse_events, event, parse_events


def test_events_written_parse_back() -> None:
    text = event({"index": 0, "text": "héllo\n"}, "token") + event({"a": [1]}) + event("[DONE]")
    assert list(parse_events(text.splitlines())) == [
        ("token", {"index": 0, "text": "héllo\n"}), ("message", {"a": [1]}), ("message", "[DONE]"),
    ]


def test_an_event_name_applies_to_its_own_event_only() -> None:
    lines = ["event: done", "data: {}", "", "data: 1", ""]
    assert list(parse_events(lines)) == [("done", {}), ("message", 1)]



def test_lines_that_arrive_asynchronously_give_each_event_once_its_blank_line_came() -> None:
    """The first event comes before any line of the second is read; the last, unterminated
    one at the stream's end."""
    read: list[str] = []
    text = event({"i": 1}, "token") + event({"i": 2}, "done").rstrip("\n")

    async def lines() -> AsyncIterator[str]:
        for line in text.split("\n"):
            read.append(line)
            yield line

    async def collect() -> list[tuple[tuple[str, object], int]]:
        return [(item, len(read)) async for item in aparse_events(lines())]

    got = asyncio.run(collect())
    assert [item for item, _ in got] == [("token", {"i": 1}), ("done", {"i": 2})]
    first_block = event({"i": 1}, "token").count("\n")
    assert got[0][1] == first_block  # no line of the second event read yet
