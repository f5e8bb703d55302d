"""The finalize actors: store and announce a finished task; tell the backend of an ended one."""

from __future__ import annotations

import dramatiq

from actors.dispatch import dispatch
from actors.notify import try_notice
from actors.runtime import current
from actors.stages import finalize_task

#: A copy into storage of a large course takes long; the lease (renewed while each step is
#: alive) is what catches a hung finalize. As for claim, this is only the last resort.
FINALIZE_TIME_LIMIT_MS = 12 * 3600 * 1000


@dramatiq.actor(queue_name="finalize", max_retries=0, time_limit=FINALIZE_TIME_LIMIT_MS)
def finalize(task_id: str, token: int, failing_since: float = 0.0) -> None:
    """Move the files into storage, send task.completed, mark the task done, clean up."""
    dispatch(task_id, finalize_task(current(), task_id, token, failing_since))


@dramatiq.actor(queue_name="finalize", max_retries=0)
def notify(task_id: str, seq: int | None = None) -> None:
    """One try at the task.failed or task.canceled an ended task owes; when it fails, the next
    try is this actor again, delayed. No Dramatiq retries: a retry would be a second chain
    beside the one this message continues (see actors/notify.py)."""
    later = try_notice(current(), task_id, seq)
    if later is not None:
        notify.send_with_options(args=(task_id, later.seq), delay=int(later.delay_seconds * 1000))


@dramatiq.actor(queue_name="finalize", max_retries=0)
def notify_failed(task_id: str) -> None:
    """Messages sent before the notify chain existed: the notice's first try, if none was made
    yet (the supervisor re-sends any other owed notice). Remove once no such message is left
    (their retries lasted a day)."""
    notify(task_id)
