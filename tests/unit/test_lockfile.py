"""The venv the suite runs in holds exactly the lock's versions: nothing missing, nothing
different, nothing installed by hand beside it (which could hide a missing lock entry)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers.lock import LOCK, differences, installed, normalize, read_lock


def test_installed_versions_are_the_locks() -> None:
    assert differences(read_lock(LOCK), installed()) == []


def test_the_lock_satisfies_every_requirement_of_setup_cfg() -> None:
    """Every requirement sllm declares (its own and the test extra's, as installed from
    setup.cfg) has a pin in the lock inside its range: a dependency added to setup.cfg without
    `make lock` fails here."""
    lock = read_lock(LOCK)
    wanted = [r for r in map(Requirement, metadata.requires("sllm") or [])
              if r.marker is None or r.marker.evaluate({"extra": "test"})]
    assert wanted
    for req in wanted:
        name = normalize(req.name)
        assert name in lock, f"{req} is not in the lock: run make lock"
        assert req.specifier.contains(lock[name], prereleases=True), f"{req}: locked {lock[name]}"


def test_the_lock_pins_the_cpu_build_of_torch_and_the_build_requirements() -> None:
    lock = read_lock(LOCK)
    assert lock["torch"].local == "cpu"
    assert not any(name.startswith(("nvidia-", "cuda-")) for name in lock)
    assert {"setuptools", "wheel", "pybind11"} <= lock.keys()


def test_differences_name_each_kind(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\nA_b==1.0 \\\n    --hash=sha256:00\n    # via x\nc==2\nd==3\n")
    have = {"a-b": Version("1.0"), "c": Version("2.1"), "e": Version("1"), "pip": Version("23")}
    assert differences(read_lock(lock), have) == [
        "c: 2.1 installed, locked at 2",
        "d: locked at 3, not installed",
        "e: 1 installed, not in the lock",
    ]


def test_a_range_in_the_lock_is_refused(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("torch>=2.4\n")
    with pytest.raises(ValueError, match="not an exact pin"):
        read_lock(lock)
