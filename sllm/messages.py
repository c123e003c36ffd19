"""Typed messages between components, and the records kept in etcd.

Every body that crosses a process boundary is one of these pydantic models (``extra="forbid"``):

- etcd records: :class:`FunctionRecord`, :class:`InvokerRecord`, :class:`InstanceRecord`;
- gateway -> controller: :class:`AcquireRequest` -> :class:`Assignment`, :class:`ReleaseRequest`;
- controller -> invoker: :class:`LoadRequest` -> :class:`LoadResponse`;
- gateway -> invoker: :class:`GenerateRequest`, answered by a stream of newline-delimited JSON
  :class:`TokenMessage` ... then one :class:`DoneMessage` or :class:`ErrorMessage`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from sllm.config import MAX_PROMPT_CHARS
from sllm.manifest import FunctionManifest
from sllm.states import InstanceState


class Wire(BaseModel):
    """Base of every wire message: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


# --- etcd records -------------------------------------------------------------------------------


class FunctionRecord(Wire):
    manifest: FunctionManifest
    created: float  # unix seconds
    updated: float  # unix seconds
    generation: int = 1  # bumped on every update


class InvokerRecord(Wire):
    id: str
    url: str  # http://host:port of the invoker's API
    device: str  # "cpu" or "cuda:N": where its instances run
    memory_bytes: int  # instance memory budget (bytes)
    started: float  # unix seconds
    pid: int


class CheckpointRecord(Wire):
    """Where a model's checkpoint sits on one invoker: the fastest tier holding it."""

    invoker_id: str
    model: str
    tier: Literal["dram", "ssd"]
    nbytes: int  # checkpoint size (bytes)
    updated: float  # unix seconds


class InstanceRecord(Wire):
    id: str
    function: str
    model: str
    invoker_id: str
    invoker_url: str
    state: InstanceState
    created: float  # unix seconds
    memory_bytes: int  # what the manifest reserved on the invoker
    loaded_at: float | None = None  # unix seconds
    last_used: float | None = None  # unix seconds the last invocation ended
    load_seconds: float | None = None  # wall time of the load (read + verify + build the model)
    read_seconds: float | None = None  # of which reading and verifying the checkpoint
    tier: str | None = None  # where the load read the checkpoint from: "dram" or "ssd"
    reason: str | None = None  # why it stopped, when it did


# --- gateway <-> controller ---------------------------------------------------------------------


class AcquireRequest(Wire):
    function: str


class Assignment(Wire):
    """Where one invocation runs. The gateway must release it when the invocation ends."""

    function: str
    model: str
    instance_id: str
    invoker_url: str
    cold: bool  # this invocation waited for a load it caused or joined
    queue_seconds: float  # time waiting for capacity, excluding the load
    load_seconds: float  # time spent waiting for the checkpoint load (0 when warm)
    tier: str | None = None  # where the instance's checkpoint was loaded from ("dram", "ssd")
    defaults: dict[str, Any]  # the function's generation defaults (maxTokens, temperature, topP)


class ReleaseRequest(Wire):
    instance_id: str


# --- controller <-> invoker ---------------------------------------------------------------------


class LoadRequest(Wire):
    instance_id: str
    function: str
    model: str
    device: str = "auto"


class LoadResponse(Wire):
    instance_id: str
    device: str
    nbytes: int  # checkpoint bytes read
    load_seconds: float  # wall time: read + verify + build the model
    read_seconds: float  # of which reading the checkpoint into memory and verifying checksums
    tier: str  # where the checkpoint came from: "dram" (the invoker's pool) or "ssd"


# --- gateway <-> invoker ------------------------------------------------------------------------


class ChatMessage(Wire):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(Wire):
    """One generation. Exactly one of ``prompt`` and ``messages``."""

    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = None
    raw: bool = False  # prompt is plain text to complete, not a user message
    max_tokens: int = Field(ge=1, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        check_prompt(self.prompt, self.messages)
        return self


def check_prompt(prompt: str | None, messages: list[ChatMessage] | None) -> None:
    """Raise ValueError unless exactly one of ``prompt`` / ``messages`` is given and non-empty."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    if prompt is not None and not prompt.strip():
        raise ValueError("prompt must not be empty")
    if messages is not None:
        if not messages:
            raise ValueError("messages must not be empty")
        total = sum(len(m.content) for m in messages)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"messages hold {total} characters; the limit is {MAX_PROMPT_CHARS}")


class TokenMessage(Wire):
    type: Literal["token"] = "token"
    index: int  # 0-based position among generated tokens
    token_id: int
    text: str


class DoneMessage(Wire):
    type: Literal["done"] = "done"
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float


class ErrorBody(Wire):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorMessage(Wire):
    type: Literal["error"] = "error"
    error: ErrorBody


StreamMessage = Annotated[TokenMessage | DoneMessage | ErrorMessage, Field(discriminator="type")]
STREAM_MESSAGE: TypeAdapter[TokenMessage | DoneMessage | ErrorMessage] = TypeAdapter(StreamMessage)


class InvokeRequest(Wire):
    """Body of ``POST /v1/functions/{name}/invoke``; unset generation fields take the function's
    defaults."""

    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = None
    raw: bool = False
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> InvokeRequest:
        check_prompt(self.prompt, self.messages)
        return self
