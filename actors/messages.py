"""The messages haul's actors exchange, sent through a broker the caller owns.

A message names its actor, so whoever sends one (a backend's client, the CLI, the supervisor,
the actors themselves) needs a broker but no actor object: the actors are declared only where
a worker runs them (:mod:`actors.handlers`). Three kinds exist: ``claim`` runs a task (claim,
download, finalize in one thread), ``finalize`` goes on with a finalizing task that rested, and
``notify`` tries the task.failed or task.canceled an ended task owes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import redis
from dramatiq import Broker, Message
from dramatiq.brokers.redis import RedisBroker

from actors.outcome import Next, Outcome
from actors.settings import Settings
from actors.store_base import redis_options

#: Queues, by the actors they carry. ``haul worker`` consumes both.
CLAIM_QUEUE = "claim"
FINALIZE_QUEUE = "finalize"
QUEUES = (CLAIM_QUEUE, FINALIZE_QUEUE)
#: Actor names and their queues: the names are in every message already in Redis, so they stay.
ACTOR_QUEUES = {"claim": CLAIM_QUEUE, "finalize": FINALIZE_QUEUE, "notify": FINALIZE_QUEUE}


class ClosingRedisBroker(RedisBroker):
    """Dramatiq's Redis broker, whose ``close`` also closes its connections (Dramatiq's own
    leaves them open for the garbage collector)."""

    def close(self) -> None:
        super().close()
        self.client.connection_pool.disconnect()


def redis_broker(settings: Settings) -> RedisBroker:
    """A broker on HAUL_REDIS_URL, for sending messages (and, with actors declared, a worker's)."""
    # Dramatiq drops connection options given beside a URL, so the pool is built here.
    pool = redis.ConnectionPool.from_url(settings.redis_url, **redis_options())
    return ClosingRedisBroker(connection_pool=pool)  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class QueuedMessage:
    """A message as the entries Dramatiq's Redis broker keeps for it (the queue list and its
    hash of message bodies), for a script to write in the step that creates the task: a new
    task and its claim message exist together or not at all, in one round trip."""

    queue_key: str
    bodies_key: str
    redis_id: str
    body: bytes


class Messages:
    """Sends haul's messages through ``broker``."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def claim(self, task_id: str, delay_seconds: float = 0.0) -> None:
        """Ask a worker to run the task (submit, retry, a rescued orphan, the next attempt)."""
        self._send("claim", (task_id,), delay_seconds)

    def queued_claim(self, task_id: str) -> QueuedMessage | None:
        """The claim message of a new task as :meth:`claim` would enqueue it with Dramatiq's
        Redis broker, for :meth:`actors.store.TaskStore.create` to write (None: this broker is
        not Redis's; send with :meth:`claim`). The layout is ``RedisBroker.enqueue``'s
        (dramatiq 2.x): the body in ``<namespace>:<queue>.msgs`` under a fresh id, the id
        pushed on ``<namespace>:<queue>``; no default middleware acts on enqueue."""
        if not isinstance(self.broker, RedisBroker):
            return None
        redis_id = str(uuid4())
        message = self._message("claim", (task_id,)).copy(options={"redis_message_id": redis_id})
        queue = f"{self.broker.namespace}:{CLAIM_QUEUE}"
        return QueuedMessage(queue, f"{queue}.msgs", redis_id, message.encode())

    def finalize(self, task_id: str, token: int, failing_since: float = 0.0, delay_seconds: float = 0.0) -> None:
        """Go on finalizing a task that rests under ``token`` (a slot wait, an outage, a resend)."""
        self._send("finalize", (task_id, token, failing_since), delay_seconds)

    def notify(self, task_id: str, seq: int | None = None, delay_seconds: float = 0.0) -> None:
        """Try the notice an ended task owes: without ``seq`` its first try (sent as the task
        ends; a duplicate does nothing), with it the try its chain waits for."""
        self._send("notify", (task_id, seq), delay_seconds)

    def follow(self, task_id: str, outcome: Outcome) -> None:
        """Send what a stage's outcome asks for next (nothing for most)."""
        if outcome.next is Next.FINALIZE:
            self.finalize(task_id, outcome.token, outcome.failing_since, outcome.delay_seconds)
        elif outcome.next is Next.RETRY:
            self.claim(task_id, outcome.delay_seconds)
        elif outcome.next is Next.NOTIFY:
            self.notify(task_id)

    def _send(self, actor: str, args: tuple[Any, ...], delay_seconds: float) -> None:
        self.broker.enqueue(self._message(actor, args), delay=int(delay_seconds * 1000) or None)

    @staticmethod
    def _message(actor: str, args: tuple[Any, ...]) -> Message[Any]:
        return Message(queue_name=ACTOR_QUEUES[actor], actor_name=actor, args=args, kwargs={}, options={})
