"""Typed messages between components, and the records kept in etcd.

Field names on the wire carry their unit: ``_seconds`` (and unix-seconds timestamps named for
the event: ``created``, ``loaded_at``), ``_bytes`` or ``nbytes``, ``_bps`` (bytes per second).
Inside a process, code says ``_s`` for seconds.

Every body that crosses a process boundary is one of these pydantic models (``extra="forbid"``):

- etcd records: :class:`FunctionRecord`, :class:`InvokerRecord`, :class:`InstanceRecord`;
- gateway -> controller: :class:`AcquireRequest` -> :class:`Assignment`, :class:`ReleaseRequest`;
- controller -> invoker: :class:`LoadRequest` -> :class:`LoadResponse`;
- invoker -> invoker: :class:`CheckpointListing` (the files of a checkpoint to fetch);
- gateway -> invoker: :class:`GenerateRequest`, answered by a stream of newline-delimited JSON
  (:func:`stream_line`, :func:`parse_stream_line`) of :class:`TokenMessage` ... then one
  :class:`DoneMessage`, :class:`ErrorMessage` or :class:`MigratedMessage`.

One module: the whole wire vocabulary in one place, so that a field's name and unit are decided
once for every hop.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from sllm.config import MAX_PROMPT_CHARS
from sllm.manifest import FunctionManifest, Scheduling
from sllm.sampling import SamplingOverrides, SamplingParams
from sllm.states import InstanceState
from sllm.tiers import LocalTier, Tier


class Wire(BaseModel):
    """Base of every wire message: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


# --- etcd records -------------------------------------------------------------------------------


class FunctionRecord(Wire):
    manifest: FunctionManifest
    created: float  # unix seconds
    updated: float  # unix seconds
    generation: int = 1  # bumped on every update


class BandwidthRecord(Wire):
    """An invoker's measured bandwidths (bytes per second): seeded by a probe at start-up, then
    an exponentially weighted moving average of its own loads and transfers."""

    dram_bps: float  # DRAM tier -> usable weights
    ssd_bps: float  # local SSD -> memory
    network_bps: float  # a checkpoint copy from another invoker or the store root
    samples: int = 0  # loads and transfers measured since the probe


class InvokerRecord(Wire):
    id: str
    url: str  # http://host:port of the invoker's API
    device: str  # "cpu" or "cuda:N": where its instances run
    memory_bytes: int  # instance memory budget (bytes)
    started: float  # unix seconds
    pid: int
    bandwidths: BandwidthRecord | None = None  # None only from an invoker too old to measure
    io_engine: Literal["native", "python"] | None = None  # what reads its checkpoints (None:
    # an invoker too old to say)


class CheckpointRecord(Wire):
    """Where a model's checkpoint sits on one invoker: the fastest tier holding it."""

    invoker_id: str
    model: str
    tier: LocalTier
    nbytes: int  # checkpoint size (bytes)
    updated: float  # unix seconds


class LeaderRecord(Wire):
    """The current leader of a role (``/sllm/leader/<role>``), held under the leader's lease."""

    holder: str  # the leader's id (e.g. "controller-0")
    url: str  # where the leader's API answers
    since: float  # unix seconds it took the lead


class EstimateRecord(Wire):
    """One candidate invoker's estimated startup time (ServerlessLLM §6), seconds."""

    invoker_id: str
    tier: Tier  # the fastest tier holding the checkpoint there
    queue_seconds: float  # waiting behind loads already queued there
    load_seconds: float  # checkpoint size / that tier's bandwidth (remote: copy, then SSD load)
    migration_seconds: float  # moving running inferences away first (0 when not needed)
    total_seconds: float
    evicts: bool = False  # idle instances must be unloaded first
    migrates: bool = False  # running instances must be migrated away first


class PlacementRecord(Wire):
    """Why an instance went where it did: the decision and the candidates' estimates."""

    policy: str  # "ours", "locality", "least-loaded" or "random"
    chosen: EstimateRecord
    candidates: list[EstimateRecord]  # best first; at most PLACEMENT_KEEP of them
    considered: int  # invokers that could host it
    evicted: list[str] = []  # idle instances unloaded to make room
    migrate: list[str] = []  # running instances that must move away (the next issue)
    decided_at: float  # unix seconds
    decision_seconds: float  # wall time of the placement decision


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
    tier: Tier | None = None  # where the load read the checkpoint from
    reason: str | None = None  # why it stopped, when it did
    placement: PlacementRecord | None = None  # the decision that put it there
    ready_by: float | None = None  # unix seconds its load is estimated to end (while starting)
    transfer_seconds: float | None = None  # fetching the checkpoint first (no local copy)
    fetched_from: str | None = None  # where it was fetched from: a peer invoker's URL or the root
    lost_at: float | None = None  # unix seconds it was marked lost
    migrated_to: str | None = None  # the instance its generations moved to (live migration)
    kv_budget_tokens: int | None = None  # tokens of KV cache its memory leaves (once loaded)


# --- gateway <-> controller ---------------------------------------------------------------------


class AcquireRequest(Wire):
    function: str
    resume: bool = False  # for a generation moved off its instance: never moves others for it
    # an instance to take the slot on when it has one free (the other choices of an n > 1
    # request go where the first went, so that their engine shares the prompt's prefill)
    prefer: str | None = None


class Assignment(Wire):
    """Where one invocation runs. The gateway must release it when the invocation ends."""

    function: str
    model: str
    instance_id: str
    invoker_url: str
    cold: bool  # this invocation waited for a load it caused or joined
    queue_seconds: float  # time waiting for capacity, excluding the load
    load_seconds: float  # time spent waiting for the checkpoint load (0 when warm)
    tier: Tier | None = None  # where the instance's checkpoint was loaded from
    defaults: SamplingParams  # the function's generation defaults (spec.generation)


class ReleaseRequest(Wire):
    instance_id: str
    failed: str | None = None  # the invoker could not be reached: why (the controller checks it)
    moved_to: str | None = None  # the slot moves to this instance (its generation migrated there)


class MigrateInstanceRequest(Wire):
    """Body of ``POST /v1/instances/{id}/migrate`` (an operator's live migration)."""

    to: str | None = None  # the destination invoker's id; default: where placement puts it
    # move at most this many of its running generations; the rest, and the instance, stay
    # serving (default: every generation moves and the instance drains)
    generations: int | None = Field(default=None, ge=1)


# --- controller <-> invoker ---------------------------------------------------------------------


class LoadRequest(Wire):
    instance_id: str
    function: str
    model: str
    device: str = "auto"
    sources: list[str] = []  # peer invokers' URLs holding the checkpoint, tried in order before
    # the invoker's store root when it has no local copy
    memory_bytes: int = Field(default=1 << 30, gt=0)  # the function's spec.resources.memory:
    # the weights and the instance's KV caches together
    scheduling: Scheduling = Scheduling()  # the function's spec.scheduling


class LoadResponse(Wire):
    instance_id: str
    device: str
    nbytes: int  # checkpoint bytes read
    load_seconds: float  # wall time: read + verify + build the model
    read_seconds: float  # of which reading the checkpoint into memory and verifying checksums
    tier: Tier  # where the checkpoint came from ("remote": fetched first)
    transfer_seconds: float = 0.0  # fetching the checkpoint into the local store first
    transferred_bytes: int = 0  # bytes fetched (less than nbytes when a transfer resumed)
    source: str | None = None  # where it was fetched from (a peer URL or the store root)
    kv_budget_bytes: int = 0  # what its KV caches may take: memory_bytes less the weights
    kv_budget_tokens: int = 0  # the same in tokens of this model's cache


class MigrateRequest(Wire):
    """Controller -> source invoker: move the generations running on an instance to the
    destination instance (already loaded), ServerlessLLM §5."""

    to_url: str  # the destination invoker
    to_instance: str  # the destination instance (same model)
    # move at most this many running generations (the earliest started first) and leave the
    # rest, and new ones, here; None: every generation, waiting ones and new ones too
    limit: int | None = Field(default=None, ge=1)


class MigrateResponse(Wire):
    """What a migration did, once every generation on the source instance has handed over,
    finished, or stayed (the destination failed)."""

    moved: int  # generations handed over to the destination
    finished: int  # generations that finished on the source before their handoff
    abandoned: str | None = None  # why the rest stayed on the source (the destination failed)
    rounds: int  # prefill rounds sent, all generations together
    tokens: int  # tokens (prompt + generated) whose KV cache the destination recomputed
    seconds: float  # wall time of the whole migration on the source


# --- invoker <-> invoker (checkpoint distribution, migration) ----------------------------------


class PrefillRequest(Wire):
    """Source -> destination, one per migration round: extend the session's KV cache by
    ``ids``, which start at position ``start`` of prompt + generated tokens."""

    session: str
    start: int = Field(ge=0)
    ids: list[int] = Field(min_length=1)


class PrefillResponse(Wire):
    cached: int  # positions the session's KV cache covers now
    seconds: float  # the prefill's compute time


class CheckpointFile(Wire):
    """One file of a checkpoint: its path relative to the checkpoint folder (posix separators)
    and its size in bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    size: int = Field(ge=0)


class CheckpointListing(Wire):
    """The body of ``GET /v1/checkpoints/{model}``: every regular file of the checkpoint folder,
    sorted by name, and the sha256 hex digest of its ``index.json`` (the checkpoint's version)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    index_sha256: str
    files: list[CheckpointFile]


class ReplicateRequest(Wire):
    """Controller -> invoker (``PUT /v1/checkpoints/{model}``): hold a current copy of the
    checkpoint in the local store, fetched from ``sources`` (peer invokers' URLs, tried in
    order) and then the store root when there is none."""

    sources: list[str] = []


class ReplicateResponse(Wire):
    """What a replication did: nothing moved (``transferred_bytes`` 0, no ``source``) when the
    local copy was current already."""

    model: str
    transferred_bytes: int = Field(ge=0)  # bytes written into the local store this time
    seconds: float = Field(ge=0)  # wall time of the fetch
    source: str | None = None  # the peer URL or store root it came from


class ReplicationPaused(Wire):
    """Invoker -> controller (``DELETE /v1/checkpoints/{model}/replication``): whether a
    replication of ``model`` was running and is now paused (False: none ran, or a load waits
    on that fetch, so it goes on)."""

    model: str
    paused: bool


# --- gateway <-> invoker ------------------------------------------------------------------------


class ChatMessage(Wire):
    role: Literal["system", "user", "assistant"]
    content: str


class Prompt(Wire):
    """What a generation reads: exactly one of ``prompt`` (a user message; with ``raw``, plain
    text to complete) and chat ``messages``, not empty."""

    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = None
    raw: bool = False  # prompt is plain text to complete, not a user message

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty or only whitespace")
        return v

    @field_validator("messages")
    @classmethod
    def _messages_fit(cls, v: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if v is not None:
            if not v:
                raise ValueError("must not be empty")
            total = sum(len(m.content) for m in v)
            if total > MAX_PROMPT_CHARS:
                raise ValueError(f"hold {total} characters; the limit is {MAX_PROMPT_CHARS}")
        return v

    @model_validator(mode="after")
    def _one_input(self) -> Prompt:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self

    def only(self) -> Prompt:
        """The prompt fields alone (of a request model that adds others)."""
        return Prompt(prompt=self.prompt, messages=self.messages, raw=self.raw)


class TokenLogprob(Wire):
    """One token's log probability (natural log) at a position."""

    token_id: int
    token: str  # the token's text alone (``tokenizer.decode([token_id])``)
    logprob: float


class TokenLogprobs(Wire):
    """A generated token's log probability and the most likely tokens at its position, most
    likely first (``SamplingParams.logprobs`` of them)."""

    logprob: float
    token: str
    top: list[TokenLogprob]


class ResumeRequest(Wire):
    """A generation moved from another instance: go on after ``token_ids``."""

    token_ids: list[int]  # generated before the move (no EOS)
    emitted: int = Field(ge=0)  # of which the client has received the first ``emitted``
    session: str | None = None  # a live migration whose KV cache this invoker prepared
    # the tokens' log probabilities, when the request asks for them (one per token id)
    logprobs: list[TokenLogprobs] | None = None


class GenerateRequest(Wire):
    """One generation, gateway -> invoker: the prompt and the complete sampling parameters (the
    function's defaults already applied); ``resume`` when it continues a generation that began
    elsewhere (live migration, or the first invoker died)."""

    input: Prompt
    sampling: SamplingParams
    resume: ResumeRequest | None = None

    @model_validator(mode="after")
    def _resume_fits(self) -> GenerateRequest:
        if self.resume is not None and self.resume.emitted > len(self.resume.token_ids):
            raise ValueError("resume.emitted exceeds the number of resumed tokens")
        return self


class TokenMessage(Wire):
    type: Literal["token"] = "token"
    index: int  # 0-based position among generated tokens
    token_id: int
    text: str
    logprobs: TokenLogprobs | None = None  # when the request asked for them


class DoneMessage(Wire):
    type: Literal["done"] = "done"
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    queued_seconds: float = 0.0  # waiting inside the instance before its first iteration


class MigratedMessage(Wire):
    """The last message of a stream whose generation stopped here to go on elsewhere: at the
    named instance (a live migration, whose KV cache the destination prepared under
    ``session``), or, with no destination, wherever the gateway finds room (the instance was
    unloaded under it: preemption)."""

    type: Literal["migrated"] = "migrated"
    token_ids: list[int]  # every token generated so far, held-back ones included
    logprobs: list[TokenLogprobs] | None = None  # theirs, when the request asked for them
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    invoker_url: str | None = None
    instance_id: str | None = None
    session: str | None = None
    reason: str  # "migrated" or "preempted"


class ErrorBody(Wire):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorMessage(Wire):
    type: Literal["error"] = "error"
    error: ErrorBody


StreamMessage = TokenMessage | DoneMessage | ErrorMessage | MigratedMessage
"""What a generation's stream carries (invoker -> gateway): one :class:`TokenMessage` per token,
then exactly one :class:`DoneMessage`, :class:`ErrorMessage` (it failed after the stream began)
or :class:`MigratedMessage` (it stopped here to go on elsewhere)."""

STREAM_MEDIA_TYPE = "application/x-ndjson"
"""The stream's framing: newline-delimited JSON, one message a line."""

_STREAM_MESSAGE: TypeAdapter[StreamMessage] = TypeAdapter(
    Annotated[StreamMessage, Field(discriminator="type")])


def stream_line(message: StreamMessage) -> str:
    """One message of a generation's stream as its line (newline included)."""
    return message.model_dump_json() + "\n"


def parse_stream_line(line: str | bytes) -> StreamMessage:
    """The message of one line of a generation's stream.

    Raises:
        ValueError: the line is not one of the stream's messages (pydantic's ValidationError).
    """
    return _STREAM_MESSAGE.validate_json(line)


class InvokeRequest(Prompt, SamplingOverrides):
    """Body of ``POST /v1/functions/{name}/invoke``: the prompt fields (:class:`Prompt`), the
    sampling fields a call may set (:class:`~sllm.sampling.SamplingOverrides`; unset ones take
    the function's defaults), and ``stream``."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    stream: bool = False
