"""The actors: what a worker does with each message, declared on a broker for one runtime.

One ``claim`` message runs a task from its claim through download and finalize in one thread,
rather than one message per stage: a message waiting in a busy worker's prefetch buffer would
hold the task's lease without work being done (and let it expire), and every hop costs a Redis
round trip and a poll interval. Waits (a full stage, a backoff, an outage) still go through
delayed messages, so no thread ever idles.

Nothing is declared at import: :func:`declare_actors` is called by the worker's entry
(:mod:`actors.worker`) or a test, with the broker and the runtime the actors use.
"""

from __future__ import annotations

import dramatiq
from dramatiq import Broker

from actors.finalize import finalize_task
from actors.messages import CLAIM_QUEUE, FINALIZE_QUEUE, Messages
from actors.notify import try_notice
from actors.runtime import Runtime
from actors.stages import run_task

#: Dramatiq's default limit (10 minutes) would kill a long course; the lease, read timeouts
#: and the supervisor are what catch a hung download or finalize. This is only the last resort.
RUN_TIME_LIMIT_MS = 12 * 3600 * 1000


def declare_actors(broker: Broker, rt: Runtime) -> Messages:
    """Declare haul's actors on ``broker``, running with ``rt``; return the messages they send."""
    messages = Messages(broker)

    @dramatiq.actor(broker=broker, queue_name=CLAIM_QUEUE, max_retries=0, time_limit=RUN_TIME_LIMIT_MS)
    def claim(task_id: str) -> None:
        """Take the task (lease, fencing token, attempt + 1), download it, store and announce it."""
        messages.follow(task_id, run_task(rt, task_id))

    @dramatiq.actor(broker=broker, queue_name=FINALIZE_QUEUE, max_retries=0, time_limit=RUN_TIME_LIMIT_MS)
    def finalize(task_id: str, token: int, failing_since: float = 0.0) -> None:
        """Move the files into storage, send task.completed, mark the task done, clean up."""
        messages.follow(task_id, finalize_task(rt, task_id, token, failing_since))

    @dramatiq.actor(broker=broker, queue_name=FINALIZE_QUEUE, max_retries=0)
    def notify(task_id: str, seq: int | None = None) -> None:
        """One try at the task.failed or task.canceled an ended task owes; when it fails, the
        next try is this actor again, delayed. No Dramatiq retries: a retry would be a second
        chain beside the one this message continues (see actors/notify.py)."""
        later = try_notice(rt, task_id, seq)
        if later is not None:
            messages.notify(task_id, later.seq, later.delay_seconds)

    @dramatiq.actor(broker=broker, queue_name=FINALIZE_QUEUE, max_retries=0)
    def notify_failed(task_id: str) -> None:
        """Messages sent before the notify chain existed: the notice's first try, if none was
        made yet. Remove once no such message is left (their retries lasted a day)."""
        notify.fn(task_id)

    return messages
