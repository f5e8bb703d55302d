"""The fault suite: real worker processes, a real supervisor, a real redis-server with the
append-only file on (as ops/ configures it), real origins and receivers on 127.0.0.1, broken
on purpose. Every byte is checked afterwards. (SIGKILL and SIGTERM mid-download, and supervisor
takeover, are in test_recovery.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.registry import WorkerRegistry
from actors.states import State
from actors.store import TaskStore
from tests import processes
from tests.conftest import wait_for
from tests.media import duration_of, make_hls, serve
from tests.processes import Process, running, submitted, wait_until
from tests.redisserver import RedisServer
from tests.servers import Delivery, Origin, Receiver, Site

pytestmark = pytest.mark.e2e
KIB, MIB = 1024, 1024 * 1024


class Stack:
    """A persistent redis-server of its own, and the environment workers and supervisors get."""

    def __init__(self, tmp_path: Path, receiver: Receiver, **overrides: str) -> None:
        self.tmp_path = tmp_path
        self.redis = RedisServer(tmp_path / "redis", appendonly=True)
        self.env = processes.stack_env(
            tmp_path, self.redis.url, receiver.url,
            HAUL_LEASE_SECONDS="3", HAUL_SWEEP_SECONDS="0.5", HAUL_ORPHAN_SECONDS="5",
            HAUL_RETRY_MIN_SECONDS="0.2", HAUL_RETRY_MAX_SECONDS="2",
        )  # fmt: skip
        self.env.update(overrides)
        self.store = TaskStore.from_url(self.redis.url)
        self.count = 0
        self.redis.start()  # last: nothing after it can fail and leave the server running

    @property
    def storage(self) -> Path:
        return Path(self.env["HAUL_STORAGE_DIR"])

    def worker(self, threads: int = 2) -> Process:
        self.count += 1
        return processes.worker(self.env, self.tmp_path / f"worker{self.count}.log", threads=threads)

    def supervisor(self) -> Process:
        return processes.supervisor(self.env, self.tmp_path / "supervisor.log")

    def submit(self, origin: Origin, files: dict[str, bytes]) -> str:
        entries = [{"url": origin.put(f"/{name}", data), "path": name} for name, data in files.items()]
        manifest = self.tmp_path / f"m{self.count}-{random.random()}.json"
        manifest.write_text(json.dumps({"files": entries}))
        return submitted(self.env, manifest)

    def submit_many(self, origin: Origin, tasks: list[dict[str, bytes]]) -> list[str]:
        """Submit through the Python API path (store + claim message), faster than the CLI."""
        from dramatiq import Message
        from dramatiq.brokers.redis import RedisBroker

        from actors.manifest import spec_from_manifest

        broker = RedisBroker(url=self.redis.url)  # type: ignore[no-untyped-call]
        ids = []
        for files in tasks:
            entries = [{"url": origin.put(f"/{name}", data), "path": name} for name, data in files.items()]
            task_id, _ = self.store.create(spec_from_manifest({"files": entries}), now=time.time())
            broker.enqueue(Message(queue_name="claim", actor_name="claim", args=(task_id,), kwargs={}, options={}))
            ids.append(task_id)
        broker.close()
        return ids

    def close(self) -> None:
        self.store.client.close()
        self.redis.stop()


@pytest.fixture
def stack(tmp_path: Path, receiver: Receiver) -> Iterator[Stack]:
    s = Stack(tmp_path, receiver)
    yield s
    s.close()


def stored_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("moment", ["while the webhook is in flight", "after the webhook, before done"])
def test_sigkill_during_finalize(stack: Stack, origin: Origin, receiver: Receiver, moment: str) -> None:
    data = os.urandom(MIB)
    first = stack.worker(threads=1)
    sup = stack.supervisor()
    killed: list[float] = []
    in_flight: list[float] = []

    def on_delivery(delivery: Delivery) -> None:
        if killed:
            return
        if moment == "while the webhook is in flight":
            in_flight.append(time.monotonic())
            time.sleep(2)  # the test kills the worker meanwhile; the files are stored already
        else:
            first.kill()  # the receiver has the event; the worker dies before hearing back
            killed.append(time.monotonic())

    receiver.on_delivery = on_delivery
    with running(first, sup):
        task_id = stack.submit(origin, {"lesson.mp4": data})
        if moment == "while the webhook is in flight":
            wait_until(lambda: bool(in_flight), 30, "the first delivery")
            assert (stack.storage / task_id / "lesson.mp4").exists()
            first.kill()
            killed.append(time.monotonic())
        wait_until(lambda: bool(killed), 30, "the kill")
        second = stack.worker(threads=1)
        with running(second):
            task = wait_for(stack.store, task_id, timeout=60)
    assert task.state.value == "done"
    assert stored_files(stack.storage) == {f"{task_id}/lesson.mp4": data}  # one copy, nothing stray
    assert len(receiver.deliveries) >= 2 and len({d.id for d in receiver.deliveries}) == 1
    assert len({d.body for d in receiver.deliveries}) == 1  # one webhook-id, one body
    assert receiver.accepted()


def test_a_split_download_killed_half_way_resumes_only_the_missing_ranges(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    # Four connections at 16 MiB/s each; a SIGKILL loses at most one checkpoint (4 MiB) of each
    s = Stack(tmp_path, receiver, HAUL_SPLIT="4", HAUL_MIN_SPLIT_BYTES=str(8 * MIB), HAUL_TASK_PARALLEL_FILES="1")
    try:
        origin.rate = 16 * MIB
        data = os.urandom(320 * MIB)
        first = s.worker(threads=1)
        with running(first):
            task_id = s.submit(origin, {"lecture.mp4": data})
            wait_until(lambda: origin.served["/lecture.mp4"] >= len(data) // 2, 60, "half the file served")
            assert origin.max_active == 4  # split, and killed while split
            first.kill()
        wait_until(lambda: origin.active == 0, 10, "the killed worker's connections closed")
        with running(s.worker(threads=1), s.supervisor()):
            task = wait_for(s.store, task_id, timeout=120)
        assert task.state is State.DONE, task.error
        assert (
            hashlib.sha256((s.storage / task_id / "lecture.mp4").read_bytes()).digest() == hashlib.sha256(data).digest()
        )
        assert origin.served["/lecture.mp4"] <= len(data) * 1.05
    finally:
        s.close()


def test_a_stream_killed_half_way_resumes_fetching_only_the_missing_fragments(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    folder = tmp_path / "hls"
    folder.mkdir()
    make_hls(folder)
    sizes = {f"/hls/{item.name}": item.stat().st_size for item in folder.iterdir() if item.suffix == ".ts"}
    serve(origin, folder, "/hls")
    site = Site()
    page = site.page("/lecture", f'<html><body><video src="{origin.url("/hls/index.m3u8")}"></video></body></html>')
    s = Stack(tmp_path, receiver, HAUL_SPLIT="2", HAUL_HOST_MIN_INTERVAL_SECONDS="0")
    try:
        origin.rate = 16 * KIB  # about a second a fragment, two at once
        manifest = tmp_path / "page.json"
        manifest.write_text(json.dumps({"files": [{"page": page, "path": "lecture.mp4"}]}))
        first = s.worker(threads=1)
        with running(first):
            task_id = submitted(s.env, manifest)

            def whole() -> int:
                return sum(origin.served[path] == size for path, size in sizes.items())

            wait_until(lambda: whole() >= len(sizes) // 2, 60, "half the fragments served")
            first.kill()
        whole_at_kill = whole()
        assert whole_at_kill < len(sizes)
        with running(s.worker(threads=1), s.supervisor()):
            task = wait_for(s.store, task_id, timeout=120)
        assert task.state is State.DONE and task.attempts == 2, task.error
        assert abs(duration_of(s.storage / task_id / "lecture.mp4") - 10.0) <= 0.1
        asked = {path: len(origin.requests_for(path)) for path in sizes}
        # Asked again: only what was not whole when the worker died, and what was in flight then
        # (at most its two connections' fragments, whose last bytes it may not have written).
        assert sum(n > 1 for n in asked.values()) <= len(sizes) - whole_at_kill + 2, asked
        assert sum(asked.values()) <= len(sizes) + 2, asked
    finally:
        s.close()
        site.close()


def test_a_worker_without_the_resolve_extra_hands_a_page_file_to_one_that_has_it(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    data, notes = os.urandom(64 * KIB), os.urandom(32 * KIB)
    site = Site()
    page = site.page("/lesson", f'<html><body><video src="{origin.put("/v.mp4", data)}"></video></body></html>')
    files = [{"page": page, "path": "lesson.mp4"}, {"url": origin.put("/notes.pdf", notes), "path": "notes.pdf"}]
    # A worker on a machine without yt-dlp: the package's import fails there
    blocked = tmp_path / "without-yt-dlp" / "yt_dlp"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("yt-dlp is not installed on this machine")\n')
    s = Stack(tmp_path, receiver, HAUL_HOST_MIN_INTERVAL_SECONDS="0")
    registry = WorkerRegistry(s.store.client, s.store.prefix)
    try:
        able = s.worker(threads=1)
        with running(able):
            wait_until(lambda: registry.have("resolve", "claim", time.time()), 30, "a worker with the extra")
            os.killpg(able.popen.pid, signal.SIGSTOP)  # alive and registered, taking nothing for now
            s.env["PYTHONPATH"] = str(blocked.parent)
            unable = s.worker(threads=1)
            with running(unable):
                wait_until(lambda: len(registry.workers()) == 2, 30, "the worker without the extra registered")
                manifest = tmp_path / "page.json"
                manifest.write_text(json.dumps({"files": files}))
                task_id = submitted(s.env, manifest)
                wait_until(lambda: unable.output().count("handed back") >= 2, 30, "the task handed back, twice")
                assert s.store.get(task_id).attempts == 0  # type: ignore[union-attr]
                os.killpg(able.popen.pid, signal.SIGCONT)
                task = wait_for(s.store, task_id, timeout=60)
        assert task.state is State.DONE and task.attempts == 1, task.error
        assert (s.storage / task_id / "lesson.mp4").read_bytes() == data
        assert (s.storage / task_id / "notes.pdf").read_bytes() == notes
        assert origin.served["/notes.pdf"] == len(notes)  # the task's direct file waited for the worker that took it
        assert "this worker cannot resolve pages" in unable.output()
    finally:
        s.close()
        site.close()


def test_redis_killed_and_restarted_with_tasks_queued_and_running(
    stack: Stack, origin: Origin, receiver: Receiver
) -> None:
    origin.rate = 2 * MIB
    files = {f"t{n}.mp4": os.urandom(512 * KIB) for n in range(16)}
    workers = [stack.worker(), stack.worker()]
    sup = stack.supervisor()
    with running(*workers, sup):
        ids = {name: stack.submit(origin, {name: data}) for name, data in files.items()}
        wait_until(lambda: stack.store.counts()[State.DONE] >= 2, 60, "some tasks to finish")
        stack.redis.kill()
        time.sleep(2)
        stack.redis.start()
        tasks = {name: wait_for(stack.store, task_id, timeout=120) for name, task_id in ids.items()}
    assert {t.state.value for t in tasks.values()} == {"done"}, {n: t.error for n, t in tasks.items()}
    for name, task_id in ids.items():
        assert (stack.storage / task_id / name).read_bytes() == files[name]
    delivered = {d.event["data"]["id"] for d in receiver.accepted() if d.event["type"] == "task.completed"}
    assert delivered == set(ids.values())


def test_flaky_origin_and_flaky_receiver_with_an_outage(stack: Stack, origin: Origin, receiver: Receiver) -> None:
    # A fifth of requests fail; with 5 attempts one task in ~3,000 would legitimately end dead.
    stack.env["HAUL_MAX_ATTEMPTS"] = "10"
    origin.chaos = (0.10, 0.05, 0.05)
    receiver.fail_share = 0.2
    files = {f"f{n}.mp4": os.urandom(random.randrange(64 * KIB, MIB)) for n in range(30)}
    workers = [stack.worker(threads=4), stack.worker(threads=4)]
    sup = stack.supervisor()
    with running(*workers, sup):
        receiver.down_until = time.time() + 30
        ids = {name: stack.submit(origin, {name: data}) for name, data in files.items()}
        tasks = {name: wait_for(stack.store, task_id, timeout=120) for name, task_id in ids.items()}
    assert {t.state.value for t in tasks.values()} == {"done"}, {n: t.error for n, t in tasks.items()}
    accepted = {d.event["data"]["id"]: d.at for d in receiver.accepted() if d.event["type"] == "task.completed"}
    for name, task in tasks.items():
        assert (stack.storage / task.id / name).read_bytes() == files[name]
        # (the store keeps times to the millisecond)
        assert task.id in accepted and accepted[task.id] <= task.updated_at + 0.001, "done before its webhook succeeded"
    assert any(d.answered == 503 for d in receiver.deliveries)  # the outage really happened


def test_full_staging_disk_fails_transiently_and_completes_once_space_is_back(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    staging = tmp_path / "small-staging"
    staging.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(staging)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    stack: Stack | None = None
    try:
        stack = Stack(tmp_path, receiver, HAUL_STAGING_DIR=str(staging), HAUL_MAX_ATTEMPTS="100")
        data = os.urandom(5 * MIB)
        worker = stack.worker(threads=1)
        with running(worker):
            task_id = stack.submit(origin, {"big.mp4": data})
            wait_until(
                lambda: "free space in HAUL_STAGING_DIR" in (stack.store.get(task_id).error or ""),  # type: ignore[union-attr]
                30,
                "the disk-full error",
            )
            assert stack.store.get(task_id).state.value in {"queued", "claimed", "downloading"}  # type: ignore[union-attr]
            subprocess.run(["mount", "-o", "remount,size=64m", str(staging)], check=True)
            task = wait_for(stack.store, task_id, timeout=60)
        assert task.state.value == "done"
        assert (stack.storage / task_id / "big.mp4").read_bytes() == data
    finally:
        if stack is not None:
            stack.close()
        subprocess.run(["umount", "-l", str(staging)])


def test_soak(stack: Stack, origin: Origin, receiver: Receiver, request: pytest.FixtureRequest) -> None:
    """Workers SIGKILLed and restarted every few seconds, Redis restarted once: nothing lost,
    corrupted, duplicated or left unannounced."""
    count = int(request.config.getoption("--soak-tasks"))
    rng = random.Random(3)
    origin.rate = 256 * KIB  # per response: downloads are still running when workers die
    expected: dict[str, dict[str, bytes]] = {}
    workers = [stack.worker(), stack.worker()]
    sup = stack.supervisor()
    started = time.monotonic()
    try:
        batch = []
        for n in range(count):
            sizes = [rng.randrange(16 * KIB, 256 * KIB) for _ in range(rng.randint(1, 3))]
            batch.append({f"t{n}/part{k}.bin": rng.randbytes(size) for k, size in enumerate(sizes)})
        expected = dict(zip(stack.submit_many(origin, batch), batch, strict=True))
        redis_restarted = False
        deadline = time.monotonic() + 60 + count
        while time.monotonic() < deadline:
            counts = stack.store.counts()
            if sum(counts[s] for s in counts if s.final) == count:
                break
            time.sleep(rng.uniform(2, 4))
            victim = rng.randrange(len(workers))
            workers[victim].kill()
            workers[victim].close()
            workers[victim] = stack.worker()
            if not redis_restarted and counts[State.DONE] >= count // 3:
                stack.redis.kill()
                time.sleep(1)
                stack.redis.start()
                redis_restarted = True
        # Let the last requeues settle with live workers
        tasks = {task_id: wait_for(stack.store, task_id, timeout=120) for task_id in expected}
    finally:
        for w in workers:
            w.close()
        sup.close()
    lost = [t for t in tasks.values() if t.state.value != "done"]
    corrupted = duplicated = 0
    present = stored_files(stack.storage)
    wanted = {f"{task_id}/{name}": data for task_id, files in expected.items() for name, data in files.items()}
    for path, data in wanted.items():
        if path in present and hashlib.sha256(present[path]).digest() != hashlib.sha256(data).digest():
            corrupted += 1
    duplicated = len(set(present) - set(wanted))
    delivered = {d.event["data"]["id"] for d in receiver.accepted() if d.event["type"] == "task.completed"}
    undelivered = len([t for t in tasks.values() if t.state.value == "done" and t.id not in delivered])
    missing = len(set(wanted) - set(present))
    summary = (
        f"faults: {count} tasks, done {count - len(lost)}, lost {len(lost)}, corrupted {corrupted}, "
        f"duplicated {duplicated}, undelivered {undelivered} ({time.monotonic() - started:.0f}s, redis restarted "
        f"{'once' if redis_restarted else 'never'})"
    )
    print("\n" + summary)
    assert (len(lost), corrupted, duplicated, undelivered, missing) == (0, 0, 0, 0, 0), (
        summary,
        [t.error for t in lost],
    )
    assert redis_restarted
