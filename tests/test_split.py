"""One large file over several connections (issue 16): split only when the origin caps each
connection, positional writes into one ``.part`` with a record of what is missing, a resume
that asks only for that, a file changed mid-split restarting whole, an origin without ranges
on one connection. In-process workers on the real broker, a real origin on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os

from actors.manifest import spec_from_manifest
from actors.settings import Settings
from actors.states import State
from actors.store import TaskStore
from tests.conftest import in_process_worker, submit_spec, wait_for
from tests.processes import wait_until
from tests.servers import Fault, Origin, etag_of

MIB = 1024 * 1024


def split_settings(settings: Settings, width: int = 4) -> Settings:
    return settings.replace(task_parallel_files=1, split=width, min_split_bytes=8 * MIB)


def submit(store: TaskStore, origin: Origin, data: bytes, path: str = "/lecture.mp4") -> str:
    url = origin.put(path, data)
    return submit_spec(spec_from_manifest({"files": [{"url": url, "path": "lecture.mp4"}]}), store)


def stored_sha256(store: TaskStore, task_id: str) -> str:
    task = store.get(task_id)
    assert task is not None
    [entry] = task.stored
    return str(entry["sha256"])


def test_a_file_over_an_origin_capping_each_connection_is_split_and_ends_intact(
    settings: Settings, store: TaskStore, origin: Origin
) -> None:
    origin.rate = 8 * MIB
    data = os.urandom(96 * MIB)
    with in_process_worker(split_settings(settings), store, threads=1):
        task_id = submit(store, origin, data)

        def four_connections() -> bool:  # as status shows them, written with the lease's renewal
            task = store.get(task_id)
            return task is not None and task.as_status()["files"][0].get("connections") == 4

        wait_until(four_connections, 20, "the file on four connections in its status")
        task = wait_for(store, task_id)
    assert task.state is State.DONE and task.attempts == 1
    assert (settings.storage_dir / task.id / "lecture.mp4").read_bytes() == data
    assert stored_sha256(store, task.id) == hashlib.sha256(data).hexdigest()  # hashed in order, ranges out of it
    # Doubled while the total grew: 1, 2, 4 (HAUL_SPLIT); a body given up as its span was halved
    # may be counted a moment longer
    assert origin.max_active >= 4
    assert origin.served["/lecture.mp4"] <= len(data) * 1.05
    ranges = [r.headers.get("Range", "") for r in origin.requests_for("/lecture.mp4")]
    assert all(r.startswith("bytes=") for r in ranges[1:]) and len(ranges) >= 4
    assert all(r.headers.get("If-Range") for r in origin.requests_for("/lecture.mp4")[1:])


def test_an_origin_that_does_not_cap_connections_keeps_one(
    settings: Settings, store: TaskStore, origin: Origin
) -> None:
    origin.rate = 12 * MIB
    origin.shared_rate = True  # the link is the limit, not the connection: a second one gains nothing
    data = os.urandom(48 * MIB)  # 4 s: worth trying a second connection
    with in_process_worker(split_settings(settings), store, threads=1):
        task = wait_for(store, submit(store, origin, data))
    assert task.state is State.DONE and task.attempts == 1
    assert (settings.storage_dir / task.id / "lecture.mp4").read_bytes() == data
    assert origin.max_active == 2  # tried a second, retired it
    assert origin.served["/lecture.mp4"] <= len(data) * 1.05


def test_an_origin_without_ranges_gets_one_connection(settings: Settings, store: TaskStore, origin: Origin) -> None:
    origin.rate = 8 * MIB
    origin.ranges = False
    data = os.urandom(24 * MIB)
    with in_process_worker(split_settings(settings), store, threads=1):
        task = wait_for(store, submit(store, origin, data))
    assert task.state is State.DONE and task.attempts == 1 and origin.max_active == 1
    assert (settings.storage_dir / task.id / "lecture.mp4").read_bytes() == data


def test_a_split_download_cut_half_way_resumes_only_what_is_missing(
    settings: Settings, store: TaskStore, origin: Origin
) -> None:
    origin.rate = 8 * MIB
    data = os.urandom(96 * MIB)
    origin.put("/lecture.mp4", data)
    with in_process_worker(split_settings(settings), store, threads=1) as running:
        task_id = submit(store, origin, data)
        # Half way, the worker stops (its connections cut mid-body); another run goes on
        wait_until(lambda: origin.served["/lecture.mp4"] >= len(data) // 2, 30, "half the file served")
        running.rt.stopper.stop()
        wait_until(lambda: origin.active == 0, 10, "every connection closed")
    with in_process_worker(split_settings(settings), store, threads=1):
        task = wait_for(store, task_id)
    assert task.state is State.DONE
    assert (settings.storage_dir / task_id / "lecture.mp4").read_bytes() == data
    assert stored_sha256(store, task_id) == hashlib.sha256(data).hexdigest()
    assert origin.served["/lecture.mp4"] <= len(data) * 1.05


def test_a_file_changed_on_the_origin_mid_split_restarts_whole_and_ends_as_the_new_file(
    settings: Settings, store: TaskStore, origin: Origin
) -> None:
    origin.rate = 8 * MIB
    old, new = os.urandom(64 * MIB), os.urandom(64 * MIB)
    origin.put("/lecture.mp4", old)
    # While the second connection's range is on its way, the file is replaced: the ranges asked
    # for after it (If-Range the old version) are answered with the whole new file

    def replace() -> None:
        origin.put("/lecture.mp4", new)

    origin.fault("/lecture.mp4", Fault("none"), Fault("none", after=MIB, midway=replace))
    with in_process_worker(split_settings(settings), store, threads=1):
        task = wait_for(store, submit(store, origin, old), timeout=120)
    assert task.state is State.DONE
    assert (settings.storage_dir / task.id / "lecture.mp4").read_bytes() == new
    assert stored_sha256(store, task.id) == hashlib.sha256(new).hexdigest()
    assert origin.served_etags["/lecture.mp4"] == {etag_of(old), etag_of(new)}  # changed mid-way
