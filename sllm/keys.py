"""The etcd key schema: the one place that builds and parses sllm's keys.

::

    /sllm/functions/<function>          FunctionRecord   a deployed function (its manifest)
    /sllm/instances/<instance-id>       InstanceRecord   one instance and its state
    /sllm/invokers/<invoker-id>         InvokerRecord    a live invoker; attached to its lease,
                                                         so it disappears when the invoker dies
    /sllm/checkpoints/<invoker-id>/<model>
                                        CheckpointRecord the fastest tier holding a model's
                                                         checkpoint on an invoker (dram or ssd);
                                                         attached to the invoker's lease
    /sllm/leader/<role>                 LeaderRecord     who leads (role "controller"); attached to
                                                         the leader's lease, so it frees itself
                                                         when the leader dies

Values are JSON documents of the pydantic records in :mod:`sllm.messages`.
"""

from __future__ import annotations

from enum import Enum

ROOT = "/sllm/"


class Kind(str, Enum):
    """The kinds of object stored under :data:`ROOT`."""

    FUNCTION = "functions"
    INSTANCE = "instances"
    INVOKER = "invokers"
    CHECKPOINT = "checkpoints"
    LEADER = "leader"


PARTS = {Kind.FUNCTION: 1, Kind.INSTANCE: 1, Kind.INVOKER: 1, Kind.CHECKPOINT: 2, Kind.LEADER: 1}
"""How many name parts each kind's keys have."""


def prefix(kind: Kind) -> str:
    """The prefix under which every object of ``kind`` lives, ending in ``/``."""
    return f"{ROOT}{kind.value}/"


def key(kind: Kind, *parts: str) -> str:
    """The key of one object: ``key(Kind.FUNCTION, name)``,
    ``key(Kind.CHECKPOINT, invoker_id, model)``.

    Raises:
        ValueError: the wrong number of parts for ``kind``, or a part that is empty or holds ``/``.
    """
    if len(parts) != PARTS[kind]:
        raise ValueError(f"{kind.value} keys have {PARTS[kind]} part(s), got {parts!r}")
    for p in parts:
        if not p or "/" in p:
            raise ValueError(f"invalid {kind.value} name for an etcd key: {p!r}")
    return prefix(kind) + "/".join(parts)


def parse(k: str) -> tuple[Kind, tuple[str, ...]]:
    """Split a key into its kind and name parts. Raises ValueError for a key outside the schema."""
    if not k.startswith(ROOT):
        raise ValueError(f"not an sllm key: {k!r}")
    kind_s, _, rest = k[len(ROOT):].partition("/")
    try:
        kind = Kind(kind_s)
    except ValueError:
        raise ValueError(f"unknown kind in key {k!r}") from None
    parts = tuple(rest.split("/"))
    if len(parts) != PARTS[kind] or not all(parts):
        raise ValueError(f"malformed key {k!r}")
    return kind, parts
