"""The store's search indexes (actors/store_index.py) on a real redis-server: tasks found by name
prefix and by origin host, page by page, written with the task and pruned with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.client import Client
from actors.manifest import spec_from_manifest, spec_from_urls
from actors.states import State
from actors.store import Cursor, TaskStore
from actors.store_index import MAX_INDEXED_HOSTS, MAX_INDEXED_NAME_CHARS, folded, name_range
from actors.task import FileSpec, TaskSpec
from supervisor import sweeps

pytestmark = pytest.mark.fast

NOW = 1_700_000_000.0
RETAIN = 3600.0


def new(store: TaskStore, name: str = "", urls: tuple[str, ...] = ("https://cdn.example.com/v.mp4",), *,
        at: float = NOW, task_id: str | None = None) -> str:  # fmt: skip
    return store.create(spec_from_urls(list(urls), name=name), now=at, task_id=task_id)[0]


def ended(store: TaskStore, task_id: str, *, at: float = NOW) -> None:
    """Take a task through claim, download and release into ``done`` at ``at``."""
    claim = store.claim(task_id, worker="w", now=at, lease_seconds=30, max_attempts=3, start=State.DOWNLOADING)
    store.finish_download(task_id, claim.token, now=at, lease_seconds=30, progress=(1, 1, 1), finalize_limit=0)
    assert store.release(task_id, claim.token, State.DONE, now=at, max_attempts=3) is State.DONE


def by_name(store: TaskStore, prefix: str, limit: int = 100) -> list[str]:
    return store.tasks_by_name(prefix, limit)[0]


def commands(store: TaskStore) -> dict[str, int]:
    """Redis commands run since the last CONFIG RESETSTAT, by name."""
    return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in store.client.info("commandstats").items()}


def test_a_name_prefix_finds_tasks_whatever_their_case(store: TaskStore) -> None:
    # Given named tasks, one in Vietnamese (characters above U+00FF), one in German, one unnamed
    course = new(store, "Khóa học Python")
    other = new(store, "Khóa thiết kế")
    german = new(store, "Straße der Videos")
    japanese = new(store, "日本語の講座")
    new(store, "")
    # Then a prefix finds them in any case, casefolded as Python does
    assert by_name(store, "khóa") == sorted([course, other], key=lambda t: folded(store.get(t).name))  # type: ignore[union-attr]
    assert by_name(store, "KHÓA HỌC") == [course]
    assert by_name(store, "Khóa học python") == [course]
    assert by_name(store, "STRASSE") == [german] and by_name(store, "straß") == [german]
    assert by_name(store, "日本") == [japanese]
    assert by_name(store, "khóa học java") == [] and by_name(store, "x") == []
    # ... and the unnamed task is not in the index at all
    assert store.client.zcard(store.name_index_key) == 4
    with pytest.raises(ValueError, match="at least one character"):
        store.tasks_by_name("", 10)


def test_a_nul_in_a_name_is_left_out_of_its_member(store: TaskStore) -> None:
    # Given a name holding NUL (the manifest refuses it; a TaskSpec built in code may not)
    spec = TaskSpec(files=(FileSpec("https://cdn.example.com/a.mp4", "a.mp4"),), name="Lesson\x001")
    task_id = store.create(spec, now=NOW)[0]
    # Then its member holds one NUL, the separator, and the name is found with or without it
    [member] = store.client.zrange(store.name_index_key, 0, -1)
    assert member == f"lesson1\x00{task_id}".encode()
    assert by_name(store, "lesson1") == [task_id] and by_name(store, "Lesson\x001") == [task_id]
    with pytest.raises(ValueError):
        store.tasks_by_name("\x00", 10)


def test_a_long_name_is_found_by_its_first_characters() -> None:
    name = "é" * (MAX_INDEXED_NAME_CHARS + 50)
    assert folded(name) == "é" * MAX_INDEXED_NAME_CHARS
    low, high = name_range(name.upper())
    assert low == b"[" + ("é" * MAX_INDEXED_NAME_CHARS).encode() and high == low + b"\xff"


def test_name_pages_follow_their_cursor_without_gaps_or_repeats(store: TaskStore) -> None:
    # Given 23 lessons (5 of them with the same name) among other tasks
    lessons = [new(store, f"Lesson {n:02}") for n in range(18)] + [new(store, "Lesson 99") for _ in range(5)]
    for n in range(4):
        new(store, f"Intro {n}")
        new(store, f"Lessons learnt {n}"[::-1])
    expected = sorted(lessons, key=lambda t: (folded(store.get(t).name), t))  # type: ignore[union-attr]
    # When they are read 5 at a time
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        ids, after = store.tasks_by_name("lesson ", 5, after)
        seen += ids
        pages += 1
        if after is None:
            break
    # Then every lesson comes once, in name order, and the last page says it is the last
    assert seen == expected and pages == 5
    # A cursor from below the prefix starts at its first name, one past it at nothing
    assert store.tasks_by_name("lesson ", 2, after="intro 3\x00z")[0] == expected[:2]
    assert store.tasks_by_name("lesson ", 2, after="zzz")[0] == []
    # A page exactly as long as what is left ends without a cursor
    assert store.tasks_by_name("lesson 99", 5) == (expected[18:], None)


def test_host_pages_are_newest_first_and_follow_their_cursor(store: TaskStore) -> None:
    # Given 17 tasks on one host, 6 of them created in the same millisecond, and one elsewhere
    tasks = [new(store, urls=("https://cdn.example.com/v.mp4",), at=NOW + n) for n in range(11)]
    tasks += [new(store, urls=("https://cdn.example.com/w.mp4",), at=NOW + 20) for _ in range(6)]
    new(store, urls=("https://other.example.com/v.mp4",), at=NOW + 30)
    expected = sorted(tasks, key=lambda t: (store.get(t).created_at, t), reverse=True)  # type: ignore[union-attr]
    # When they are read 4 at a time (the host in any case)
    seen: list[str] = []
    before: Cursor | None = None
    while True:
        ids, before = store.tasks_by_host("CDN.Example.com", 4, before)
        seen += ids
        if before is None:
            break
    # Then each comes once, newest first, ties by id as state pages list them
    assert seen == expected
    assert store.tasks_by_host("nowhere.example.com", 10) == ([], None)
    assert store.tasks_by_host("", 10) == ([], None)
    with pytest.raises(ValueError):
        store.tasks_by_host("cdn.example.com", 0)


def test_a_task_is_found_under_each_of_its_hosts_a_page_under_its_page_host(store: TaskStore) -> None:
    # Given a task with files on two hosts (one with a port, userinfo and capitals, one an IDN),
    # and a page file
    spec = spec_from_manifest({"name": "Mixed", "files": [
        {"url": "https://user:pw@CDN.Example.com:8443/a.mp4", "path": "a.mp4"},
        {"url": "https://media.example.com/b.mp4", "path": "b.mp4"},
        {"url": "https://Bücher.example/c.pdf", "path": "c.pdf"},
        {"page": "https://www.example.org/watch?v=1", "path": "d.mp4"},
    ]})  # fmt: skip
    task_id = store.create(spec, now=NOW)[0]
    # Then it is found under each hostname, without port or userinfo, lowercased
    for host in ("cdn.example.com", "media.example.com", "bücher.example", "www.example.org", "BÜCHER.example"):
        assert store.tasks_by_host(host, 10)[0] == [task_id], host
    assert store.tasks_by_host("cdn.example.com:8443", 10)[0] == []
    assert store.client.zscore(store.host_index_key("www.example.org"), task_id) == NOW


def test_at_most_16_hosts_of_a_task_are_indexed_and_all_of_them_are_pruned(store: TaskStore, tmp_path: Path) -> None:
    hosts = [f"h{n:02}.example.com" for n in range(MAX_INDEXED_HOSTS + 4)]
    task_id = new(store, "Many hosts", tuple(f"https://{h}/{n}.mp4" for n, h in enumerate(hosts)))
    found = [h for h in hosts if store.tasks_by_host(h, 10)[0] == [task_id]]
    assert found == hosts[:MAX_INDEXED_HOSTS]
    ended(store, task_id)
    sweeps.prune(store, tmp_path, NOW + RETAIN + 1, retain_seconds=RETAIN)
    assert store.get(task_id) is None
    assert not store.client.exists(*(store.host_index_key(h) for h in hosts))


def test_prune_takes_a_task_out_of_both_indexes(store: TaskStore, tmp_path: Path) -> None:
    # Given two ended tasks sharing a name and a host, one of them old enough to be pruned
    old = new(store, "Course A", ("https://cdn.example.com/a.mp4", "https://media.example.com/b.mp4"))
    young = new(store, "Course A", ("https://cdn.example.com/c.mp4",))
    page = store.create(spec_from_urls([], name="Page", pages=["https://www.example.org/w"]), now=NOW)[0]
    for task_id in (old, page):
        ended(store, task_id)
    ended(store, young, at=NOW + RETAIN)
    # When the supervisor's prune sweep runs
    outcome = sweeps.prune(store, tmp_path, NOW + RETAIN + 1, retain_seconds=RETAIN)
    # Then the old ones left both indexes (and the member map), the young one stayed
    assert outcome == {"records_done": 2}
    assert by_name(store, "course") == [young] and by_name(store, "page") == []
    assert store.tasks_by_host("cdn.example.com", 10)[0] == [young]
    assert not store.client.exists(store.host_index_key("media.example.com"), store.host_index_key("www.example.org"))
    assert store.client.hkeys(store.name_members_key) == [young.encode()]


def test_an_entry_whose_record_is_gone_is_skipped_and_dropped_by_prune(
    store: TaskStore, client: Client, tmp_path: Path
) -> None:
    # Given three tasks of one name and host, one of whose records was lost (deleted outside haul)
    kept = [new(store, "Lost and found", at=NOW + n) for n in range(3)]
    lost = kept.pop(1)
    ended(store, lost)
    store.client.delete(store.task_key(lost), store.spec_key(lost))
    # Then the store's pages still list it, the client's pages leave it out
    assert sorted(store.tasks_by_name("lost", 10)[0]) == sorted([*kept, lost])
    tasks, cursor = client.by_name("LOST", 10)
    assert sorted(t.id for t in tasks) == sorted(kept) and cursor is None
    tasks, newer = client.by_host("cdn.example.com", 2)
    assert [t.id for t in tasks] == [kept[1]] and newer == Cursor(NOW + 1, lost)
    tasks, older = client.by_host("cdn.example.com", 2, newer)
    assert [t.id for t in tasks] == [kept[0]] and older is None
    # ... and prune drops its name entry with its state entry (its hosts went with the record)
    sweeps.prune(store, tmp_path, NOW + RETAIN + 1, retain_seconds=RETAIN)
    assert sorted(store.tasks_by_name("lost", 10)[0]) == sorted(kept)


def test_the_reads_are_a_few_commands_and_never_a_scan(store: TaskStore, client: Client) -> None:
    # Given 30 tasks among 300 on other hosts and names
    for n in range(300):
        new(store, f"Other {n}", (f"https://o{n % 7}.example.com/v.mp4",), at=NOW + n)
    mine = [new(store, f"Mine {n:02}", ("https://cdn.example.com/v.mp4",), at=NOW + n) for n in range(30)]
    store.client.config_resetstat()
    # When the client reads them in pages of 10, by name and by host
    named, after = client.by_name("mine", 10)
    while after is not None:
        more, after = client.by_name("mine", 10, after)
        named += more
    hosted, before = client.by_host("cdn.example.com", 10)
    while before is not None:
        more_hosted, before = client.by_host("cdn.example.com", 10, before)
        hosted += more_hosted
    # Then each page is one index command and one pipelined read of its tasks; no key is scanned
    assert [t.id for t in named] == mine and [t.id for t in hosted] == mine[::-1]
    ran = commands(store)
    assert not {"scan", "keys", "hscan", "zscan", "sscan"} & ran.keys()
    assert ran["zrangebylex"] == 3  # 3 pages by name
    assert (ran["zrevrange"], ran["zrevrangebyscore"], ran["zcount"]) == (1, 2, 2)  # by host: 2 after a cursor
    assert ran["hgetall"] == 60  # each task read once
