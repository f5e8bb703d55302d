"""The search indexes brought up to date after an upgrade (actors/store_backfill.py and
supervisor/backfill.py) on a real redis-server: tasks stored without their entries are found
after it, entries of records deleted without theirs are dropped, an interrupted walk resumes
from its saved position, the leader's job runs it once, and ``haul reindex`` runs it now."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis

from actors.manifest import spec_from_urls
from actors.store import TaskStore
from actors.store_backfill import LARGE_SPEC_BYTES, Backfill, Phase
from actors.store_base import text_of
from actors.store_index import MAX_INDEXED_HOSTS
from supervisor import backfill
from supervisor.daemon import Supervisor
from tests.conftest import ClaimsOnly
from tests.processes import haul_cli as haul

NOW = 1_700_000_000.0


def new(store: TaskStore, name: str = "", urls: tuple[str, ...] = ("https://cdn.example.com/v.mp4",), *,
        at: float = NOW) -> str:  # fmt: skip
    return store.create(spec_from_urls(list(urls), name=name), now=at)[0]


def unindexed(store: TaskStore, *task_ids: str) -> None:
    """Take tasks out of both indexes by hand, as if they were stored before the indexes."""
    for task_id in task_ids:
        member = store.client.hget(store.name_members_key, task_id)
        if member is not None:
            store.client.zrem(store.name_index_key, member)
            store.client.hdel(store.name_members_key, task_id)
        for host in text_of(store.client.hget(store.task_key(task_id), "hosts") or "").split():
            store.client.zrem(store.host_index_key(host), task_id)


def lost(store: TaskStore, *task_ids: str) -> None:
    """Delete records outside haul (a prune older than the indexes): their entries stay."""
    for task_id in task_ids:
        store.client.delete(store.task_key(task_id), store.spec_key(task_id))


def indexes(store: TaskStore) -> dict[str, Any]:
    """Every index key and what it holds."""
    found: dict[str, Any] = {}
    for key in sorted(text_of(k) for k in store.client.keys(f"{store.prefix}index:*")):
        if key == store.backfill_key:
            continue
        kind = text_of(store.client.type(key))
        found[key] = store.client.zrange(key, 0, -1, withscores=True) if kind == "zset" else store.client.hgetall(key)
    return found


def to_the_end(store: TaskStore, batch: int = backfill.DEFAULT_BACKFILL_BATCH) -> Backfill:
    """Batches until the backfill is done; where it stands then."""
    for _ in range(10_000):
        if backfill.advance(store, NOW, batches=10, batch=batch) is None:
            return store.backfill()
    raise AssertionError("the backfill did not end")


def commands(store: TaskStore) -> dict[str, int]:
    """Redis commands run since the last CONFIG RESETSTAT, by name (the reset itself left out)."""
    stats = store.client.info("commandstats").items()
    return {n.removeprefix("cmdstat_"): int(s["calls"]) for n, s in stats if not n.startswith("cmdstat_config")}


@pytest.mark.fast
def test_tasks_stored_before_the_indexes_get_the_entries_create_writes(store: TaskStore) -> None:
    # Given tasks of every shape, as create indexed them
    hosts = [f"h{n:02}.example.com" for n in range(MAX_INDEXED_HOSTS + 4)]
    tasks = [
        new(store, "Khóa học Python", ("https://CDN.example.com/a.mp4", "https://media.example.com/b.mp4")),
        new(store, "Straße der Videos", at=NOW + 1),
        new(store, "", at=NOW + 2),
        new(store, "Many hosts", tuple(f"https://{h}/{n}.mp4" for n, h in enumerate(hosts)), at=NOW + 3),
        store.create(spec_from_urls([], name="Page", pages=["https://www.example.org/w"]), now=NOW + 4)[0],
    ]
    created = indexes(store)
    # ... whose entries are then taken out, as for tasks stored before the indexes existed, and
    # a record half gone (its spec deleted) and a key under task: that is not a task's hash
    unindexed(store, *tasks)
    half = new(store, "Half gone", ("https://half.example.com/v.mp4",))
    unindexed(store, half)
    store.client.delete(store.spec_key(half))
    store.client.set(f"{store.prefix}task:not-a-hash", "x")
    assert store.tasks_by_name("khóa", 10)[0] == [] and indexes(store) == {}
    # When the backfill runs to its end
    state = to_the_end(store)
    # Then the indexes hold exactly what create wrote: found by name and by host again
    assert indexes(store) == created
    assert store.tasks_by_name("KHÓA HỌC", 10)[0] == [tasks[0]] and store.tasks_by_name("strasse", 10)[0] == [tasks[1]]
    assert store.tasks_by_host("media.example.com", 10)[0] == [tasks[0]]
    assert store.tasks_by_host("www.example.org", 10)[0] == [tasks[4]]
    assert [h for h in hosts if store.tasks_by_host(h, 10)[0]] == hosts[:MAX_INDEXED_HOSTS]
    # ... the half-gone record is left out, and the counts say so
    assert store.tasks_by_name("half", 10)[0] == [] and store.tasks_by_host("half.example.com", 10)[0] == []
    assert state.done and state.indexed == len(tasks) and state.dropped == 0
    assert state.done_at == NOW and state.started_at == NOW
    # When it runs again over indexes already up to date: nothing changes
    store.reset_backfill()
    assert to_the_end(store).indexed == len(tasks) and indexes(store) == created


@pytest.mark.fast
def test_entries_of_records_deleted_without_them_are_dropped(store: TaskStore) -> None:
    # Given two tasks of one name and host, one of them also on a host of its own, whose record
    # was then deleted without its entries
    kept = new(store, "Course A", ("https://cdn.example.com/a.mp4",))
    gone = new(store, "Course B", ("https://cdn.example.com/b.mp4", "https://own.example.com/b.mp4"))
    lost(store, gone)
    assert sorted(store.tasks_by_name("course", 10)[0]) == sorted([kept, gone])
    # When the backfill runs
    state = to_the_end(store)
    # Then its name member, its map entry and its host entries are gone; the other task's stay
    assert store.tasks_by_name("course", 10)[0] == [kept]
    assert store.client.hkeys(store.name_members_key) == [kept.encode()]
    assert store.tasks_by_host("cdn.example.com", 10)[0] == [kept]
    assert not store.client.exists(store.host_index_key("own.example.com"))
    assert state.indexed == 1 and state.dropped == 3  # one name member, two host entries


@pytest.mark.fast
def test_a_record_pruned_between_the_read_and_the_write_is_left_without_entries(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two unindexed tasks, one of whose records goes (a prune) just after the batch read it
    kept, pruned = new(store, "Course A"), new(store, "Course B", ("https://own.example.com/b.mp4",))
    unindexed(store, kept, pruned)
    read = store._entries

    def read_then_prune(ids: list[str]) -> Any:
        entries = read(ids)
        lost(store, pruned)
        return entries

    monkeypatch.setattr(store, "_entries", read_then_prune)
    # When the batch writes what it read
    cursor, indexed = store.reindex_batch(0, 1000)
    # Then the entries written for the pruned record were taken back out
    assert cursor == 0 and indexed == 1
    assert store.tasks_by_name("course", 10)[0] == [kept]
    assert store.client.hkeys(store.name_members_key) == [kept.encode()]
    assert not store.client.exists(store.host_index_key("own.example.com"))


@pytest.mark.fast
def test_a_member_folded_otherwise_once_is_replaced(store: TaskStore) -> None:
    # Given a task whose name member was written another way (an older folding)
    task_id = new(store, "Course A")
    unindexed(store, task_id)
    store.client.zadd(store.name_index_key, {f"Course A\x00{task_id}": 0})
    store.client.hset(store.name_members_key, task_id, f"Course A\x00{task_id}")
    # When the backfill runs
    to_the_end(store)
    # Then the index holds its member as create writes it now, and the map names that one
    assert store.client.zrange(store.name_index_key, 0, -1) == [f"course a\x00{task_id}".encode()]
    assert store.client.hgetall(store.name_members_key) == {task_id.encode(): f"course a\x00{task_id}".encode()}


@pytest.mark.fast
def test_an_interrupted_backfill_goes_on_from_its_saved_position(store: TaskStore, redis_url: str) -> None:
    # Given 300 tasks of one name on one host (sets past Redis's compact encoding, so their
    # ZSCAN goes in parts), none of them indexed, 100 of whose records were then lost
    tasks = [new(store, "Lesson", at=NOW + n) for n in range(300)]
    unindexed(store, *tasks)
    # When one batch of 20 keys runs
    first = backfill.advance(store, NOW, batches=1, batch=20)
    # Then it stopped inside the task walk, its position saved in Redis
    assert first is not None and first.phase is Phase.TASKS and first.cursor != 0
    assert store.backfill() == first
    # When the rest runs a batch at a time, each on a new store (a restart, another leader),
    # with records lost midway
    phases: list[tuple[Phase, bool]] = []
    for _ in range(10_000):
        if phases and phases[-1][0] is Phase.NAMES and store.client.exists(store.task_key(tasks[0])):
            lost(store, *tasks[:100])  # once the task walk is over: their entries stay behind
        again = TaskStore(redis.Redis.from_url(redis_url))
        state = backfill.advance(again, NOW, batches=1, batch=20)
        again.client.close()
        if state is None:
            break
        phases.append((state.phase, bool(state.pending)))
    # Then each task was indexed once (the walk went on, it never started over), each lost one's
    # entries dropped, a host set left half walked was taken up where it stopped
    done = store.backfill()
    assert done.done and done.indexed == 300 and done.dropped == 200
    assert (Phase.HOSTS, True) in phases
    assert sorted(store.tasks_by_name("lesson", 1000)[0]) == sorted(tasks[100:])
    assert store.client.zcard(store.host_index_key("cdn.example.com")) == 200


@pytest.mark.fast
def test_a_course_whose_spec_is_large_is_read_on_its_own_and_indexed(store: TaskStore) -> None:
    # Given a course of 3,000 lessons (a spec past LARGE_SPEC_BYTES) beside a small task
    urls = tuple(f"https://media{n % 3}.example.com/course/lesson-{n:05d}-{'x' * 60}.mp4" for n in range(3000))
    course, small = new(store, "Khóa học lớn", urls), new(store, "Small")
    assert store.client.strlen(store.spec_key(course)) > LARGE_SPEC_BYTES
    unindexed(store, course, small)
    # When the backfill runs
    assert to_the_end(store).done
    # Then both are found again, by name and by each of the course's hosts
    assert store.tasks_by_name("khóa", 10)[0] == [course] and store.tasks_by_name("small", 10)[0] == [small]
    assert all(store.tasks_by_host(f"media{n}.example.com", 10)[0] == [course] for n in range(3))


@pytest.mark.fast
def test_a_walk_whose_redis_restarted_starts_its_phase_over(store: TaskStore) -> None:
    # Given a task walk stopped midway, its cursor saved from another Redis server (a restart
    # reseeds the hash table: a SCAN cursor of before may skip keys)
    tasks = [new(store, "Lesson", at=NOW + n) for n in range(300)]
    unindexed(store, *tasks)
    first = backfill.advance(store, NOW, batches=1, batch=20)
    assert first is not None and first.cursor != 0 and first.indexed > 0 and first.server == store.server_run_id()
    store.client.hset(store.backfill_key, "server", "a-server-gone-since")
    # When it goes on
    done = to_the_end(store, batch=20)
    # Then the task walk started over from its start: every task is found, the first batch's twice
    assert done.done and done.server == store.server_run_id() and done.indexed == 300 + first.indexed
    assert sorted(store.tasks_by_name("lesson", 1000)[0]) == sorted(tasks)


@pytest.mark.fast
def test_a_host_walk_step_looks_at_a_bounded_number_of_entries(store: TaskStore) -> None:
    # Given 200 host sets, one of them of 500 tasks
    for n in range(200):
        new(store, urls=(f"https://h{n}.example.com/v.mp4",))
    for _ in range(499):
        new(store, urls=("https://h0.example.com/w.mp4",))
    # When the hosts are walked 100 entries a call
    cursor, looked, calls = 0, 0, 0
    pending: list[tuple[str, int]] = []
    while True:
        store.client.config_resetstat()
        cursor, pending, dropped = store.drop_dangling_hosts(cursor, pending, 100)
        ran = commands(store)
        assert ran.get("scan", 0) <= 1 and ran.get("exists", 0) <= 200 and dropped == 0, ran
        looked += ran.get("exists", 0)
        calls += 1
        if cursor == 0 and not pending:
            break
    # Then every entry was looked at, each once, in calls of a bounded size
    assert looked == 699 and calls >= 5


def test_the_leader_s_job_runs_the_backfill_once(settings: Any, store: TaskStore, caplog: Any) -> None:
    fast = settings.replace(lease_seconds=2, sweep_seconds=0.2)
    tasks = [new(store, f"Course {n}") for n in range(3)]
    unindexed(store, *tasks)
    a = Supervisor(fast, store, ClaimsOnly(), node_id="a")
    assert "backfill_indexes" in a.jobs.by_name() and a.jobs.every("backfill_indexes") == 0.2
    # Given a replica that does not lead: its job does nothing
    store.client.set(store.leader_key, "b", px=5000)
    a.elect()
    a.jobs.backfill_indexes()
    assert not store.client.exists(store.backfill_key) and store.tasks_by_name("course", 10)[0] == []
    # When it leads, its job's first run brings the (small) indexes up to date, and says so
    store.client.delete(store.leader_key)
    a.elect()
    with caplog.at_level(logging.INFO, logger="supervisor.backfill"):
        a.jobs.backfill_indexes()
    assert sorted(store.tasks_by_name("course", 10)[0]) == sorted(tasks)
    assert store.backfill_done_at() is not None
    assert "index backfill: starting" in caplog.text
    assert "index backfill: done" in caplog.text and "3 task(s) indexed" in caplog.text
    # When its job comes again: one HGET besides the lock's check, under the sweep's metric
    store.client.config_resetstat()
    a.jobs.backfill_indexes()
    assert commands(store) == {"get": 1, "hget": 1}
    count = a.metrics.registry.get_sample_value("haul_sweep_duration_seconds_count", {"job": "backfill_indexes"})
    assert count == 2


def test_haul_reindex_runs_the_backfill_now_and_again_on_request(store: TaskStore) -> None:
    # Given two tasks stored before the indexes
    tasks = [new(store, "Course A"), new(store, "Course B")]
    unindexed(store, *tasks)
    # When an operator runs haul reindex
    result = haul("reindex")
    # Then it runs to the end, saying how far it got
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "done: 2 task(s) indexed, 0 entr(ies) of gone tasks dropped"
    assert sorted(store.tasks_by_name("course", 10)[0]) == sorted(tasks)
    # When it runs again: nothing to do
    again = haul("reindex")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    # When a record was lost since, --again runs it from scratch
    lost(store, tasks[0])
    fresh = haul("reindex", "--again")
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.splitlines()[-1] == "done: 1 task(s) indexed, 2 entr(ies) of gone tasks dropped"
    assert store.tasks_by_name("course", 10)[0] == [tasks[1]]
