"""Service times and the expected wait for a busy instance (controller/service_time.py)."""

from __future__ import annotations

import pytest

from controller.service_time import ServiceTimes


def test_worked_example() -> None:
    """The module docstring's example: one sample of 2 s; busy for 0.5 s and for 3 s."""
    st = ServiceTimes()
    st.observe("f", 2.0)
    started = [9.5, 7.0]  # now = 10
    assert st.expected_wait("f", started, 10.0) == pytest.approx(1.5)
    assert st.expected_wait("f", started, 10.0, ahead=1) == pytest.approx(2.0)
    assert st.expected_wait("f", started, 10.0, ahead=2) == pytest.approx(3.5)


def test_a_call_past_the_mean_still_has_time_left() -> None:
    """The mean residual life of the recent samples, not the mean minus the time elapsed."""
    st = ServiceTimes(alpha=1.0, window=5)
    for s in (1.0, 1.0, 1.0, 5.0, 7.0):
        st.observe("f", s)
    assert st.remaining("f", 0.5) == pytest.approx(3.0 - 0.5)  # every sample ran longer
    assert st.remaining("f", 2.0) == pytest.approx(6.0 - 2.0)  # calls past 2 s needed 5 and 7
    assert st.remaining("f", 9.0) == pytest.approx(7.0)  # longer than all: one more mean (alpha 1)
    assert st.remaining("f", -1.5) == pytest.approx(7.0 + 1.5)  # starts in 1.5 s, then the mean
    st.observe("f", 3.0)  # the window forgets the first 1.0: (1, 1, 5, 7, 3)
    assert st.remaining("f", 0.5) == pytest.approx(3.4 - 0.5)
    assert st.remaining("g", 1.0) is None
    with pytest.raises(ValueError, match="window"):
        ServiceTimes(window=0)


def test_the_mean_follows_recent_invocations() -> None:
    st = ServiceTimes(alpha=0.5)
    assert st.mean("f") is None
    st.observe("f", 4.0)  # the first sample is the mean
    st.observe("f", 2.0)
    st.observe("f", -1.0)  # a clock step backwards: ignored
    assert st.mean("f") == pytest.approx(3.0) and st.mean("g") is None
    with pytest.raises(ValueError, match="alpha"):
        ServiceTimes(alpha=0)


def test_no_estimate_without_a_sample_or_a_slot() -> None:
    st = ServiceTimes()
    assert st.expected_wait("f", [1.0], 2.0) is None  # never measured
    st.observe("f", 1.0)
    assert st.expected_wait("f", [], 2.0) is None  # nothing will free


def test_a_loading_instance_frees_after_its_load_and_one_service() -> None:
    st = ServiceTimes()
    st.observe("f", 1.0)
    assert st.expected_wait("f", [12.5], 10.0) == pytest.approx(3.5)  # ready at 12.5, +1 s
