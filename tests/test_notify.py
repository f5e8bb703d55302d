"""Owed notices (task.failed, task.canceled): one chain of tries per notice, on a real Redis,
with a real in-process Dramatiq worker, the supervisor's sweeps and a real receiver."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from actors.manifest import spec_from_manifest, spec_from_urls
from actors.states import State
from actors.store import TaskStore
from supervisor.daemon import Supervisor
from tests.conftest import (
    InProcessWorker,
    dramatiq_supervisor,
    in_process_worker,
    messages,
    settle,
    submit_spec,
    wait_for,
)
from tests.servers import Origin, Receiver

NOW = 1_700_000_000.0
#: The receiver's outage in the chain test, and the pause bounds the chain must keep (seconds).
OUTAGE_SECONDS = 6.0
PAUSE_MIN, PAUSE_MAX = 0.5, 1.0


def failed_task(store: TaskStore, now: float = NOW) -> str:
    task_id, _ = store.create(spec_from_urls(["https://cdn.example.com/v.mp4"]), now=now)
    c = store.claim(task_id, worker="w", now=now, lease_seconds=30, max_attempts=3)
    assert store.release(task_id, c.token, State.FAILED, now=now + 1, error="404", max_attempts=3) is State.FAILED
    return task_id


def test_only_the_message_the_chain_waits_for_makes_a_try(store: TaskStore) -> None:
    task_id = failed_task(store)
    first = store.begin_notice(task_id, None, busy_until=NOW + 20)
    assert first.go and (first.seq, first.tries, first.run) == (1, 1, 0)
    # A duplicate of the first message, or one of another step, does nothing
    assert store.begin_notice(task_id, None, busy_until=NOW + 20).skipped == "first try already made"
    assert not store.begin_notice(task_id, 0, busy_until=NOW + 20).go
    # While the try is in flight the supervisor leaves the notice alone
    assert store.lost_notices(now=NOW + 25, grace_seconds=10) == []
    assert store.notice_later(task_id, first.seq, due=NOW + 30)
    assert store.lost_notices(now=NOW + 39, grace_seconds=10) == []
    # Once overdue by the grace period its message is taken for lost: sent again once, same step
    assert store.lost_notices(now=NOW + 41, grace_seconds=10) == [(task_id, 1)]
    assert store.lost_notices(now=NOW + 42, grace_seconds=10) == []
    second = store.begin_notice(task_id, 1, busy_until=NOW + 60)
    assert second.go and (second.seq, second.tries) == (2, 2)
    assert not store.begin_notice(task_id, 1, busy_until=NOW + 60).go  # the late original
    # A stale try neither reschedules nor gives up the notice; a delivery by any try ends it
    assert not store.notice_later(task_id, first.seq, due=NOW + 70)
    assert not store.end_notice(task_id, 0, first.seq)
    assert store.end_notice(task_id, 0)
    assert store.begin_notice(task_id, 2, busy_until=NOW + 80).skipped == "nothing owed"
    assert store.client.hget(store.task_key(task_id), "notify_tries") == b"2"


def test_a_retried_task_drops_its_old_notice_and_owes_a_new_one_later(store: TaskStore) -> None:
    task_id = failed_task(store)
    old = store.begin_notice(task_id, None, busy_until=NOW + 20)
    assert store.retry(task_id, NOW + 2) == "ok"
    # The old chain ends: nothing is owed while the task runs again
    assert not store.notice_later(task_id, old.seq, due=NOW + 30)
    assert not store.begin_notice(task_id, old.seq, busy_until=NOW + 20).go
    c = store.claim(task_id, worker="w", now=NOW + 3, lease_seconds=30, max_attempts=3)
    store.release(task_id, c.token, State.FAILED, now=NOW + 4, error="404 again", max_attempts=3)
    # The new run's notice starts its own chain; the old run's delivery cannot end it
    assert not store.end_notice(task_id, 0)
    new = store.begin_notice(task_id, None, busy_until=NOW + 20)
    assert new.go and new.tries == 1 and new.run == 1 and new.seq == old.seq + 1


@pytest.fixture
def chain_settings(settings: Any) -> Any:
    """Pauses of 0.5-1 s between tries, and a supervisor that takes a message for lost after
    0.3 s (three sweeps): before the fix, each sweep started another chain."""
    return settings.replace(
        retry_min_seconds=PAUSE_MIN, retry_max_seconds=PAUSE_MAX, orphan_seconds=0.3, sweep_seconds=0.1,
        lease_seconds=5,
    )  # fmt: skip


@dataclass(frozen=True)
class Stack:
    sup: Supervisor
    worker: InProcessWorker


@pytest.fixture
def stack(chain_settings: Any, store: TaskStore) -> Iterator[Stack]:
    """An in-process worker and a leading supervisor, sweeping every 0.1 s."""
    sup = dramatiq_supervisor(chain_settings, store, node_id="n")
    with in_process_worker(chain_settings, store, threads=4) as running:
        sup.start()
        try:
            yield Stack(sup, running)
        finally:
            sup.stop()


def after_sweeps(stack: Stack, count: int, timeout: float = 10.0) -> None:
    """Wait for ``count`` more runs of the notices' sweep, then until every message sent so far
    (by them, or by a chain) is handled: a check that nothing more went out is then
    deterministic, where a fixed sleep only hopes."""
    registry = stack.sup.metrics.registry

    def runs() -> float:
        return registry.get_sample_value("haul_sweep_duration_seconds_count", {"job": "resend_notices"}) or 0.0

    target, deadline = runs() + count, time.monotonic() + timeout
    while runs() < target:
        assert time.monotonic() < deadline, f"fewer than {count} sweeps in {timeout}s"
        time.sleep(0.02)
    settle(stack.worker)


def failing_task(store: TaskStore, origin: Origin) -> str:
    """A task whose only file is missing: it fails at once and owes task.failed."""
    spec = spec_from_manifest({"files": [{"url": origin.url("/missing.mp4"), "path": "v.mp4"}]})
    return submit_spec(spec, store)


def test_a_receiver_down_gets_one_chain_of_tries_then_exactly_one_event(
    stack: Stack, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    receiver.down_until = time.time() + OUTAGE_SECONDS
    task_id = failing_task(store, origin)
    assert wait_for(store, task_id).state is State.FAILED
    deadline = time.monotonic() + OUTAGE_SECONDS + 10
    while not receiver.accepted() and time.monotonic() < deadline:
        time.sleep(0.02)
    after_sweeps(stack, 15)  # nothing else may go out
    posts = list(receiver.deliveries)
    down = [d for d in posts if d.answered == 503]
    # One chain: tries one after the other, a backoff pause apart (not one chain per sweep)
    gaps = [b.at - a.at for a, b in zip(posts, posts[1:], strict=False)]
    assert down and min(gaps) >= PAUSE_MIN * 0.9, gaps
    assert len(down) <= OUTAGE_SECONDS / PAUSE_MIN + 1, len(down)
    [accepted] = receiver.accepted()
    assert accepted is posts[-1] and {d.id for d in posts} == {f"{task_id}.task.failed.0"}
    assert accepted.event["type"] == "task.failed"
    assert store.client.zcard(store.notify_key) == 0
    tries = store.client.hget(store.task_key(task_id), "notify_tries")
    assert tries is not None and int(tries) == len(posts)  # counted on the task


def test_a_delivered_notice_is_not_sent_again(
    stack: Stack, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    task_id = failing_task(store, origin)
    assert wait_for(store, task_id).state is State.FAILED
    deadline = time.monotonic() + 10
    while not receiver.accepted() and time.monotonic() < deadline:
        time.sleep(0.02)
    # A duplicate of the first message (Dramatiq delivers at least once), with the supervisor
    # sweeping meanwhile, sends nothing more ...
    messages().notify(task_id)
    after_sweeps(stack, 15)
    assert [d.answered for d in receiver.deliveries] == [204]
    assert store.client.zcard(store.notify_key) == 0
    # ... nor does a message of a later step of the chain
    messages().notify(task_id, 1)
    settle(stack.worker)
    assert [d.answered for d in receiver.deliveries] == [204]


def test_a_notice_is_given_up_after_the_give_up_time(
    chain_settings: Any, store: TaskStore, origin: Origin, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.down_until = time.time() + 3600
    quick = chain_settings.replace(finalize_give_up_seconds=2.0, retry_min_seconds=0.3, retry_max_seconds=0.6)
    sup = dramatiq_supervisor(quick, store, node_id="n")
    caplog.set_level(logging.ERROR, logger="actors.notify")
    with in_process_worker(quick, store, threads=2) as running:
        sup.start()
        try:
            task_id = failing_task(store, origin)
            deadline = time.monotonic() + 15
            while "given up" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            tries = len(receiver.deliveries)
            after_sweeps(Stack(sup, running), 10)
        finally:
            sup.stop()
    [record] = [r for r in caplog.records if "given up" in r.getMessage()]
    assert task_id in record.getMessage() and receiver.url in record.getMessage()
    assert "HAUL_FINALIZE_GIVE_UP_SECONDS" in record.getMessage()
    assert store.client.zscore(store.notify_key, task_id) is None
    # The last try falls on the give-up time, and none comes after it
    assert 2 <= tries == len(receiver.deliveries)
    task = store.get(task_id)
    assert task is not None and receiver.deliveries[-1].at - task.updated_at < 2.0 + PAUSE_MAX
