"""The supervisor's leader lock, held only while this replica's sweeps make progress.

The ``elect`` job renews the lock only while the leader's requeue sweep ended within
``progress_seconds`` (the lock's TTL less one election) and no watched sweep has been running
longer than that: a sweep blocked on a stalled connection, a slow Redis or a bug makes the leader
give the lock up, so a standby takes over within the TTL plus a sweep, and a replica whose sweep
is still blocked does not stand again. A sweep starts only while this replica renewed the lock
recently by its own clock and Redis still names it, and one that outlives the lock sends nothing
more (:meth:`Leadership.fenced`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ParamSpec

import redis

from actors.store import TaskStore
from supervisor.health import Problem, redis_problem

log = logging.getLogger(__name__)

P = ParamSpec("P")

#: The leader lock lives this many sweep intervals (and at least this many seconds).
LOCK_SWEEPS = 3
MIN_LOCK_SECONDS = 1.0
#: Elections (renew, or try to take, the lock) per lock TTL.
ELECTIONS_PER_LOCK = 3
#: The leader acts only until this share of the lock's TTL has passed since its last renewal,
#: by its own clock (the rest absorbs drift against Redis's clock), like a worker's lease fence.
LOCK_SAFETY = 0.8
#: Sweeps whose running too long costs the lock (prune may remove large sandboxes, and
#: backfill_indexes read a course's large spec: both left out).
WATCHED_SWEEPS = (
    "requeue_stuck", "rescue_orphans", "resend_finalizes", "resend_notices", "watch_workers", "check_config",
)  # fmt: skip
#: A standby sees the holder's lock as renewed once its expiry moved on by more than this (seconds).
RENEWAL_EPSILON_SECONDS = 0.05


class LeadershipLost(Exception):
    """This replica no longer holds the leader lock; the sweep that finds out stops there."""


@dataclass(frozen=True)
class Election:
    """What this replica's last election saw; times on time.monotonic()."""

    at: float
    holder: str | None = None
    #: When the holder's lock runs out; None: it has no expiry.
    expires: float | None = None
    #: When the holder's lock was last seen renewed (or that holder first seen).
    renewed_at: float = 0.0
    error: Problem | None = None


class Leadership:
    """One replica's view of the leader lock, and the progress of its sweeps."""

    def __init__(
        self, store: TaskStore, node_id: str, sweep_seconds: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.store, self.node_id, self.clock = store, node_id, clock
        self.lock_seconds = max(LOCK_SWEEPS * sweep_seconds, MIN_LOCK_SECONDS)
        #: Seconds between two elections.
        self.elect_seconds = self.lock_seconds / ELECTIONS_PER_LOCK
        #: The leader gives the lock up once its requeue sweep has not ended for this long, or a
        #: watched sweep has run this long: renewed until then, the lock is free within one more
        #: election, and a standby has it at the next of its own.
        self.progress_seconds = self.lock_seconds - self.elect_seconds
        self.is_leader = False
        self.election: Election | None = None
        #: Why this replica stands aside (a sweep still blocked), or None.
        self.stuck: str | None = None
        #: clock() when this replica's current leadership began.
        self.lead_started = 0.0
        self._lock_until = 0.0  # time.monotonic() after which this replica stops acting as leader
        self._progress_at = 0.0  # time.monotonic() when the requeue sweep last ended (or leadership began)
        self._running: dict[str, float] = {}  # watched sweep -> time.monotonic() it started

    def elect(self, now: float, first: Callable[[], None] = lambda: None) -> None:
        """Renew or take the lock while the sweeps make progress; ``first`` runs in the same
        guarded step (a Redis error there is this election's error too)."""
        self.stuck = self._stuck_sweep(now)
        if self.stuck is not None:
            if self.is_leader:
                self._step_down(self.stuck)
            return  # a replica that cannot sweep does not stand
        asked = time.monotonic()
        try:
            first()
            held = self.store.hold_leadership(self.node_id, self.lock_seconds)
            holder, left = (self.node_id, self.lock_seconds) if held else self.store.leader_lock()
        except redis.RedisError as exc:
            if self.is_leader:
                log.warning("supervisor %s: cannot renew the leader lock (%s); standing by", self.node_id, exc)
            self.is_leader = False
            self.election = Election(at=time.monotonic(), error=redis_problem(exc))
            return
        if held:
            self._lock_until = asked + self.lock_seconds * LOCK_SAFETY
            if not self.is_leader:
                self.lead_started, self._progress_at = self.clock(), time.monotonic()
                log.info("supervisor %s is now the leader", self.node_id)
            self.is_leader = True
            expiry = asked + self.lock_seconds
            self.election = Election(at=time.monotonic(), holder=self.node_id, expires=expiry, renewed_at=asked)
            return
        self._stand_by(holder, left, asked)

    def _stand_by(self, holder: str | None, left: float | None, asked: float) -> None:
        if self.is_leader:
            log.info("supervisor %s is now standing by (%s holds the lock)", self.node_id, holder)
        self.is_leader = False
        expires = None if left is None else asked + left
        before, renewed_at = self.election, asked
        if before is not None and before.error is None and holder is not None and before.holder == holder:
            moved_on = expires is not None and (
                before.expires is None or expires > before.expires + RENEWAL_EPSILON_SECONDS
            )
            renewed_at = asked if moved_on else before.renewed_at
        self.election = Election(at=time.monotonic(), holder=holder, expires=expires, renewed_at=renewed_at)

    def _stuck_sweep(self, now: float) -> str | None:
        """Why this replica may not lead now: a watched sweep running too long, or (leading) no
        requeue sweep ended for too long; None when its sweeps make progress."""
        for job, since in list(self._running.items()):
            if now - since > self.progress_seconds:
                return f"its {job} sweep has been running for {now - since:.1f}s (a slow or stalled Redis, or a bug)"
        if self.is_leader and now - self._progress_at > self.progress_seconds:
            return f"its requeue_stuck sweep has not ended for {now - self._progress_at:.1f}s"
        return None

    def _step_down(self, reason: str) -> None:
        log.error("supervisor %s gives up the leader lock: %s", self.node_id, reason)
        self.is_leader = False
        self._lock_until = 0.0
        try:
            self.store.resign(self.node_id)
        except redis.RedisError as exc:
            log.warning("could not give up the leader lock (%s); it expires within %gs", exc, self.lock_seconds)

    def resign(self) -> None:
        """Give the lock up at a clean stop (else it expires by itself)."""
        if self.is_leader:
            try:
                self.store.resign(self.node_id)
            except redis.RedisError:
                pass
        self.is_leader = False

    def fresh(self) -> bool:
        return self.is_leader and time.monotonic() < self._lock_until

    def holds_lock(self) -> bool:
        """Whether a sweep may start: this replica renewed the lock recently by its own clock and
        Redis still names it (a read at the start of every sweep)."""
        if not self.fresh():
            return False
        try:
            holder = self.store.leader()
        except redis.RedisError:
            return False  # the election reports Redis being down, once
        if holder != self.node_id:
            log.warning("supervisor %s: the leader lock names %s; not sweeping", self.node_id, holder)
            self.is_leader = False
            return False
        return True

    def fenced(self, send: Callable[P, None]) -> Callable[P, None]:
        """``send``, refused with :class:`LeadershipLost` once this replica may no longer act as leader."""

        def fenced(*args: P.args, **kwargs: P.kwargs) -> None:
            if not self.fresh():
                raise LeadershipLost(
                    f"supervisor {self.node_id} no longer holds the leader lock; the sweep stops here "
                    "and the next leader sends what is left"
                )
            send(*args, **kwargs)

        return fenced

    @contextmanager
    def sweeping(self, job: str) -> Iterator[None]:
        """A sweep's run: how long the watched ones run is what an election judges progress by."""
        if job in WATCHED_SWEEPS:
            self._running[job] = time.monotonic()
        try:
            yield
        finally:
            self._running.pop(job, None)
            if job == "requeue_stuck":
                self._progress_at = time.monotonic()
