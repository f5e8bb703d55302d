"""A task's files side by side (issue 16): up to HAUL_TASK_PARALLEL_FILES at once under one
lease, each connection counted against HAUL_DOWNLOAD_PER_HOST, the first failure stopping
the others, every file resumed from its own ``.part``. In-process workers on the real broker,
a throttled origin on 127.0.0.1 counting its connections."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from actors.events import EventLog
from actors.manifest import spec_from_manifest
from actors.settings import Settings
from actors.states import State
from actors.store import TaskStore
from tests.conftest import in_process_worker, submit_spec, wait_for
from tests.processes import wait_until
from tests.servers import Fault, Origin

KIB, MIB = 1024, 1024 * 1024


def course(store: TaskStore, origin: Origin, files: dict[str, bytes]) -> str:
    entries = [{"url": origin.put(f"/{path}", data), "path": path} for path, data in files.items()]
    return submit_spec(spec_from_manifest({"files": entries}), store)


def test_a_course_over_a_throttled_origin_downloads_four_files_at_once(
    settings: Settings, store: TaskStore, origin: Origin
) -> None:
    origin.rate = 512 * KIB  # per connection, as a CDN caps it: half a second a file, 2.5 s in all
    files = {f"lesson-{n:02}.mp4": os.urandom(256 * KIB) for n in range(20)}
    with in_process_worker(settings.replace(task_parallel_files=4), store, threads=1):
        task_id = course(store, origin, files)
        # Status names the files in flight, how far each is and the connections in use
        seen: list[dict[str, Any]] = []

        def four_in_flight() -> bool:
            status = store.get(task_id).as_status()  # type: ignore[union-attr]
            seen.append(status)
            return bool(status["connections"] == 4)

        wait_until(four_in_flight, 10, "four files downloading at once in the status")
        states = Counter(f["state"] for f in seen[-1]["files"])
        assert states["downloading"] == 4 and states["waiting"] + states["done"] == 16
        assert states["done"] == seen[-1]["files_done"]
        assert all(0 <= f["bytes_done"] <= 256 * KIB for f in seen[-1]["files"] if f["state"] == "downloading")
        task = wait_for(store, task_id)
    assert task.state is State.DONE and task.attempts == 1 and task.files_done == 20
    # The progress events carry the same: the files in flight and the connections
    events = EventLog(store.client, store.prefix).of_task(task_id)
    flying = [e.data for e in events if e.type == "task.progress" and e.data.get("connections")]
    assert flying and max(e["connections"] for e in flying) == 4
    paths = list(files)
    completed = [(e.data["index"], e.data["path"]) for e in events if e.type == "file.completed"]
    assert sorted(completed) == list(enumerate(paths))  # each file once, named by its own index
    for path, data in files.items():
        assert (settings.storage_dir / task.id / path).read_bytes() == data
    # The origin saw four bodies at once, and each file once
    assert origin.max_active == 4
    assert all(origin.served[f"/{path}"] == len(data) for path, data in files.items())


def test_the_per_host_limit_counts_every_connection_of_every_task(
    settings: Settings, store: TaskStore, origin: Origin
) -> None:
    origin.rate = 2 * MIB
    tasks = [{f"t{t}/f{n:02}.mp4": os.urandom(192 * KIB) for n in range(10)} for t in range(3)]
    limited = settings.replace(task_parallel_files=4, download_per_host=4)
    with in_process_worker(limited, store, threads=3):
        ids = [course(store, origin, files) for files in tasks]
        ended = [wait_for(store, task_id) for task_id in ids]
    assert [t.state for t in ended] == [State.DONE] * 3
    assert origin.max_active == 4  # reached, never passed, with 12 lanes wanting more
    host_slots = f"{store.prefix}slots:host:127.0.0.1"
    assert store.client.zcard(host_slots) == 0  # every connection's slot given back
    assert all(not store.client.hget(store.task_key(t), "conns") for t in ids)


def test_one_failing_file_stops_the_others_and_the_next_attempt_resumes_each_from_its_part(
    settings: Settings, store: TaskStore, origin: Origin
) -> None:
    origin.rate = 1 * MIB
    files = {f"part-{n}.mp4": os.urandom(2 * MIB) for n in range(4)}
    for path in files:
        origin.put(f"/{path}", files[path])
    origin.fault("/part-2.mp4", Fault("drop", after=512 * KIB))
    with in_process_worker(settings.replace(task_parallel_files=4), store, threads=1):
        task = wait_for(store, course(store, origin, files))
    assert task.state is State.DONE and task.attempts == 2
    for path, data in files.items():
        assert (settings.storage_dir / task.id / path).read_bytes() == data
    # The cut stopped its siblings mid-body; the second run asked each for what it lacked
    total = sum(len(data) for data in files.values())
    assert sum(origin.served[f"/{path}"] for path in files) <= total * 1.05
    resumed = [origin.requests_for(f"/{path}")[-1].headers.get("Range") for path in files]
    assert all(r is not None and r != "bytes=0-" for r in resumed), resumed


def test_files_finished_out_of_order_are_each_told_once_across_a_failed_attempt(
    settings: Settings, store: TaskStore, origin: Origin
) -> None:
    origin.rate = 1 * MIB  # they finish last to first, then the first is cut: a second run ends it
    sizes = [2 * MIB, MIB, 512 * KIB, 128 * KIB]
    files = {f"f{n}.mp4": os.urandom(size) for n, size in enumerate(sizes)}
    for path, data in files.items():
        origin.put(f"/{path}", data)
    origin.fault("/f0.mp4", Fault("drop", after=1536 * KIB))
    with in_process_worker(settings.replace(task_parallel_files=4), store, threads=1):
        task = wait_for(store, course(store, origin, files))
    assert task.state is State.DONE and task.attempts == 2
    events = EventLog(store.client, store.prefix).of_task(task.id)
    completed = [(e.data["index"], e.data["path"]) for e in events if e.type == "file.completed"]
    assert sorted(completed) == [(n, f"f{n}.mp4") for n in range(4)], completed
    assert completed[-1] == (0, "f0.mp4")


def test_a_permanent_failure_of_one_file_fails_the_task_naming_it_and_stops_the_rest(
    settings: Settings, store: TaskStore, origin: Origin
) -> None:
    origin.rate = 1 * MIB
    files = {f"big-{n}.mp4": os.urandom(8 * MIB) for n in range(3)}
    entries = [{"url": origin.put(f"/{path}", data), "path": path} for path, data in files.items()]
    entries.insert(1, {"url": origin.url("/gone.mp4"), "path": "gone.mp4"})
    with in_process_worker(settings.replace(task_parallel_files=4), store, threads=1):
        task = wait_for(store, submit_spec(spec_from_manifest({"files": entries}), store))
    assert task.state is State.FAILED and "404" in task.error and task.error_file == "gone.mp4"
    assert all(origin.served[f"/{path}"] < len(data) for path, data in files.items())  # cut short


def test_a_cancel_closes_every_connection_of_the_task(settings: Settings, store: TaskStore, origin: Origin) -> None:
    origin.rate = 512 * KIB
    files = {f"slow-{n}.mp4": os.urandom(8 * MIB) for n in range(4)}
    with in_process_worker(settings.replace(task_parallel_files=4), store, threads=1) as running:
        task_id = course(store, origin, files)
        wait_until(lambda: origin.active == 4, 10, "four bodies in flight")
        store.cancel(task_id, now=running.rt.clock())
        wait_until(lambda: origin.active == 0, 5, "every connection of the canceled task closed")
        assert wait_for(store, task_id).state is State.CANCELED


def test_a_task_needs_no_thread_beside_when_it_allows_one_file_at_a_time(
    settings: Settings, store: TaskStore, origin: Origin
) -> None:
    origin.rate = 4 * MIB
    files = {f"one-{n}.mp4": os.urandom(128 * KIB) for n in range(6)}
    with in_process_worker(settings.replace(task_parallel_files=1), store, threads=1) as running:
        task = wait_for(store, course(store, origin, files))
        assert running.rt._beside is None
    assert task.state is State.DONE and origin.max_active == 1
