"""The one error hierarchy of sllm.

Every failure a user or another component can see is one of these classes. Each knows its HTTP
status and its OpenAI error ``type``; the services map them to responses in one place
(:mod:`sllm.http`), and clients turn an error body back into the same class
(:func:`from_body`), so an error raised on an invoker reaches the user unchanged.

::

    SllmError                      500  base class; never raised directly
    ├── InvalidRequest             400  malformed JSON, empty prompt, bad parameters
    │   ├── ManifestError          422  a manifest fails validation (names the field and reason)
    │   └── PromptTooLong          400  prompt + max_tokens exceed the model's context window
    ├── NotFound                   404  base for unknown names
    │   ├── FunctionNotFound       404  no function of that name is deployed
    │   ├── ModelNotFound          404  no model of that name in the model store
    │   └── InstanceNotFound       404  no instance with that id (unloaded, or never existed)
    ├── Conflict                   409  a function or model of that name already exists
    ├── Unauthorized               401  missing or wrong API key
    ├── TooManyRequests            429  the function's wait queue is full (has Retry-After)
    ├── Unavailable                503  nothing can serve now: no invoker, no capacity, deadline
    │                                   passed while waiting for a cold start (has Retry-After)
    │   └── NotLeader              503  this controller is a standby; the message names the leader
    ├── CheckpointError            500  a checkpoint in the store is truncated, corrupt or unreadable
    ├── InvokerError               502  an invoker failed or answered something unexpected
    │   ├── InvokerUnreachable     502  no connection to the assigned invoker (nothing generated)
    │   ├── StreamBroken           502  its token stream broke off mid-way (resumable elsewhere)
    │   └── MigrationFailed        502  a live migration was abandoned
    └── InternalError              500  a bug: anything not covered above
"""

from __future__ import annotations

from typing import Any, ClassVar


class SllmError(Exception):
    """Base of all sllm errors.

    Attributes:
        status: the HTTP status this error maps to.
        openai_type: the OpenAI error ``type`` string.
        code: a stable machine-readable name (the class name in snake case by default).
        param: the request field at fault, when there is one.
        retry_after: seconds a client should wait before retrying (only for 429/503).
    """

    status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    @classmethod
    def code(cls) -> str:
        """The stable error code: the class name in snake case (``FunctionNotFound`` ->
        ``function_not_found``)."""
        name = cls.__name__
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")

    def to_body(self) -> dict[str, Any]:
        """The OpenAI-shaped error envelope: ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "param": self.param,
                "code": self.code(),
            }
        }

    def headers(self) -> dict[str, str]:
        """Response headers for this error (``Retry-After`` in whole seconds when set)."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class InvalidRequest(SllmError):
    status = 400
    openai_type = "invalid_request_error"


class ManifestError(InvalidRequest):
    status = 422


class PromptTooLong(InvalidRequest):
    status = 400


class NotFound(SllmError):
    status = 404
    openai_type = "not_found_error"


class FunctionNotFound(NotFound):
    pass


class ModelNotFound(NotFound):
    pass


class InstanceNotFound(NotFound):
    pass


class ActivationNotFound(NotFound):
    pass


class Conflict(SllmError):
    status = 409
    openai_type = "invalid_request_error"


class Unauthorized(SllmError):
    status = 401
    openai_type = "authentication_error"


class TooManyRequests(SllmError):
    status = 429
    openai_type = "rate_limit_error"


class Unavailable(SllmError):
    status = 503
    openai_type = "server_error"


class NotLeader(Unavailable):
    """Raised by a standby controller: clients try the next controller they know."""


class CheckpointError(SllmError):
    status = 500
    openai_type = "server_error"


class InvokerError(SllmError):
    status = 502
    openai_type = "server_error"


class InvokerUnreachable(InvokerError):
    """The assigned invoker did not answer at all (no connection): the invocation can be tried
    on another instance, since nothing was generated."""


class StreamBroken(InvokerError):
    """The invoker's token stream broke off (the connection failed mid-stream, e.g. the invoker
    died): the generation can be resumed elsewhere from the tokens received."""


class MigrationFailed(InvokerError):
    """A live migration was abandoned (its destination failed or refused): the inferences it
    would have moved go on where they were."""


class InternalError(SllmError):
    status = 500
    openai_type = "server_error"


def _all_subclasses(cls: type[SllmError]) -> list[type[SllmError]]:
    out: list[type[SllmError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[SllmError]] = {c.code(): c for c in _all_subclasses(SllmError)}


def from_body(status: int, body: Any) -> SllmError:
    """Rebuild the error a peer sent from its response.

    Args:
        status: the HTTP status of the response.
        body: the decoded JSON body (an OpenAI-shaped envelope), or anything else.

    Returns:
        An instance of the class named by ``error.code`` when known; otherwise the base class that
        matches ``status`` (``InvokerError`` for an unexpected answer).
    """
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        cls = _BY_CODE.get(str(err.get("code")))
        message = str(err.get("message", "unknown error"))
        if cls is not None:
            return cls(message, param=err.get("param"))
        for fallback in (InvalidRequest, NotFound, Conflict, TooManyRequests, Unavailable):
            if fallback.status == status:
                return fallback(message, param=err.get("param"))
    return InvokerError(f"peer answered HTTP {status}: {str(body)[:200]}")
