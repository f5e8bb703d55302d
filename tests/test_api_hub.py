"""The API's events hub without a server (issue 15): a subscriber that falls more than
QUEUE_EVENTS behind stops getting events and its stream ends once it drained what it had, so
its EventSource reconnects and replays from Redis; the others are not held up by it."""

from __future__ import annotations

import asyncio

import pytest

from actors.events import Event
from supervisor.api.sse import QUEUE_EVENTS, EventStreams, Hub

pytestmark = pytest.mark.fast


def progress(task_id: str, n: int) -> Event:
    return Event(id=f"{1_000 + n}-0", type="task.progress", task_id=task_id, at=n, data={"state": "downloading"},
                 task_stream_id=f"{1_000 + n}-0")  # fmt: skip


def test_a_subscriber_that_falls_behind_is_ended_and_the_others_go_on() -> None:
    async def scenario() -> tuple[int, bool, bool]:
        hub = Hub("redis://127.0.0.1:1/0", "haul:events")  # never connects: events are handed in
        slow, other = hub.subscribe("a"), hub.subscribe(None)
        for n in range(QUEUE_EVENTS + 5):
            hub._dispatch(progress("a", n))
            if n % 100 == 0:  # the other subscriber keeps up
                while not other.queue.empty():
                    other.queue.get_nowait()
        streams = EventStreams(hub.client, hub, "haul:")
        drained = [event async for event in streams._live(slow)]
        await hub.client.aclose()
        return len(drained), slow.overflowed, other.overflowed

    drained, overflowed, other_cut = asyncio.run(scenario())
    assert overflowed and drained == QUEUE_EVENTS  # what it had queued, then its stream ends
    assert not other_cut  # the one that kept up was never cut off
