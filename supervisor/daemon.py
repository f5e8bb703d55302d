"""The supervisor daemon: APScheduler jobs for the sweeps, signals, /healthz and /metrics.

Any number of replicas may run; the one holding ``haul:supervisor:leader`` sweeps, the others
stand by and take over when it dies or stops making progress (:mod:`supervisor.leadership`).
Each sweep is its own job and Sentry cron monitor (:mod:`supervisor.jobs`), so one that raises
is reported (Sentry, metric) and the others keep running. Health and incidents are
:mod:`supervisor.health`, the configuration check :mod:`supervisor.configcheck`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler

from actors.events import EventLog
from actors.messages import Messages, redis_broker
from actors.redact import install_log_redaction, secrets_of
from actors.registry import WorkerRegistry
from actors.sentry import init_sentry
from actors.settings import Settings
from actors.store import TaskStore
from supervisor import alerts
from supervisor.configcheck import ConfigCheck
from supervisor.health import Incidents, Problem, leadership_problems, redis_problem
from supervisor.http import create_server, serve_in_background
from supervisor.jobs import SweepJobs
from supervisor.leadership import Leadership, LeadershipLost
from supervisor.metrics import Metrics

log = logging.getLogger(__name__)


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
        self.metrics = Metrics(
            store,
            self.registry,
            lambda: self.jobs.last_sweep,
            {
                "download": settings.download_concurrency,
                "download_per_host": settings.download_per_host,
                "finalize": settings.finalize_concurrency,
                "staging_bytes": settings.staging_max_bytes,
            },
        )
        self.config = ConfigCheck(settings, store, self.registry, self.metrics, wall_clock=clock)
        self.jobs = SweepJobs(settings, store, self.registry, messages, self.lead, self.metrics, self.config, clock)
        self.scheduler = BackgroundScheduler(job_defaults={"max_instances": 1, "coalesce": True})
        self.scheduler.add_listener(self._job_failed, EVENT_JOB_ERROR)
        self._incidents = Incidents(self.node_id)

    @property
    def is_leader(self) -> bool:
        return self.lead.is_leader

    @property
    def lock_seconds(self) -> float:
        return self.lead.lock_seconds

    def elect(self) -> None:
        """Renew or take the leader lock while this replica's sweeps make progress, then judge
        health, opening or closing an incident. Redis being down or refusing writes is a health
        problem reported once, not an error raised every interval."""
        try:
            self.lead.elect(time.monotonic(), first=self.config.check_persistence)
        finally:
            self.metrics.leader.set(1 if self.is_leader else 0)
        self._incidents.track(self._problems(time.monotonic()))

    def check_config(self) -> list[str]:
        """The configuration's problems now (logged and reported once each as they appear)."""
        return self.config.run()

    # -- running ----------------------------------------------------------------------------

    def start(self) -> None:
        """Check the configuration, take or wait for the lock, and start the jobs. Redis may be
        down or refuse writes now: the jobs keep trying and /healthz says why (no crash loop)."""
        try:
            self.check_config()
            EventLog(self.store.client, self.store.prefix).configure(self.settings.events_retain)
        except redis.RedisError as exc:
            log.warning("supervisor %s: configuration not checked yet, Redis did not answer (%s)", self.node_id, exc)
        self.elect()
        self.scheduler.add_job(self.elect, "interval", seconds=self.lead.elect_seconds, id="elect")
        for job, run in self.jobs.by_name().items():
            self.scheduler.add_job(run, "interval", seconds=self.jobs.every(job), id=job)
        self.scheduler.start()
        try:
            self.jobs.requeue_stuck()
        except Exception as exc:  # reported as a scheduled run's would be; the job tries again
            self._report("requeue_stuck", exc)

    def stop(self) -> None:
        self.scheduler.shutdown(wait=True)
        self.lead.resign()
        self.jobs.close()

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
        persistence = self.config.persistence
        body["persistence"] = persistence.summary if persistence is not None else "not checked yet"
        last = self.jobs.last_sweep
        body["last_sweep_age_seconds"] = None if last is None else self.clock() - last
        body["healthy"] = not problems
        if problems:
            body["reason"] = "; ".join(p.text for p in problems)
            body["problems"] = [p.text for p in problems]
        return not problems, body

    def _problems(self, now: float) -> list[Problem]:
        """Why this replica is unhealthy, by what its elections and sweeps saw (empty: healthy)."""
        found = [Problem("persistence", p) for p in self.config.persistence_problems()]
        since = max(self.jobs.last_sweep or 0.0, self.lead.lead_started)
        return found + leadership_problems(self.lead, now, self.clock() - since if self.is_leader else None)

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
