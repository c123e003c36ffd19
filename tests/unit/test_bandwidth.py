"""The invoker's measured bandwidths (invoker/bandwidth.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from invoker.bandwidth import BandwidthMeter, ProbeResult, probe

GB = 10**9


def test_worked_example() -> None:
    """The module docstring's example: SSD seeded at 2 GB/s, a 1 GB load in 1 s, alpha 0.3."""
    meter = BandwidthMeter(ProbeResult(dram_bps=10 * GB, ssd_bps=2 * GB, write_bps=0.5 * GB))
    assert meter.observe("ssd", GB, 1.0)
    snap = meter.snapshot()
    assert snap.ssd_bps == pytest.approx(1.7 * GB)
    assert (snap.dram_bps, snap.network_bps, snap.samples) == (10 * GB, 0.5 * GB, 1)


def test_the_first_transfer_replaces_the_probes_stand_in() -> None:
    """The network seed is the probe's write bandwidth, a stand-in: the first transfer sets the
    figure, later ones are averaged (the docstring's second example)."""
    meter = BandwidthMeter(ProbeResult(dram_bps=10 * GB, ssd_bps=2 * GB, write_bps=0.5 * GB))
    assert meter.observe("network", GB, 10.0)
    assert meter.snapshot().network_bps == pytest.approx(0.1 * GB)
    assert meter.observe("network", GB, 5.0)
    assert meter.snapshot().network_bps == pytest.approx(0.13 * GB)
    assert meter.observe("ssd", GB, 1.0)  # a seed measured the same way is averaged from the start
    assert meter.snapshot().ssd_bps == pytest.approx(1.7 * GB)


def test_small_or_instant_samples_do_not_count() -> None:
    meter = BandwidthMeter(ProbeResult(10 * GB, 2 * GB, GB), min_bytes=8 << 20)
    assert not meter.observe("dram", 1 << 20, 0.001)  # fixed costs dominate
    assert not meter.observe("dram", GB, 0.0)
    assert meter.snapshot().dram_bps == 10 * GB and meter.snapshot().samples == 0
    with pytest.raises(ValueError, match="alpha"):
        BandwidthMeter(ProbeResult(1, 1, 1), alpha=0.0)


def test_probe_measures_and_leaves_nothing_behind(tmp_path: Path) -> None:
    got = probe(tmp_path, nbytes=4 << 20)
    assert got.dram_bps > 0 and got.ssd_bps > 0 and got.write_bps > 0
    assert list(tmp_path.iterdir()) == []
