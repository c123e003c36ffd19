"""The etcd key schema: the one place that builds and parses sllm's keys.

::

    /sllm/functions/<function>          FunctionRecord   a deployed function (its manifest)
    /sllm/instances/<instance-id>       InstanceRecord   one instance and its state
    /sllm/invokers/<invoker-id>         InvokerRecord    a live invoker; attached to its lease,
                                                         so it disappears when the invoker dies

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


def prefix(kind: Kind) -> str:
    """The prefix under which every object of ``kind`` lives, ending in ``/``."""
    return f"{ROOT}{kind.value}/"


def key(kind: Kind, name: str) -> str:
    """The key of one object. Raises ValueError when ``name`` is empty or contains ``/``."""
    if not name or "/" in name:
        raise ValueError(f"invalid {kind.value} name for an etcd key: {name!r}")
    return prefix(kind) + name


def parse(k: str) -> tuple[Kind, str]:
    """Split a key into its kind and name. Raises ValueError for a key outside the schema."""
    if not k.startswith(ROOT):
        raise ValueError(f"not an sllm key: {k!r}")
    kind_s, _, name = k[len(ROOT):].partition("/")
    try:
        kind = Kind(kind_s)
    except ValueError:
        raise ValueError(f"unknown kind in key {k!r}") from None
    if not name or "/" in name:
        raise ValueError(f"malformed key {k!r}")
    return kind, name
