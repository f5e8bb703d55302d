"""Task events: what the store's scripts append to Redis Streams as they change a task.

Every state change and progress step is appended by the Lua script that makes it (``emit`` in
``actors/lua/_lib.lua``), in the same atomic step: no state change without its event, no event
without its change. Each event goes to two streams: the task's own (``events:<id>``, replayed
from its start to a client that follows the task) and the stream of all tasks (``events``,
which an API process reads once and fans out). A task's stream is never trimmed: its latest
task.progress replaces the one before it, so it grows with files and state changes, not with
time, and goes when the task is pruned. The stream of all tasks is trimmed to about
HAUL_EVENTS_RETAIN entries; the API answers a reader whose position is no longer in it with a
reset rather than a gap (:mod:`supervisor.api.sse`).

Names are the webhook types plus the steps a live view needs:

====================  =============================================================
``task.queued``       created, or queued again after a failed attempt (with ``error``)
``task.retried``      queued again by an operator's retry
``task.claimed``      taken by a worker that has not started downloading yet
``task.started``      downloading (``worker``)
``task.progress``     at most once a second: bytes and files done, bytes stored, speed; while
                      downloading, the files in flight (``active``) and ``connections``
``file.resolved``     a page file resolved (``index``, ``extractor``, ``format_id``, ``title``,
                      ``duration`` when known, the media's ``host``)
``file.completed``    one file downloaded (``index``, ``path``, ``size``, the task's ``bytes_done``)
``task.finalizing``   downloaded; storing and announcing
``task.completed``    done (``files``: where each was stored, as the webhook says)
``task.failed``       failed or dead (``state`` says which; ``error``, ``error_code``)
``task.canceled``     canceled by an operator
====================  =============================================================
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from actors.states import FINAL_STATES, State
from actors.store_base import DEFAULT_PREFIX, text_of

#: The event a task enters each state with (the same table as EVENT_OF_STATE in _lib.lua).
EVENT_OF_STATE = {
    State.QUEUED: "task.queued",
    State.CLAIMED: "task.claimed",
    State.DOWNLOADING: "task.started",
    State.FINALIZING: "task.finalizing",
    State.DONE: "task.completed",
    State.FAILED: "task.failed",
    State.DEAD: "task.failed",
    State.CANCELED: "task.canceled",
}
#: Events that change the task's state (the others report progress within one).
STATE_EVENTS = frozenset({*EVENT_OF_STATE.values(), "task.retried"})
#: Events after which nothing follows unless an operator retries the task.
FINAL_EVENTS = frozenset({"task.completed", "task.failed", "task.canceled"})

#: Entries of a task's stream read per round trip while looking for its state changes, and
#: the most pages read (a course of 10,000 files, with room for its retries).
STATE_PAGE, MAX_STATE_PAGES = 500, 40
#: Default retention: entries of the stream of all tasks.
DEFAULT_RETAIN = 100_000

#: Fields whose values are whole numbers.
_NUMBERS = frozenset(
    {
        "attempt",
        "run",
        "index",
        "size",
        "bytes_done",
        "bytes_total",
        "files_done",
        "bytes_stored",
        "speed",
        "connections",
    }
)


@dataclass(frozen=True)
class Event:
    """One entry of a stream: its id there, its type, its task and what it says."""

    id: str
    type: str
    task_id: str
    #: When the script appended it, in milliseconds since the epoch.
    at: int
    data: dict[str, Any] = field(default_factory=dict)
    #: In the stream of all tasks: the same event's id in the task's own stream.
    task_stream_id: str = ""

    @property
    def state(self) -> State | None:
        value = self.data.get("state")
        return State(value) if value else None

    @property
    def final(self) -> bool:
        """The task ended with it (until an operator's retry)."""
        return self.type in FINAL_EVENTS and self.state in FINAL_STATES

    def payload(self) -> dict[str, Any]:
        """What a client receives: the type, the task, when, and the event's own fields."""
        return {"type": self.type, "id": self.task_id, "at": self.at, **self.data}


def event_of(entry_id: Any, fields: dict[Any, Any], task_id: str = "") -> Event:
    """An :class:`Event` from a stream entry as redis-py returns it (``task_id``: the task whose
    own stream it comes from; entries there do not repeat it)."""
    data: dict[str, Any] = {}
    for name, value in fields.items():
        key, text = text_of(name), text_of(value)
        if key in _NUMBERS and text.lstrip("-").isdigit():
            data[key] = int(text)
        elif key == "files":
            data[key] = json.loads(text)
        elif key == "active":  # files in flight: [index, bytes done, bytes total or 0, connections]
            data[key] = [dict(zip(("index", "bytes_done", "bytes_total", "connections"), e, strict=True))
                         for e in json.loads(text)]  # fmt: skip
        elif key in {"not_before", "duration"}:
            data[key] = float(text)
        else:
            data[key] = text
    return Event(
        id=text_of(entry_id),
        type=data.pop("type"),
        task_id=data.pop("task", task_id),
        at=int(data.pop("at")),
        task_stream_id=str(data.pop("tid", "")),
        data=data,
    )


def _state_events(entries: Any, task_id: str) -> list[Event]:
    """The state changes among a task stream's ``entries`` (as XRANGE answers)."""
    return [e for e in (event_of(i, f, task_id) for i, f in entries) if e.type in STATE_EVENTS]


def stream_id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``ms-seq``) as numbers, for ordering."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class EventLog:
    """Reads the event streams (synchronously; the API reads them with redis.asyncio through
    the same keys and :func:`event_of`)."""

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix

    @property
    def all_key(self) -> str:
        return f"{self.prefix}events"

    def task_key(self, task_id: str) -> str:
        return f"{self.prefix}events:{task_id}"

    def configure(self, retain: int) -> None:
        """Tell the scripts how long the stream of all tasks may grow (HAUL_EVENTS_RETAIN; the
        supervisor's, so that one setting holds whichever worker started last)."""
        self.client.hset(f"{self.prefix}config", "events_retain", retain)

    def of_task(self, task_id: str, after: str = "0", count: int = 1000) -> list[Event]:
        """The task's retained events after ``after`` (an id of its stream), oldest first."""
        start = "(" + after if after != "0" else "-"
        entries: list[Any] = self.client.xrange(self.task_key(task_id), start, "+", count) or []
        return [event_of(i, f, task_id) for i, f in entries]

    def state_changes(self, task_id: str, count: int, since: str = "") -> list[Event]:
        """The task's state changes (STATE_EVENTS), oldest first: its latest ``count``; with
        ``since`` (an id of its stream), the first ``count`` after it. Read a page of entries at
        a time, as a course's file events may outnumber them a thousand to one; at most
        MAX_STATE_PAGES pages (a task's page shows what they hold)."""
        key, found, forward = self.task_key(task_id), list[Event](), bool(since)
        bound = f"({since}" if forward else "+"
        for _ in range(MAX_STATE_PAGES):
            if len(found) >= count:
                break
            read = self.client.xrange if forward else self.client.xrevrange
            entries: Any = read(key, bound, "+" if forward else "-", STATE_PAGE) or []
            found += _state_events(entries, task_id)
            if len(entries) < STATE_PAGE:
                break
            bound = f"({text_of(entries[-1][0])}"
        return found[:count] if forward else found[:count][::-1]

    def position(self) -> str:
        """Where the stream of all tasks ends now (to follow it from there)."""
        last: Any = self.client.xrevrange(self.all_key, "+", "-", count=1)
        return text_of(last[0][0]) if last else "0"

    def follow(self, after: str, block_ms: int = 1000) -> Iterator[list[Event]]:
        """Batches of events of every task as they are appended, from after ``after`` (a
        :meth:`position`, read before whatever the caller reads, so nothing in between is
        missed); an empty batch when ``block_ms`` passed with none (a chance to stop)."""
        position = after
        while True:
            answer: Any = self.client.xread({self.all_key: position}, count=500, block=block_ms) or []
            batch = [event_of(i, f) for _, entries in answer for i, f in entries]
            if batch:
                position = batch[-1].id
            yield batch
