"""Bulk retry from the dashboard: "retry all failed (or dead, or canceled) tasks" in two steps.

The first step counts the tasks the filter matches now (at most MAX_BULK, the newest) and keeps
exactly those ids in Redis under a random confirmation id, bound to the session that asked,
for CONFIRM_SECONDS. The second step, the operator's confirmation, takes that list once and
retries those tasks and no others: a task that failed after the count is not touched, one
retried meanwhile by someone else is reported, not retried twice. The retries are paced
(RETRIES_PER_SECOND) so a thousand claims do not reach the workers in one burst, and each is
recorded on its task with the operator's name.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import asyncio as aioredis

from actors.client import Client, RetryRefused, TaskNotFound
from actors.states import State

#: Most tasks one bulk retry acts on (the newest first).
MAX_BULK = 1000
#: How long a count waits for its confirmation (seconds).
CONFIRM_SECONDS = 600
#: How fast a bulk retry queues its tasks.
RETRIES_PER_SECOND = 200.0
#: The states a bulk retry may take tasks from.
RETRYABLE = (State.FAILED, State.DEAD, State.CANCELED)


@dataclass(frozen=True)
class Counted:
    """What the first step found: the confirmation's id, the tasks' ids, and how many match in all."""

    confirm_id: str
    ids: list[str]
    matching: int
    state: State


@dataclass(frozen=True)
class Outcome:
    """What a confirmed bulk retry did."""

    retried: int
    refused: int
    missing: int


class BulkRetries:
    """Counts kept in Redis (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis, self.prefix = redis, prefix

    def _key(self, confirm_id: str) -> str:
        return f"{self.prefix}ui:bulk:{hashlib.sha256(confirm_id.encode('utf-8', 'replace')).hexdigest()}"

    async def count(self, client: Client, state: State, session_key: str, reader: Callable[..., Any]) -> Counted:
        """The tasks in ``state`` now (the newest MAX_BULK), kept for confirmation by the
        session ``session_key``; ``reader`` runs a blocking call off the event loop."""
        ids = await reader(client.store.ids, state, MAX_BULK)
        matching = (await reader(client.counts)).get(state, 0)
        confirm_id = secrets.token_urlsafe(24)
        kept = json.dumps({"session": session_key, "state": state.value, "ids": ids})
        await self.redis.set(self._key(confirm_id), kept, ex=CONFIRM_SECONDS)
        return Counted(confirm_id, ids, max(matching, len(ids)), state)

    async def take(self, confirm_id: str, session_key: str) -> list[str] | None:
        """The ids counted under ``confirm_id`` for this session, once; None when there is no
        such count (expired, used, or another session's)."""
        raw = await self.redis.getdel(self._key(confirm_id))
        if raw is None:
            return None
        kept = json.loads(raw)
        if kept.get("session") != session_key:
            return None
        return [str(i) for i in kept.get("ids", [])]


def retry_all(client: Client, ids: list[str], by: str) -> Outcome:
    """Retry each of ``ids`` (blocking; paced at RETRIES_PER_SECOND): those no longer ended or
    replaced are refused, those pruned are missing."""
    retried = refused = missing = 0
    interval = 1.0 / RETRIES_PER_SECOND
    for task_id in ids:
        started = time.monotonic()
        try:
            client.retry(task_id, by=by)
            retried += 1
        except RetryRefused:
            refused += 1
        except TaskNotFound:
            missing += 1
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return Outcome(retried, refused, missing)
