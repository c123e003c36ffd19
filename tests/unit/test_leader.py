"""Leader election (controller/leader.py) against a real etcd server.

Each test uses its own role, so its key never meets another test's. A contender that must lose
etcd is given it through a TCP proxy on loopback that the test can cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from controller.leader import LeaderElection
from sllm import keys
from sllm.etcd import Etcd
from sllm.messages import LeaderRecord

TTL_S = 2
POLL_S = 0.1


def role() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


async def eventually(check: Callable[[], bool], *, within: float) -> float:
    """Poll ``check`` until it holds; returns the seconds it took, fails after ``within``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, f"not true within {within} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@dataclass
class Contender:
    """One controller: its election, its run() task and when its callbacks were awaited."""

    election: LeaderElection
    deposed_delay: float = 0.0  # seconds on_deposed takes (stopping the leader's work)
    elected_at: list[float] = field(default_factory=list)  # monotonic seconds
    deposed_at: list[float] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def _on_elected(self) -> None:
        self.elected_at.append(time.monotonic())

    async def _on_deposed(self) -> None:
        self.deposed_at.append(time.monotonic())
        await asyncio.sleep(self.deposed_delay)

    def start(self) -> Contender:
        self.task = asyncio.create_task(self.election.run(self._on_elected, self._on_deposed))
        return self

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def contender(etcd: Etcd, role: str, holder: str, *, ttl_s: int = TTL_S, **kw: float) -> Contender:
    election = LeaderElection(etcd, role, holder, f"http://{holder}", ttl_s=ttl_s, poll_s=POLL_S)
    return Contender(election, **kw)


@contextlib.asynccontextmanager
async def running(*contenders: Contender) -> AsyncIterator[None]:
    """Start the contenders not started yet; cancel them all on the way out."""
    for c in contenders:
        if c.task is None:
            c.start()
    try:
        yield
    finally:
        for c in contenders:
            await c.stop()


@contextlib.asynccontextmanager
async def a_leads_b_waits(etcd_endpoint: str
                          ) -> AsyncIterator[tuple[Etcd, str, Contender, Contender]]:
    """Contender a leads a fresh role and b has been waiting behind it for a few polls; yields
    (a's etcd client, the role, a, b)."""
    name = role()
    async with Etcd(etcd_endpoint) as ea, Etcd(etcd_endpoint) as eb:
        a = contender(ea, name, "a").start()
        await eventually(lambda: a.election.is_leader, within=TTL_S)
        b = contender(eb, name, "b")
        async with running(b):
            await asyncio.sleep(3 * POLL_S)
            yield ea, name, a, b


class Proxy:
    """A TCP proxy on loopback to etcd; :meth:`cut` drops every connection and refuses new ones,
    so whoever talks through it finds etcd unreachable."""

    def __init__(self, target: str) -> None:
        self.host, _, port = target.rpartition(":")
        self.port = int(port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


async def leader_of(etcd: Etcd, name: str) -> str | None:
    rec = await etcd.get(keys.Kind.LEADER, name, LeaderRecord)
    return None if rec is None else rec.holder


async def test_one_of_two_contenders_leads_and_leader_reports_it(etcd_endpoint: str) -> None:
    name = role()
    async with Etcd(etcd_endpoint) as ea, Etcd(etcd_endpoint) as eb:
        a, b = contender(ea, name, "a"), contender(eb, name, "b")
        assert await a.election.leader() is None
        async with running(a, b):
            await eventually(lambda: bool(a.elected_at or b.elected_at),
                             within=TTL_S)
            await asyncio.sleep(TTL_S)  # well past a few refreshes and polls
            assert [a.election.is_leader, b.election.is_leader].count(True) == 1
            assert len(a.elected_at) + len(b.elected_at) == 1
            assert not a.deposed_at and not b.deposed_at
            lead, follower = (a, b) if a.election.is_leader else (b, a)
            for observer in (a, b):
                record = await observer.election.leader()
                assert record is not None
                assert (record.holder, record.url) == (lead.election.holder,
                                                       lead.election.url)
            assert not follower.election.is_leader
        assert await a.election.leader() is None  # cancelling the leader freed the key


async def test_other_contender_is_elected_at_once_when_the_leader_resigns(
    etcd_endpoint: str,
) -> None:
    async with a_leads_b_waits(etcd_endpoint) as (ea, name, a, b):
        assert not b.elected_at
        await a.election.resign()
        assert len(a.deposed_at) == 1 and not a.election.is_leader
        assert a.task is not None and a.task.done()  # run() returned
        took = await eventually(lambda: b.election.is_leader,
                                within=TTL_S)
        assert took < TTL_S / 2  # no waiting for the lease to expire
        assert await leader_of(ea, name) == "b"


async def test_other_contender_is_elected_when_the_leaders_task_is_cancelled(
    etcd_endpoint: str,
) -> None:
    async with a_leads_b_waits(etcd_endpoint) as (ea, name, a, b):
        await a.stop()
        assert not a.election.is_leader
        took = await eventually(lambda: b.election.is_leader,
                                within=TTL_S)
        assert took < TTL_S / 2  # the lease was revoked on cancel, not left to expire
        assert await leader_of(ea, name) == "b"


async def test_leader_whose_lease_is_revoked_is_deposed_and_the_other_leads(
    etcd_endpoint: str,
) -> None:
    name = role()
    async with Etcd(etcd_endpoint) as ea, Etcd(etcd_endpoint) as eb, Etcd(etcd_endpoint) as admin:
        # a takes a while to stop its work once deposed, so b's next poll wins the key
        a = contender(ea, name, "a", deposed_delay=1.0).start()
        await eventually(lambda: a.election.is_leader, within=TTL_S)
        b = contender(eb, name, "b")
        async with running(a, b):
            found = await admin.get_versioned(keys.Kind.LEADER, name, LeaderRecord)
            assert found is not None and found.lease
            await admin.revoke_lease(found.lease)  # what etcd does when the lease expires
            await eventually(lambda: bool(a.deposed_at), within=TTL_S)
            assert not a.election.is_leader
            await eventually(lambda: b.election.is_leader, within=TTL_S)
            assert await leader_of(admin, name) == "b"
            await asyncio.sleep(1.0)  # a campaigns again after on_deposed, and must wait
            assert b.election.is_leader and not a.election.is_leader
            assert len(a.elected_at) == 1


async def test_leader_cut_off_from_etcd_steps_down_before_another_is_elected(
    etcd_endpoint: str,
) -> None:
    name = role()
    proxy = Proxy(etcd_endpoint)
    async with Etcd(await proxy.start(), timeout=1.0) as ea, Etcd(etcd_endpoint) as eb:
        a = contender(ea, name, "a").start()
        await eventually(lambda: a.election.is_leader, within=TTL_S)
        b = contender(eb, name, "b")
        async with running(a, b):
            await asyncio.sleep(TTL_S / 2)
            assert a.election.is_leader and not b.elected_at  # refreshes through the proxy
            cut_at = time.monotonic()
            await proxy.cut()
            await eventually(lambda: bool(b.elected_at), within=3 * TTL_S)
            assert len(a.deposed_at) == 1
            # a stepped down at least a third of the TTL before b could take the key
            assert b.elected_at[0] - a.deposed_at[0] >= TTL_S / 3 - 0.1
            assert a.deposed_at[0] - cut_at <= TTL_S * 2 / 3 + 0.1
            assert await leader_of(eb, name) == "b"
            assert not a.election.is_leader


async def test_restarted_holder_with_the_same_id_takes_over_without_waiting(
    etcd_endpoint: str,
) -> None:
    name = role()
    async with Etcd(etcd_endpoint) as ea, Etcd(etcd_endpoint) as eb:
        # what a leader killed with -9 leaves behind: its key under a lease still alive for 10 s
        old_lease = await ea.grant_lease(10)
        old = LeaderRecord(holder="a", url="http://a-before", since=time.time())
        assert await ea.create(keys.Kind.LEADER, name, old, lease=old_lease)

        b = contender(eb, name, "b")
        async with running(b):
            await asyncio.sleep(3 * POLL_S)
            assert not b.elected_at  # the key is another holder's: b waits for its TTL
            a = contender(ea, name, "a")
            async with running(a):
                took = await eventually(lambda: a.election.is_leader,
                                        within=TTL_S)
                assert took < 1.0
                found = await ea.get_versioned(keys.Kind.LEADER, name, LeaderRecord)
                assert found is not None
                assert (found.record.holder, found.record.url) == ("a", "http://a")
                assert found.lease != old_lease
                assert not await ea.refresh_lease(old_lease)  # the old lease was revoked
                assert not b.election.is_leader and not b.elected_at


class ReadSignallingEtcd(Etcd):
    """A real etcd client that sets :attr:`read` each time :meth:`get_versioned` returns, so a
    test can act in the very loop step in which a leader's lease check completes."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.read = asyncio.Event()

    async def get_versioned(self, *args: Any, **kwargs: Any) -> Any:
        found = await super().get_versioned(*args, **kwargs)
        self.read.set()
        return found


async def test_cancel_that_meets_a_completing_lease_refresh_still_stops_the_leader(
    etcd_endpoint: str,
) -> None:
    # Python 3.11's asyncio.wait_for returns the inner call's result, dropping the cancellation,
    # when the cancellation arrives in the step that call completes; a leader whose refresh
    # loop lost it this way would keep its lead and never let run() return
    name = role()
    async with ReadSignallingEtcd(etcd_endpoint) as etcd:
        a = contender(etcd, name, "a").start()
        await eventually(lambda: a.election.is_leader, within=TTL_S)
        etcd.read.clear()
        await etcd.read.wait()  # the hold loop's refresh has just read the key back
        assert a.task is not None
        a.task.cancel()
        done, _ = await asyncio.wait({a.task}, timeout=TTL_S)
        assert done, "run() went on after it was cancelled"
        assert a.task.cancelled()
        assert not a.election.is_leader
        assert await leader_of(etcd, name) is None  # and its lease was revoked on the way out
