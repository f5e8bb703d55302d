"""Stage limits: slots bound to leases, per-host limits counted at a real origin, backpressure;
and the configuration check that limits, lease and timing settings agree everywhere."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from actors.manifest import spec_from_manifest, spec_from_urls
from actors.registry import WorkerInfo, WorkerLimits, WorkerRegistry
from actors.settings import Settings
from actors.states import State, StepReply
from actors.store import StageLimits, TaskStore
from supervisor import limits
from tests.conftest import in_process_worker, submit_spec, wait_for
from tests.servers import Origin, Receiver

NOW = 1_700_000_000.0
MIB = 1024 * 1024


def task_on(store: TaskStore, host: str) -> str:
    return store.create(spec_from_urls([f"https://{host}/v.mp4"]), now=NOW)[0]


def claim(store: TaskStore, task_id: str, now: float = NOW, **limits: int) -> Any:
    return store.claim(task_id, worker="w", now=now, lease_seconds=30, max_attempts=5, limits=StageLimits(**limits))


def test_per_host_slots_are_bound_to_the_lease(store: TaskStore) -> None:
    a, b, other = task_on(store, "cdn.one"), task_on(store, "cdn.one"), task_on(store, "cdn.two")
    assert claim(store, a, downloads_per_host=1).ok
    # Given one slot for cdn.one, a second task for it waits queued, untouched
    full = claim(store, b, downloads_per_host=1)
    assert full.outcome == "full" and "cdn.one" in full.detail
    assert store.get(b).state is State.QUEUED and store.get(b).attempts == 0  # type: ignore[union-attr]
    assert claim(store, other, downloads_per_host=1).ok
    # When a's worker dies, its slot frees itself once its lease has run out
    assert claim(store, b, now=NOW + 29, downloads_per_host=1).outcome == "full"
    assert claim(store, b, now=NOW + 31, downloads_per_host=1).ok


def test_slots_are_released_when_a_run_ends(store: TaskStore) -> None:
    a, b = task_on(store, "cdn.one"), task_on(store, "cdn.one")
    first = claim(store, a, downloads=1)
    store.release(a, first.token, State.QUEUED, now=NOW + 1, max_attempts=5)
    assert claim(store, b, now=NOW + 2, downloads=1).ok
    assert store.slots_in_use(NOW + 2) == {"download": 1}


def test_download_slots_move_to_finalize_and_finalize_is_limited(store: TaskStore) -> None:
    a, b = task_on(store, "cdn.one"), task_on(store, "cdn.one")
    tokens = {}
    for task_id in (a, b):
        c = claim(store, task_id, downloads=1, now=NOW if task_id == a else NOW + 1)
        assert c.ok, c
        tokens[task_id] = c.token
        store.advance(task_id, c.token, State.CLAIMED, State.DOWNLOADING, now=NOW + 1, lease_seconds=30)
        store.advance(task_id, c.token, State.DOWNLOADING, State.FINALIZING, now=NOW + 1, lease_seconds=30)
    entered, tokens[a] = store.enter_finalize(a, tokens[a], now=NOW + 2, lease_seconds=30, limit=1, due=NOW + 3)
    assert entered == "ok"  # with the run's own token
    waiting, new_token = store.enter_finalize(b, tokens[b], now=NOW + 2, lease_seconds=30, limit=1, due=NOW + 3)
    assert waiting == "full" and new_token != tokens[b]  # the next message carries a new token
    assert store.enter_finalize(b, tokens[b], now=NOW + 2, lease_seconds=30, limit=1, due=NOW + 3)[0] == "stale"
    assert store.release(a, tokens[a], State.DONE, now=NOW + 3, max_attempts=5) is State.DONE
    assert store.enter_finalize(b, new_token, now=NOW + 4, lease_seconds=30, limit=1, due=NOW + 5)[0] == "ok"


def test_a_finished_download_takes_the_finalize_slot_in_the_same_step(store: TaskStore) -> None:
    a, b = task_on(store, "cdn.one"), task_on(store, "cdn.one")
    tokens = {t: store.claim(t, worker="w", now=NOW, lease_seconds=30, max_attempts=5, start=State.DOWNLOADING).token
              for t in (a, b)}  # fmt: skip
    progress = (10, 10, 1)

    def done(task_id: str, token: int) -> tuple[StepReply, int]:
        return store.finish_download(task_id, token, now=NOW + 1, lease_seconds=30, progress=progress, finalize_limit=1)

    assert done(a, tokens[a]) == ("ok", tokens[a])
    # b is finalizing all the same, waiting for the slot a holds; a stale token moves nothing
    assert done(b, tokens[b] - 1)[0] == "stale"
    entry, token = done(b, tokens[b])
    assert entry == "full" and token != tokens[b]  # the finalize message holds the task now
    assert store.get(b).state is State.FINALIZING and store.get(b).bytes_done == 10  # type: ignore[union-attr]
    entry, token = store.enter_finalize(b, token, now=NOW + 2, lease_seconds=30, limit=1, due=NOW + 3)
    assert entry == "full"
    store.release(a, tokens[a], State.DONE, now=NOW + 3, max_attempts=5)
    assert store.enter_finalize(b, token, now=NOW + 4, lease_seconds=30, limit=1, due=NOW + 5)[0] == "ok"
    assert store.slots_in_use(NOW + 4) == {"finalize": 1}


def test_staging_budget_pauses_new_claims_but_not_resumes(store: TaskStore) -> None:
    a, b = task_on(store, "cdn.one"), task_on(store, "cdn.one")
    first = claim(store, a, staging_max_bytes=100)
    store.heartbeat(a, first.token, now=NOW + 1, lease_seconds=30, bytes_done=150, bytes_total=300, files_done=0)
    assert store.staged_bytes() == 150
    assert claim(store, b, now=NOW + 2, staging_max_bytes=100).outcome == "full"
    # a, handed back with bytes staged, may always continue: it frees space by finishing
    store.release(a, first.token, State.QUEUED, now=NOW + 2, max_attempts=5)
    again = store.claim(a, worker="w", now=NOW + 3, lease_seconds=30, max_attempts=5,
                        limits=StageLimits(staging_max_bytes=100), start=State.DOWNLOADING)  # fmt: skip
    assert again.ok
    store.finish_download(a, again.token, now=NOW + 4, lease_seconds=30, progress=(300, 300, 1), finalize_limit=0)
    store.release(a, again.token, State.DONE, now=NOW + 4, max_attempts=5)
    assert store.staged_bytes() == 0
    assert claim(store, b, now=NOW + 5, staging_max_bytes=100).ok


def test_finalize_backlog_pauses_claims(store: TaskStore) -> None:
    a, b = task_on(store, "cdn.one"), task_on(store, "cdn.one")
    c = claim(store, a)
    store.advance(a, c.token, State.CLAIMED, State.DOWNLOADING, now=NOW, lease_seconds=30)
    store.advance(a, c.token, State.DOWNLOADING, State.FINALIZING, now=NOW, lease_seconds=30)
    assert claim(store, b, finalize_backlog=1).outcome == "full"


@pytest.fixture
def limited(settings: Any) -> Any:
    return settings.replace(download_per_host=2, finalize_concurrency=1)


def test_per_host_limit_holds_at_the_origin_under_load(
    limited: Any, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    origin.rate = 4 * MIB
    data = os.urandom(MIB)
    ids = []
    for n in range(8):
        url = origin.put(f"/v{n}.mp4", data)
        ids.append(submit_spec(spec_from_manifest({"files": [{"url": url, "path": "v.mp4"}]}), store))
    with in_process_worker(limited, store, threads=8):
        for task_id in ids:
            assert wait_for(store, task_id, timeout=60).state is State.DONE
    # 8 threads were free, yet the origin never saw more than 2 bodies at once
    assert origin.max_active == 2
    assert all(store.get(i).attempts == 1 for i in ids)  # type: ignore[union-attr]


def test_a_duplicate_finalize_message_cannot_make_a_second_holder(store: TaskStore) -> None:
    task_id = task_on(store, "cdn.one")
    c = store.claim(task_id, worker="w", now=NOW, lease_seconds=30, max_attempts=5, start=State.DOWNLOADING)
    store.finish_download(task_id, c.token, now=NOW + 1, lease_seconds=30, progress=(1, 1, 1), finalize_limit=0)
    # Given a parked finalize whose message Dramatiq delivers twice ...
    first = store.enter_finalize(task_id, c.token, now=NOW + 2, lease_seconds=30, limit=0, due=NOW + 3)
    second = store.enter_finalize(task_id, c.token, now=NOW + 2, lease_seconds=30, limit=0, due=NOW + 3)
    # ... the first run gets a token of its own, and the duplicate is turned away
    assert first[0] == "ok" and first[1] > c.token
    assert second[0] == "stale"


# -- the configuration check (supervisor/limits.py) --------------------------------------------


def test_the_lease_must_leave_room_for_a_renewal_that_waits_on_a_slow_redis_call() -> None:
    # A run stops writing at 80% of its lease since its last renewal; a renewal (every second)
    # may wait 10 s (the Redis socket timeout): 0.8 x lease must exceed 1 + 10
    for lease in (3, 10, 13.75):
        [problem] = limits.check(Settings(lease_seconds=lease, sweep_seconds=1), [])
        assert f"HAUL_LEASE_SECONDS={lease:g}" in problem and "raise HAUL_LEASE_SECONDS above 13.75" in problem
    assert limits.check(Settings(lease_seconds=14, sweep_seconds=1), []) == []
    assert limits.check(Settings(), []) == []  # the defaults pass every check


def test_retention_must_outlast_the_notices_still_owed() -> None:
    day = 86400.0
    # One try of a notice: connect 10 s + read 60 s + 5 s; the last is due up to 0.1 s past the give-up
    assert limits.notice_seconds(Settings(finalize_give_up_seconds=day)) == day + 0.1 + 75
    for retain in (3600, day, day + 60):  # shorter than the give-up; than the give-up and a last try
        [problem] = limits.check(Settings(retain_seconds=retain, finalize_give_up_seconds=day), [])
        assert f"HAUL_RETAIN_SECONDS={retain:g}" in problem and "HAUL_FINALIZE_GIVE_UP_SECONDS=86400" in problem
        assert "raise HAUL_RETAIN_SECONDS above 86475.1" in problem
    assert limits.check(Settings(retain_seconds=day + 76, finalize_give_up_seconds=day), []) == []


def test_workers_whose_limits_disagree_are_named_and_old_records_still_read(store: TaskStore) -> None:
    ours = Settings(download_concurrency=4, download_per_host=2, lease_seconds=60)
    registry = WorkerRegistry(store.client)
    both = ("claim", "finalize")
    registry.register(WorkerInfo("w1", "h1", 1, both, 8, 0.0, limits=WorkerLimits.of(ours)), now=time.time())
    registry.register(WorkerInfo("w2", "h1", 2, both, 8, 0.0, limits=WorkerLimits.of(ours)), now=time.time())
    other = WorkerLimits.of(ours.replace(download_concurrency=3, lease_seconds=30))
    registry.register(WorkerInfo("w3", "h2", 3, both, 8, 0.0, limits=other), now=time.time())
    # A record written by an older haul, without limits
    old = {"host": "h3", "pid": 4, "queues": list(both), "threads": 8, "started": 0.0}
    store.client.hset("haul:workers", "w4", json.dumps(old))
    store.client.zadd("haul:workers:seen", {"w4": time.time()})
    workers = {w.id: w for w in registry.workers()}
    assert workers["w4"].limits is None and workers["w4"].threads == 8
    assert workers["w3"].limits == other
    problems = [p for p in limits.check(ours, list(workers.values())) if "not the same everywhere" in p]
    assert len(problems) == 2, problems
    concurrency, lease = problems
    assert "HAUL_DOWNLOAD_CONCURRENCY=3 on worker w3; HAUL_DOWNLOAD_CONCURRENCY=4 on workers w1, w2" in concurrency
    assert "this supervisor has HAUL_DOWNLOAD_CONCURRENCY=4" in concurrency
    assert "HAUL_LEASE_SECONDS=30 on worker w3; HAUL_LEASE_SECONDS=60 on workers w1, w2" in lease
    assert "w4" not in " ".join(problems)
    # A worker alone can disagree with the supervisor
    [alone] = limits.check(ours.replace(staging_max_bytes=10**9), [workers["w1"]])
    assert "HAUL_STAGING_MAX_BYTES=0 on worker w1; this supervisor has HAUL_STAGING_MAX_BYTES=1000000000" in alone


def test_a_worker_registers_the_limits_and_lease_it_runs_with(settings: Any, store: TaskStore) -> None:
    own = settings.replace(download_concurrency=6, download_per_host=2, finalize_concurrency=3,
                           staging_max_bytes=MIB, lease_seconds=20)  # fmt: skip
    with in_process_worker(own, store, threads=2):
        [worker] = WorkerRegistry(store.client).workers()
    assert worker.limits == WorkerLimits(6, 2, 3, MIB, 20.0)
