"""TaskStore on a real redis-server: idempotent create, claim gate, fencing, counts."""

from __future__ import annotations

from typing import Any

from actors.store import TaskStore
from actors.task import State, spec_from_urls

SPEC = spec_from_urls(["https://cdn.example.com/a.mp4"], name="A", key="order-7")
NOW = 1_700_000_000.0


def claim(store: TaskStore, task_id: str, now: float = NOW, **kw: Any) -> Any:
    options = {"worker": "w1", "lease_seconds": 30, "max_attempts": 3} | kw
    return store.claim(task_id, now=now, **options)


def test_create_is_idempotent_on_key(store: TaskStore) -> None:
    first, created = store.create(SPEC, now=NOW)
    again, created_again = store.create(SPEC, now=NOW + 5)
    assert created and not created_again and first == again
    unkeyed = spec_from_urls(["https://cdn.example.com/a.mp4"])
    assert store.create(unkeyed, now=NOW)[0] != store.create(unkeyed, now=NOW)[0]
    assert store.counts()[State.QUEUED] == 3


def test_claim_gives_a_lease_and_skips_live_or_final_tasks(store: TaskStore) -> None:
    task_id, _ = store.create(SPEC, now=NOW)
    first = claim(store, task_id)
    assert first.ok and first.token == 1 and first.attempts == 1
    # Given a live lease, a duplicate claim message does nothing
    assert claim(store, task_id, now=NOW + 10).outcome == "busy"
    # When the run ends done, later duplicates are skipped too
    assert store.release(task_id, 1, State.DONE, now=NOW + 11, max_attempts=3) is State.DONE
    assert claim(store, task_id, now=NOW + 12).outcome == "final"
    assert claim(store, "0" * 32).outcome == "missing"


def test_a_claim_can_enter_the_download_and_returns_the_task(store: TaskStore) -> None:
    task_id, _ = store.create(SPEC, now=NOW)
    c = claim(store, task_id, start=State.DOWNLOADING)
    assert c.ok and c.task is not None
    assert c.task.state is State.DOWNLOADING and c.task.token == c.token and c.task.attempts == 1
    assert c.task.spec == store.get(task_id).spec  # type: ignore[union-attr]
    assert c.task.worker == "w1" and c.task.lease_until == NOW + 30
    assert store.counts()[State.DOWNLOADING] == 1 and store.counts()[State.CLAIMED] == 0
    # A record whose spec was lost is claimed without a task to run (its lease then runs out)
    lost, _ = store.create(SPEC.__class__(files=SPEC.files), now=NOW)
    store.client.delete(store.spec_key(lost))
    assert claim(store, lost, start=State.DOWNLOADING).task is None


def test_expired_lease_is_taken_over_and_the_old_token_is_fenced(store: TaskStore) -> None:
    task_id, _ = store.create(SPEC, now=NOW)
    old = claim(store, task_id)
    assert store.advance(task_id, old.token, State.CLAIMED, State.DOWNLOADING, now=NOW + 1, lease_seconds=30)
    # When the lease runs out, another worker takes the task with a new token
    new = claim(store, task_id, now=NOW + 40, worker="w2")
    assert new.ok and new.token == old.token + 1 and new.attempts == 2
    # Then every write of the old holder is refused
    progress = {"lease_seconds": 30, "bytes_done": 5, "bytes_total": 9, "files_done": 0}
    assert not store.heartbeat(task_id, old.token, now=NOW + 41, **progress)
    assert not store.advance(task_id, old.token, State.CLAIMED, State.DOWNLOADING, now=NOW + 41, lease_seconds=30)
    assert store.release(task_id, old.token, State.DONE, now=NOW + 41, max_attempts=3) is None
    task = store.get(task_id)
    assert task is not None and task.state is State.CLAIMED and task.worker == "w2" and task.bytes_done == 0
    assert store.heartbeat(task_id, new.token, now=NOW + 41, **progress)


def test_transient_release_queues_with_backoff_then_dies(store: TaskStore) -> None:
    task_id, _ = store.create(SPEC, now=NOW)
    for attempt in (1, 2):
        c = claim(store, task_id, now=NOW + attempt * 100)
        reached = store.release(
            task_id, c.token, State.QUEUED, now=NOW + attempt * 100, error="503", not_before=NOW + attempt * 100 + 5,
            max_attempts=3,
        )  # fmt: skip
        assert reached is State.QUEUED
        # An early duplicate message waits for the backoff
        assert claim(store, task_id, now=NOW + attempt * 100 + 1).outcome == "wait"
    last = claim(store, task_id, now=NOW + 400)
    assert last.attempts == 3
    assert store.release(task_id, last.token, State.QUEUED, now=NOW + 401, error="503", max_attempts=3) is State.DEAD
    assert store.ids(State.DEAD) == [task_id]
    assert store.client.zscore(store.notify_key, task_id) is not None


def test_expired_lease_with_no_attempts_left_is_dead(store: TaskStore) -> None:
    task_id, _ = store.create(SPEC, now=NOW)
    claim(store, task_id, max_attempts=1)
    result = claim(store, task_id, now=NOW + 100, max_attempts=1)
    task = store.get(task_id)
    assert result.outcome == "dead" and task is not None and task.state is State.DEAD
    assert "lease expired" in task.error


def test_cancel_fences_the_worker_and_retry_revives(store: TaskStore) -> None:
    task_id, _ = store.create(SPEC, now=NOW)
    c = claim(store, task_id)
    assert store.cancel(task_id, NOW + 1) == "ok"
    assert store.release(task_id, c.token, State.DONE, now=NOW + 2, max_attempts=3) is None
    assert store.cancel(task_id, NOW + 2) == "final"
    assert store.retry(task_id, NOW + 3) == "ok"
    task = store.get(task_id)
    assert task is not None and task.state is State.QUEUED and task.attempts == 0 and task.run == 1
    assert store.retry(task_id, NOW + 4) == "not_ended"
    assert store.counts()[State.QUEUED] == 1 and store.counts()[State.CANCELED] == 0
