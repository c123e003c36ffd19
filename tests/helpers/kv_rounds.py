"""A KV cache recomputed as a live migration's destination computes it: in rounds, through a
session (ServerlessLLM §5), for tests of resumed generations."""

from __future__ import annotations

import threading

from transformers import DynamicCache

from invoker.instance import ModelInstance
from invoker.migration import Sessions
from sllm.messages import PrefillRequest


def prefill_in_two_rounds(instance: ModelInstance, ids: list[int]) -> tuple[DynamicCache, int]:
    """The cache over ``ids`` (prompt + tokens so far) prefilled in two rounds, and the positions
    it covers: ``len(ids) - 1`` (the session leaves the last id for the first decode step)."""
    sessions, lock = Sessions(), threading.Lock()
    half = len(ids) // 2
    for start, part in ((0, ids[:half]), (half, ids[half:])):
        sessions.prefill("i", instance, lock, PrefillRequest(session="s", start=start, ids=part))
    return sessions.take("s", "i", ids)
