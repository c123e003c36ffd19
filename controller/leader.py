"""Leader election through an etcd lease: of several controllers, exactly one leads.

The technique is etcd's lease-based election (the ``concurrency`` package of etcd's Go client:
``Election.Campaign``, ``Resign``, ``Leader``), itself a form of the leases of Gray and Cheriton
(SOSP'89) that Chubby made common. It is reduced here to one key and polling:

- **Campaign.** Grant a lease of ``ttl_s`` seconds and, in one etcd transaction, create
  ``/sllm/leader/<role>`` holding a :class:`~sllm.messages.LeaderRecord` attached to that lease,
  only if the key does not exist (``version == 0``). Whoever creates it leads. The others poll the
  key every ``poll_s`` seconds; when the leader dies its lease expires, etcd deletes the key, and
  the next poll creates it. (etcd's own election queues candidates by create revision and watches
  the key ahead; with two controllers, polling is simpler and costs one read every ``poll_s``.)
- **Restart under the same id.** A leader killed with ``kill -9`` leaves its key behind until the
  lease expires. When the key's holder is our own ``holder`` id, the campaign takes it over at once
  by compare-and-swap on the key's mod revision (rewriting it under the new lease) and revokes the
  old lease, instead of waiting out the TTL. Holder ids must therefore be unique per controller.
- **Hold.** The leader refreshes its lease every ``ttl_s / 6`` seconds and checks that the key is
  still attached to it. It is deposed when etcd says the lease has expired, when the key is gone
  or under another lease, or when no refresh has succeeded for ``ttl_s * 2/3`` seconds.
- **Step down first.** etcd keeps a lease at least ``ttl_s`` seconds after the last refresh it
  received, and that refresh was received after we sent it; so measuring from the moment the last
  successful refresh was *sent* (local monotonic clock), a leader that steps down at ``2/3`` of the
  TTL does so at least ``ttl_s / 3`` seconds before etcd can free the key for another controller.

Worked example, ``ttl_s = 6``: the leader refreshes every second. Its last successful refresh
was sent at t = 10 s, then etcd becomes unreachable from it. Etcd holds the lease until at least
t = 16 s. The leader gives up at t = 14 s (10 + 6 * 2/3), calls ``on_deposed`` and campaigns
again. The other controller can create the key at t >= 16 s, and does within ``poll_s`` of it.
So ``on_deposed`` has ``ttl_s / 3`` = 2 s to stop the leader's work before anyone else starts.

Caveats: the guarantee assumes ``on_deposed`` finishes within ``ttl_s / 3`` seconds and the
process's event loop is not stalled for longer than that (:attr:`LeaderElection.is_leader` also
turns False on its own at the deadline, for code that checks it). etcd may grant a longer TTL than
asked for (its minimum is about 2 s), which only makes stepping down more conservative.

Timeouts use ``asyncio.timeout``, never ``asyncio.wait_for``: on Python 3.11 ``wait_for`` returns
the inner call's result and drops a cancellation that arrives in the loop step that call completes
(CPython gh-86296), and a hold loop that lost one that way would lead on, so ``run`` never returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from sllm import keys
from sllm.errors import Unavailable
from sllm.etcd import Etcd
from sllm.messages import LeaderRecord

log = logging.getLogger(__name__)

STEP_DOWN_FRACTION = 2 / 3
"""A leader steps down after this fraction of the TTL without a successful refresh."""
REFRESHES_PER_TTL = 6
"""How many lease refreshes a leader attempts per TTL (so a few may fail without deposing it)."""


class LeaderElection:
    """Campaign for, hold and give up the lead of ``role`` (e.g. ``"controller"``).

    Args:
        etcd: the etcd client.
        role: what is led; the key is ``/sllm/leader/<role>``.
        holder: this contender's id, unique among contenders and stable across its restarts.
        url: where this contender's API answers, published in the :class:`LeaderRecord`.
        ttl_s: the lease's time to live, in seconds: how long the key outlives a dead leader.
        poll_s: seconds between two looks at the key while another contender leads.

    Raises:
        ValueError: ``ttl_s`` below 1, ``poll_s`` not positive, or a ``role`` that cannot be
            part of a key (empty, or holding ``/``).
    """

    def __init__(self, etcd: Etcd, role: str, holder: str, url: str, *, ttl_s: int = 5,
                 poll_s: float = 0.5) -> None:
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be at least 1 second, got {ttl_s}")
        if poll_s <= 0:
            raise ValueError(f"poll_s must be positive, got {poll_s}")
        keys.key(keys.Kind.LEADER, role)  # raises ValueError for a role that cannot be a key
        self.role = role
        self.holder = holder
        self.url = url
        self.ttl_s = ttl_s
        self.poll_s = poll_s
        self._etcd = etcd
        self._lease: int | None = None  # our lease while we hold (or may hold) the key
        self._leading = False
        self._last_ok = 0.0  # monotonic seconds the last successful grant or refresh was sent
        self._resigning = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._run_done = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        """Whether this contender leads now. Turns False by itself once ``ttl_s * 2/3`` seconds
        have passed without a successful refresh, even before :meth:`run` notices."""
        return self._leading and time.monotonic() < self._deadline()

    async def leader(self) -> LeaderRecord | None:
        """Who leads ``role`` now, as etcd says; None when nobody does.

        Raises:
            Unavailable: etcd is unreachable.
        """
        return await self._etcd.get(keys.Kind.LEADER, self.role, LeaderRecord)

    async def run(self, on_elected: Callable[[], Awaitable[None]],
                  on_deposed: Callable[[], Awaitable[None]]) -> None:
        """Campaign, lead, and campaign again after losing the lead, until cancelled or
        :meth:`resign` is called.

        ``on_elected`` is awaited once elected, while the lease is already being kept alive (if
        the lead is lost before it returns, it is cancelled). ``on_deposed`` is awaited when the
        lead is lost or given up with :meth:`resign`; it should stop the leader's work within
        ``ttl_s / 3`` seconds. etcd being unreachable is logged and retried, never raised.

        On cancellation the lease is revoked (without calling ``on_deposed``: the canceller
        knows), so another contender is elected at once.

        Raises:
            RuntimeError: ``run`` is already running.
            Exception: whatever a callback raises, after the lease is revoked.
        """
        if self._run_task is not None:
            raise RuntimeError(f"leader election for {self.role!r} is already running")
        self._run_task = asyncio.current_task()
        self._run_done.clear()
        try:
            while not self._resigning.is_set():
                if not await self._campaign():
                    return  # resigned while campaigning
                self._leading = True
                log.info("%s leads %s", self.holder, self.role)
                reason = await self._lead(on_elected)
                self._leading = False
                log.warning("%s no longer leads %s: %s", self.holder, self.role, reason)
                await on_deposed()
                await self._release()
        finally:
            self._leading = False
            await self._release()
            self._run_task = None
            self._run_done.set()

    async def resign(self) -> None:
        """Give up the lead for good: :meth:`run` (if running) stops campaigning, awaits
        ``on_deposed`` if it was leading, and returns; then the lease is revoked so another
        contender is elected at once. Returns when all this is done (called from a callback, it
        returns at once and :meth:`run` does it after the callback). Never raises: when etcd is
        unreachable the key frees itself when the lease expires."""
        self._resigning.set()
        if self._run_task is None:
            await self._release()
        elif self._run_task is not asyncio.current_task():
            await self._run_done.wait()
        log.info("%s resigned from %s", self.holder, self.role)

    # -- campaign --

    async def _campaign(self) -> bool:
        """Poll until we hold the key under a fresh lease (True) or resign (False)."""
        seen: str | None = None  # the holder last logged, to log each change once
        etcd_down = False
        while not self._resigning.is_set():
            try:
                current = await self._try_once()
            except Unavailable as e:
                if not etcd_down:
                    log.warning("campaign for %s: %s; retrying every %.1f s",
                                self.role, e, self.poll_s)
                etcd_down = True
                await self._release()
            else:
                if etcd_down:
                    log.info("campaign for %s: etcd is reachable again", self.role)
                    etcd_down = False
                if current is None:
                    return True
                if current != seen:
                    log.info("%s waits: %s leads %s", self.holder, current, self.role)
                    seen = current
            await self._sleep_unless_resigning(self.poll_s)
        return False

    async def _try_once(self) -> str | None:
        """One attempt: take the key if it is free or was ours. Returns None when we now hold
        it, else the holder that does. Raises Unavailable."""
        found = await self._etcd.get_versioned(keys.Kind.LEADER, self.role, LeaderRecord)
        if found is not None and found.record.holder != self.holder:
            return found.record.holder
        sent = time.monotonic()
        self._lease = await self._etcd.grant_lease(self.ttl_s)
        record = LeaderRecord(holder=self.holder, url=self.url, since=time.time())
        if found is None:
            won = await self._etcd.create(keys.Kind.LEADER, self.role, record, lease=self._lease)
        else:
            won = await self._etcd.replace(keys.Kind.LEADER, self.role, record,
                                           mod_revision=found.mod_revision, lease=self._lease)
            if won:
                log.info("%s takes %s over from its previous run (lease %x)",
                         self.holder, self.role, found.lease)
                if found.lease:
                    await self._revoke(found.lease)
        if won:
            self._last_ok = sent
            return None
        await self._release()  # another contender was faster
        again = await self._etcd.get(keys.Kind.LEADER, self.role, LeaderRecord)
        return "another contender" if again is None else again.holder

    # -- lead --

    async def _lead(self, on_elected: Callable[[], Awaitable[None]]) -> str:
        """Run ``on_elected`` while keeping the lease alive; return why the lead ended."""
        hold = asyncio.create_task(self._hold(), name=f"leader-hold-{self.role}")
        elected = asyncio.ensure_future(on_elected())
        try:
            await asyncio.wait({hold, elected}, return_when=asyncio.FIRST_COMPLETED)
            if elected.done():
                elected.result()  # a callback's error ends run()
            return await hold
        finally:
            pending = {task for task in (elected, hold) if not task.done()}
            for task in pending:
                task.cancel()
            if pending:
                # asyncio.wait, not awaiting each task under suppress(CancelledError): that
                # would also swallow a cancellation of run() arriving meanwhile
                await asyncio.wait(pending)

    async def _hold(self) -> str:
        """Refresh the lease until it is lost or we resign; return the reason."""
        assert self._lease is not None
        lease = self._lease
        beat = self.ttl_s / REFRESHES_PER_TTL
        while True:
            if await self._sleep_unless_resigning(min(beat, self._left())):
                return "resigned"
            left = self._left()
            if left <= 0:
                return f"no lease refresh succeeded for {self.ttl_s * STEP_DOWN_FRACTION:.1f} s"
            try:
                async with asyncio.timeout(left):
                    lost = await self._refresh(lease)
            except (Unavailable, TimeoutError) as e:
                log.warning("%s could not refresh its lease on %s: %s",
                            self.holder, self.role, str(e) or "timed out")
                continue
            if lost is not None:
                return lost

    async def _refresh(self, lease: int) -> str | None:
        """Refresh the lease and check the key is still ours. Returns why we lost the lead, or
        None. Raises Unavailable."""
        sent = time.monotonic()
        if not await self._etcd.refresh_lease(lease):
            return "its lease expired"
        self._last_ok = sent
        found = await self._etcd.get_versioned(keys.Kind.LEADER, self.role, LeaderRecord)
        if found is None:
            return "its key was deleted"
        if found.lease != lease:
            return f"its key was taken over by {found.record.holder}"
        return None

    # -- helpers --

    def _deadline(self) -> float:
        """Monotonic seconds at which we must presume the lease lost."""
        return self._last_ok + self.ttl_s * STEP_DOWN_FRACTION

    def _left(self) -> float:
        return self._deadline() - time.monotonic()

    async def _sleep_unless_resigning(self, seconds: float) -> bool:
        """Sleep ``seconds``; returns True at once when resigning."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._resigning.wait()
        return self._resigning.is_set()

    async def _release(self) -> None:
        """Revoke our lease, if any (deleting the key when it is still attached to it)."""
        lease, self._lease = self._lease, None
        if lease is not None:
            await self._revoke(lease)

    async def _revoke(self, lease: int) -> None:
        """Revoke ``lease``, best effort: waits at most until the lease expires on its own
        (``ttl_s`` seconds); failures are logged (an expired lease cannot be revoked either)."""
        try:
            async with asyncio.timeout(self.ttl_s):
                await self._etcd.revoke_lease(lease)
        except (Unavailable, TimeoutError) as e:
            log.debug("revoking lease %x for %s failed: %s", lease, self.role,
                      str(e) or "timed out")
