"""The function manifest: one YAML document per function, in the Kubernetes style.

::

    apiVersion: sllm.dev/v1
    kind: Function
    metadata: {name: smollm2-chat}
    spec:
      model: smollm2-135m-instruct          # a name in the model store
      resources: {device: auto, memory: 1Gi}
      scaling: {minInstances: 0, maxInstances: 1, targetConcurrency: 8, keepAlive: 60s}
      generation: {maxTokens: 128, temperature: 0.0}
      scheduling: {policy: mlfq, maxBatch: 16}   # inside each instance (:class:`Scheduling`)

Field names are the manifest's own (camelCase). Unknown fields are errors. :func:`parse_manifest`
turns YAML or JSON text into a :class:`FunctionManifest` and every failure into
:class:`~sllm.errors.ManifestError` naming the field and the reason; the CLI and the API both use it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sllm.config import COLD_START_DEADLINE_S, MAX_QUEUE_PER_FUNCTION
from sllm.errors import ManifestError
from sllm.sampling import MaxTokens, SamplingParams, Temperature, TopP
from sllm.validation import describe

API_VERSION = "sllm.dev/v1"
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
"""A DNS-1123 label, as Kubernetes names are: lowercase, digits and '-', at most 63 characters."""

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_QUANTITY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|K|M|G|T|k)?\s*$")
_QUANTITY_UNITS = {
    None: 1,
    "K": 10**3, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}


def parse_duration(value: Any) -> float:
    """Seconds from a duration: a number of seconds or a string like ``500ms``, ``60s``, ``5m``,
    ``1h``. Raises ValueError on anything else or a negative value."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 60s, 5m or 1h")  # noqa: TRY004 - pydantic reports ValueErrors
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration such as 60s, 5m or 1h")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_quantity(value: Any) -> int:
    """Bytes from a Kubernetes quantity: an integer or a string like ``512Mi``, ``1Gi``, ``2G``.
    Raises ValueError on anything else or a negative value."""
    if isinstance(value, bool):
        raise ValueError("expected a memory quantity such as 512Mi or 1Gi")  # noqa: TRY004 - as above
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = _QUANTITY_RE.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a memory quantity such as 512Mi or 1Gi")
        n = float(m.group(1)) * _QUANTITY_UNITS[m.group(2)]
    if n < 0:
        raise ValueError("must not be negative")
    return int(n)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class Metadata(_Strict):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_is_dns_label(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                "must be a DNS-1123 label: lowercase letters, digits and '-', "
                "starting and ending with a letter or digit, at most 63 characters"
            )
        return v


def device_serves(requested: str, device: str) -> bool:
    """Whether an invoker whose instances run on ``device`` (``cpu`` or ``cuda:N``, its record's
    ``device``) serves a function asking for ``requested`` (``spec.resources.device``): ``auto``
    takes any invoker, ``cpu`` the CPU ones, ``cuda`` any GPU one, ``cuda:N`` that GPU only."""
    if requested == "auto":
        return True
    if requested == "cuda":
        return device.startswith("cuda")
    return device == requested


class Resources(_Strict):
    device: str = "auto"
    """Where the function's instances run: ``auto`` (any invoker, on its own device: a GPU when
    it has one, else CPU), ``cpu``, ``cuda`` (a GPU invoker) or ``cuda:N`` (an invoker on that
    GPU); placement only considers the invokers that :func:`device_serves` it."""
    memory: int = 1 << 30
    """Bytes of device memory one instance may take; written as a quantity (``1Gi``)."""

    @field_validator("device")
    @classmethod
    def _device_known(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("memory", mode="before")
    @classmethod
    def _memory_quantity(cls, v: Any) -> int:
        n = parse_quantity(v)
        if n <= 0:
            raise ValueError("must be greater than 0")
        return n


class Scaling(_Strict):
    minInstances: int = Field(default=0, ge=0)
    maxInstances: int = Field(default=1, ge=1)
    targetConcurrency: int = Field(default=8, ge=1)
    """In-flight invocations one instance takes before another is started or requests wait:
    the sequences its engine holds at once (Knative's target concurrency), batched
    ``scheduling.maxBatch`` at a time. The default, 8, is where SmolLM2 on 2 CPU cores gives
    about 4x one stream's tokens/s with TPOT still under 100 ms (docs/benchmarks.md §7.1)."""
    keepAlive: float = 60.0
    """Seconds an idle instance stays loaded before it is scaled to zero; written as ``60s``."""
    maxQueue: int = Field(default=MAX_QUEUE_PER_FUNCTION, ge=0)
    """Invocations that may wait for capacity at once (as Knative's activator buffers them while
    a revision scales up); past it they get 429 with Retry-After."""
    queueTimeout: float = COLD_START_DEADLINE_S
    """Seconds an invocation may wait for capacity and a cold start together before it gets 503
    with Retry-After; written as ``300s``."""

    @field_validator("keepAlive", "queueTimeout", mode="before")
    @classmethod
    def _durations(cls, v: Any) -> float:
        return parse_duration(v)

    @model_validator(mode="after")
    def _min_le_max(self) -> Scaling:
        if self.minInstances > self.maxInstances:
            raise ValueError(
                f"minInstances ({self.minInstances}) exceeds maxInstances ({self.maxInstances})"
            )
        return self


class GenerationDefaults(_Strict):
    """The function's sampling defaults (bounds: :mod:`sllm.sampling`), which a call may
    override."""

    maxTokens: MaxTokens = 128
    temperature: Temperature = 0.0
    topP: TopP = 1.0

    def sampling(self) -> SamplingParams:
        """These defaults as the engine's parameters."""
        return SamplingParams(max_tokens=self.maxTokens, temperature=self.temperature,
                              top_p=self.topP)


Policy = Literal["mlfq", "fcfs", "run-to-completion"]
POLICIES: tuple[Policy, ...] = ("mlfq", "fcfs", "run-to-completion")


class Scheduling(_Strict):
    """How each instance of the function schedules its sequences, iteration by iteration (the
    engine's scheduler, :mod:`invoker.engine.scheduler`, runs by it; it travels with each load
    in :class:`sllm.messages.LoadRequest`).

    Policies:

    - ``mlfq``: FastServe's skip-join multi-level feedback queue (Wu et al., arXiv 2305.05920
      §4), preemptive at iteration granularity: level ``i`` has a quantum of
      ``quantum * quantumRatio**i`` seconds of iteration time; a new sequence joins the highest
      level whose quantum covers its estimated prefill time; one that used its level's quantum
      moves down a level; one that has not run for ``starvation`` seconds goes back to the top.
    - ``fcfs``: continuous batching in arrival order (vLLM's default).
    - ``run-to-completion``: one sequence at a time, each to its end (a batch of one).

    The MLFQ defaults are the simulation's choice on this machine's profiled cost model
    (``python -m bench.engine``, docs/benchmarks.md §7.2): a quantum of about twenty full-batch
    iterations, levels twice as long each (FastServe's ratio), and promotion after 30 s without
    running. They are seconds of this machine's iterations: a GPU, whose iterations are several
    times shorter, wants them that many times smaller.

    Attributes:
        policy: see above.
        maxBatch: sequences one iteration runs at most (1 under ``run-to-completion``).
        maxBatchTokens: tokens one iteration computes at most, prefill chunks and decodes
            together: a long prompt is prefilled in chunks.
        quantum: the top level's quantum, seconds of iteration time (``mlfq``).
        quantumRatio: how much longer each level's quantum is than the one above (``mlfq``).
        starvation: seconds without running after which a sequence goes back to the top level
            (``mlfq``).
    """

    policy: Policy = "mlfq"
    maxBatch: int = Field(default=16, ge=1, le=1024)
    maxBatchTokens: int = Field(default=256, ge=1, le=1 << 20)
    quantum: float = 2.0
    quantumRatio: float = Field(default=2.0, ge=1.0)
    starvation: float = 30.0

    @field_validator("quantum", "starvation", mode="before")
    @classmethod
    def _durations(cls, v: Any) -> float:
        seconds = parse_duration(v)
        if seconds <= 0:
            raise ValueError("must be greater than 0")
        return seconds

    @property
    def batch(self) -> int:
        """The sequences an iteration may run under this policy."""
        return 1 if self.policy == "run-to-completion" else self.maxBatch


class Spec(_Strict):
    model: str = Field(min_length=1)
    resources: Resources = Field(default_factory=Resources)
    scaling: Scaling = Field(default_factory=Scaling)
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)
    scheduling: Scheduling = Field(default_factory=Scheduling)


class FunctionManifest(_Strict):
    apiVersion: Literal["sllm.dev/v1"]
    kind: Literal["Function"]
    metadata: Metadata
    spec: Spec

    @property
    def name(self) -> str:
        return self.metadata.name


def validate_manifest(data: Any) -> FunctionManifest:
    """Validate an already-decoded manifest (a dict).

    Raises:
        ManifestError: with ``param`` set to the dotted field path (``spec.scaling.minInstances``)
            and a message giving every failing field and its reason.
    """
    if not isinstance(data, dict):
        raise ManifestError("a manifest must be a mapping with apiVersion, kind, metadata, spec")
    try:
        return FunctionManifest.model_validate(data)
    except ValidationError as e:
        message, param = describe(e)
        raise ManifestError("invalid manifest: " + message, param=param) from None


def parse_manifest(text: str) -> FunctionManifest:
    """Parse YAML (or JSON, a subset of YAML) manifest text.

    Raises:
        ManifestError: malformed YAML (with line and column), or any validation failure.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ManifestError(f"malformed YAML{where}: {problem}") from None
    return validate_manifest(data)


def manifest_to_dict(manifest: FunctionManifest) -> dict[str, Any]:
    """The manifest as plain data in its own field names (for JSON bodies and etcd values)."""
    return json.loads(manifest.model_dump_json())
