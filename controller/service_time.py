"""Service time: how long an invocation holds its instance, and so how soon a busy one frees.

A scale-out is a cold start. When a function's instances are all busy and the best place for
another one would take longer to load (a checkpoint copied from elsewhere, say) than one of the
busy instances needs to finish, waiting for it is the faster start. ServerlessLLM (OSDI'24 §6)
estimates each candidate server's startup time and picks the smallest; ``ours`` adds one more
candidate, *wait for a busy instance of the function*, whose estimate is its expected remaining
service time. That candidate is ours, not the paper's.

The pool measures each function's service time (seconds from an invocation taking a slot to
giving it back): an exponentially weighted mean, and the last :data:`WINDOW` samples. A busy
slot whose invocation has run for ``a`` seconds is expected to free after the mean residual
life of the recent samples, ``mean(s - a for s > a)``: what calls that ran that long went on
to need. A call running longer than every recent one (under a burst, the cores shared by more
generations slow every call) is expected to need one more mean service, not none (why not
``mean - a``: docs/architecture.md, Decisions, "Scale-out or wait"). The wait of a new
invocation is the time until the slot it would get frees, given the invocations already
waiting ahead of it.

Under the batching engine (:mod:`invoker.engine`) a slot is one of the ``targetConcurrency``
sequences an instance holds at once, and its service time is measured as it runs, beside the
instance's other sequences: a busier instance's calls take longer, and the samples say so. The
estimate has no constant to recalibrate for batching; what changed is only that an instance has
several slots, which ``started`` lists one by one.

Worked example (the test ``test_worked_example``): one sample of 2 s (the mean); two busy
instances, one busy for 0.5 s (1.5 s left), one for 3 s (longer than any sample: 2 s left);
with nobody ahead the wait is 1.5 s, with one ahead 2 s, with two ahead 1.5 + 2 = 3.5 s (the
first slot frees twice).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

WINDOW = 64
"""Recent service times kept per function for the mean residual life."""


class ServiceTimes:
    """Per function, an exponentially weighted mean of invocation service times (seconds) and
    the last ``window`` of them.

    Args:
        alpha: weight of a new sample in the mean, 0 < alpha <= 1.
        window: recent samples kept per function, at least 1.

    Raises:
        ValueError: alpha or window out of range.
    """

    def __init__(self, alpha: float = 0.3, window: int = WINDOW) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._alpha = alpha
        self._window = window
        self._mean: dict[str, float] = {}
        self._recent: dict[str, deque[float]] = {}

    def observe(self, function: str, seconds: float) -> None:
        """Fold in one invocation of ``function`` that held its slot for ``seconds``."""
        if seconds < 0:
            return
        old = self._mean.get(function)
        self._mean[function] = seconds if old is None else (
            self._alpha * seconds + (1 - self._alpha) * old)
        self._recent.setdefault(function, deque(maxlen=self._window)).append(seconds)

    def remaining(self, function: str, elapsed: float) -> float | None:
        """Expected seconds left of an invocation of ``function`` that has held its slot for
        ``elapsed`` seconds (negative: it starts in ``-elapsed`` seconds): the mean of ``s -
        elapsed`` over the recent samples ``s`` longer than ``elapsed``, or the mean service
        when none is (module docstring). None before the first sample."""
        mean = self._mean.get(function)
        if mean is None:
            return None
        if elapsed <= 0:
            return mean - elapsed
        longer = [s for s in self._recent[function] if s > elapsed]
        return sum(longer) / len(longer) - elapsed if longer else mean

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
        if mean is None:
            return None
        left = sorted(self.remaining(function, now - t) for t in started)  # type: ignore[misc]
        if not left:
            return None
        rounds, slot = divmod(max(0, ahead), len(left))
        return left[slot] + rounds * mean  # type: ignore[operator]
