"""The data path's guarantees tried as an adversary would: a receiver slower than the lease, an
origin that pauses longer than most of the lease, two finalizes racing across filesystems, an
interrupted restart of a file that changed on the origin, a task path that looks like one of
haul's temporaries, a worker process paused past its lease. Real redis-server, real worker
processes or an in-process Dramatiq worker, real origins and receivers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.errors import OriginUnavailable, Stopping
from actors.fetch import Fetcher
from actors.manifest import spec_from_manifest
from actors.netguard import DestinationPolicy
from actors.sandbox import Sandbox
from actors.storage import LocalStorage
from actors.task import FileSpec
from tests.conftest import dramatiq_supervisor, in_process_worker, runtime_for, submit_spec, wait_for
from tests.processes import drained, running, wait_until
from tests.servers import Delivery, Fault, Origin, Receiver
from tests.test_faults import Stack

KIB, MIB = 1024, 1024 * 1024


def other_filesystem(than: Path) -> Path:
    """A folder on another filesystem than ``than`` (/dev/shm is a tmpfs on Debian)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(than).st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    folder = shm / f"haul-test-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir()
    return folder


@pytest.fixture
def shm_folder(tmp_path: Path) -> Iterator[Path]:
    folder = other_filesystem(tmp_path)
    yield folder
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.e2e
def test_a_receiver_slower_than_the_lease_gets_task_completed_once(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    # Given a lease of 3 s and a receiver that answers the first delivery after 5 s ...
    stack = Stack(tmp_path, receiver, HAUL_READ_TIMEOUT_SECONDS="10")
    slow: list[float] = []

    def answer_slowly(delivery: Delivery) -> None:
        if not slow:
            slow.append(time.monotonic())
            time.sleep(5)

    receiver.on_delivery = answer_slowly
    try:
        worker, sup = stack.worker(threads=2), stack.supervisor()
        with running(worker, sup):
            task_id = stack.submit(origin, {"lesson.mp4": os.urandom(MIB)})
            task = wait_for(stack.store, task_id, timeout=60)
            drained(stack.redis.url)  # a late duplicate, if there were one, has arrived
    finally:
        stack.close()
    # ... the worker keeps its lease while it waits: one delivery, done at the first attempt
    assert task.state.value == "done" and task.attempts == 1, task
    types = [d.event["type"] for d in receiver.deliveries]
    assert types == ["task.completed"], types
    assert "lease expired" not in sup.output()


def test_an_origin_pause_shorter_than_the_read_timeout_keeps_the_task(
    settings: Any, store: Any, origin: Origin, receiver: Receiver
) -> None:
    # Given a lease of 2 s, a read timeout of 5 s and an origin that pauses 4 s mid-body ...
    fast = settings.replace(lease_seconds=2, sweep_seconds=0.2, read_timeout_seconds=5)
    data = os.urandom(3 * MIB)
    url = origin.put("/pause.mp4", data)
    origin.fault("/pause.mp4", Fault("stall", after=MIB, seconds=4))
    sup = dramatiq_supervisor(fast, store, node_id="test-sup")
    with in_process_worker(fast, store, threads=2):
        sup.start()
        try:
            task_id = submit_spec(spec_from_manifest({"files": [{"url": url, "path": "pause.mp4"}]}), store)
            task = wait_for(store, task_id, timeout=30)
        finally:
            sup.stop()
    # ... the read is alive, so the lease is renewed: one attempt, one request, one copy
    assert task.state.value == "done" and task.attempts == 1, task
    assert len(origin.requests_for("/pause.mp4")) == 1
    assert (fast.storage_dir / task_id / "pause.mp4").read_bytes() == data


@pytest.mark.e2e
def test_a_paused_worker_loses_its_task_and_writes_nothing_when_it_wakes(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    # Given a worker downloading a throttled file ...
    stack = Stack(tmp_path, receiver)
    data = os.urandom(6 * MIB)
    origin.rate = 2 * MIB
    try:
        first, sup = stack.worker(threads=1), stack.supervisor()
        with running(first, sup):
            task_id = stack.submit(origin, {"paused.mp4": data})

            def downloading() -> bool:
                task = stack.store.get(task_id)
                return task is not None and task.bytes_done >= MIB

            wait_until(downloading, 30, "the download to pass 1 MiB")
            # When the whole worker (its lease keeper too) is paused past its lease, as a
            # frozen VM or a partition would ...
            os.killpg(first.popen.pid, signal.SIGSTOP)
            second = stack.worker(threads=1)
            with running(second):
                origin.rate = None
                task = wait_for(stack.store, task_id, timeout=60)
                assert task.state.value == "done" and task.attempts == 2, task
                stored = stack.storage / task_id / "paused.mp4"
                before = hashlib.sha256(stored.read_bytes()).hexdigest()
                os.killpg(first.popen.pid, signal.SIGCONT)
                # ... then it wakes up, finds its lease gone and stops before another write
                wait_until(lambda: "stopping" in first.output() and task_id in first.output(), 20, "the stop")
                time.sleep(0.5)
                assert hashlib.sha256(stored.read_bytes()).hexdigest() == before == hashlib.sha256(data).hexdigest()
                assert stack.store.get(task_id).state.value == "done"  # type: ignore[union-attr]
    finally:
        stack.close()


def race(runners: int, work: Any) -> list[BaseException]:
    """Run ``work`` in ``runners`` threads released at once; return what they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(runners)

    def run() -> None:
        barrier.wait()
        try:
            work()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(runners)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_two_finalizes_copying_across_filesystems_never_store_a_torn_file(tmp_path: Path, shm_folder: Path) -> None:
    # Given a finished 8 MiB file in staging on one filesystem and storage on another ...
    task_id = "ab" * 16
    sandbox = Sandbox(shm_folder, task_id)
    sandbox.prepare()
    spec = FileSpec(url="http://origin.example/a.mp4", path="lesson/a.mp4")
    data = os.urandom(8 * MIB)
    sandbox.file(spec).parent.mkdir(parents=True)
    sandbox.file(spec).write_bytes(data)
    storage = LocalStorage(tmp_path / "storage")
    target = storage.task_dir(task_id) / spec.path
    for _ in range(5):
        target.unlink(missing_ok=True)
        # When two runs of the task (a stale holder and its successor) commit at once ...
        errors = race(2, lambda: storage.commit(sandbox, [spec]))
        # ... both succeed and the stored file is the whole file, with nothing left beside it
        assert errors == []
        assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert list(storage.temporary_dir.iterdir()) == []
        assert sorted(p.name for p in target.parent.iterdir()) == ["a.mp4"]


def test_a_restart_interrupted_after_the_new_version_arrived_never_splices(tmp_path: Path, origin: Origin) -> None:
    fetcher = Fetcher(DestinationPolicy(True), connect_timeout=2, read_timeout=5)
    spec = FileSpec(url=origin.url("/v.mp4"), path="v.mp4")
    part = tmp_path / "0.part"
    old, new = os.urandom(MIB), os.urandom(MIB)
    origin.put("/v.mp4", old)
    # Given a first attempt that kept 200 KiB of version 1 ...
    origin.fault("/v.mp4", Fault("drop", after=200 * KIB))
    with pytest.raises(OriginUnavailable):
        fetcher.fetch(spec, part, task_id="t", on_progress=lambda position: None)
    assert part.stat().st_size == 200 * KIB
    # ... and an origin that now serves version 2, whose answer arrives just as the worker is
    # told to stop (or its fence trips) ...
    origin.put("/v.mp4", new)

    def stop(position: int) -> None:
        raise Stopping("the worker is stopping")

    with pytest.raises(Stopping):
        fetcher.fetch(spec, part, task_id="t", on_progress=stop)
    # When the next attempt resumes, it ends with version 2 whole, never 1 spliced with 2
    size = fetcher.fetch(spec, part, task_id="t", on_progress=lambda position: None)
    assert size == len(new) and part.read_bytes() == new


def test_a_task_path_that_looks_like_a_temporary_is_stored_beside_its_neighbour(
    settings: Any, store: Any, origin: Origin, receiver: Receiver
) -> None:
    # Given a task naming a file the way haul once named the temporary of its neighbour ...
    files = {"lesson/.a.mp4.haul-tmp": os.urandom(MIB), "lesson/a.mp4": os.urandom(2 * MIB)}
    entries = [{"url": origin.put(f"/{n}", data), "path": path} for n, (path, data) in enumerate(files.items())]
    with in_process_worker(settings, store, threads=2):
        task_id = submit_spec(spec_from_manifest({"files": entries}), store)
        task = wait_for(store, task_id, timeout=30)
    # ... both files are stored whole and announced
    assert task.state.value == "done", task
    for path, data in files.items():
        assert (settings.storage_dir / task_id / path).read_bytes() == data
    [delivery] = receiver.accepted()
    assert sorted(f["path"] for f in delivery.event["data"]["files"]) == sorted(files)


def test_the_operators_own_internal_receiver_is_trusted_a_tasks_is_not(
    settings: Any, store: Any, origin: Origin, receiver: Receiver
) -> None:
    # Given private networks off, the origin allowlisted, and HAUL_WEBHOOK_URL on an internal
    # address that no allowlist names ...
    strict = settings.replace(allow_private_networks=False, allow_hosts=frozenset({f"127.0.0.1:{origin.port}"}))
    url = origin.put("/a.mp4", os.urandom(64 * KIB))
    other = Receiver("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    try:
        with in_process_worker(strict, store, threads=2):
            configured = submit_spec(spec_from_manifest({"files": [{"url": url, "path": "a.mp4"}]}), store)
            given = submit_spec(
                spec_from_manifest({"files": [{"url": url, "path": "a.mp4"}], "webhook": other.url}), store
            )
            done, refused = wait_for(store, configured, timeout=30), wait_for(store, given, timeout=30)
    finally:
        other.close()
    # ... the operator's receiver is configuration and gets task.completed; a task-given
    # receiver on an internal address is hostile input, refused before anything is fetched
    assert done.state.value == "done", done
    assert len(origin.requests_for("/a.mp4")) == 1
    assert [d.event["type"] for d in receiver.accepted()] == ["task.completed"]
    assert refused.state.value == "failed" and "not a public address" in refused.error, refused
    assert other.deliveries == []


def test_a_stopping_worker_does_not_take_the_task_it_just_handed_back(runtime: Any, store: Any) -> None:
    from actors.outcome import Next
    from actors.stages import run_task

    task_id = submit_spec(spec_from_manifest({"files": [{"url": "http://127.0.0.1:9/a.mp4", "path": "a.mp4"}]}), store)
    # When a claim message reaches a thread of a worker that is stopping ...
    runtime.stopper.stop()
    outcome = run_task(runtime, task_id)
    # ... it is sent back to the queue for another worker, and the task is left untouched
    assert outcome.next is Next.RETRY and outcome.delay_seconds == 0
    task = store.get(task_id)
    assert task.state.value == "queued" and task.attempts == 0


def test_a_stale_holder_still_writing_never_reaches_the_restarted_file(tmp_path: Path, origin: Origin) -> None:
    fetcher = Fetcher(DestinationPolicy(True), connect_timeout=2, read_timeout=5)
    spec = FileSpec(url=origin.url("/v.mp4"), path="v.mp4")
    part = tmp_path / "0.part"
    old, new = os.urandom(MIB), os.urandom(MIB // 2)
    origin.put("/v.mp4", old)
    origin.fault("/v.mp4", Fault("drop", after=300 * KIB))
    with pytest.raises(OriginUnavailable):
        fetcher.fetch(spec, part, task_id="t", on_progress=lambda position: None)
    # Given a holder that lost the task (a cancel and a retry) but still has the .part open ...
    stale = os.open(part, os.O_WRONLY)
    try:
        # When its successor restarts the file, which changed on the origin ...
        origin.put("/v.mp4", new)
        assert fetcher.fetch(spec, part, task_id="t", on_progress=lambda position: None) == len(new)
        # ... the stale holder's late writes land in the old file, never in the new one
        os.pwrite(stale, old[: 600 * KIB], 0)
    finally:
        os.close(stale)
    assert part.read_bytes() == new


class DrippingServer:
    """An HTTP peer that answers a byte every ``pause`` seconds: every read returns within
    the read timeout, so only the step's deadline can end the wait."""

    def __init__(self, pause: float = 0.3, limit_seconds: float = 30.0) -> None:
        import socket

        self.pause, self.limit = pause, limit_seconds
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: Any) -> None:
        deadline = time.monotonic() + self.limit
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                if self.closed.is_set() or time.monotonic() > deadline:
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(self.pause)

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


def test_an_origin_dripping_its_answer_cannot_hold_a_thread_past_the_steps_deadline(
    settings: Any, store: Any, receiver: Receiver
) -> None:
    # Given an origin that sends its status line a byte every 0.3 s (a read timeout of 1 s
    # never fires) and a request step that may take 2 s (+ slack) ...
    drip = DrippingServer()
    fast = settings.replace(lease_seconds=3, connect_timeout_seconds=1, read_timeout_seconds=1, max_attempts=1)
    url = f"http://127.0.0.1:{drip.port}/v.mp4"
    try:
        with in_process_worker(fast, store, threads=1):
            started = time.monotonic()
            task_id = submit_spec(spec_from_manifest({"files": [{"url": url, "path": "v.mp4"}]}), store)
            # ... the keeper wakes the request once its step overran: the run ends like any
            # transient failure (dead here, with one attempt), not when the origin gives up
            task = wait_for(store, task_id, timeout=20)
            took = time.monotonic() - started
    finally:
        drip.close()
    assert task.state.value == "dead" and task.attempts == 1, task
    assert took < 12, took  # the drip alone would have held the thread for 30 s


def claimed_and_downloaded(rt: Any, store: Any, origin: Origin, **manifest: Any) -> tuple[Any, Any, Any]:
    """A task claimed and downloaded in this thread, its lease held: (task, lease, hold)."""
    import dataclasses

    from actors.outcome import Next
    from actors.stages import claim_task, download_task
    from actors.states import State

    url = origin.put("/a.mp4", os.urandom(256 * KIB))
    task_id = submit_spec(spec_from_manifest({"files": [{"url": url, "path": "a.mp4"}], **manifest}), store)
    since = time.monotonic()
    claimed = claim_task(rt, task_id)
    assert claimed.next is Next.DOWNLOAD and claimed.task is not None
    hold = rt.leases.hold(task_id, claimed.token, since=since)
    lease = hold.__enter__()
    downloading = claimed.task
    if manifest.get("webhook"):  # only finalize sees the task's receiver
        downloading = dataclasses.replace(downloading, spec=dataclasses.replace(downloading.spec, webhook=None))
    assert download_task(rt, downloading, lease).next is Next.FINALIZE
    return dataclasses.replace(claimed.task, state=State.FINALIZING), lease, hold


def test_a_cancel_that_won_stops_storing_before_the_next_file(
    runtime: Any, store: Any, origin: Origin, receiver: Receiver, settings: Any
) -> None:
    from actors.finalize import finish_task
    from actors.states import CancelReply

    task, lease, hold = claimed_and_downloaded(runtime, store, origin)
    try:
        # When an operator cancels between the download and the first rename into storage
        # (before the lease keeper's next renewal could tell the worker) ...
        assert store.cancel(task.id, time.time()) is CancelReply.OK
        finish_task(runtime, task, lease)
    finally:
        hold.__exit__(None, None, None)
    # ... nothing reaches storage and nothing is announced
    assert not (settings.storage_dir / task.id / "a.mp4").exists()
    assert receiver.deliveries == []
    assert store.get(task.id).state.value == "canceled"


def test_a_graceful_stop_hands_a_finalize_back(runtime: Any, store: Any, origin: Origin, receiver: Receiver) -> None:
    from actors.finalize import finish_task
    from actors.outcome import Next

    task, lease, hold = claimed_and_downloaded(runtime, store, origin)
    try:
        runtime.stopper.stop()
        outcome = finish_task(runtime, task, lease)
    finally:
        hold.__exit__(None, None, None)
    # The task goes back to the queue for another worker, its attempt given back
    assert outcome.next is Next.RETRY
    after = store.get(task.id)
    assert after.state.value == "queued" and after.attempts == 0 and receiver.deliveries == []


def test_an_error_after_the_announcement_never_fails_the_task(
    settings: Any, store: Any, origin: Origin, receiver: Receiver
) -> None:
    from actors.finalize import finish_task
    from actors.outcome import Next

    # Given a task whose receiver turns out to be refused only once its completion is being
    # announced (a policy change, a name that now resolves to a private address) ...
    strict = settings.replace(allow_private_networks=False, allow_hosts=frozenset({f"127.0.0.1:{origin.port}"}))
    other = Receiver("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    try:
        rt = runtime_for(strict, store)
        task, lease, hold = claimed_and_downloaded(rt, store, origin, webhook=other.url)
        try:
            outcome = finish_task(rt, task, lease)
        finally:
            hold.__exit__(None, None, None)
    finally:
        other.close()
    # ... it waits in finalizing like an outage (the receiver may hold an earlier delivery),
    # never failed: task.failed must not follow a task.completed of the same run
    assert outcome.next is Next.FINALIZE and outcome.delay_seconds > 0
    after = store.get(task.id)
    assert after.state.value == "finalizing" and after.announced, after
