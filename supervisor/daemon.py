"""The supervisor daemon: APScheduler jobs for the sweeps, signals, /healthz and /metrics.

Any number of replicas may run; the one holding ``haul:supervisor:leader`` sweeps, the others
stand by and take over when it dies or stops making progress (:mod:`supervisor.leadership`).
Each sweep is its own job and Sentry cron monitor, so one that raises is reported (Sentry,
metric) and the others keep running. Health and incidents are :mod:`supervisor.health`.
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
from typing import Any

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
from supervisor.health import Incidents, Problem, leadership_problems, redis_problem
from supervisor.http import create_server, serve_in_background
from supervisor.leadership import Leadership, LeadershipLost
from supervisor.metrics import Metrics

log = logging.getLogger(__name__)

#: Prune runs at most this often (seconds); it is the least urgent sweep.
PRUNE_SECONDS = 60.0


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
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.clock = clock
        self.lead = Leadership(store, self.node_id, settings.sweep_seconds, clock)
        # A sweep that outlives the lock sends nothing more (the next leader sends what it owed).
        self.send_claim = self.lead.fenced(messages.claim)
        self.send_notify = self.lead.fenced(messages.notify)
        self.send_finalize = self.lead.fenced(messages.finalize)
        self.last_sweep: float | None = None
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
        self._persistence: limits.Persistence | None = None
        self._incidents = Incidents(self.node_id)

    @property
    def is_leader(self) -> bool:
        return self.lead.is_leader

    @property
    def lock_seconds(self) -> float:
        return self.lead.lock_seconds

    # -- jobs -------------------------------------------------------------------------------

    def elect(self) -> None:
        """Renew or take the leader lock while this replica's sweeps make progress, then judge
        health, opening or closing an incident. Redis being down or refusing writes is a health
        problem reported once, not an error raised every interval."""
        try:
            self.lead.elect(time.monotonic(), first=self._check_persistence)
        finally:
            self.metrics.leader.set(1 if self.is_leader else 0)
        self._incidents.track(self._problems(time.monotonic()))

    def requeue_stuck(self) -> None:
        """Tasks whose lease ran out go back to queued (or dead), and the claims of tasks queued
        again before a lost send go out (the outbox)."""
        if not self.lead.holds_lock():
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
        if not self.lead.holds_lock():
            return
        with self._timed("rescue_orphans"):
            found = sweeps.rescue_orphans(
                self.store, self.clock(), send_claim=self.send_claim, grace_seconds=self._orphan_seconds()
            )
            self.metrics.requeues.labels("orphan").inc(found)

    def resend_finalizes(self) -> None:
        """Resting finalizing tasks whose finalize message is overdue (lost) get it again."""
        if not self.lead.holds_lock():
            return
        with self._timed("resend_finalizes"):
            lost = sweeps.resend_finalizes(
                self.store, self.clock(), send_finalize=self.send_finalize, grace_seconds=self._orphan_seconds()
            )
            self.metrics.requeues.labels("finalize_lost").inc(lost)

    def resend_notices(self) -> None:
        """Owed task.failed / task.canceled notices whose message is overdue (lost) get it again."""
        if not self.lead.holds_lock():
            return
        with self._timed("resend_notices"):
            sweeps.resend_notifications(
                self.store, self.clock(), send_notify=self.send_notify, grace_seconds=self._orphan_seconds()
            )

    def watch_workers(self) -> None:
        """Workers whose heartbeat stopped are reported."""
        if not self.lead.holds_lock():
            return
        with self._timed("watch_workers"):
            gone = sweeps.vanished_workers(self.registry, self.clock(), on_vanished=alerts.vanished_worker)
            self.metrics.vanished.inc(gone)

    def check_config_job(self) -> None:
        """The configuration against the registered workers (see :meth:`check_config`)."""
        if not self.lead.holds_lock():
            return
        with self._timed("check_config"):
            self.check_config()

    def prune(self) -> None:
        """Ended records past HAUL_RETAIN_SECONDS, failed tasks' sandboxes, orphaned temporaries."""
        if not self.lead.holds_lock():
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
        self.scheduler.add_job(self.elect, "interval", seconds=self.lead.elect_seconds, id="elect")
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
        self.lead.resign()

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
        election = self.lead.election
        body["leader"] = election.holder if election is not None and election.error is None else None
        body["persistence"] = self._persistence.summary if self._persistence is not None else "not checked yet"
        body["last_sweep_age_seconds"] = None if self.last_sweep is None else self.clock() - self.last_sweep
        body["healthy"] = not problems
        if problems:
            body["reason"] = "; ".join(p.text for p in problems)
            body["problems"] = [p.text for p in problems]
        return not problems, body

    # -- health ---------------------------------------------------------------------------

    def _check_persistence(self) -> None:
        self._persistence = limits.redis_persistence(self.store.client)

    def _problems(self, now: float) -> list[Problem]:
        """Why this replica is unhealthy, by what its elections and sweeps saw (empty: healthy)."""
        found = [Problem("persistence", p) for p in (self._persistence.problems if self._persistence else ())]
        since = max(self.last_sweep or 0.0, self.lead.lead_started)
        return found + leadership_problems(self.lead, now, self.clock() - since if self.is_leader else None)

    # -- helpers ----------------------------------------------------------------------------

    def _orphan_seconds(self) -> float:
        return max(self.settings.orphan_seconds, 3 * self.settings.sweep_seconds)

    def _dead(self, task_id: str) -> None:
        task = self.store.get(task_id)
        alerts.dead_task(task_id, task.attempts if task else 0, task.error if task else "lease expired")
        self.send_notify(task_id, None)  # the first try of its task.failed

    @contextmanager
    def _timed(self, job: str) -> Iterator[None]:
        """A sweep as a Sentry cron check-in, a duration observation and a run the election
        judges progress by."""
        slug = f"haul-{job.replace('_', '-')}"
        with self.lead.sweeping(job), alerts.monitored(slug, self.settings.sweep_seconds):
            with self.metrics.sweep_seconds.labels(job).time():
                yield

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
