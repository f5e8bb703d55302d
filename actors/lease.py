"""A run's hold on its task: a lease renewed while the run is alive, not while bytes flow.

A worker thread that runs a task declares each blocking step it starts (a request, a read, a
hash of a resumed ``.part``, a copy into storage, a webhook call) with the longest it may take:
:meth:`Lease.step`. One :class:`LeaseKeeper` thread per process renews the leases of every run
whose current step is within its deadline, in one pipelined round trip a tick, writing
progress in the same call. So a slow origin, a pause mid-body, a slow receiver or a long
upload keep their task; a thread that is really hung (a step past its deadline, a paused
process, a partition from Redis) stops being renewed, its lease runs out and the supervisor
gives the task to another worker.

The fence on disk is judged by the working thread's own clock: before every write it calls
:meth:`Lease.check`, which refuses once ``LEASE_SAFETY`` of the lease has passed since the
last renewal that Redis confirmed (the rest absorbs clock drift between hosts), or once the
keeper learnt that the token moved on (another worker, an operator's cancel). Redis refuses a
stale token's writes by itself; the check keeps a stale holder from writing files.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import redis

from actors.errors import LeaseLost, StorageUnavailable
from actors.interrupt import Interrupter
from actors.stagemeter import DOWNLOAD, StageClock, StageMeter
from actors.store import FilesProgress, Renewal, TaskStore

log = logging.getLogger(__name__)

#: Longest pause, in seconds, between two renewals of a held lease (and two progress writes).
RENEW_SECONDS = 1.0
#: Renewals per lease at the least: a lease of 3 s is renewed every 0.75 s.
RENEWALS_PER_LEASE = 4
#: A holder stops writing once this share of its lease has passed since its last renewal.
LEASE_SAFETY = 0.8
#: Added to each step's own limit (a socket timeout) before renewal stops, in seconds: the
#: step's own error (a read timeout) should end it first, with a clearer message.
STEP_SLACK_SECONDS = 2.0
#: Longest a local disk step may take (syncing a file, hashing or copying a chunk), in seconds.
DISK_STEP_SECONDS = 60.0

#: Longest :meth:`LeaseKeeper.stop` waits for the keeper's last tick, in seconds.
STOP_JOIN_SECONDS = 5.0

Figures = tuple[int, int, int]
#: What a lease holder calls before a blocking step with the longest it may take (seconds);
#: raises to stop (the fence). Fetch and storage take one, so they need no Lease.
Step = Callable[[float], None]


def no_step(seconds: float) -> None:
    """For callers that hold no lease (tests, tools)."""


def no_figures() -> Figures | None:
    """For a lease whose run writes no download progress (a finalize)."""
    return None


def no_files() -> FilesProgress | None:
    """For a lease whose run reports no files (a finalize)."""
    return None


def nothing_stored() -> int | None:
    """For a lease whose run stores nothing (a download)."""
    return None


class Lane:
    """One thread's steps within a run: the deadline of the step it is in, and the sockets that
    step waits on (shut when it overruns its deadline or the lease is lost). A run has its
    working thread's lane, and one more for each file it downloads beside (:meth:`Lease.lane`).
    """

    def __init__(self, lease: Lease, deadline: float) -> None:
        self.lease = lease
        #: Renewal stops after this time.monotonic() unless the thread starts a new step.
        self.deadline = deadline
        self.doing = "starting"
        #: The deadline of the step last woken for overrunning it (woken once per step).
        self.woken_for = 0.0
        self._interrupter = Interrupter()

    def step(self, seconds: float, doing: str) -> None:
        """Say that this thread starts a blocking step that may take ``seconds``."""
        now = time.monotonic()
        self.lease.check(now, doing)
        self.doing = doing
        self.deadline = now + seconds + STEP_SLACK_SECONDS

    def wake(self, deadline: float) -> None:
        """Close the socket the overrunning step waits on (a peer dripping a byte now and then
        defeats the read timeout): the step fails, and the run ends as for any transient error
        while its token is still valid, instead of holding its thread until the lease runs out.
        Only the step that overran ``deadline``: a step started since is left alone."""
        if self.deadline == deadline:
            self._interrupter.interrupt()

    def fire(self) -> None:
        self._interrupter.fire()

    def guard(self, closeable: Any) -> AbstractContextManager[None]:
        """Close ``closeable`` if the lease is lost, or this step overruns, while the block runs."""
        return self._interrupter.guard(closeable)


class Lease:
    """One run's lease on one task, shared by the run's threads and the keeper.

    Plain attributes written by one thread and read by the other: each is replaced whole, so
    the reader sees the old or the new value, never half of one.
    """

    def __init__(
        self,
        task_id: str,
        token: int,
        lease_seconds: float,
        *,
        renewed_at: float,
        figures: Callable[[], Figures | None] = no_figures,
        stored: Callable[[], int | None] = nothing_stored,
        meter: StageMeter | None = None,
        stage: str = DOWNLOAD,
    ) -> None:
        self.task_id = task_id
        self.token = token
        self.lease_seconds = lease_seconds
        #: time.monotonic() just before the last renewal Redis confirmed (or the claim).
        self.renewed_at = renewed_at
        #: The working thread's steps.
        self.main = Lane(self, renewed_at + lease_seconds)
        #: The lanes of files downloading beside the working thread's (replaced whole).
        self.beside: tuple[Lane, ...] = ()
        #: Why the lease is lost, once the keeper learnt it (the token moved on).
        self.lost: str | None = None
        self.figures = figures
        #: A download's files (which finished, which are in flight), written with each renewal.
        self.files: Callable[[], FilesProgress | None] = no_files
        self.stored = stored
        #: The run's bytes and seconds in its current stage (the stage metrics).
        self.tally = StageClock(meter or StageMeter(), stage, renewed_at)
        self._lanes_lock = threading.Lock()

    def step(self, seconds: float, doing: str) -> None:
        """Say that the working thread starts a blocking step that may take ``seconds``."""
        self.main.step(seconds, doing)

    def check(self, now: float | None = None, doing: str | None = None) -> None:
        """Raise :class:`LeaseLost` when this holder can no longer be sure it owns the task."""
        if self.lost is not None:
            raise LeaseLost(f"task {self.task_id}: {self.lost}; stopping")
        now = time.monotonic() if now is None else now
        if now > self.renewed_at + self.lease_seconds * LEASE_SAFETY:
            raise LeaseLost(
                f"task {self.task_id}: lease not renewed for {now - self.renewed_at:.1f}s (while "
                f"{doing or self.main.doing}: a hung step, a paused process or Redis unreachable); stopping "
                "before another write"
            )

    def lanes(self) -> tuple[Lane, ...]:
        return (self.main, *self.beside)

    def due(self, now: float) -> bool:
        """Whether the keeper should renew: every lane's step is within its deadline."""
        return self.lost is None and all(now <= lane.deadline for lane in self.lanes())

    @contextmanager
    def lane(self) -> Iterator[Lane]:
        """A lane for a thread working beside the main one while the block runs (its first
        step must come within STEP_SLACK_SECONDS)."""
        lane = Lane(self, time.monotonic() + STEP_SLACK_SECONDS)
        with self._lanes_lock:
            self.beside = (*self.beside, lane)
        if self.lost is not None:
            lane.fire()
        try:
            yield lane
        finally:
            with self._lanes_lock:
                self.beside = tuple(other for other in self.beside if other is not lane)

    def lose(self, reason: str) -> None:
        """The token moved on: wake every lane's thread blocked on a socket."""
        self.lost = reason
        for lane in self.lanes():
            lane.fire()

    def guard(self, closeable: Any) -> AbstractContextManager[None]:
        """Close ``closeable`` if the lease is lost while the block runs."""
        return self.main.guard(closeable)


class LeaseKeeper:
    """Renews the leases this process holds, from one daemon thread, started on first use."""

    def __init__(self, store: TaskStore, lease_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        #: What this process's runs moved and spent per stage, added to Redis's totals each tick.
        self.meter = StageMeter()
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.interval = min(RENEW_SECONDS, lease_seconds / RENEWALS_PER_LEASE)
        self._held: dict[tuple[str, int], Lease] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._failing = False

    @contextmanager
    def hold(
        self,
        task_id: str,
        token: int,
        *,
        since: float,
        figures: Callable[[], Figures | None] = no_figures,
        stored: Callable[[], int | None] = nothing_stored,
        stage: str = DOWNLOAD,
    ) -> Iterator[Lease]:
        """Keep the lease of ``token`` renewed while the block runs; ``since`` is the
        time.monotonic() taken just before the call that granted it. ``figures`` (a download's)
        and ``stored`` (a finalize's bytes in storage) are written with each renewal; the run's
        time from ``since`` on counts as ``stage``'s until it enters another."""
        lease = Lease(
            task_id, token, self.lease_seconds, renewed_at=since, figures=figures, stored=stored, meter=self.meter,
            stage=stage,
        )  # fmt: skip
        with self._lock:
            self._held[(task_id, token)] = lease
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="haul-lease-keeper", daemon=True)
                self._thread.start()
        try:
            yield lease
        finally:
            with self._lock:
                self._held.pop((task_id, token), None)
            lease.tally.tell()

    def stop(self) -> None:
        """Stop renewing, after one last tick (the stage counts of the runs that ended)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_SECONDS)

    def confirm(self, lease: Lease) -> None:
        """Raise :class:`LeaseLost` unless Redis still names ``lease``'s token, asked now from the
        working thread: before a step that must not happen after a cancel that won (a file
        renamed into storage), waiting for the keeper's next tick would be too late. A read, not
        a renewal: it costs no write (no fsync of the append-only file); the holder's own
        fence still judges the time since the last renewal."""
        try:
            held = self.store.holds(lease.task_id, lease.token)
        except redis.RedisError as exc:  # unconfirmed: a cancel may have won meanwhile
            raise StorageUnavailable(
                f"task {lease.task_id}: cannot confirm its lease with Redis before storing ({exc}); will try again"
            ) from exc
        if not held:
            lease.lose("another worker or an operator took the task over (its token moved on)")
        lease.check()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.renew_due()
        self.renew_due()  # the stage counts of the runs that ended since the last tick

    def renew_due(self) -> int:
        """Renew every held lease whose step is within its deadline, and wake the steps past
        theirs; return how many were renewed."""
        started = time.monotonic()
        with self._lock:
            held = list(self._held.values())
        for lease in held:
            for lane in lease.lanes():
                deadline = lane.deadline  # read once: the thread may start a new step meanwhile
                if lease.lost is None and started > deadline and lane.woken_for != deadline:
                    lane.woken_for = deadline
                    log.warning(
                        "task %s: %s took longer than its deadline; its lease is no longer renewed",
                        lease.task_id,
                        lane.doing,
                    )
                    lane.wake(deadline)
        for lease in held:
            lease.tally.tell(started)
        tallies = self.meter.take()
        leases = [lease for lease in held if lease.due(started)]
        if not leases and not tallies:
            return 0
        renewals = [
            Renewal(lease.task_id, lease.token, lease.figures(), lease.stored(), lease.files()) for lease in leases
        ]
        try:
            results = self.store.renew_many(
                renewals, now=self.clock(), lease_seconds=self.lease_seconds, tallies=tallies
            )
        except redis.RedisError as exc:  # the holders' own check stops them if this lasts
            self.meter.put_back(tallies)
            if not self._failing:
                log.warning("leases not renewed, Redis unreachable (%s); runs go on until their fence", exc)
            self._failing = True
            return 0
        self._failing = False
        for lease, renewed in zip(leases, results, strict=True):
            if renewed:
                lease.renewed_at = max(lease.renewed_at, started)
            else:
                lease.lose("another worker or an operator took the task over (its token moved on)")
        return sum(results)
