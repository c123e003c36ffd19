"""Placement: which invoker a new instance goes to.

This is the first, memory-only policy: among live invokers whose free instance memory covers the
function's ``resources.memory``, pick the one with the most free memory (ties: the lowest id, so
the choice is deterministic). ServerlessLLM's startup-time-optimized placement (OSDI'24 §6:
queueing + checkpoint size / bandwidth of the fastest tier holding it + migration cost) replaces it
with the controller issue, behind the same signature.

Worked example: invokers a (4 GiB budget, 3 GiB used) and b (2 GiB budget, nothing used); a
function that needs 1 GiB goes to b (2 GiB free > 1 GiB free); one that needs 3 GiB goes nowhere
(None), and the caller must first unload idle instances.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sllm.messages import InvokerRecord


def choose_invoker(
    invokers: Sequence[InvokerRecord], used_bytes: Mapping[str, int], need_bytes: int
) -> InvokerRecord | None:
    """The invoker with the most free memory that fits ``need_bytes``, or None.

    Args:
        invokers: live invokers.
        used_bytes: invoker id -> bytes already reserved by its instances (absent = 0).
        need_bytes: bytes the new instance reserves.
    """
    best: InvokerRecord | None = None
    best_free = -1
    for inv in sorted(invokers, key=lambda i: i.id):
        free = inv.memory_bytes - used_bytes.get(inv.id, 0)
        if free >= need_bytes and free > best_free:
            best, best_free = inv, free
    return best
