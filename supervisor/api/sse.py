"""Server-Sent Events: a task's stream (replayed from its start, closed after its final event)
and the stream of every task (from now on).

One :class:`Hub` per API process reads the stream of all tasks (one blocking read on a Redis
connection of its own) and hands each event to the subscribers that follow its task, so a
thousand subscribers cost a thousand queues, not a thousand Redis connections. A subscriber
subscribes first, then replays what the streams hold (a task's from its start, or from its
Last-Event-ID), then takes live events from its queue, skipping those the replay already sent:
nothing between the two is lost or sent twice. A subscriber that falls behind by more than
QUEUE_EVENTS events is disconnected; its EventSource reconnects with its Last-Event-ID and
replays from Redis.

Event ids name their stream: ``T<entry>.<task>`` for a task's (the task's id prefix guards
against an id of another task), ``A<entry>`` for all tasks'. An id that does not name a place
in this stream (another stream's, another task's, one trimmed away or lost to a Redis restart,
one from the future) is answered with ``event: reset`` carrying the task's state (re-read it),
never a silent gap. In a task's stream a task.progress replaces the one before it, so an id of
a replaced progress event is a place too: the next entry after it is the progress that
replaced it. A comment goes out after KEEPALIVE_SECONDS without an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from starlette.responses import Response, StreamingResponse

from actors.events import STATE_EVENTS, Event, event_of, stream_id_key
from actors.states import FINAL_STATES
from actors.store_base import REDIS_SOCKET_TIMEOUT_SECONDS, redis_options, text_of
from supervisor.api.auth import watcher_view
from supervisor.api.problems import Problem

log = logging.getLogger(__name__)

#: Longest silence on a stream before a keep-alive comment (at most 15 s, by contract).
KEEPALIVE_SECONDS = 10
#: Events a subscriber may fall behind by before it is disconnected (it then replays).
QUEUE_EVENTS = 2000
#: Entries read per replay request.
PAGE = 200
#: Longest a new stream waits for the hub to know where it reads from (seconds).
READY_SECONDS = 5.0
#: Tells an EventSource how long to wait before it reconnects (milliseconds).
RETRY_MS = 2000
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
TASK_MARK, ALL_MARK = "T", "A"
TAG_CHARS = 8
#: Encoded frames kept for the subscribers of the same events (cleared when full).
FRAME_CACHE = 10_000
FINAL = frozenset(state.value for state in FINAL_STATES)

Snapshot = Callable[[], Awaitable[dict[str, Any]]]


def frame(event_id: str | None, name: str, data: Any) -> str:
    """One event of a stream (``event_id`` None: without an id, as the dashboard's, which a
    reconnect reads afresh rather than resuming)."""
    place = f"id: {event_id}\n" if event_id is not None else ""
    return f"{place}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def task_sse_id(task_id: str, entry_id: str) -> str:
    return f"{TASK_MARK}{entry_id}.{task_id[:TAG_CHARS]}"


def entry_of(event_id: str | None, mark: str, task_id: str = "") -> str | None:
    """The stream entry an SSE id names, if it is one of this stream's ids (None otherwise)."""
    if not event_id or not event_id.startswith(mark):
        return None
    entry, _, tag = event_id[len(mark) :].partition(".")
    if tag != task_id[:TAG_CHARS]:
        return None
    ms, dash, seq = entry.partition("-")
    ascii_digits = ms.isascii() and seq.isascii() and ms.isdigit() and seq.isdigit()
    return entry if dash and ascii_digits else None


@dataclass(eq=False)
class Subscription:
    """One subscriber's queue of live events (of the tasks it follows; None: of every task),
    and whether it fell too far behind."""

    task_ids: tuple[str | None, ...]
    queue: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(QUEUE_EVENTS))
    overflowed: bool = False


class Hub:
    """The one reader of the stream of all tasks in this process (see the module docstring)."""

    def __init__(self, url: str, key: str) -> None:
        # Its reads block up to KEEPALIVE_SECONDS; a half-open connection is cut after that.
        timeout = KEEPALIVE_SECONDS + REDIS_SOCKET_TIMEOUT_SECONDS
        self.client = aioredis.Redis.from_url(url, **(redis_options() | {"socket_timeout": timeout}))
        self.key = key
        self.subscribers: dict[str | None, set[Subscription]] = {}
        self._reader: asyncio.Task[None] | None = None
        #: Set once the hub knows where it reads from: a stream opened before that could miss
        #: an event between its replay and the hub's first read.
        self.ready = asyncio.Event()
        #: State changes read so far: a view of the counts by state reads them again when it moved.
        self.state_changes = 0

    async def start(self) -> None:
        """Read where the stream ends before the API takes its first request: an event appended
        after a subscriber's replay is then always one the hub reads (were the position read
        later, an event in between would be in neither)."""
        position = None
        try:
            last = await self.client.xrevrange(self.key, "+", "-", count=1)
            position = text_of(last[0][0]) if last else "0"
        except redis.RedisError as exc:  # nothing is appended while Redis is down: read it later
            log.warning("api: cannot read the event stream yet (%s)", exc)
        self._reader = asyncio.create_task(self._run(position), name="haul-events-hub")
        self._reader.add_done_callback(self._ended)

    def _ended(self, reader: asyncio.Task[None]) -> None:
        if not reader.cancelled() and reader.exception() is not None:
            log.error("api: the event stream reader stopped: %r; event streams answer 503", reader.exception())

    @property
    def alive(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def wait_ready(self) -> None:
        """Return once the hub reads the stream; raise a 503 problem when it cannot."""
        if self.alive:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), READY_SECONDS)
        if not (self.alive and self.ready.is_set()):
            raise Problem(503, "the API cannot read the event stream from Redis now; reconnect in a moment")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.client.aclose()

    def subscribe(self, *task_ids: str | None) -> Subscription:
        """A queue of the events of ``task_ids`` (None: of every task), one queue however many."""
        sub = Subscription(tuple(dict.fromkeys(task_ids)))
        for task_id in sub.task_ids:
            self.subscribers.setdefault(task_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        for task_id in sub.task_ids:
            group = self.subscribers.get(task_id)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self.subscribers[task_id]

    async def _run(self, position: str | None) -> None:
        while True:
            try:
                if position is None:
                    last = await self.client.xrevrange(self.key, "+", "-", count=1)
                    position = text_of(last[0][0]) if last else "0"
                self.ready.set()
                answer: Any = await self.client.xread({self.key: position}, count=500, block=KEEPALIVE_SECONDS * 1000)
            except redis.RedisError as exc:  # the position is kept: nothing is skipped once it answers
                log.warning("api: cannot read the event stream (%s); trying again", exc)
                await asyncio.sleep(1.0)
                continue
            for _, entries in answer or []:
                for entry_id, fields in entries:
                    position = text_of(entry_id)
                    try:
                        self._dispatch(event_of(entry_id, fields))
                    except Exception:  # one unreadable entry must not end every stream
                        log.exception("api: event %s could not be read; skipped", position)

    def _dispatch(self, event: Event) -> None:
        if event.type in STATE_EVENTS:
            self.state_changes += 1
        for group in (self.subscribers.get(event.task_id, ()), self.subscribers.get(None, ())):
            for sub in group:
                if sub.overflowed:
                    continue
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    sub.overflowed = True


class EventStreams:
    """The two SSE responses, over the hub and a pooled client for replays."""

    def __init__(self, client: aioredis.Redis, hub: Hub, prefix: str) -> None:
        self.client = client
        self.hub = hub
        self.prefix = prefix
        self._frames: dict[tuple[str, str, bool], str] = {}

    async def _range(self, key: str, start: str, end: str, count: int | None = None) -> list[Any]:
        entries: Any = await self.client.xrange(key, start, end, count=count)
        return list(entries or [])

    async def _place(self, key: str, entry: str | None) -> bool:
        """Whether ``entry`` is a place to go on from in stream ``key``: an entry it holds, or a
        task.progress replaced since (the next entry is then a task.progress)."""
        if entry is None:
            return False
        if await self._range(key, entry, entry):
            return True
        following = await self._range(key, "(" + entry, "+", count=1)
        return bool(following) and event_of(*following[0]).type == "task.progress"

    async def _end(self, key: str) -> str:
        last = await self.client.xrevrange(key, "+", "-", count=1)
        return text_of(last[0][0]) if last else "0"

    async def task(self, task_id: str, last_event_id: str | None, snapshot: Snapshot, watcher: bool) -> Response:
        """A task's events after ``last_event_id`` (all of them, without one); 204 when the
        client has the task's final event already."""
        key = f"{self.prefix}events:{task_id}"
        position, reset = "0", None
        if last_event_id is not None:
            entry = entry_of(last_event_id, TASK_MARK, task_id)
            if await self._place(key, entry):
                assert entry is not None
                position = entry
                ahead = await self._range(key, "(" + entry, "+", count=1)
                if not ahead and (await snapshot())["state"] in FINAL:
                    return Response(status_code=204, headers=SSE_HEADERS)
            else:
                position = await self._end(key)
                reset = await snapshot()
        await self.hub.wait_ready()
        sub = self.hub.subscribe(task_id)  # before the replay: nothing after it is missed
        body = self._follow_task(key, task_id, position, reset, sub, watcher)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)

    async def _follow_task(
        self, key: str, task_id: str, position: str, reset: dict[str, Any] | None, sub: Subscription, watcher: bool
    ) -> AsyncIterator[str]:
        try:
            yield f"retry: {RETRY_MS}\n\n"
            if reset is not None:
                yield frame(task_sse_id(task_id, position), "reset", reset)
                if reset["state"] in FINAL:
                    return  # at the end already: a reconnect gets 204
            last, ended = position, False
            while True:  # the replay, to the stream's end
                start = "-" if last == "0" else "(" + last
                entries = await self._range(key, start, "+", count=PAGE)
                for entry_id, fields in entries:
                    event = event_of(entry_id, fields, task_id)
                    last, ended = event.id, event.final
                    yield self._frame(task_id, event.id, event, watcher)
                if len(entries) < PAGE:
                    break
            if ended:
                return  # the task's final event was the stream's last: a reconnect gets 204
            async for live in self._live(sub):  # then live, past what the replay sent
                if live is None:
                    yield ": keep-alive\n\n"
                    continue
                tid = live.task_stream_id
                if not tid:
                    return  # written by a script older than the tid: the client replays from Redis
                if stream_id_key(tid) <= stream_id_key(last):
                    continue
                last = tid
                yield self._frame(task_id, tid, live, watcher)
                if live.final:
                    return
        finally:
            self.hub.unsubscribe(sub)

    def _frame(self, task_id: str, entry_id: str, event: Event, watcher: bool) -> str:
        """A task event's frame, encoded once for all the task's subscribers of one view (a
        thousand subscribers cost one JSON encoding per event, not a thousand)."""
        cache_key = (entry_id, task_id, watcher)
        found = self._frames.get(cache_key)
        if found is None:
            data = watcher_view(event.payload()) if watcher else event.payload()
            found = frame(task_sse_id(task_id, entry_id), event.type, data)
            if len(self._frames) >= FRAME_CACHE:
                self._frames.clear()
            self._frames[cache_key] = found
        return found

    async def everything(self, last_event_id: str | None, counts: Callable[[], Awaitable[dict[str, int]]]) -> Response:
        """Every task's events from now on (or after ``last_event_id``); never closes."""
        key = f"{self.prefix}events"
        entry = entry_of(last_event_id, ALL_MARK)
        await self.hub.wait_ready()
        sub = self.hub.subscribe(None)
        reset = None
        if last_event_id is not None and (entry is None or not await self._range(key, entry, entry)):
            reset = {"counts": await counts()}
            entry = None
        position = entry or await self._end(key)
        return StreamingResponse(
            self._follow_all(key, position, reset, sub), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def _follow_all(
        self, key: str, position: str, reset: dict[str, Any] | None, sub: Subscription
    ) -> AsyncIterator[str]:
        try:
            yield f"retry: {RETRY_MS}\n\n"
            if reset is not None:
                yield frame(f"{ALL_MARK}{position}", "reset", reset)
            last = position
            while True:  # what came after the client's id, before it subscribed
                entries = await self._range(key, "(" + last, "+", count=PAGE)
                for entry_id, fields in entries:
                    event = event_of(entry_id, fields)
                    last = event.id
                    yield frame(f"{ALL_MARK}{event.id}", event.type, event.payload())
                if len(entries) < PAGE:
                    break
            async for live in self._live(sub):
                if live is None:
                    yield ": keep-alive\n\n"
                    continue
                if stream_id_key(live.id) <= stream_id_key(last):
                    continue
                last = live.id
                yield frame(f"{ALL_MARK}{live.id}", live.type, live.payload())
        finally:
            self.hub.unsubscribe(sub)

    async def _live(self, sub: Subscription) -> AsyncIterator[Event | None]:
        """The subscriber's live events, None after KEEPALIVE_SECONDS without one (the caller
        sends a keep-alive comment); ends once the subscriber fell behind and its queue is
        drained (the client reconnects with its last id and replays from Redis)."""
        while True:
            try:
                event = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                if sub.overflowed:
                    return
                yield None
                continue
            yield event
            if sub.overflowed and sub.queue.empty():
                return
