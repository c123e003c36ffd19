"""Turning a pydantic ``ValidationError`` into the one-line message users see."""

from __future__ import annotations

from pydantic import ValidationError

from sllm.errors import InvalidRequest


def describe(e: ValidationError) -> tuple[str, str | None]:
    """A one-line message naming each failing field and its reason (``spec.replicas: unknown
    field; ...``), and the first field's dotted path (None when the error is not on a field)."""
    parts = []
    first: str | None = None
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        first = first or loc or None
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        parts.append(f"{loc}: {reason}" if loc else reason)
    return "; ".join(parts), first


def invalid_request(e: ValidationError) -> InvalidRequest:
    """The 400 a request that failed validation gets: ``invalid request: <describe(e)>``, with
    ``param`` the first failing field."""
    message, param = describe(e)
    return InvalidRequest(f"invalid request: {message}", param=param)
