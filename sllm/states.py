"""Instance states and their legal transitions.

An instance is one loaded copy of a function's model on one invoker::

    cold ──> loading ──> idle <──> warm
      │         │         │         │
      └─────────┴─────────┴─────────┴──> stopped

``cold`` is chosen but not yet loading; ``idle`` and ``warm`` are both loaded (warm while it has
invocations in flight); ``stopped`` is final (unloaded after keep-alive, failed to load, or its
invoker died).
"""

from __future__ import annotations

from enum import Enum

from sllm.errors import InternalError


class InstanceState(str, Enum):
    COLD = "cold"  # placed on an invoker, load not started
    LOADING = "loading"  # the invoker is loading the checkpoint
    IDLE = "idle"  # loaded, no invocation in flight; keep-alive clock running
    WARM = "warm"  # loaded, serving one or more invocations
    STOPPED = "stopped"  # unloaded or failed; final


TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.COLD: frozenset({InstanceState.LOADING, InstanceState.STOPPED}),
    InstanceState.LOADING: frozenset({InstanceState.IDLE, InstanceState.WARM, InstanceState.STOPPED}),
    InstanceState.IDLE: frozenset({InstanceState.WARM, InstanceState.STOPPED}),
    InstanceState.WARM: frozenset({InstanceState.IDLE, InstanceState.STOPPED}),
    InstanceState.STOPPED: frozenset(),
}

LOADED = frozenset({InstanceState.IDLE, InstanceState.WARM})
"""States in which an instance can serve invocations."""


def check_transition(old: InstanceState, new: InstanceState) -> None:
    """Raise :class:`~sllm.errors.InternalError` when ``old -> new`` is not in
    :data:`TRANSITIONS` (staying in the same state is always allowed)."""
    if old != new and new not in TRANSITIONS[old]:
        raise InternalError(f"illegal instance transition {old.value} -> {new.value}")
