"""Startup-time estimation (ServerlessLLM §6): arithmetic against hand-computed cases."""

from __future__ import annotations

import pytest

from controller.estimator import (
    Bandwidths,
    Candidate,
    Estimate,
    MigrationCost,
    choose,
    estimate,
    seconds_per_byte,
    startup_s,
)

GB = 10**9
BW = Bandwidths(dram_bps=10 * GB, ssd_bps=2 * GB, network_bps=1 * GB)


def test_worked_example() -> None:
    """The module docstring's example."""
    a = Candidate("a", "dram", BW, queued_seconds=2.0)
    b = Candidate("b", "ssd", BW)
    c = Candidate("c", "remote", BW)
    best, all_ = choose([a, b, c], GB)
    assert best is not None and best.invoker_id == "b"
    assert [(e.invoker_id, round(e.total_s, 6)) for e in all_] == [("b", 0.5), ("c", 1.5), ("a", 2.1)]
    best, _ = choose([Candidate("a", "dram", BW), b, c], GB)
    assert best is not None and best.invoker_id == "a" and best.total_s == pytest.approx(0.1)


def test_seconds_per_byte_per_tier() -> None:
    dram, ssd, remote = seconds_per_byte(BW)
    assert 4 * GB * dram == pytest.approx(0.4)
    assert 4 * GB * ssd == pytest.approx(2.0)
    assert 4 * GB * remote == pytest.approx(4.0 + 2.0)  # a copy over the network, then the SSD


def test_startup_is_queue_plus_load_plus_migration_and_its_parts_add_up() -> None:
    """The estimate placement runs for every candidate (startup_s) and for the ones it keeps
    (estimate): one formula."""
    _, ssd, remote = seconds_per_byte(BW)
    assert startup_s(0.0, GB, ssd) == pytest.approx(0.5)
    assert startup_s(0.5, GB, remote, 1.0) == pytest.approx(0.5 + 1.5 + 1.0)
    e = estimate("a", 2, 0.5, GB, remote, 1.0, migrates=True)
    assert (e.tier, e.queue_s, e.migration_s, e.migrates) == ("remote", 0.5, 1.0, True)
    assert e.load_s == pytest.approx(1.5)
    assert e.total_s == startup_s(0.5, GB, remote, 1.0)  # exactly: the same arithmetic


def test_with_equal_bandwidths_dram_beats_ssd_beats_remote() -> None:
    cands = [Candidate("r", "remote", BW), Candidate("s", "ssd", BW), Candidate("d", "dram", BW)]
    _, all_ = choose(cands, GB)
    assert [e.tier for e in all_] == ["dram", "ssd", "remote"]


def test_migration_adds_token_cost_and_destination_load() -> None:
    cost = MigrationCost(per_token_s=0.001, fixed_s=0.05, dest_load_s=0.3)
    e, _ = choose([Candidate("a", "dram", BW, migration_tokens=200)], GB, cost)
    assert e is not None and e.migration_s == pytest.approx(0.2 + 0.05 + 0.3)
    assert e.total_s == pytest.approx(0.1 + 0.55)
    # a DRAM copy behind a migration loses to a free SSD invoker when the migration is long
    best, _ = choose([Candidate("a", "dram", BW, migration_tokens=2000), Candidate("b", "ssd", BW)], GB, cost)
    assert best is not None and best.invoker_id == "b"


def test_migration_without_a_cost_model_is_refused() -> None:
    with pytest.raises(ValueError, match="migration"):
        choose([Candidate("a", "ssd", BW, migration_tokens=10)], GB)


def test_unmeasured_bandwidth_is_refused() -> None:
    with pytest.raises(ValueError, match="ssd_bps"):
        seconds_per_byte(Bandwidths(dram_bps=1, ssd_bps=0, network_bps=1))


def test_ties_are_deterministic() -> None:
    best, _ = choose([Candidate("b", "ssd", BW), Candidate("a", "ssd", BW)], GB)
    assert best is not None and best.invoker_id == "a"
    assert choose([], GB) == (None, [])


def test_an_estimate_describes_itself_in_one_line() -> None:
    """What the controller logs for the chosen invoker and the runners-up."""
    assert Estimate("a", "ssd", 0.0, 0.5, 0.0).brief() == "a ssd 0.500 s"
    assert Estimate("b", "dram", 1.27, 0.04, 0.2, evicts=True, migrates=True).brief() == (
        "b dram 1.510 s (queue 1.270 s, migration 0.200 s, evicts, migrates)")
