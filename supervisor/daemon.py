"""The supervisor daemon: APScheduler jobs for the sweeps, a Redis leader lock, signals, HTTP.

Any number of replicas may run; the one holding ``haul:supervisor:leader`` sweeps, the others
stand by and take over within the lock's TTL when it dies. Each sweep is its own job, so one
that raises is reported (Sentry, metric) and the others keep running.
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

from actors.registry import WorkerRegistry
from actors.settings import Settings
from actors.storage import LocalStorage
from actors.store import TaskStore
from supervisor import alerts, limits, sweeps
from supervisor.http import create_server, serve_in_background
from supervisor.metrics import Metrics

log = logging.getLogger(__name__)

SendTask = Callable[[str], None]

#: The leader lock lives this many sweep intervals (and at least this many seconds).
LOCK_SWEEPS = 3
MIN_LOCK_SECONDS = 1.0
#: Prune runs at most this often (seconds); it is the least urgent sweep.
PRUNE_SECONDS = 60.0


class Supervisor:
    """One supervisor replica: its jobs, its view of leadership, its metrics and health."""

    def __init__(
        self,
        settings: Settings,
        store: TaskStore,
        *,
        send_claim: SendTask,
        send_notify: sweeps.SendNotice,
        node_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = WorkerRegistry(store.client, store.prefix)
        self.send_claim = send_claim
        self.send_notify = send_notify
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.clock = clock
        self.is_leader = False
        self.last_sweep: float | None = None
        self.lock_seconds = max(LOCK_SWEEPS * settings.sweep_seconds, MIN_LOCK_SECONDS)
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

    # -- jobs -------------------------------------------------------------------------------

    def elect(self) -> None:
        was = self.is_leader
        try:
            self.is_leader = self.store.hold_leadership(self.node_id, self.lock_seconds)
        except redis.RedisError:
            self.is_leader = False
            raise
        finally:
            self.metrics.leader.set(1 if self.is_leader else 0)
        if self.is_leader != was:
            log.info("supervisor %s is now %s", self.node_id, "the leader" if self.is_leader else "standing by")

    def requeue_stuck(self) -> None:
        if not self.is_leader:
            return
        with self._timed("requeue_stuck"):
            outcome = sweeps.requeue_stuck(
                self.store,
                self.clock(),
                max_attempts=self.settings.max_attempts,
                send_claim=self.send_claim,
                on_dead=self._dead,
                on_error=alerts.bad_record,
            )
            self.metrics.requeues.labels("lease_expired").inc(outcome["queued"])
            orphans = sweeps.rescue_orphans(
                self.store, self.clock(), send_claim=self.send_claim, grace_seconds=self._orphan_seconds()
            )
            self.metrics.requeues.labels("orphan").inc(orphans)
            sweeps.resend_notifications(
                self.store, self.clock(), send_notify=self.send_notify, grace_seconds=self._orphan_seconds()
            )
        self.last_sweep = self.clock()

    def watch_workers(self) -> None:
        if not self.is_leader:
            return
        with self._timed("watch_workers"):
            gone = sweeps.vanished_workers(self.registry, self.clock(), on_vanished=alerts.vanished_worker)
            self.metrics.vanished.inc(gone)
            self.check_config()

    def prune(self) -> None:
        if not self.is_leader:
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

    def check_config(self) -> list[str]:
        problems = limits.check(self.settings, self.registry.workers()) + limits.check_redis(self.store.client)
        self.metrics.config_problems.set(len(problems))
        for problem in problems:
            if problem not in self._reported_problems:
                log.error("configuration: %s", problem)
                alerts.config_problem(problem)
        self._reported_problems = set(problems)
        return problems

    # -- running ----------------------------------------------------------------------------

    def start(self) -> None:
        """Check the configuration, take or wait for the lock, and start the jobs."""
        self.check_config()
        self.elect()
        interval = self.settings.sweep_seconds
        self.scheduler.add_job(self.elect, "interval", seconds=self.lock_seconds / 3, id="elect")
        self.scheduler.add_job(self.requeue_stuck, "interval", seconds=interval, id="requeue_stuck")
        self.scheduler.add_job(self.watch_workers, "interval", seconds=interval, id="watch_workers")
        self.scheduler.add_job(self.prune, "interval", seconds=max(interval, PRUNE_SECONDS), id="prune")
        self.scheduler.start()
        self.requeue_stuck()

    def stop(self) -> None:
        self.scheduler.shutdown(wait=True)
        if self.is_leader:
            try:
                self.store.resign(self.node_id)
            except redis.RedisError:
                pass  # the lock expires by itself
        self.is_leader = False

    def health(self) -> tuple[bool, dict[str, Any]]:
        body: dict[str, Any] = {"role": "leader" if self.is_leader else "standby", "node": self.node_id}
        try:
            self.store.client.ping()
            body["redis"] = "ok"
        except redis.RedisError as exc:
            body["redis"] = f"unreachable: {type(exc).__name__}"
            return False, body
        age = None if self.last_sweep is None else self.clock() - self.last_sweep
        body["last_sweep_age_seconds"] = age
        stale = self.is_leader and (age is None or age > LOCK_SWEEPS * self.settings.sweep_seconds + 5)
        return not stale, body

    # -- helpers ----------------------------------------------------------------------------

    def _orphan_seconds(self) -> float:
        return max(self.settings.orphan_seconds, 3 * self.settings.sweep_seconds)

    def _dead(self, task_id: str) -> None:
        task = self.store.get(task_id)
        alerts.dead_task(task_id, task.attempts if task else 0, task.error if task else "lease expired")
        self.send_notify(task_id, None)  # the first try of its task.failed

    @contextmanager
    def _timed(self, job: str) -> Iterator[None]:
        """A sweep as a Sentry cron check-in and a duration observation."""
        slug = f"haul-{job.replace('_', '-')}"
        with alerts.monitored(slug, self.settings.sweep_seconds), self.metrics.sweep_seconds.labels(job).time():
            yield

    def _job_failed(self, event: JobExecutionEvent) -> None:
        self.metrics.sweep_errors.labels(event.job_id).inc()
        log.error("sweep %s raised %r", event.job_id, event.exception)
        alerts.job_error(event.job_id, event.exception)


def run(settings: Settings) -> int:
    """``haul supervisor``: run until SIGTERM or SIGINT."""
    import sentry_sdk

    from actors.dispatch import enqueue_claim, enqueue_notify  # sets up the broker

    sentry_sdk.set_tag("component", "supervisor")
    supervisor = Supervisor(
        settings, TaskStore.from_url(settings.redis_url), send_claim=enqueue_claim, send_notify=enqueue_notify
    )
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
