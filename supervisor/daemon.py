"""The supervisor daemon: APScheduler jobs for the sweeps, a Redis leader lock, signals, HTTP.

Any number of replicas may run; the one holding ``haul:supervisor:leader`` sweeps, the others
stand by and take over when it dies or stops making progress. Each sweep is its own job, so one
that raises is reported (Sentry, metric) and the others keep running.

Leadership follows progress, not liveness. The ``elect`` job renews the lock only while the
leader's requeue sweep ended within ``progress_seconds`` (the lock's TTL less one election) and
no sweep but prune has been running longer than that: a sweep blocked on a stalled connection, a
slow Redis or a bug makes the leader give the lock up, so a standby takes over within the TTL
plus a sweep, and a replica whose sweep is still blocked does not stand again. A sweep starts
only while this replica renewed the lock recently by its own clock and Redis still names it, and
one that outlives the lock sends nothing more (its requeued tasks wait in the outbox for the
next leader).

Healthy (``/healthz`` 200) means: Redis answers and keeps an append-only file synced on every
write, and either this replica leads and its sweeps succeed, or another replica holds the lock
and renews it. Anything else is 503 with the reason, and one Sentry event per incident (plus one
for a new cause that joins it), not one per interval.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, ParamSpec

import redis
from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler

from actors.messages import Messages, redis_broker
from actors.redact import install_log_redaction, secrets_of
from actors.registry import WorkerRegistry
from actors.sentry import init_sentry
from actors.settings import Settings
from actors.storage import LocalStorage
from actors.store import TaskStore
from supervisor import alerts, limits, sweeps
from supervisor.http import create_server, serve_in_background
from supervisor.metrics import Metrics

log = logging.getLogger(__name__)

SendTask = Callable[[str], None]
P = ParamSpec("P")

#: The leader lock lives this many sweep intervals (and at least this many seconds).
LOCK_SWEEPS = 3
MIN_LOCK_SECONDS = 1.0
#: Elections (renew, or try to take, the lock) per lock TTL.
ELECTIONS_PER_LOCK = 3
#: The leader acts only until this share of the lock's TTL has passed since its last renewal,
#: by its own clock (the rest absorbs drift against Redis's clock), like a worker's lease fence.
LOCK_SAFETY = 0.8
#: Sweeps whose running too long costs the lock (prune may remove large sandboxes: left out).
WATCHED_SWEEPS = ("requeue_stuck", "rescue_orphans", "resend_finalizes", "resend_notices", "watch_workers")
#: Seconds beyond the lock's TTL before a leader's last sweep, or the last election, is stale.
STALE_SLACK_SECONDS = 5.0
#: A standby sees the holder's lock as renewed once its expiry moved on by more than this (seconds).
RENEWAL_EPSILON_SECONDS = 0.05
#: Elections in a row that find the replica unhealthy before it is an incident (one Sentry
#: event): a lock changing hands is not one.
INCIDENT_AFTER = 2
#: Prune runs at most this often (seconds); it is the least urgent sweep.
PRUNE_SECONDS = 60.0


class LeadershipLost(Exception):
    """This replica no longer holds the leader lock; the sweep that finds out stops there."""


class Problem(NamedTuple):
    """Why a replica is unhealthy: ``kind`` groups incidents, ``text`` says what to do."""

    kind: str
    text: str


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


def redis_problem(exc: redis.RedisError) -> Problem:
    """What Redis answered (or how it failed), as a sentence saying what to do."""
    name = type(exc).__name__
    if isinstance(exc, redis.ReadOnlyError):
        return Problem(
            "redis-readonly",
            "Redis refuses writes (READONLY): it is a replica; point HAUL_REDIS_URL at the primary",
        )
    if isinstance(exc, redis.AuthenticationError):
        return Problem("redis-auth", f"Redis refused haul's credentials ({name}); fix the password in HAUL_REDIS_URL")
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return Problem("redis-unreachable", f"Redis is unreachable ({name}: {exc}); start it or fix HAUL_REDIS_URL")
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return Problem("redis-loading", "Redis is loading its data (after a restart or a resync); wait for it")
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return Problem("redis-oom", "Redis refuses writes (OOM): it reached maxmemory; raise maxmemory or free memory")
    if str(exc).startswith("MISCONF"):
        return Problem("redis-misconf", "Redis refuses writes (MISCONF): it cannot save to disk; see its log")
    return Problem("redis-error", f"Redis refused the leader election ({name}: {exc})")


class Supervisor:
    """One supervisor replica: its jobs, its view of leadership, its metrics and health."""

    def __init__(
        self,
        settings: Settings,
        store: TaskStore,
        messages: Messages,
        *,
        node_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = WorkerRegistry(store.client, store.prefix)
        # A sweep that outlives the lock sends nothing more (the next leader sends what it owed).
        self.send_claim = self._fenced(messages.claim)
        self.send_notify = self._fenced(messages.notify)
        self.send_finalize = self._fenced(messages.finalize)
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.clock = clock
        self.is_leader = False
        self.last_sweep: float | None = None
        self.lock_seconds = max(LOCK_SWEEPS * settings.sweep_seconds, MIN_LOCK_SECONDS)
        #: Seconds between two elections.
        self.elect_seconds = self.lock_seconds / ELECTIONS_PER_LOCK
        #: The leader gives the lock up once its requeue sweep has not ended for this long, or a
        #: watched sweep has run this long: renewed until then, the lock is free within one more
        #: election, and a standby has it at the next of its own.
        self.progress_seconds = self.lock_seconds - self.elect_seconds
        self.metrics = Metrics(
            store,
            self.registry,
            lambda: self.last_sweep,
            {
                "download": settings.download_concurrency,
                "download_per_host": settings.download_per_host,
                "finalize": settings.finalize_concurrency,
                "staging_bytes": settings.staging_max_bytes,
            },
        )
        self.scheduler = BackgroundScheduler(job_defaults={"max_instances": 1, "coalesce": True})
        self.scheduler.add_listener(self._job_failed, EVENT_JOB_ERROR)
        self._reported_problems: set[str] = set()
        self._lock_until = 0.0  # time.monotonic() after which this replica stops acting as leader
        self._lead_started = 0.0  # clock() when this replica's current leadership began
        self._progress_at = 0.0  # time.monotonic() when the requeue sweep last ended (or leadership began)
        self._running: dict[str, float] = {}  # watched sweep -> time.monotonic() it started
        self._stuck: str | None = None  # why this replica stands aside (a sweep still blocked)
        self._election: Election | None = None
        self._persistence: limits.Persistence | None = None
        self._unhealthy_runs = 0
        self._incident: set[str] = set()  # the kinds of problem reported in the open incident

    # -- jobs -------------------------------------------------------------------------------

    def elect(self) -> None:
        """Renew or take the leader lock while this replica's sweeps make progress, then judge
        health, opening or closing an incident. Redis being down or refusing writes is a health
        problem reported once, not an error raised every interval."""
        try:
            self._elect(time.monotonic())
        finally:
            self.metrics.leader.set(1 if self.is_leader else 0)
        self._track_incident(self._problems(time.monotonic()))

    def requeue_stuck(self) -> None:
        """Tasks whose lease ran out go back to queued (or dead), and the claims of tasks queued
        again before a lost send go out (the outbox)."""
        if not self._holds_lock():
            return
        with self._timed("requeue_stuck"):
            outcome = sweeps.requeue_stuck(
                self.store, self.clock(), max_attempts=self.settings.max_attempts, send_claim=self.send_claim,
                on_dead=self._dead, on_error=alerts.bad_record,
            )  # fmt: skip
            self.metrics.requeues.labels("lease_expired").inc(outcome["queued"])
            self.metrics.requeues.labels("unsent").inc(outcome["resent"])
        self.last_sweep = self.clock()

    def rescue_orphans(self) -> None:
        """Queued tasks whose claim message is overdue (lost) get it again."""
        if not self._holds_lock():
            return
        with self._timed("rescue_orphans"):
            found = sweeps.rescue_orphans(
                self.store, self.clock(), send_claim=self.send_claim, grace_seconds=self._orphan_seconds()
            )
            self.metrics.requeues.labels("orphan").inc(found)

    def resend_finalizes(self) -> None:
        """Resting finalizing tasks whose finalize message is overdue (lost) get it again."""
        if not self._holds_lock():
            return
        with self._timed("resend_finalizes"):
            lost = sweeps.resend_finalizes(
                self.store, self.clock(), send_finalize=self.send_finalize, grace_seconds=self._orphan_seconds()
            )
            self.metrics.requeues.labels("finalize_lost").inc(lost)

    def resend_notices(self) -> None:
        """Owed task.failed / task.canceled notices whose message is overdue (lost) get it again."""
        if not self._holds_lock():
            return
        with self._timed("resend_notices"):
            sweeps.resend_notifications(
                self.store, self.clock(), send_notify=self.send_notify, grace_seconds=self._orphan_seconds()
            )

    def watch_workers(self) -> None:
        """Workers whose heartbeat stopped are reported."""
        if not self._holds_lock():
            return
        with self._timed("watch_workers"):
            gone = sweeps.vanished_workers(self.registry, self.clock(), on_vanished=alerts.vanished_worker)
            self.metrics.vanished.inc(gone)

    def check_config_job(self) -> None:
        """The configuration against the registered workers (see :meth:`check_config`)."""
        if not self._holds_lock():
            return
        with self._timed("check_config"):
            self.check_config()

    def prune(self) -> None:
        """Ended records past HAUL_RETAIN_SECONDS, failed tasks' sandboxes, orphaned temporaries."""
        if not self._holds_lock():
            return
        with self._timed("prune"):
            now = self.clock()
            outcome = sweeps.prune(
                self.store, self.settings.staging_dir, now, retain_seconds=self.settings.retain_seconds
            )
            temporaries = sweeps.prune_temporaries(LocalStorage(self.settings.storage_dir).temporary_dir, now)
            if temporaries:
                outcome["storage_temporaries"] = temporaries
            if outcome:
                log.info("pruned: %s", dict(outcome))

    def sweeps(self) -> dict[str, Callable[[], None]]:
        """Every sweep by its job name: each is its own APScheduler job, its own Sentry cron
        monitor (``haul-<name>``) and its own ``job`` label on the sweep metrics."""
        return {
            "requeue_stuck": self.requeue_stuck,
            "rescue_orphans": self.rescue_orphans,
            "resend_finalizes": self.resend_finalizes,
            "resend_notices": self.resend_notices,
            "watch_workers": self.watch_workers,
            "check_config": self.check_config_job,
            "prune": self.prune,
        }

    def check_config(self) -> list[str]:
        """Limits and timing (logged and sent to Sentry once each, as they appear) and Redis
        persistence (a health problem: /healthz says it, and its incident is the Sentry event)."""
        problems = limits.check(self.settings, self.registry.workers())
        self._persistence = limits.redis_persistence(self.store.client)
        persistence = list(self._persistence.problems)
        self.metrics.config_problems.set(len(problems) + len(persistence))
        for problem in problems + persistence:
            if problem not in self._reported_problems:
                log.error("configuration: %s", problem)
                if problem in problems:
                    alerts.config_problem(problem)
        self._reported_problems = set(problems + persistence)
        return problems + persistence

    # -- running ----------------------------------------------------------------------------

    def start(self) -> None:
        """Check the configuration, take or wait for the lock, and start the jobs. Redis may be
        down or refuse writes now: the jobs keep trying and /healthz says why (no crash loop)."""
        try:
            self.check_config()
        except redis.RedisError as exc:
            log.warning("supervisor %s: configuration not checked yet, Redis did not answer (%s)", self.node_id, exc)
        self.elect()
        interval = self.settings.sweep_seconds
        self.scheduler.add_job(self.elect, "interval", seconds=self.elect_seconds, id="elect")
        for job, run in self.sweeps().items():
            every = max(interval, PRUNE_SECONDS) if job == "prune" else interval
            self.scheduler.add_job(run, "interval", seconds=every, id=job)
        self.scheduler.start()
        try:
            self.requeue_stuck()
        except Exception as exc:  # reported as a scheduled run's would be; the job tries again
            self._report("requeue_stuck", exc)

    def stop(self) -> None:
        self.scheduler.shutdown(wait=True)
        if self.is_leader:
            try:
                self.store.resign(self.node_id)
            except redis.RedisError:
                pass  # the lock expires by itself
        self.is_leader = False

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: a real round trip to Redis, and what the last election and sweeps saw."""
        body: dict[str, Any] = {"role": "leader" if self.is_leader else "standby", "node": self.node_id}
        problems: list[Problem] = []
        try:
            self.store.client.ping()
            body["redis"] = "ok"
        except redis.RedisError as exc:
            body["redis"] = f"unreachable: {type(exc).__name__}"
            problems.append(redis_problem(exc))
        for problem in self._problems(time.monotonic()):
            if problem.kind not in {p.kind for p in problems}:
                problems.append(problem)
        election = self._election
        body["leader"] = election.holder if election is not None and election.error is None else None
        body["persistence"] = self._persistence.summary if self._persistence is not None else "not checked yet"
        body["last_sweep_age_seconds"] = None if self.last_sweep is None else self.clock() - self.last_sweep
        body["healthy"] = not problems
        if problems:
            body["reason"] = "; ".join(p.text for p in problems)
            body["problems"] = [p.text for p in problems]
        return not problems, body

    # -- leadership -------------------------------------------------------------------------

    def _elect(self, now: float) -> None:
        self._stuck = self._stuck_sweep(now)
        if self._stuck is not None:
            if self.is_leader:
                self._step_down(self._stuck)
            return  # a replica that cannot sweep does not stand
        asked = time.monotonic()
        try:
            self._persistence = limits.redis_persistence(self.store.client)
            held = self.store.hold_leadership(self.node_id, self.lock_seconds)
            holder, left = (self.node_id, self.lock_seconds) if held else self._lock_holder()
        except redis.RedisError as exc:
            if self.is_leader:
                log.warning("supervisor %s: cannot renew the leader lock (%s); standing by", self.node_id, exc)
            self.is_leader = False
            self._election = Election(at=time.monotonic(), error=redis_problem(exc))
            return
        if held:
            self._lock_until = asked + self.lock_seconds * LOCK_SAFETY
            if not self.is_leader:
                self._lead_started, self._progress_at = self.clock(), time.monotonic()
                log.info("supervisor %s is now the leader", self.node_id)
            self.is_leader = True
            expiry = asked + self.lock_seconds
            self._election = Election(at=time.monotonic(), holder=self.node_id, expires=expiry, renewed_at=asked)
            return
        if self.is_leader:
            log.info("supervisor %s is now standing by (%s holds the lock)", self.node_id, holder)
        self.is_leader = False
        expires = None if left is None else asked + left
        before, renewed_at = self._election, asked
        if before is not None and before.error is None and holder is not None and before.holder == holder:
            moved_on = expires is not None and (
                before.expires is None or expires > before.expires + RENEWAL_EPSILON_SECONDS
            )
            renewed_at = asked if moved_on else before.renewed_at
        self._election = Election(at=time.monotonic(), holder=holder, expires=expires, renewed_at=renewed_at)

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

    def _lock_holder(self) -> tuple[str | None, float | None]:
        """Who holds the leader lock and how long it has left in seconds (None: no expiry)."""
        pipe = self.store.client.pipeline(transaction=False)
        pipe.get(self.store.leader_key)
        pipe.pttl(self.store.leader_key)
        holder, pttl = pipe.execute()
        if holder is None:
            return None, None
        text = holder.decode() if isinstance(holder, bytes) else str(holder)
        return text, (pttl / 1000 if pttl >= 0 else None)

    def _lock_fresh(self) -> bool:
        return self.is_leader and time.monotonic() < self._lock_until

    def _holds_lock(self) -> bool:
        """Whether a sweep may start: this replica renewed the lock recently by its own clock and
        Redis still names it (a read at the start of every sweep)."""
        if not self._lock_fresh():
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

    def _fenced(self, send: Callable[P, None]) -> Callable[P, None]:
        """``send``, refused with :class:`LeadershipLost` once this replica may no longer act as leader."""

        def fenced(*args: P.args, **kwargs: P.kwargs) -> None:
            if not self._lock_fresh():
                raise LeadershipLost(
                    f"supervisor {self.node_id} no longer holds the leader lock; the sweep stops here "
                    "and the next leader sends what is left"
                )
            send(*args, **kwargs)

        return fenced

    # -- health -----------------------------------------------------------------------------

    def _problems(self, now: float) -> list[Problem]:
        """Why this replica is unhealthy, by what its elections and sweeps saw (empty: healthy)."""
        found = [Problem("persistence", p) for p in (self._persistence.problems if self._persistence else ())]
        election = self._election
        if self._stuck is not None:
            found.append(
                Problem(
                    "stuck-sweep",
                    f"this replica gave up leading: {self._stuck}; it stands aside until the sweep returns "
                    "(restart it if that lasts)",
                )
            )
        elif election is None:
            found.append(Problem("starting", "no leader election has run yet"))
        elif election.error is not None:
            found.append(election.error)
        elif now - election.at > self.lock_seconds + STALE_SLACK_SECONDS:
            found.append(
                Problem(
                    "election-stalled",
                    f"this replica's last leader election was {now - election.at:.0f}s ago (a Redis call blocked?)",
                )
            )
        elif self.is_leader:
            since = max(self.last_sweep or 0.0, self._lead_started)
            if self.clock() - since > self.lock_seconds + STALE_SLACK_SECONDS:
                found.append(
                    Problem(
                        "sweeps-failing",
                        f"this replica leads but its requeue sweep has not succeeded for {self.clock() - since:.0f}s; "
                        "its log and Sentry have the sweep's error",
                    )
                )
        elif election.holder is None:
            found.append(Problem("no-leader", "no replica holds the leader lock"))
        elif election.expires is None:
            found.append(
                Problem(
                    "lock-without-expiry",
                    f"the leader lock {self.store.leader_key} names {election.holder} but has no expiry (set by "
                    "hand?); delete it and a replica takes over",
                )
            )
        elif now - election.renewed_at > self.lock_seconds + self.elect_seconds:
            found.append(
                Problem(
                    "leader-silent",
                    f"the leader {election.holder} has not renewed its lock for {now - election.renewed_at:.0f}s; "
                    f"nobody sweeps until it expires in {max(0.0, election.expires - now):.0f}s",
                )
            )
        return found

    def _track_incident(self, problems: list[Problem]) -> None:
        """Open an incident once unhealthy for INCIDENT_AFTER elections in a row: one Sentry
        event, and one more only for a cause that joins it (Redis going away during a
        persistence incident, say), never one per interval. It ends when health returns."""
        if not problems:
            if self._incident:
                log.info("supervisor %s is healthy again (was: %s)", self.node_id, ", ".join(sorted(self._incident)))
            self._incident, self._unhealthy_runs = set(), 0
            return
        self._unhealthy_runs += 1
        new = [p for p in problems if p.kind not in self._incident]
        if self._unhealthy_runs >= INCIDENT_AFTER and new:
            self._incident |= {p.kind for p in new}
            text = "; ".join(p.text for p in new)
            log.error("supervisor %s is unhealthy: %s", self.node_id, text)
            alerts.unhealthy(self.node_id, new[0].kind, text)

    # -- helpers ----------------------------------------------------------------------------

    def _orphan_seconds(self) -> float:
        return max(self.settings.orphan_seconds, 3 * self.settings.sweep_seconds)

    def _dead(self, task_id: str) -> None:
        task = self.store.get(task_id)
        alerts.dead_task(task_id, task.attempts if task else 0, task.error if task else "lease expired")
        self.send_notify(task_id, None)  # the first try of its task.failed

    @contextmanager
    def _timed(self, job: str) -> Iterator[None]:
        """A sweep as a Sentry cron check-in and a duration observation; how long the watched
        sweeps run is what the election judges progress by."""
        slug = f"haul-{job.replace('_', '-')}"
        if job in WATCHED_SWEEPS:
            self._running[job] = time.monotonic()
        try:
            with alerts.monitored(slug, self.settings.sweep_seconds), self.metrics.sweep_seconds.labels(job).time():
                yield
        finally:
            self._running.pop(job, None)
            if job == "requeue_stuck":
                self._progress_at = time.monotonic()

    def _job_failed(self, event: JobExecutionEvent) -> None:
        self._report(event.job_id, event.exception)

    def _report(self, job: str, exception: BaseException | None) -> None:
        if isinstance(exception, LeadershipLost):
            log.warning("sweep %s stopped: %s", job, exception)
            return
        self.metrics.sweep_errors.labels(job).inc()
        log.error("sweep %s raised %r", job, exception)
        alerts.job_error(job, exception)


def run(settings: Settings) -> int:
    """``haul supervisor``: run until SIGTERM or SIGINT."""
    install_log_redaction(secrets_of(settings))
    init_sentry(settings, component="supervisor")
    supervisor = Supervisor(settings, TaskStore.from_url(settings.redis_url), Messages(redis_broker(settings)))
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    server = create_server(settings.supervisor_host, settings.supervisor_port, supervisor.metrics.registry,
                           supervisor.health)  # fmt: skip
    serve_in_background(server)
    log.info(
        "supervisor %s: sweeping every %gs, /healthz and /metrics on %s:%d",
        supervisor.node_id, settings.sweep_seconds, settings.supervisor_host, server.server_address[1],
    )  # fmt: skip

    def _run() -> int:
        supervisor.start()
        stopped.wait()
        log.info("supervisor %s: stopping", supervisor.node_id)
        supervisor.stop()
        server.shutdown()
        server.server_close()
        return 0

    return alerts.crash(_run)
