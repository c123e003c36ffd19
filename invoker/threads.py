"""Model compute outside the engines' threads runs in threads of its own.

A forward pass run in a thread that stays alive (an executor's worker, or the main thread)
slows every later forward pass in other threads on a CPU, the engines' included. Measured on
SmolLM2 on 2 cores, one stream: the engine's TPOT is 40 ms on 2 cores after the invoker's
warm-up ran in a thread that ended, against 64 ms on 1.2 cores after the same warm-up in an
executor's worker or the main thread; through the runtime, 42 ms against 63 ms.
``OMP_WAIT_POLICY=PASSIVE`` changes nothing, and plain matrix products in a kept thread do not
show it; why torch behaves so is not found. So the warm-up and a migration destination's
prefill each run in a fresh thread (:func:`in_own_thread`, called from the event loop's
executor), which costs a thread's start, tens of microseconds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_own_thread(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a new thread that ends with it (blocking). Returns what it returns;
    raises what it raises."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            errors.append(e)

    thread = threading.Thread(target=run, name=f"sllm-{getattr(fn, '__name__', 'compute')}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]
