"""Instance states and their legal transitions.

An instance is one copy of a function's model on one invoker::

    pending ──> loading ──> idle <──> active <──> migrating (from idle too)
       │           │          │          │            │
       │           │          └──────────┴─> draining ┘
       │           │                 │           │
       └───────────┴─────────────────┴───────────┴──> stopped | lost

- ``pending``: placed on an invoker; its load request is not sent yet (the record is written to
  etcd first, so a controller that dies here finds the pending load and sends it again);
- ``loading``: the invoker is fetching (when it has no copy) and loading the checkpoint;
- ``idle``: warm, no invocation in flight; the keep-alive clock runs;
- ``active``: warm, serving one or more invocations;
- ``migrating``: warm, its inferences are moving to another instance (ServerlessLLM §5); it
  takes no new invocations, and drains once they have moved (or goes back to idle or active
  when the migration is abandoned);
- ``draining``: takes no new invocations and is unloaded when the last one in flight ends
  (the function was deleted or changed);
- ``stopped`` (final): unloaded after keep-alive, evicted, or failed to load;
- ``lost`` (final): its invoker died (lease expired or unreachable); the record stays a while so
  an operator sees what happened.
"""

from __future__ import annotations

from enum import Enum

from sllm.errors import InternalError


class InstanceState(str, Enum):
    PENDING = "pending"
    LOADING = "loading"
    IDLE = "idle"
    ACTIVE = "active"
    MIGRATING = "migrating"
    DRAINING = "draining"
    STOPPED = "stopped"
    LOST = "lost"


S = InstanceState
_END = {S.STOPPED, S.LOST}
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    S.PENDING: frozenset({S.LOADING, *_END}),
    S.LOADING: frozenset({S.IDLE, S.DRAINING, *_END}),
    S.IDLE: frozenset({S.ACTIVE, S.MIGRATING, S.DRAINING, *_END}),
    S.ACTIVE: frozenset({S.IDLE, S.MIGRATING, S.DRAINING, *_END}),
    S.MIGRATING: frozenset({S.ACTIVE, S.IDLE, S.DRAINING, *_END}),
    S.DRAINING: frozenset(_END),
    S.STOPPED: frozenset(),
    S.LOST: frozenset(),
}

LOADED = frozenset({S.IDLE, S.ACTIVE})
"""States in which an instance takes new invocations."""

STARTING = frozenset({S.PENDING, S.LOADING})
"""States of an instance on its way to being loaded (a cold start in progress)."""

FINAL = frozenset(_END)
"""States an instance never leaves; it holds no memory on its invoker."""


def check_transition(old: InstanceState, new: InstanceState) -> None:
    """Raise :class:`~sllm.errors.InternalError` when ``old -> new`` is not in
    :data:`TRANSITIONS` (staying in the same state is always allowed)."""
    if old != new and new not in TRANSITIONS[old]:
        raise InternalError(f"illegal instance transition {old.value} -> {new.value}")
