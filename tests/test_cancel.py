"""Cancel against a finishing task: a cancel wins until the first delivery of task.completed
starts, is refused from then on, and is announced as task.canceled. Real Redis, a real
in-process worker (or real worker processes), real origin and receiver on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from actors.manifest import spec_from_manifest, spec_from_urls
from actors.store import TaskStore
from tests.conftest import InProcessWorker, in_process_worker, messages, settle, wait_for
from tests.processes import haul_cli as haul
from tests.processes import running, wait_until
from tests.servers import Delivery, Origin, Receiver

MIB = 1024 * 1024


def accepted_ids(receiver: Receiver) -> list[str]:
    return [d.id for d in receiver.accepted()]


def new_task(store: TaskStore, origin: Origin, files: dict[str, bytes]) -> str:
    """A queued task with no claim message yet: the test decides when it runs."""
    entries = [{"url": origin.put(f"/{path}", data), "path": path} for path, data in files.items()]
    return store.create(spec_from_manifest({"files": entries}), now=time.time())[0]


@pytest.fixture
def memory_storage() -> Any:
    """Storage on tmpfs, another filesystem than staging: files are copied into it, which
    leaves a cancel time to land while they are stored."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm (tmpfs) on this machine")
    folder = Path(tempfile.mkdtemp(prefix="haul-test-storage-", dir="/dev/shm"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_cancel_while_the_files_are_stored_wins_and_a_retry_announces_the_new_run(
    settings: Any, store: TaskStore, origin: Origin, receiver: Receiver, memory_storage: Path
) -> None:
    files = {f"part-{n}.mp4": os.urandom(32 * MIB) for n in range(4)}
    task_id = new_task(store, origin, files)
    outcomes: list[str] = []
    stop = threading.Event()

    def cancel_once_finalizing() -> None:
        """What `haul cancel` does, the moment the download has ended."""
        while not stop.is_set():
            if store.client.hget(store.task_key(task_id), "state") == b"finalizing":
                outcomes.append(str(store.cancel(task_id, time.time())))
                messages().notify(task_id)
                return

    canceler = threading.Thread(target=cancel_once_finalizing, daemon=True)
    with in_process_worker(settings.replace(storage_dir=memory_storage), store) as running:
        canceler.start()
        messages().claim(task_id)
        try:
            assert wait_for(store, task_id).state.value == "canceled"
        finally:
            stop.set()
            canceler.join(10)  # its cancel landed before it recorded the answer: wait for that
        assert outcomes == ["ok"]  # the cancel landed while the task was finalizing
        wait_until(lambda: accepted_ids(receiver), 10, "task.canceled")
        settle(running)
        # The backend hears task.canceled, never task.completed, for run 0
        assert accepted_ids(receiver) == [f"{task_id}.task.canceled.0"]
        [canceled] = receiver.accepted()
        assert canceled.event["type"] == "task.canceled"
        assert canceled.event["data"]["error"] == "canceled by an operator"
        # A retry is a new run, announced under its own id
        assert haul("retry", task_id).returncode == 0
        assert wait_for(store, task_id, timeout=30).state.value == "done"
        wait_until(lambda: len(receiver.accepted()) == 2, 10, "task.completed")
    assert accepted_ids(receiver) == [f"{task_id}.task.canceled.0", f"{task_id}.task.completed.1"]
    for path, data in files.items():
        assert (memory_storage / task_id / path).read_bytes() == data


def test_a_cancel_once_the_completion_is_announced_is_refused(
    worker: InProcessWorker, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    task_id = new_task(store, origin, {"v.mp4": b"video"})
    answers: list[subprocess.CompletedProcess[str]] = []

    def cancel_during_delivery(delivery: Delivery) -> None:
        if not answers:
            answers.append(haul("cancel", task_id))  # the receiver has the event; it answers after this

    receiver.on_delivery = cancel_during_delivery
    messages().claim(task_id)
    assert wait_for(store, task_id, timeout=30).state.value == "done"
    [answer] = answers
    assert answer.returncode == 3 and "the completion is being announced" in answer.stderr, answer
    assert "canceled" not in answer.stdout
    settle(worker)
    assert accepted_ids(receiver) == [f"{task_id}.task.completed.0"]
    assert store.client.zcard(store.notify_key) == 0


def test_a_canceled_task_announces_task_canceled_never_task_failed(
    worker: InProcessWorker, store: TaskStore, receiver: Receiver
) -> None:
    task_id, _ = store.create(spec_from_urls(["https://cdn.example.com/v.mp4"], key="order-9"), now=time.time())
    result = haul("cancel", task_id)
    assert result.returncode == 0 and "canceled" in result.stdout, result
    wait_until(lambda: receiver.accepted(), 10, "task.canceled")
    settle(worker)
    [delivery] = receiver.accepted()
    assert delivery.id == f"{task_id}.task.canceled.0" and delivery.event["type"] == "task.canceled"
    assert delivery.event["data"]["key"] == "order-9"
    assert store.client.zcard(store.notify_key) == 0
    assert haul("cancel", task_id).returncode == 3  # already ended


@pytest.mark.e2e
def test_a_worker_killed_while_announcing_is_announced_again_never_dead(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    from tests.test_faults import Stack

    # Given a task on its only attempt whose worker dies once the receiver holds task.completed
    stack = Stack(tmp_path, receiver, HAUL_MAX_ATTEMPTS="1")
    try:
        first = stack.worker(threads=1)
        killed: list[float] = []

        def kill_first(delivery: Delivery) -> None:
            if not killed:
                first.kill()
                killed.append(time.monotonic())

        receiver.on_delivery = kill_first
        with running(first, stack.supervisor()):
            task_id = stack.submit(origin, {"lesson.mp4": b"lesson"})
            wait_until(lambda: bool(killed), 30, "the kill")
            # ... its lease runs out: it goes back to the queue, not to dead
            with running(stack.worker(threads=1)):
                task = wait_for(stack.store, task_id, timeout=60)
                time.sleep(1.0)
        assert task.state.value == "done", task.error
        # The same event again, under the same id; never task.failed for the same run
        assert {d.id for d in receiver.deliveries} == {f"{task_id}.task.completed.0"}
        assert len(receiver.deliveries) >= 2 and receiver.accepted()
        assert (stack.storage / task_id / "lesson.mp4").read_bytes() == b"lesson"
    finally:
        stack.close()
