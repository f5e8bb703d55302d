"""Server-Sent Events: a task's stream (replayed from its start, closed after its final event)
and the stream of every task (from now on), read from Redis with redis.asyncio so a thousand
subscribers cost a thousand waiting coroutines, not a thousand threads.

Event ids name their stream (``T<entry>`` for a task's, ``A<entry>`` for all tasks'), so an id
given to the wrong stream is recognized, and answered as one whose events are lost: ``event:
reset`` with the task's state (re-read it), never a silent gap. So is an id older than what
the stream retains. A comment goes out after every KEEPALIVE_SECONDS without an event, so
proxies and load balancers keep the connection open.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis
from starlette.responses import Response, StreamingResponse

from actors.events import Event, event_of, trimmed_past
from actors.store_base import text_of

#: Longest silence on a stream before a keep-alive comment (the issue's bound is 15 s).
KEEPALIVE_SECONDS = 10
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
TASK_MARK, ALL_MARK = "T", "A"


def sse_id(mark: str, entry_id: str) -> str:
    return f"{mark}{entry_id}"


def entry_of(mark: str, event_id: str | None) -> str | None:
    """The stream entry a Last-Event-ID names, if it is one of this stream's ids."""
    if not event_id or not event_id.startswith(mark):
        return None
    entry = event_id[len(mark) :]
    ms, dash, seq = entry.partition("-")
    return entry if dash and ms.isdigit() and seq.isdigit() else None


def frame(event_id: str, name: str, data: Any) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class EventStreams:
    """The SSE responses, over one redis.asyncio client (a connection per waiting subscriber,
    from its pool)."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    async def _lost(self, key: str, after: str) -> bool:
        try:
            info = await self.client.xinfo_stream(key)
        except redis.ResponseError:
            return False
        return trimmed_past(info, after)

    async def _last_entry(self, key: str) -> str:
        last = await self.client.xrevrange(key, "+", "-", count=1)
        return text_of(last[0][0]) if last else "0"

    async def task(
        self, task_id: str, last_event_id: str | None, final: bool, snapshot: Callable[[], Awaitable[dict[str, Any]]]
    ) -> Response:
        """A task's events after ``last_event_id`` (all retained, without one); 204 when the
        client already has the task's final event (``final``: the task has ended)."""
        key = f"{self.prefix}events:{task_id}"
        position, reset = "0", False
        if last_event_id is not None:
            entry = entry_of(TASK_MARK, last_event_id)
            if entry is None or await self._lost(key, entry):
                reset, position = True, await self._last_entry(key)
            else:
                position = entry
                ahead = await self.client.xrange(key, "(" + entry, "+", count=1)
                if not ahead and final:
                    return Response(status_code=204, headers=SSE_HEADERS)
        first = (await snapshot()) if reset else None
        return StreamingResponse(
            self._follow(key, TASK_MARK, position, first, closes=True), media_type="text/event-stream",
            headers=SSE_HEADERS,
        )  # fmt: skip

    async def everything(self, last_event_id: str | None, counts: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
        """Every task's events from now on (or after ``last_event_id``); never closes."""
        key = f"{self.prefix}events"
        position = await self._last_entry(key)
        first = None
        if last_event_id is not None:
            entry = entry_of(ALL_MARK, last_event_id)
            if entry is None or await self._lost(key, entry):
                first = {"counts": await counts()}
            else:
                position = entry
        return StreamingResponse(
            self._follow(key, ALL_MARK, position, first, closes=False), media_type="text/event-stream",
            headers=SSE_HEADERS,
        )  # fmt: skip

    async def _follow(
        self, key: str, mark: str, position: str, reset: dict[str, Any] | None, *, closes: bool
    ) -> AsyncIterator[str]:
        if reset is not None:  # the id of the reset is where the stream goes on from
            yield frame(sse_id(mark, position), "reset", reset)
        while True:
            answer: Any = await self.client.xread({key: position}, count=200, block=KEEPALIVE_SECONDS * 1000)
            if not answer:
                yield ": keep-alive\n\n"
                continue
            for _, entries in answer:
                for entry_id, fields in entries:
                    event: Event = event_of(entry_id, fields)
                    position = event.id
                    yield frame(sse_id(mark, event.id), event.type, event.payload())
                    if closes and event.final:
                        return
