"""Every HTTP route of every service, one path template each: the server registers the template
(a starlette ``Route``), every client fills it (:func:`path`). Nothing else spells a path.

Templates use starlette's syntax: ``{name}`` is one path segment, ``{name:path}`` the rest of
the path, slashes included.
"""

from __future__ import annotations

import re
from urllib.parse import quote

HEALTH = "/health"
"""Every service: ``{"status", "component", ...}``, 200 while it serves."""

METRICS = "/metrics"
"""The gateway's Prometheus metrics."""


class Gateway:
    """The public API (default http://127.0.0.1:8080)."""

    INVOKE = "/v1/functions/{name}/invoke"
    CHAT_COMPLETIONS = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    MODELS = "/v1/models"
    ACTIVATIONS = "/v1/activations"
    ACTIVATION = "/v1/activations/{id}"
    # management: passed to the controller's routes of the same path
    FUNCTIONS = "/v1/functions"
    FUNCTION = "/v1/functions/{name}"
    INSTANCES = "/v1/instances"
    MIGRATE = "/v1/instances/{id}/migrate"
    INVOKERS = "/v1/invokers"
    CHECKPOINTS = "/v1/checkpoints"


class Controller:
    """The leader controller: function management (the gateway's management routes, same
    paths), instance slots for the gateway, and the cluster's state."""

    FUNCTIONS = Gateway.FUNCTIONS
    FUNCTION = Gateway.FUNCTION
    INSTANCES = Gateway.INSTANCES
    MIGRATE = Gateway.MIGRATE
    INVOKERS = Gateway.INVOKERS
    CHECKPOINTS = Gateway.CHECKPOINTS
    ACQUIRE = "/v1/acquire"
    RELEASE = "/v1/release"


class Invoker:
    """One node's invoker: instances, generation, live migration, and its checkpoints."""

    INSTANCES = "/v1/instances"  # POST: load one; GET: the loaded ones
    INSTANCE = "/v1/instances/{id}"  # DELETE: unload
    GENERATE = "/v1/instances/{id}/generate"
    MIGRATE = "/v1/instances/{id}/migrate"  # as the source of a live migration
    PREFILL = "/v1/instances/{id}/migrations"  # as its destination: one prefill round
    SESSION = "/v1/instances/{id}/migrations/{session}"  # DELETE: drop a prepared KV cache
    CHECKPOINT = "/v1/checkpoints/{model}"  # GET: its file listing; PUT: replicate it here
    CHECKPOINT_FILE = "/v1/checkpoints/{model}/files/{path:path}"
    REPLICATION = "/v1/checkpoints/{model}/replication"  # DELETE: pause a replication


_PARAM = re.compile(r"\{(\w+)(?::(\w+))?\}")


def path(template: str, **params: str) -> str:
    """``template`` with each ``{name}`` replaced by ``params[name]``, percent-encoded (a
    ``{name:path}`` parameter keeps its slashes).

    Raises:
        KeyError: a parameter of the template is not given.
        ValueError: a parameter is given that the template does not have.
    """
    used: set[str] = set()

    def fill(m: re.Match[str]) -> str:
        used.add(m.group(1))
        return quote(str(params[m.group(1)]), safe="/" if m.group(2) == "path" else "")

    out = _PARAM.sub(fill, template)
    if extra := set(params) - used:
        raise ValueError(f"{template} has no parameter {', '.join(sorted(extra))}")
    return out
