"""Every import points down a layer: the contracts in pyproject.toml (``[tool.importlinter]``),
checked by import-linter over the installed packages. ``cli`` over the three services, which
never import one another, over ``store``, over the ground floor (``sllm``, ``native_loader``);
inside the controller's and the invoker's packages, their own layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_imports_follow_the_layers() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"  # the venv's console script
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 broken" in done.stdout, done.stdout
