"""Service time: how long an invocation holds its instance, and so how soon a busy one frees.

A scale-out is a cold start. When a function's instances are all busy and the best place for
another one would take longer to load (a checkpoint copied from elsewhere, say) than one of the
busy instances needs to finish, waiting for it is the faster start. ServerlessLLM (OSDI'24 §6)
estimates each candidate server's startup time and picks the smallest; ``ours`` adds one more
candidate, *wait for a busy instance of the function*, whose estimate is its expected remaining
service time. That candidate is ours, not the paper's.

The pool measures each function's service time (seconds from an invocation taking a slot to
giving it back) as an exponentially weighted mean, and estimates the wait of a new invocation as
the time until the slot it would get frees, given the invocations already waiting ahead of it.

Worked example (the test ``test_worked_example``): mean service 2 s; two busy instances, one
busy for 0.5 s (1.5 s left), one for 3 s (over the mean: 0 s left); with nobody ahead the wait
is 0 s, with one ahead 1.5 s, with two ahead 0 + 2 = 2 s (the first slot frees twice).
"""

from __future__ import annotations

from collections.abc import Iterable


class ServiceTimes:
    """Per function, an exponentially weighted mean of invocation service times (seconds).

    Args:
        alpha: weight of a new sample, 0 < alpha <= 1.

    Raises:
        ValueError: alpha out of range.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self._alpha = alpha
        self._mean: dict[str, float] = {}

    def observe(self, function: str, seconds: float) -> None:
        """Fold in one invocation of ``function`` that held its slot for ``seconds``."""
        if seconds < 0:
            return
        old = self._mean.get(function)
        self._mean[function] = seconds if old is None else (
            self._alpha * seconds + (1 - self._alpha) * old)

    def mean(self, function: str) -> float | None:
        """The mean service time of ``function`` (seconds); None before its first sample."""
        return self._mean.get(function)

    def expected_wait(self, function: str, started: Iterable[float], now: float,
                      ahead: int = 0) -> float | None:
        """Seconds until a slot of ``function`` frees for a new invocation.

        Args:
            function: the function.
            started: when each slot's current invocation started (seconds, the same clock as
                ``now``; a time after ``now`` is a slot on an instance still loading, ready
                then).
            now: the current time (seconds).
            ahead: invocations already waiting for a slot, served first.

        Returns:
            The expected wait (seconds), or None when it cannot be estimated (no sample yet, or
            no slot that will free).
        """
        mean = self._mean.get(function)
        left = sorted(max(0.0, mean - (now - t)) for t in started) if mean is not None else []
        if not left:
            return None
        rounds, slot = divmod(max(0, ahead), len(left))
        return left[slot] + rounds * mean  # type: ignore[operator]
