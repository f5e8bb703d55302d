"""The claim actor: the gate through which every run of a task starts."""

from __future__ import annotations

import dramatiq

from actors.dispatch import dispatch
from actors.runtime import current
from actors.stages import claim_task

#: A claim is one Redis script call; a minute is generous.
CLAIM_TIME_LIMIT_MS = 60_000


@dramatiq.actor(queue_name="claim", max_retries=0, time_limit=CLAIM_TIME_LIMIT_MS)
def claim(task_id: str) -> None:
    """Take the task (lease, fencing token, attempt + 1) and hand it to download."""
    dispatch(task_id, claim_task(current(), task_id))
