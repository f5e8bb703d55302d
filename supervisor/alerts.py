"""What the supervisor tells Sentry: dead tasks, vanished workers, sweeps that raised,
configuration problems, an unhealthy replica (once per incident), its own crash; and cron
check-ins for every sweep."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sentry_sdk
from sentry_sdk.crons import capture_checkin

from actors.registry import WorkerInfo
from actors.sentry import report_task

log = logging.getLogger(__name__)


def dead_task(task_id: str, attempts: int, error: str) -> None:
    report_task(f"task {task_id} is dead: {error}", kind="dead", task_id=task_id, stage="lease", attempt=attempts)


def bad_record(task_id: str, exc: Exception) -> None:
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("task_id", task_id)
        scope.fingerprint = ["haul", "bad-record"]
        sentry_sdk.capture_exception(exc)


def vanished_worker(worker: WorkerInfo) -> None:
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("worker", worker.id)
        scope.set_tag("worker_host", worker.host)
        scope.fingerprint = ["haul", "vanished-worker", worker.host]
        sentry_sdk.capture_message(
            f"worker {worker.id} on {worker.host} (pid {worker.pid}, {worker.threads} threads, queues "
            f"{', '.join(worker.queues)}) stopped sending heartbeats: killed, out of memory, or its host is gone",
            level="error",
        )


def config_problem(text: str) -> None:
    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["haul", "config", text.split(":", 1)[0]]
        sentry_sdk.capture_message(f"haul configuration: {text}", level="warning")


def unhealthy(node: str, kind: str, reason: str) -> None:
    """One event when a replica's /healthz turns 503 (not one per check): replicas that see the
    same cause (a read-only Redis, say) share a fingerprint, so they make one Sentry issue."""
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("supervisor", node)
        scope.set_tag("health", kind)
        scope.fingerprint = ["haul", "supervisor-unhealthy", kind]
        sentry_sdk.capture_message(f"haul supervisor {node} is unhealthy: {reason}", level="error")


def job_error(job_id: str, exception: BaseException | None) -> None:
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("sweep", job_id)
        scope.fingerprint = ["haul", "sweep-error", job_id, type(exception).__name__]
        if exception is not None:
            sentry_sdk.capture_exception(exception)
        else:
            sentry_sdk.capture_message(f"sweep {job_id} failed", level="error")


@contextmanager
def monitored(slug: str, schedule_seconds: float) -> Iterator[None]:
    """A Sentry cron check-in around one sweep: in progress, then ok or error."""
    config: Any = {
        "schedule": {"type": "interval", "value": max(1, round(schedule_seconds / 60)), "unit": "minute"},
        "checkin_margin": 2,
        "max_runtime": 5,
    }
    check_in = capture_checkin(monitor_slug=slug, status="in_progress", monitor_config=config)
    try:
        yield
    except Exception:
        capture_checkin(monitor_slug=slug, check_in_id=check_in, status="error")
        raise
    capture_checkin(monitor_slug=slug, check_in_id=check_in, status="ok")


def crash(run: Callable[[], int]) -> int:
    """Run the daemon; a crash is reported (and flushed) before it propagates."""
    try:
        return run()
    except Exception as exc:
        sentry_sdk.capture_exception(exc)
        sentry_sdk.flush(5)
        raise
