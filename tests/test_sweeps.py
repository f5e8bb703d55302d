"""Supervisor sweeps as plain functions over a real Redis: requeue, rescue, prune, workers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from actors import registry as registry_module
from actors.manifest import spec_from_urls
from actors.registry import HEARTBEAT_SECONDS, Heartbeat, WorkerInfo, WorkerRegistry
from actors.states import State
from actors.store import TaskStore
from supervisor import sweeps
from tests.conftest import end_task

NOW = 1_700_000_000.0


def new_task(store: TaskStore, key: str | None = None) -> str:
    return store.create(spec_from_urls(["https://cdn.example.com/v.mp4"], key=key), now=NOW)[0]


def test_requeue_stuck_takes_back_expired_leases_only(store: TaskStore) -> None:
    live, stuck, last_try = new_task(store), new_task(store), new_task(store)
    store.claim(live, worker="w", now=NOW, lease_seconds=100, max_attempts=2)
    old = store.claim(stuck, worker="w", now=NOW, lease_seconds=10, max_attempts=2)
    for started in (NOW - 50, NOW - 30):  # the second run took over the first's expired lease
        store.claim(last_try, worker="w", now=started, lease_seconds=10, max_attempts=2)
    claims: list[str] = []
    dead: list[str] = []
    outcome = sweeps.requeue_stuck(store, NOW + 20, max_attempts=2, send_claim=claims.append, on_dead=dead.append)
    assert outcome == {"queued": 1, "dead": 1}
    assert claims == [stuck] and dead == [last_try]
    task = store.get(stuck)
    assert task is not None and task.state is State.QUEUED and task.token > old.token
    assert "lease expired during claimed on worker w" in task.error
    assert store.get(live).state is State.CLAIMED  # type: ignore[union-attr]
    # A second sweep finds nothing: the leases set only holds live leases now
    assert sweeps.requeue_stuck(store, NOW + 21, max_attempts=2, send_claim=claims.append, on_dead=dead.append) == {}


def test_requeue_stuck_costs_what_it_finds_not_what_is_stored(store: TaskStore) -> None:
    pipe_ids = [new_task(store) for _ in range(2000)]
    for task_id in pipe_ids:
        store.claim(task_id, worker="w", now=NOW, lease_seconds=1000, max_attempts=5)
    before = int(store.client.info("stats")["total_commands_processed"])
    assert sweeps.requeue_stuck(store, NOW + 10, max_attempts=5, send_claim=print, on_dead=print) == {}
    # A few commands (the leases set by deadline, the outbox), whatever is stored: 2,000 live
    # leases are not read one by one. (The INFO calls count one each.)
    spent = int(store.client.info("stats")["total_commands_processed"]) - before
    assert spent <= 6, spent


def test_rescue_orphans_resends_once_per_grace_period(store: TaskStore) -> None:
    waiting = new_task(store)
    sent: list[str] = []
    assert sweeps.rescue_orphans(store, NOW + 10, send_claim=sent.append, grace_seconds=60) == 0
    assert sweeps.rescue_orphans(store, NOW + 61, send_claim=sent.append, grace_seconds=60) == 1
    assert sweeps.rescue_orphans(store, NOW + 62, send_claim=sent.append, grace_seconds=60) == 0
    assert sweeps.rescue_orphans(store, NOW + 122, send_claim=sent.append, grace_seconds=60) == 1
    assert sent == [waiting, waiting]


def test_prune_deletes_old_records_and_failed_sandboxes_never_live_files(store: TaskStore, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    done, failed, live = new_task(store, key="order-1"), new_task(store), new_task(store)
    for task_id, target in ((done, State.DONE), (failed, State.FAILED)):
        end_task(store, task_id, target, now=NOW + 1)
    store.claim(live, worker="w", now=NOW, lease_seconds=10, max_attempts=3)
    for task_id in (failed, live):
        (staging / task_id / "files").mkdir(parents=True)
    orphan = staging / ("f" * 32)
    orphan.mkdir()
    os.utime(orphan, (NOW - 10 * 3600, NOW - 10 * 3600))
    fresh_orphan = staging / ("e" * 32)
    fresh_orphan.mkdir()
    os.utime(fresh_orphan, (NOW + 7000, NOW + 7000))
    # Before the retention period nothing goes
    assert sweeps.prune(store, staging, NOW + 100, retain_seconds=3600) == {"orphan_sandboxes": 1}
    # A failed task whose task.failed is still owed is kept past it: the notice needs its record
    assert sweeps.prune(store, staging, NOW + 7200, retain_seconds=3600) == {"records_done": 1}
    assert store.get(failed) is not None
    assert store.end_notice(failed, run=0)  # delivered
    outcome = sweeps.prune(store, staging, NOW + 7200, retain_seconds=3600)
    assert outcome == {"records_failed": 1, "sandboxes": 1}
    assert store.get(done) is None and store.get(failed) is None and store.get(live) is not None
    assert not (staging / failed).exists() and (staging / live / "files").is_dir() and fresh_orphan.exists()
    # The idempotency key is free again once its task is pruned
    assert new_task(store, key="order-1") != done


def test_prune_looks_at_every_orphan_sandbox_however_many(store: TaskStore, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    live = new_task(store)
    names = [f"{n:032x}" for n in range(7)] + [live]
    for name in names:
        (staging / name).mkdir(parents=True)
        os.utime(staging / name, (NOW - 10 * 3600, NOW - 10 * 3600))
    # Seven orphans, checked three at a time: all go in one run; the live task's folder stays
    assert sweeps.prune(store, staging, NOW, retain_seconds=3600, limit=3) == {"orphan_sandboxes": 7}
    assert [p.name for p in staging.iterdir()] == [live]


def test_vanished_workers_are_reported_once(store: TaskStore) -> None:
    registry = WorkerRegistry(store.client)
    for name, seen in (("alive", NOW), ("gone", NOW - 10 * HEARTBEAT_SECONDS)):
        registry.register(WorkerInfo(name, "host", 1, ("claim",), 8, NOW), now=seen)
    reported: list[str] = []
    assert sweeps.vanished_workers(registry, NOW, on_vanished=lambda w: reported.append(w.id)) == 1
    assert sweeps.vanished_workers(registry, NOW, on_vanished=lambda w: reported.append(w.id)) == 0
    assert reported == ["gone"] and [w.id for w in registry.workers()] == ["alive"]


def test_a_worker_removed_as_vanished_registers_again_on_its_next_beat(store: TaskStore) -> None:
    registry = WorkerRegistry(store.client)
    info = WorkerInfo("w1", "host", 7, ("claim", "finalize"), 8, NOW)
    registry.register(info, now=NOW)
    # Given a Redis outage longer than three heartbeats: the supervisor removes the worker ...
    assert [w.id for w in registry.vanished(NOW + 60)] == ["w1"] and registry.workers() == []
    # ... and its next beat brings it back whole, so its queues and threads count again
    registry.beat(info, now=NOW + 61)
    assert registry.workers() == [WorkerInfo("w1", "host", 7, ("claim", "finalize"), 8, NOW, seen=NOW + 61)]
    # So does a Redis restart that lost the registry
    store.client.flushall()
    registry.beat(info, now=NOW + 66)
    assert [(w.id, w.threads, w.seen) for w in registry.workers()] == [("w1", 8, NOW + 66)]


def test_a_heartbeat_thread_re_registers_its_worker_and_stays_away_once_stopped(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "HEARTBEAT_SECONDS", 0.05)
    registry = WorkerRegistry(store.client)
    heartbeat = Heartbeat(registry, "w1", time.time)
    heartbeat.start(WorkerInfo("w1", "host", 7, ("claim", "finalize"), 8, NOW))
    try:
        assert [w.id for w in registry.vanished(time.time() + 60)] == ["w1"]  # removed as if Redis was away
        deadline = time.monotonic() + 5
        while not registry.workers() and time.monotonic() < deadline:
            time.sleep(0.02)
        [back] = registry.workers()
        assert back.queues == ("claim", "finalize") and back.threads == 8
    finally:
        heartbeat.stop()
    # A beat in flight when the worker stops does not register it again after its unregister
    time.sleep(0.3)
    assert registry.workers() == [] and not heartbeat.thread.is_alive()


def test_an_unreadable_record_is_reported_and_skipped(store: TaskStore) -> None:
    broken, fine = new_task(store), new_task(store)
    for task_id in (broken, fine):
        store.claim(task_id, worker="w", now=NOW, lease_seconds=10, max_attempts=3)
    store.client.hset(store.task_key(broken), "lease_until", "garbage")
    errors: list[str] = []
    claims: list[str] = []
    outcome = sweeps.requeue_stuck(
        store, NOW + 20, max_attempts=3, send_claim=claims.append, on_dead=print,
        on_error=lambda task_id, exc: errors.append(task_id),
    )  # fmt: skip
    assert outcome == {"error": 1, "queued": 1} and errors == [broken] and claims == [fine]


def failed_task(store: TaskStore) -> str:
    task_id = new_task(store)
    claim = store.claim(task_id, worker="w", now=NOW, lease_seconds=10, max_attempts=3)
    store.release(task_id, claim.token, State.FAILED, now=NOW + 1, error="404", max_attempts=3)
    return task_id


def test_the_sweep_resends_a_lost_message_with_its_step_and_drops_notices_of_gone_tasks(store: TaskStore) -> None:
    never_tried, tried, alive = failed_task(store), failed_task(store), failed_task(store)
    begun = store.begin_notice(tried, None, busy_until=NOW + 5)
    # A chain whose next try is due in time is alive: its notice is never re-sent
    waiting = store.begin_notice(alive, None, busy_until=NOW + 5)
    assert store.notice_later(alive, waiting.seq, due=NOW + 90)
    store.client.zadd(store.notify_key, {"f" * 32: NOW})  # a task pruned by hand
    sent: list[tuple[str, int | None]] = []

    def send(task_id: str, seq: int | None) -> None:
        sent.append((task_id, seq))

    assert sweeps.resend_notifications(store, NOW + 100, send_notify=send, grace_seconds=30) == 2
    assert sorted(sent, key=str) == sorted([(never_tried, None), (tried, begun.seq)], key=str)
    assert store.client.zscore(store.notify_key, "f" * 32) is None
    assert sweeps.resend_notifications(store, NOW + 101, send_notify=send, grace_seconds=30) == 0


def test_prune_removes_only_abandoned_storage_temporaries(tmp_path: Path) -> None:
    from actors.storage import LocalStorage

    folder = LocalStorage(tmp_path / "storage").temporary_dir
    folder.mkdir(parents=True)
    abandoned, copying = folder / "a-1", folder / "b-2"
    abandoned.write_bytes(b"left by a killed finalize")
    copying.write_bytes(b"being written")
    now = time.time()
    os.utime(abandoned, (now - 7200, now - 7200))
    assert sweeps.prune_temporaries(folder, now, grace_seconds=3600) == 1
    assert not abandoned.exists() and copying.exists()
    assert sweeps.prune_temporaries(tmp_path / "nowhere", now) == 0
