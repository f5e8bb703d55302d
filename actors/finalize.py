"""The finalize actors: store and announce a finished task; announce a failed one."""

from __future__ import annotations

import dramatiq

from actors.dispatch import dispatch
from actors.runtime import current
from actors.stages import finalize_task
from actors.stages import notify_failed as notify_failed_task

#: Storage moves are links or copies of staged files; an hour covers a large copy.
FINALIZE_TIME_LIMIT_MS = 3600 * 1000
#: task.failed is retried by Dramatiq: from 5 s up to an hour apart, for about a day.
NOTIFY_MAX_RETRIES = 30
NOTIFY_MIN_BACKOFF_MS = 5_000
NOTIFY_MAX_BACKOFF_MS = 3600 * 1000


@dramatiq.actor(queue_name="finalize", max_retries=0, time_limit=FINALIZE_TIME_LIMIT_MS)
def finalize(task_id: str, token: int, failing_since: float = 0.0) -> None:
    """Move the files into storage, send task.completed, mark the task done, clean up."""
    dispatch(task_id, finalize_task(current(), task_id, token, failing_since))


@dramatiq.actor(
    queue_name="finalize",
    max_retries=NOTIFY_MAX_RETRIES,
    min_backoff=NOTIFY_MIN_BACKOFF_MS,
    max_backoff=NOTIFY_MAX_BACKOFF_MS,
)
def notify_failed(task_id: str) -> None:
    """Send task.failed for a failed or dead task, so the backend can refund."""
    notify_failed_task(current(), task_id)
