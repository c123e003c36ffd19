"""invoker.threads: model compute outside the engines in a thread that ends with it."""

from __future__ import annotations

import threading

import pytest

from invoker.threads import in_own_thread


def test_the_call_runs_in_a_fresh_thread_that_has_ended_and_its_result_or_error_comes_back(
        ) -> None:
    seen: list[threading.Thread] = []

    def where(x: int) -> int:
        seen.append(threading.current_thread())
        return x + 1

    assert in_own_thread(where, 41) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def boom() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        in_own_thread(boom)
