"""The lock file (``requirements/lock.txt``) against what is installed in the running Python.

``python -m tests.helpers.lock [LOCK]`` prints every difference, one per line (``make
test-latest`` runs it, as ``python -m tests.lock``, to say which releases it tests beyond the
lock); ``tests/unit/test_lockfile.py`` asserts there is none in the project's venv.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.version import Version

LOCK = Path(__file__).resolve().parents[2] / "requirements" / "lock.txt"

NOT_LOCKED = frozenset({"sllm", "pip"})
"""Installed but never in the lock: the project itself (editable) and the venv's own pip."""

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalize(name: str) -> str:
    """A distribution name in PEP 503's normal form (``Typing_Extensions`` -> ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, Version]:
    """Distribution name (normalized) -> the version the lock pins.

    Raises:
        ValueError: a requirement line that is not an exact ``name==version`` pin.
    """
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith(("#", "--")):
            continue  # comments, and the hashes of the line above
        m = _PIN.match(line)
        if m is None:
            raise ValueError(f"{path}: not an exact pin: {line!r}")
        pins[normalize(m.group(1))] = Version(m.group(2))
    return pins


def installed() -> dict[str, Version]:
    """Distribution name (normalized) -> its installed version, in this Python's environment."""
    return {normalize(d.metadata["Name"]): Version(d.version) for d in metadata.distributions()}


def differences(lock: dict[str, Version], have: dict[str, Version]) -> list[str]:
    """One line per distribution whose installed version is not the lock's: missing, another
    version, or installed without a lock entry (a hand-installed package), sorted by name."""
    out = []
    for name in sorted(lock.keys() | have.keys()):
        if name in NOT_LOCKED:
            continue
        if name not in have:
            out.append(f"{name}: locked at {lock[name]}, not installed")
        elif name not in lock:
            out.append(f"{name}: {have[name]} installed, not in the lock")
        elif have[name] != lock[name]:
            out.append(f"{name}: {have[name]} installed, locked at {lock[name]}")
    return out


def main(argv: list[str]) -> None:
    """Print the differences between the lock at ``argv[0]`` (default :data:`LOCK`) and this
    Python's installed versions."""
    diff = differences(read_lock(Path(argv[0]) if argv else LOCK), installed())
    print("\n".join(diff) if diff else "every installed version is the lock's")


if __name__ == "__main__":
    main(sys.argv[1:])
