"""The iteration scheduler: which sequences the next forward pass runs, and how many of their
tokens. Pure: no torch, no clock (``now`` is passed in); the engine (:mod:`invoker.engine.batching`)
carries its decisions out, as vLLM's ``Scheduler.schedule()`` and ``update_from_output`` split
deciding from running.

A :class:`Job` is the scheduler's view of one sequence: how many of its ids are known (prompt +
generated) and how many of them its KV cache holds (``computed``). Each iteration computes
``n <= known - computed`` positions of a job: a prefill chunk, or the one new token of a decode;
when ``n`` reaches ``known`` the engine samples the job's next token. :meth:`Scheduler.decide`
takes the jobs in the policy's order (:class:`sllm.manifest.Scheduling`) and gives each, in turn,
its share of the iteration's token budget (``maxBatchTokens``): the first ``maxBatch`` jobs that
may run form the batch, and the budget goes to their decodes first (one token each), then to
their prefill chunks in the order, so that a long prompt never stalls the decodes beside it
(Sarathi-Serve's stall-free batching). The order is the policy's:

- ``fcfs`` and ``run-to-completion``: started jobs first, then by arrival (vLLM's running queue
  before its waiting one); run-to-completion runs one job at a time.
- ``mlfq``: FastServe's skip-join MLFQ (Wu et al., arXiv 2305.05920 §4.1), by level, then
  arrival. Level ``i``'s quantum is ``quantum * quantumRatio**i`` seconds of iteration time; a
  job joins the highest level whose quantum covers its estimated first iteration (skip-join:
  the :class:`Profile` of this instance's own iterations estimates it); a job whose time at its
  level (each iteration it ran in counts whole) reached the quantum moves down a level; a job
  that has not run for ``starvation`` seconds goes back to level 0 (FastServe's official code
  checks every 1,000 iterations; here every decision). A job not chosen keeps its KV cache: it
  is preempted at an iteration boundary and goes on where it stopped.

**KV budget** (tokens of cache the instance may hold). Each job's cache grows by doubling up to
its limit (:func:`capacity_for`), so a job that fits the budget alone always fits eventually
(:meth:`Scheduler.fits`). A job without a cache (new, or dropped) starts only when it and every
job holding a cache could all grow to their limits within the budget, so the jobs that run never
run out of room: preempted ones keep their caches. A job holding a cache whose next iteration
would still overflow the budget (one a migration brought with its cache, admitted as it came)
takes the caches of jobs after it in the order, the lowest priority first: those are dropped and
recomputed when they run again (vLLM V1's recompute preemption); if that is not enough, it
waits. Letting new jobs take caches instead thrashes under MLFQ, where every arrival outranks
the jobs that ran: the simulation measured mean JCTs up to 500 times fcfs's that way, with a
budget of 10,000 tokens, as nearly finished jobs lost their caches over and over.

Worked example (``test_scheduler.py``): mlfq, quantum 1 s, ratio 2, a profile where a prefill of
P tokens takes ``0.1 + 0.01 P`` s. A 50-token prompt (0.6 s) joins level 0; a 300-token prompt
(3.1 s) joins level 2 (quantum 4 s). The first runs first although it came later.
"""

from __future__ import annotations

from dataclasses import dataclass

from sllm.manifest import Scheduling

INITIAL_CAPACITY = 64
"""Positions a job's first KV-cache allocation holds at least (tokens)."""

MAX_LEVEL = 32
"""The lowest MLFQ level (quanta past it would outlast any generation)."""


def capacity_for(capacity: int, length: int, limit: int) -> int:
    """The KV capacity (positions) a cache of ``capacity`` needs to hold ``length`` positions:
    unchanged when it does; else doubled (from at least :data:`INITIAL_CAPACITY`) until it
    does, capped at ``limit``."""
    if capacity >= length:
        return capacity
    c = max(capacity, INITIAL_CAPACITY, 1)
    while c < length:
        c *= 2
    return min(c, limit)


@dataclass
class Job:
    """One sequence as the scheduler sees it (fields in tokens and seconds).

    Attributes:
        id: the sequence.
        arrival: when it reached the instance.
        known: ids known: prompt + generated (+ those a migration brought).
        computed: positions its KV cache holds (0 once dropped).
        limit: the most positions it will ever hold.
        capacity: positions allocated for its cache (0: none).
        level: its MLFQ level.
        served: iteration seconds it ran at its level.
        last_run: when it last ran (its arrival until it runs).
        started: it has run at least once.
        held: not to be started (its instance is migrating away).
    """

    id: str
    arrival: float
    known: int
    limit: int
    computed: int = 0
    capacity: int = 0
    level: int = 0
    served: float = 0.0
    last_run: float = 0.0
    started: bool = False
    held: bool = False

    @property
    def pending(self) -> int:
        """Known ids its cache lacks (at least 1 while it generates)."""
        return self.known - self.computed


@dataclass(frozen=True)
class Step:
    """A decision: ``run`` is ``(job id, positions to compute)`` in the packed batch's order;
    ``drop`` the jobs whose KV cache is freed first (recomputed when they run again)."""

    run: tuple[tuple[str, int], ...]
    drop: tuple[str, ...] = ()


class Profile:
    """This instance's iteration time as measured: ``seconds ~ a + b * tokens + c * jobs``
    fitted by least squares over its iterations, the older ones weighing less (forgetting
    factor ``decay`` per iteration). FastServe profiles prefill time per input length ahead of
    time; this profile is learnt while serving, so it follows the machine it runs on.

    Args:
        decay: weight of the past at each new iteration, in (0, 1].
    """

    def __init__(self, decay: float = 0.995) -> None:
        self._decay = decay
        self._xtx = [[0.0] * 3 for _ in range(3)]
        self._xty = [0.0] * 3
        self.iterations = 0

    def observe(self, tokens: int, jobs: int, seconds: float) -> None:
        """One iteration that computed ``tokens`` positions of ``jobs`` jobs in ``seconds``."""
        x = (1.0, float(tokens), float(jobs))
        for i in range(3):
            self._xty[i] = self._xty[i] * self._decay + x[i] * seconds
            for j in range(3):
                self._xtx[i][j] = self._xtx[i][j] * self._decay + x[i] * x[j]
        self.iterations += 1

    def seconds(self, tokens: int, jobs: int = 1) -> float:
        """The estimated time of an iteration over ``tokens`` positions of ``jobs`` jobs
        (seconds; 0 before any iteration was observed)."""
        if self.iterations == 0:
            return 0.0
        coef = _solve(self._xtx, self._xty)
        return max(0.0, coef[0] + coef[1] * tokens + coef[2] * jobs)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Ridge-regularised 3x3 least squares by Gaussian elimination (the features are collinear
    while every iteration is decodes only: then the fit spreads the time evenly)."""
    scale = max(a[i][i] for i in range(3)) or 1.0
    m = [[a[i][j] + (1e-9 * scale if i == j else 0.0) for j in range(3)] + [b[i]] for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if m[col][col] == 0.0:
            continue
        for r in range(3):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [m[r][k] - f * m[col][k] for k in range(4)]
    return [m[i][3] / m[i][i] if m[i][i] else 0.0 for i in range(3)]


@dataclass
class Counters:
    """What the scheduler has done, for metrics."""

    preemptions: int = 0  # a job that ran in one iteration and not in the next, unfinished
    dropped: int = 0  # KV caches freed under memory pressure (recomputed later)
    demotions: int = 0
    promotions: int = 0  # starving jobs back to level 0


class Scheduler:
    """Decides each iteration of one instance (module docstring).

    Args:
        config: the function's scheduling.
        kv_tokens: the KV budget, positions over all jobs.
        profile: the instance's iteration profile (skip-join's estimates).
    """

    def __init__(self, config: Scheduling, kv_tokens: int, profile: Profile | None = None) -> None:
        self.config = config
        self.kv_tokens = kv_tokens
        self.profile = profile or Profile()
        self.jobs: dict[str, Job] = {}
        self.counters = Counters()
        self._last: set[str] = set()

    # --- jobs -----------------------------------------------------------------------------------

    def fits(self, limit: int) -> bool:
        """Whether a job of at most ``limit`` positions fits the KV budget alone."""
        return capacity_for(0, limit, limit) <= self.kv_tokens

    def quantum(self, level: int) -> float:
        """Seconds of iteration time a job may run at ``level`` before it moves down."""
        return self.config.quantum * self.config.quantumRatio ** level

    def join_level(self, pending: int) -> int:
        """Skip-join: the highest level whose quantum covers the estimated first iteration of a
        job with ``pending`` positions to compute (capped by the token budget: a longer prompt
        is prefilled in chunks)."""
        first = self.profile.seconds(min(pending, self.config.maxBatchTokens))
        level = 0
        while level < MAX_LEVEL and self.quantum(level) < first and self.config.quantumRatio > 1:
            level += 1
        return level

    def add(self, job_id: str, now: float, known: int, limit: int) -> Job:
        """A sequence reaches the instance with ``known`` ids to compute.

        Raises:
            ValueError: the id is taken, ``known`` is not in [1, limit], or it can never fit the
                KV budget (:meth:`fits`).
        """
        if job_id in self.jobs:
            raise ValueError(f"job {job_id!r} exists")
        if not 1 <= known <= limit:
            raise ValueError(f"known ({known}) must be in [1, {limit}]")
        if not self.fits(limit):
            raise ValueError(f"a job of {limit} positions never fits a KV budget of "
                             f"{self.kv_tokens}")
        level = self.join_level(known) if self.config.policy == "mlfq" else 0
        job = Job(job_id, arrival=now, known=known, limit=limit, level=level, last_run=now)
        self.jobs[job_id] = job
        return job

    def remove(self, job_id: str) -> None:
        """The sequence left (finished, cancelled, handed over); its cache is freed."""
        self.jobs.pop(job_id, None)
        self._last.discard(job_id)

    def seed_cache(self, job_id: str, positions: int) -> None:
        """A job that has no cache gets one holding ``positions`` already (a migration prepared
        them, or a sibling of the same prompt lent them); one that has not run re-joins the
        level its now shorter first iteration calls for (skip-join)."""
        job = self.jobs[job_id]
        job.computed = positions
        job.capacity = capacity_for(0, positions, job.limit)
        if self.config.policy == "mlfq" and not job.started:
            job.level = self.join_level(job.pending)

    def admits(self, job_id: str) -> bool:
        """Whether the job may hold a cache now: it holds one, or every job holding one and it
        could all grow to their limits within the budget (the rule :meth:`decide` starts jobs
        by)."""
        job = self.jobs[job_id]
        return bool(job.capacity) or (
            sum(j.limit for j in self.jobs.values() if j.capacity) + job.limit <= self.kv_tokens)

    def generated(self, job_id: str) -> None:
        """The job's next token was sampled: one more id is known."""
        self.jobs[job_id].known += 1

    @property
    def used(self) -> int:
        """KV positions allocated over all jobs."""
        return sum(j.capacity for j in list(self.jobs.values()))  # (read by metrics too)

    # --- deciding ------------------------------------------------------------------------------

    def order(self, now: float) -> list[Job]:
        """The jobs by priority, highest first (promoting starving ones under ``mlfq``)."""
        if self.config.policy == "mlfq":
            for job in self.jobs.values():
                if job.level > 0 and now - job.last_run >= self.config.starvation:
                    job.level, job.served, job.last_run = 0, 0.0, now
                    self.counters.promotions += 1
            return sorted(self.jobs.values(), key=lambda j: (j.level, j.arrival, j.id))
        return sorted(self.jobs.values(), key=lambda j: (not j.started, j.arrival, j.id))

    def decide(self, now: float) -> Step:
        """The next iteration (module docstring); an empty ``run`` when nothing can run."""
        order = [j for j in self.order(now) if (j.started or not j.held) and j.pending > 0]
        # the batch, in the order: a decode takes one token of the budget, a prefill chunk what
        # is left once the decodes after it (that the batch still has room for) have theirs, so
        # that a long prompt never stalls the decodes beside it (stall-free batching)
        reserved = sum(j.limit for j in self.jobs.values() if j.capacity)
        decodes_after = [0] * (len(order) + 1)
        for i in range(len(order) - 1, -1, -1):
            decodes_after[i] = decodes_after[i + 1] + (order[i].pending == 1)
        tokens = self.config.maxBatchTokens
        chosen: list[tuple[int, Job]] = []
        counts: dict[str, int] = {}
        for rank, job in enumerate(order):
            slots = self.config.batch - len(chosen)
            if slots == 0 or tokens == 0:
                break
            if job.pending == 1:
                n = 1
            else:
                n = min(job.pending, tokens - min(slots - 1, decodes_after[rank + 1]))
                if n <= 0:
                    continue
            if not job.capacity:  # it starts (or restarts) only with room to finish
                if reserved + job.limit > self.kv_tokens:
                    continue
                reserved += job.limit
            chosen.append((rank, job))
            counts[job.id] = n
            tokens -= n
        # room for the caches to grow
        run: list[tuple[str, int]] = []
        drop: list[str] = []
        used = self.used
        for rank, job in chosen:
            n = counts.get(job.id, 0)
            if not n:
                continue
            extra = capacity_for(job.capacity, job.computed + n, job.limit) - job.capacity
            if used + extra > self.kv_tokens and job.capacity:
                # a job holding a cache takes those of lower-priority jobs, the lowest first
                for victim in reversed(order[rank + 1:]):
                    if used + extra <= self.kv_tokens:
                        break
                    if victim.capacity and victim.id not in drop and victim.id not in counts:
                        drop.append(victim.id)
                        used -= victim.capacity
            if used + extra > self.kv_tokens:
                continue  # waits for memory
            used += extra
            run.append((job.id, n))
        for job_id in drop:
            job = self.jobs[job_id]
            job.computed = job.capacity = 0
            self.counters.dropped += 1
        chosen_ids = {j for j, _ in run}
        self.counters.preemptions += len(self._last - chosen_ids)
        self._last = chosen_ids
        return Step(tuple(run), tuple(drop))

    def account(self, step: Step, seconds: float, now: float) -> None:
        """The iteration of ``step`` took ``seconds``, ending at ``now``: caches grew, each job
        that ran was served ``seconds`` at its level (and demoted once its quantum is used),
        and the profile learns the iteration."""
        mlfq = self.config.policy == "mlfq"
        for job_id, n in step.run:
            job = self.jobs.get(job_id)
            if job is None:
                continue
            job.computed += n
            job.capacity = capacity_for(job.capacity, job.computed, job.limit)
            job.started = True
            job.last_run = now
            job.served += seconds
            if mlfq and job.served >= self.quantum(job.level) and job.level < MAX_LEVEL:
                job.level += 1
                job.served = 0.0
                self.counters.demotions += 1
        self.profile.observe(sum(n for _, n in step.run), len(step.run), seconds)

    def waiting(self) -> int:
        """Jobs that did not run in the last iteration."""
        return len(self.jobs) - len(self._last)

    def running(self) -> int:
        """Jobs that ran in the last iteration."""
        return len(self._last)
