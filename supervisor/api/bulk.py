"""Bulk retry from the dashboard: "retry all failed (or dead, or canceled) tasks", of every
origin or of one host, in two steps.

The first step counts the tasks the filter matches now (at most MAX_BULK, the newest) and keeps
exactly those ids in Redis under a random confirmation id, bound to the session that asked,
for CONFIRM_SECONDS. The second step, the operator's confirmation, takes that list once and
retries those tasks and no others: a task that failed after the count is not touched, one
retried meanwhile by someone else is reported, not retried twice. The retries are paced
(RETRIES_PER_SECOND) so a thousand claims do not reach the workers in one burst, and each is
recorded on its task with the operator's name.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

from redis import asyncio as aioredis

from actors.client import Client, RetryRefused, TaskNotFound
from actors.states import State
from actors.store import TaskStore
from actors.store_base import text_of
from supervisor.api.sessions import digest

#: Most tasks one bulk retry acts on (the newest first).
MAX_BULK = 1000
#: How long a count waits for its confirmation (seconds).
CONFIRM_SECONDS = 600
#: How fast a bulk retry queues its tasks.
RETRIES_PER_SECOND = 200.0
#: Most entries of a host's index one count looks through (newest first) for tasks in the state.
MAX_HOST_SCANNED = 20_000
#: Entries of a host's index read per round trip while counting.
HOST_PAGE = 500


@dataclass(frozen=True)
class Counted:
    """What the first step found: the confirmation's id, the tasks' ids, and how many match in all."""

    confirm_id: str
    ids: list[str]
    matching: int
    state: State
    #: The origin host the count was of (None: every origin).
    host: str | None = None
    #: Whether ``matching`` is every match: a host's count stops after MAX_HOST_SCANNED entries.
    exact: bool = True


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
        return f"{self.prefix}ui:bulk:{digest(confirm_id)}"

    async def count(self, store: TaskStore, state: State, session_key: str, host: str | None = None) -> Counted:
        """The tasks in ``state`` now (the newest MAX_BULK; with ``host``, of those with a file
        on it), kept for confirmation by the session ``session_key``."""
        if host is None:
            async with self.redis.pipeline(transaction=True) as pipe:  # the ids and the count of one moment
                pipe.zrevrange(store.state_key(state), 0, MAX_BULK - 1)
                pipe.zcard(store.state_key(state))
                found, matching = await pipe.execute()
            ids, exact = [text_of(i) for i in found], True
        else:
            ids, matching, exact = await self._of_host(store, state, host)
        confirm_id = secrets.token_urlsafe(24)
        kept = json.dumps({"session": session_key, "ids": ids})
        await self.redis.set(self._key(confirm_id), kept, ex=CONFIRM_SECONDS)
        return Counted(confirm_id, ids, int(matching), state, host, exact)

    async def _of_host(self, store: TaskStore, state: State, host: str) -> tuple[list[str], int, bool]:
        """The newest MAX_BULK tasks in ``state`` among a host's (its index, newest first, a page
        at a time, each page's states read in one round trip), how many match among those looked
        at, and whether that was all of the host's (at most MAX_HOST_SCANNED are)."""
        key, ids, matching = store.host_index_key(host), list[str](), 0
        for start in range(0, MAX_HOST_SCANNED, HOST_PAGE):
            page = [text_of(i) for i in await self.redis.zrevrange(key, start, start + HOST_PAGE - 1)]
            async with self.redis.pipeline(transaction=False) as pipe:
                for task_id in page:
                    pipe.hget(store.task_key(task_id), "state")
                states = await pipe.execute() if page else []
            for task_id, found in zip(page, states, strict=True):
                if found is not None and text_of(found) == state.value:
                    matching += 1
                    if len(ids) < MAX_BULK:
                        ids.append(task_id)
            if len(page) < HOST_PAGE:
                return ids, matching, True
        return ids, matching, int(await self.redis.zcard(key)) <= MAX_HOST_SCANNED

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
