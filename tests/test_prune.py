"""Pruning ended records in batches (actors/lua/prune.lua, sweeps.prune) on a real Redis: the
rules each record passes, and a sweep that keeps up with thousands of tasks ended a minute."""

from __future__ import annotations

from pathlib import Path

from actors.manifest import spec_from_urls
from actors.states import State
from actors.store import TaskStore
from supervisor import sweeps

NOW = 1_700_000_000.0
CUTOFF = NOW + 100
RETAIN = 3600.0


def ended(store: TaskStore, target: State, *, at: float = NOW, key: str | None = None, staged: int = 0) -> str:
    """A task taken through create, claim and release into ``target`` at ``at``."""
    task_id = store.create(spec_from_urls(["https://cdn.example.com/v.mp4"], key=key), now=at)[0]
    claim = store.claim(task_id, worker="w", now=at, lease_seconds=30, max_attempts=3, start=State.DOWNLOADING)
    if staged:
        store.heartbeat(
            task_id, claim.token, now=at, lease_seconds=30, bytes_done=staged, bytes_total=staged, files_done=0
        )
    if target is State.DONE:  # done only after finalizing
        store.finish_download(
            task_id, claim.token, now=at, lease_seconds=30, progress=(staged, staged, 1), finalize_limit=0
        )
    assert store.release(task_id, claim.token, target, now=at, max_attempts=3) is target
    return task_id


def delivered(store: TaskStore, task_id: str) -> None:
    assert store.end_notice(task_id, run=0)


def commands(store: TaskStore, name: str) -> int:
    """How many ``name`` commands Redis ran since the last CONFIG RESETSTAT."""
    stats = store.client.info("commandstats").get(f"cmdstat_{name}")
    return int(stats["calls"]) if stats else 0


def test_a_batch_keeps_owed_notices_young_records_and_live_tasks(store: TaskStore) -> None:
    # Given ended tasks of every kind, and live ones with old timestamps
    owed = ended(store, State.FAILED)
    failed = ended(store, State.FAILED, staged=150)
    delivered(store, failed)
    done = ended(store, State.DONE)
    young = ended(store, State.DONE, at=CUTOFF + 1)
    queued = store.create(spec_from_urls(["https://cdn.example.com/q.mp4"]), now=NOW)[0]
    claimed = store.create(spec_from_urls(["https://cdn.example.com/c.mp4"]), now=NOW)[0]
    store.claim(claimed, worker="w", now=NOW, lease_seconds=30, max_attempts=3)
    # ... a live task listed among the done by mistake, and a done entry whose record is gone
    store.client.zadd(store.state_key(State.DONE), {claimed: NOW, "f" * 32: NOW})
    assert store.staged_bytes() == 150
    # When each final state is pruned in one batch
    pruned = {s: store.prune_batch(s, cutoff=CUTOFF, limit=500) for s in State if s.final}
    # Then only the old records whose notice is not owed went, with their spec and staged bytes
    assert pruned[State.DONE] == ([(done, State.DONE)], 1, False)  # the live task passed over
    assert pruned[State.FAILED] == ([(failed, State.FAILED)], 1, False)  # the owed notice passed over
    for task_id in (done, failed):
        assert not store.client.exists(store.task_key(task_id), store.spec_key(task_id))
    assert store.staged_bytes() == 0 and not store.client.hexists(f"{store.prefix}staged", failed)
    for task_id in (owed, young, queued, claimed):
        assert store.get(task_id) is not None
    assert store.get(claimed).state is State.CLAIMED  # type: ignore[union-attr]
    # ... and the entry with no record left the set, reported as nothing pruned
    assert store.client.zscore(store.state_key(State.DONE), "f" * 32) is None
    assert store.client.zrange(store.state_key(State.DONE), 0, -1) == [claimed.encode(), young.encode()]


def test_the_idempotency_key_goes_only_while_it_points_to_the_pruned_task(store: TaskStore) -> None:
    mine = ended(store, State.DONE, key="order-1")
    moved = ended(store, State.DONE, key="order-2")
    other = ended(store, State.DONE, at=CUTOFF + 1)
    store.client.set(f"{store.prefix}key:order-2", other)  # the key now names another task
    pruned, _, _ = store.prune_batch(State.DONE, cutoff=CUTOFF, limit=500)
    assert sorted(pruned) == sorted([(mine, State.DONE), (moved, State.DONE)])
    assert store.client.get(f"{store.prefix}key:order-1") is None
    assert store.client.get(f"{store.prefix}key:order-2") == other.encode()


def test_a_batch_passes_over_owed_notices_at_the_head(store: TaskStore) -> None:
    # Given 5 failed tasks whose notice is owed, ended before 12 whose notice was delivered
    owed = [ended(store, State.FAILED, at=NOW + n) for n in range(5)]
    later = [ended(store, State.FAILED, at=NOW + 10 + n) for n in range(12)]
    for task_id in later:
        delivered(store, task_id)
    # When batches of 10 run, then 10 go at once, then the last 2, past the same 5 kept
    first, skip, more = store.prune_batch(State.FAILED, cutoff=CUTOFF, limit=10)
    assert [t for t, _ in first] == later[:10] and skip == 5 and more
    second, skip, more = store.prune_batch(State.FAILED, cutoff=CUTOFF, limit=10, skip=skip)
    assert [t for t, _ in second] == later[10:] and skip == 5 and not more
    assert store.client.zrange(store.state_key(State.FAILED), 0, -1) == [t.encode() for t in owed]


def test_a_batch_looks_at_a_bounded_number_of_entries(store: TaskStore) -> None:
    # Given 50 owed notices at the head of the set, then one record to prune
    for n in range(50):
        ended(store, State.FAILED, at=NOW + n)
    last = ended(store, State.FAILED, at=NOW + 60)
    delivered(store, last)
    # A batch of 5 looks at 20 entries, and says where the next one starts
    assert store.prune_batch(State.FAILED, cutoff=CUTOFF, limit=5) == ([], 20, True)
    assert store.prune_batch(State.FAILED, cutoff=CUTOFF, limit=5, skip=20) == ([], 40, True)
    assert store.prune_batch(State.FAILED, cutoff=CUTOFF, limit=5, skip=40) == ([(last, State.FAILED)], 50, False)


def test_one_sweep_prunes_thousands_of_records_in_batches(store: TaskStore, tmp_path: Path) -> None:
    # Given 2,500 done tasks and 20 failed ones with their sandboxes (kept for inspection)
    done = [ended(store, State.DONE) for _ in range(2500)]
    failed = [ended(store, State.FAILED) for _ in range(20)]
    for task_id in failed:
        delivered(store, task_id)
        (tmp_path / task_id / "files").mkdir(parents=True)
    live = store.create(spec_from_urls(["https://cdn.example.com/live.mp4"]), now=NOW)[0]
    store.client.config_resetstat()
    # When one sweep runs past their retention
    outcome = sweeps.prune(store, tmp_path, NOW + RETAIN + 1, retain_seconds=RETAIN)
    # Then every record went, in a handful of script calls (500 records each), not one per task
    assert outcome == {"records_done": 2500, "records_failed": 20, "sandboxes": 20}
    assert commands(store, "evalsha") + commands(store, "eval") <= 10
    assert store.counts()[State.DONE] == 0 and store.counts()[State.FAILED] == 0
    assert not store.client.exists(*(store.task_key(t) for t in done[:100]))
    assert store.get(live) is not None and list(tmp_path.iterdir()) == []


def test_owed_notices_at_the_head_do_not_hold_back_a_sweep(store: TaskStore, tmp_path: Path) -> None:
    # Given 2,100 failed tasks whose notice is owed (their receiver is down), ended first
    for n in range(2100):
        ended(store, State.FAILED, at=NOW + n / 1000)
    # ... and 30 ended later whose notice was delivered
    behind = [ended(store, State.FAILED, at=NOW + 10) for _ in range(30)]
    for task_id in behind:
        delivered(store, task_id)
    # When one sweep runs: batches look at 2,000 entries at most, the next starts past them
    outcome = sweeps.prune(store, tmp_path, NOW + RETAIN + 20, retain_seconds=RETAIN)
    # Then the 30 went, and every owed one stayed
    assert outcome == {"records_failed": 30}
    assert store.counts()[State.FAILED] == 2100
    assert not store.client.exists(*(store.task_key(t) for t in behind))


def test_a_sweep_stops_starting_batches_once_its_budget_is_spent(store: TaskStore, tmp_path: Path) -> None:
    for _ in range(250):
        ended(store, State.DONE)

    def sweep(budget_seconds: float = sweeps.DEFAULT_PRUNE_BUDGET_SECONDS) -> dict[str, int]:
        return sweeps.prune(
            store, tmp_path, NOW + RETAIN + 1, retain_seconds=RETAIN, batch=100, budget_seconds=budget_seconds
        )

    # With no time to spend, one round of batches runs; the next sweep goes on
    assert sweep(budget_seconds=0) == {"records_done": 100}
    assert sweep(budget_seconds=0) == {"records_done": 100}
    assert sweep() == {"records_done": 50}
    assert store.counts()[State.DONE] == 0
