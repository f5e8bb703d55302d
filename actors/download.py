"""The download actor: fetch every file of a task into its sandbox."""

from __future__ import annotations

import dramatiq

from actors.dispatch import dispatch
from actors.runtime import current
from actors.stages import download_task

#: Dramatiq's default limit (10 minutes) would kill a long course; the lease, read timeouts
#: and the supervisor are what catch a hung download. This is only the last resort.
DOWNLOAD_TIME_LIMIT_MS = 12 * 3600 * 1000


@dramatiq.actor(queue_name="download", max_retries=0, time_limit=DOWNLOAD_TIME_LIMIT_MS)
def download(task_id: str, token: int) -> None:
    """Fetch every file of the task into its sandbox, then hand it to finalize."""
    dispatch(task_id, download_task(current(), task_id, token))
