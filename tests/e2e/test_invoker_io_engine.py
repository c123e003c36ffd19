"""An invoker says which I/O engine reads its checkpoints; one started to use the native engine
(``--io-engine native``, what the invoker image sets) that cannot load it says so at start-up,
in its log and in ``/health`` (degraded), and in its etcd record."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx
import pytest

import native_loader
from cli import launcher
from sllm import keys
from sllm.etcd import Etcd
from sllm.messages import InvokerRecord

WITHOUT_ENGINE = '''
import sys

class _NoEngine:
    """Imports as an install without the compiled engine does (setup.py left out)."""

    def find_spec(self, name, path=None, target=None):
        if name == "native_loader._engine":
            raise ImportError("No module named 'native_loader._engine'")
        return None

sys.meta_path.insert(0, _NoEngine())
'''


def start_invoker(tmp_path: Path, etcd_endpoint: str, name: str, env: dict[str, str]
                  ) -> tuple[dict[str, object], str, InvokerRecord]:
    """Run an invoker until healthy; returns its /health body, its log, and its etcd record."""
    port = launcher.free_port()
    proc = launcher.spawn(name, [
        sys.executable, "-m", "invoker", "--id", name, "--port", str(port), "--etcd", etcd_endpoint,
        "--store", str(tmp_path / name / "models"), "--memory", "1Gi", "--dram-pool", "0",
    ], tmp_path, env={**os.environ, **env}, stop_at_exit=True)
    try:
        url = f"http://127.0.0.1:{port}/health"
        launcher.wait_healthy(url, proc, tmp_path / f"{name}.log", expect={"id": name})
        health = httpx.get(url).json()

        async def record() -> InvokerRecord:
            async with Etcd(etcd_endpoint) as etcd:
                got = await etcd.get(keys.Kind.INVOKER, name, InvokerRecord)
                assert got is not None
                return got

        return health, (tmp_path / f"{name}.log").read_text(), asyncio.run(record())
    finally:
        launcher.stop_pid(proc.pid)


def test_an_invoker_built_for_the_native_engine_that_cannot_load_it_says_so(
        tmp_path: Path, etcd_endpoint: str) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(WITHOUT_ENGINE)
    health, log, record = start_invoker(tmp_path, etcd_endpoint, "inv-no-engine",
                                        {"PYTHONPATH": str(shim), "SLLM_IO_ENGINE": "native"})
    assert health["status"] == "degraded"
    assert health["io_engine"] == "python"
    assert "native I/O engine cannot be loaded" in health["problems"][0]  # type: ignore[index]
    assert "native_loader._engine" in health["problems"][0]  # type: ignore[index]
    assert "ERROR" in log and "native I/O engine cannot be loaded" in log and "degraded" in log
    assert record.io_engine == "python"


@pytest.mark.skipif(not native_loader.NATIVE, reason="the native engine is not built here")
def test_an_invoker_with_the_native_engine_is_healthy_and_says_which_it_reads_with(
        tmp_path: Path, etcd_endpoint: str) -> None:
    health, log, record = start_invoker(tmp_path, etcd_endpoint, "inv-engine",
                                        {"SLLM_IO_ENGINE": "native"})
    assert health["status"] == "ok" and health["io_engine"] == "native"
    assert health["problems"] == []
    assert "cannot be loaded" not in log
    assert record.io_engine == "native"
