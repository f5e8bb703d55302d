"""The claim actor: runs a task from its claim through download and finalize, in one thread.

One thread for the whole run, rather than one message per stage: a message waiting in a
busy worker's prefetch buffer would hold the task's lease without work being done (and let it
expire), and every hop costs a Redis round trip and a poll interval. Waits (a full stage, a
backoff, an outage) still go through delayed messages, so no thread ever idles.
"""

from __future__ import annotations

import dramatiq

from actors.dispatch import dispatch
from actors.runtime import current
from actors.stages import run_task

#: Dramatiq's default limit (10 minutes) would kill a long course; the lease, read timeouts
#: and the supervisor are what catch a hung download. This is only the last resort.
RUN_TIME_LIMIT_MS = 12 * 3600 * 1000


@dramatiq.actor(queue_name="claim", max_retries=0, time_limit=RUN_TIME_LIMIT_MS)
def claim(task_id: str) -> None:
    """Take the task (lease, fencing token, attempt + 1), download it, store and announce it."""
    dispatch(task_id, run_task(current(), task_id))
