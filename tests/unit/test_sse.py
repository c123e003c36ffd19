"""SSE framing and parsing are each other's inverse."""

from __future__ import annotations

from sllm.sse import event, parse_events


def test_events_written_parse_back() -> None:
    text = event({"index": 0, "text": "héllo\n"}, "token") + event({"a": [1]}) + event("[DONE]")
    assert list(parse_events(text.splitlines())) == [
        ("token", {"index": 0, "text": "héllo\n"}), ("message", {"a": [1]}), ("message", "[DONE]"),
    ]


def test_an_event_name_applies_to_its_own_event_only() -> None:
    lines = ["event: done", "data: {}", "", "data: 1", ""]
    assert list(parse_events(lines)) == [("done", {}), ("message", 1)]
