"""Server-Sent Events (``text/event-stream``): framing on the gateway, parsing for its clients
(the CLI, the benchmarks, the tests)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(data: Any, name: str | None = None) -> str:
    """One SSE event: optional ``event:`` line, one ``data:`` line of JSON (or the string as is),
    and the blank line that ends it."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {payload}\n\n"


def parse_events(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """``(event name, data)`` per event of a stream's lines, as :func:`event` writes them: the
    name is ``message`` when the event has none; data is decoded JSON, except OpenAI's closing
    ``[DONE]``, which stays a string."""
    name = "message"
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            payload = line[5:].strip()
            yield name, payload if payload == "[DONE]" else json.loads(payload)
            name = "message"


async def aparse_events(lines: AsyncIterable[str]) -> AsyncIterator[tuple[str, Any]]:
    """:func:`parse_events` over lines that arrive asynchronously (``httpx``'s
    ``aiter_lines``): each event as soon as the blank line that ends it has come."""
    block: list[str] = []
    async for line in lines:
        if line:
            block.append(line)
            continue
        for item in parse_events(block):
            yield item
        block = []
    for item in parse_events(block):
        yield item
