"""The operator dashboard's throughput per minute (actors/store_figures.py) on a real Redis: tasks
counted by the scripts that end them, bytes by the lease keepers' ticks, read in one round trip
from a few known keys, and gone a quarter of an hour later."""

from __future__ import annotations

import os
import time

import pytest

from actors.manifest import spec_from_manifest, spec_from_urls
from actors.states import CancelReply, RequeueReply, State
from actors.store import TaskStore
from actors.store_figures import MINUTE_TTL_SECONDS, MinuteFigures
from tests.conftest import InProcessWorker, end_task, submit_spec, wait_for
from tests.processes import wait_until
from tests.servers import Origin, Receiver

#: The first second of a minute (the scripts are told the time; the buckets follow it).
T = 1_699_999_980
MIB = 1024 * 1024


def new_task(store: TaskStore) -> str:
    return store.create(spec_from_urls(["https://cdn.example.com/v.mp4"]), now=T)[0]


def ttl(store: TaskStore, start: int) -> int:
    return int(store.client.ttl(store.minute_key(start // 60)))


@pytest.mark.fast
def test_tasks_are_counted_in_the_minute_they_end_in_and_only_those_that_end(store: TaskStore) -> None:
    # Given tasks that end done, failed and dead in one minute (by a worker's release and by the
    # supervisor's requeue of a lease that ran out with every attempt used) ...
    done, late, failed, dead, swept, next_minute = (new_task(store) for _ in range(6))
    assert end_task(store, done, State.DONE, now=T + 1) is State.DONE
    assert end_task(store, late, State.DONE, now=T + 59.9) is State.DONE
    assert end_task(store, failed, State.FAILED, now=T + 30) is State.FAILED
    assert end_task(store, dead, State.QUEUED, now=T + 30, max_attempts=1) is State.DEAD
    store.claim(swept, worker="gone", now=T + 10, lease_seconds=10, max_attempts=1)
    assert store.requeue_expired([swept], now=T + 40, max_attempts=1) == [RequeueReply.DEAD]
    # ... one more done the next minute, and tasks that do not end: queued again, canceled
    assert end_task(store, next_minute, State.DONE, now=T + 60) is State.DONE
    assert end_task(store, new_task(store), State.QUEUED, now=T + 30, max_attempts=3) is State.QUEUED
    assert store.cancel(new_task(store), now=T + 30) is CancelReply.OK
    # When the dashboard asks for the last 2 minutes and the current one
    figures = store.throughput(T + 61, minutes=2)
    # Then each minute holds what ended in it, oldest first, a quiet minute as zeros
    assert figures == [
        MinuteFigures(start=T - 60),
        MinuteFigures(start=T, done=2, failed=1, dead=2),
        MinuteFigures(start=T + 60, done=1),
    ]
    # ... and each bucket expires MINUTE_TTL_SECONDS after its last write (_lib.lua agrees)
    assert MINUTE_TTL_SECONDS - 5 < ttl(store, T) <= MINUTE_TTL_SECONDS
    assert MINUTE_TTL_SECONDS - 5 < ttl(store, T + 60) <= MINUTE_TTL_SECONDS


@pytest.mark.fast
def test_a_lease_keeper_tick_adds_its_bytes_to_its_minute_in_the_stage_totals_round_trip(store: TaskStore) -> None:
    # Given two workers' ticks in one minute and a third's in the next that moved no bytes
    store.renew_many([], now=T + 5, lease_seconds=30, tallies={"download": (5000, 1.0)})
    store.renew_many([], now=T + 50, lease_seconds=30, tallies={"download": (1000, 0.5), "finalize": (6000, 0.5)})
    store.renew_many([], now=T + 70, lease_seconds=30, tallies={"finalize": (0, 2.0)})
    # Then the bytes are in the minute of the tick that added them, beside the totals
    [minute, quiet] = store.throughput(T + 70, minutes=1)
    assert minute == MinuteFigures(start=T, download_bytes=6000, finalize_bytes=6000)
    assert quiet == MinuteFigures(start=T + 60)
    assert store.stage_totals()["download"][0] == 6000 and store.stage_totals()["finalize"] == (6000, 2.5)
    # ... the bucket expires, and a tick without bytes makes none
    assert MINUTE_TTL_SECONDS - 5 < ttl(store, T) <= MINUTE_TTL_SECONDS
    assert store.client.exists(store.minute_key((T + 60) // 60)) == 0


@pytest.mark.fast
def test_throughput_reads_only_its_minutes(store: TaskStore) -> None:
    # Given nothing stored: the current minute and the 5 before it, all zeros
    now = T + 12.5
    figures = store.throughput(now)
    assert [m.start for m in figures] == [T - 300, T - 240, T - 180, T - 120, T - 60, T]
    assert all(m == MinuteFigures(start=m.start) for m in figures)
    assert store.throughput(now, minutes=0) == [MinuteFigures(start=T)]


def test_a_worker_s_completed_task_and_its_bytes_show_in_the_current_minutes(
    worker: InProcessWorker, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    # Given a real worker that downloads, stores and announces a task
    data = os.urandom(2 * MIB)
    url = origin.put("/v.mp4", data)
    task_id = submit_spec(spec_from_manifest({"files": [{"url": url, "path": "v.mp4"}]}), store)
    assert wait_for(store, task_id).state is State.DONE

    def minutes() -> list[MinuteFigures]:
        return store.throughput(time.time())

    # Then the release to done counted it, and the lease keeper's ticks added the bytes it
    # received and stored (the last of them at its next tick)
    wait_until(lambda: sum(m.finalize_bytes for m in minutes()) == len(data), 5, "the stored bytes in the minutes")
    assert sum(m.done for m in minutes()) == 1 and sum(m.failed + m.dead for m in minutes()) == 0
    assert sum(m.download_bytes for m in minutes()) == origin.served["/v.mp4"] == len(data)
