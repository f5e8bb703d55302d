"""The whole pipeline in-process: a real Dramatiq worker on the real Redis broker, a real
origin and a real webhook receiver on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from actors.manifest import spec_from_manifest
from actors.settings import Settings
from actors.store import TaskStore
from tests.conftest import InProcessWorker, eventually_gone, messages, settle, submit_spec, wait_for
from tests.processes import wait_until
from tests.servers import Delivery, Fault, Origin, Receiver

MIB = 1024 * 1024


def submit(store: Any, origin: Origin, files: dict[str, bytes], **manifest: Any) -> str:
    entries = [{"url": origin.put(f"/{path}", data), "path": path} for path, data in files.items()]
    return submit_spec(spec_from_manifest({"files": entries, **manifest}), store)


def stored(settings: Settings, task_id: str, path: str) -> bytes:
    return (settings.storage_dir / task_id / path).read_bytes()


def test_a_course_is_downloaded_stored_and_announced(
    worker: Any, store: Any, origin: Origin, receiver: Receiver, settings: Any
) -> None:
    files = {"lesson-01/intro.mp4": os.urandom(3 * MIB), "lesson-02/part.mp4": os.urandom(MIB), "notes.pdf": b"pdf"}
    task_id = submit(store, origin, files, name="Course 12", key="order-1")
    task = wait_for(store, task_id)
    assert task.state.value == "done" and task.attempts == 1
    assert task.files_done == 3 and task.bytes_done == task.bytes_total == sum(map(len, files.values()))
    for path, data in files.items():
        assert stored(settings, task_id, path) == data
    [delivery] = receiver.accepted()
    event = delivery.event
    assert event["type"] == "task.completed" and event["data"]["id"] == task_id
    assert event["data"]["name"] == "Course 12" and event["data"]["key"] == "order-1"
    assert sorted(f["path"] for f in event["data"]["files"]) == sorted(files)
    assert eventually_gone(settings.staging_dir / task_id)


def test_a_dropped_connection_resumes_and_the_origin_serves_the_file_about_once(
    worker: Any, store: Any, origin: Origin, receiver: Receiver, settings: Any
) -> None:
    data = os.urandom(8 * MIB)
    origin.put("/big.mp4", data)
    origin.fault("/big.mp4", Fault("drop", after=5 * MIB))
    task_id = submit(store, origin, {"big.mp4": data})
    task = wait_for(store, task_id)
    assert task.state.value == "done" and task.attempts == 2
    assert stored(settings, task_id, "big.mp4") == data
    assert origin.served["/big.mp4"] <= len(data) * 1.02
    assert origin.requests_for("/big.mp4")[1].headers["Range"] == f"bytes={5 * MIB}-"
    # The stage metrics count what came over the network (the resumed bytes once) and what
    # went into storage, added to Redis by the worker's lease keeper at its next tick
    wait_until(lambda: store.stage_totals()["finalize"][0] == len(data), 5, "the finalize's bytes in the totals")
    totals = store.stage_totals()
    assert totals["download"][0] == origin.served["/big.mp4"]
    assert totals["download"][1] > 0 and totals["finalize"][1] > 0
    # ... and to the dashboard's minutes in the same ticks: the same bytes, minute by minute
    minutes = store.throughput(time.time())
    assert sum(m.download_bytes for m in minutes) == totals["download"][0]
    assert sum(m.finalize_bytes for m in minutes) == totals["finalize"][0]


def test_a_file_changed_between_attempts_ends_as_the_new_file(
    worker: Any, store: Any, origin: Origin, receiver: Receiver, settings: Any
) -> None:
    old, new = os.urandom(4 * MIB), os.urandom(4 * MIB)
    origin.put("/v.mp4", old)
    origin.fault("/v.mp4", Fault("drop", after=2 * MIB, then=lambda: origin.put("/v.mp4", new)))
    task_id = submit(store, origin, {"v.mp4": old})
    assert wait_for(store, task_id).state.value == "done"
    assert hashlib.sha256(stored(settings, task_id, "v.mp4")).digest() == hashlib.sha256(new).digest()


def test_a_404_fails_at_once_and_tells_the_backend(worker: Any, store: Any, origin: Origin, receiver: Receiver) -> None:
    spec = spec_from_manifest({"files": [{"url": origin.url("/gone.mp4"), "path": "gone.mp4"}], "key": "k404"})
    task_id = submit_spec(spec, store)
    task = wait_for(store, task_id)
    assert task.state.value == "failed" and task.attempts == 1
    assert "404" in task.error and origin.url("/gone.mp4") in task.error
    deadline = time.monotonic() + 10
    while not receiver.accepted() and time.monotonic() < deadline:
        time.sleep(0.02)
    [delivery] = receiver.accepted()
    assert delivery.event["type"] == "task.failed" and "404" in delivery.event["data"]["error"]
    deadline = time.monotonic() + 5  # the owed mark goes once the receiver's answer is read
    while store.client.zcard(store.notify_key) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.client.zcard(store.notify_key) == 0


def test_two_503s_then_success_is_done_after_three_attempts(
    worker: Any, store: Any, origin: Origin, receiver: Receiver, settings: Any
) -> None:
    origin.put("/v.mp4", b"video")
    origin.fault("/v.mp4", Fault("status", code=503), Fault("status", code=503))
    task_id = submit(store, origin, {"v.mp4": b"video"})
    task = wait_for(store, task_id)
    assert task.state.value == "done" and task.attempts == 3
    assert stored(settings, task_id, "v.mp4") == b"video"


def test_transient_errors_end_dead_after_max_attempts(
    worker: Any, store: Any, origin: Origin, receiver: Receiver
) -> None:
    origin.put("/v.mp4", b"video")
    origin.fault("/v.mp4", *[Fault("status", code=500)] * 10)
    task_id = submit(store, origin, {"v.mp4": b"video"})
    task = wait_for(store, task_id)
    assert task.state.value == "dead" and task.attempts == 5 and "500" in task.error
    deadline = time.monotonic() + 10
    while not receiver.accepted() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [d.event["type"] for d in receiver.accepted()] == ["task.failed"]


def test_duplicate_messages_download_once(
    worker: InProcessWorker, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    data = os.urandom(2 * MIB)
    task_id = submit(store, origin, {"v.mp4": data})
    for _ in range(3):
        messages().claim(task_id)  # Dramatiq is at-least-once: the same message may come again
    assert wait_for(store, task_id).state.value == "done"
    messages().claim(task_id)
    settle(worker)
    assert len(origin.requests_for("/v.mp4")) == 1
    assert origin.served["/v.mp4"] == len(data)
    again = store.get(task_id)
    assert len(receiver.accepted()) == 1 and again is not None and again.attempts == 1


def test_a_webhook_answering_500_twice_is_retried_with_the_same_id_and_staging_kept(
    worker: Any, store: Any, origin: Origin, receiver: Receiver, settings: Any
) -> None:
    receiver.statuses.extend([500, 500])
    seen: list[tuple[str, bool, bool]] = []

    def check(delivery: Delivery) -> None:
        task_id = delivery.event["data"]["id"]
        staged = (settings.staging_dir / task_id / "files" / "v.mp4").exists()
        in_storage = (settings.storage_dir / task_id / "v.mp4").exists()
        seen.append((delivery.id, staged, in_storage))

    receiver.on_delivery = check
    task_id = submit(store, origin, {"v.mp4": b"video"})
    assert wait_for(store, task_id).state.value == "done"
    assert [answer.answered for answer in receiver.deliveries] == [500, 500, 204]
    assert len({event_id for event_id, _, _ in seen}) == 1
    assert all(staged and in_storage for _, staged, in_storage in seen)
    assert eventually_gone(settings.staging_dir / task_id)


def test_a_webhook_outage_keeps_the_task_out_of_done_until_delivered(
    worker: Any, store: Any, origin: Origin, receiver: Receiver, settings: Any
) -> None:
    receiver.statuses.extend([503] * 12)  # more than two runs' quick retries
    task_id = submit(store, origin, {"v.mp4": b"video"})
    task = wait_for(store, task_id)
    # The outage cost no download attempt: the finished task waited in finalizing
    assert task.state.value == "done" and task.attempts == 1
    assert [d.answered for d in receiver.deliveries][-1] == 204
    assert len({d.id for d in receiver.deliveries}) == 1
    assert stored(settings, task_id, "v.mp4") == b"video"


def test_a_bad_task_does_not_stop_its_neighbours(
    worker: Any, store: Any, origin: Origin, receiver: Receiver, settings: Any
) -> None:
    good = submit(store, origin, {"good.mp4": b"good"})
    bad = submit_spec(spec_from_manifest({"files": [{"url": origin.url("/nope"), "path": "nope"}]}), store)
    assert wait_for(store, bad).state.value == "failed"
    assert wait_for(store, good).state.value == "done"
    assert stored(settings, good, "good.mp4") == b"good"
    assert (settings.staging_dir / bad).exists()  # kept for inspection


def test_a_receiver_down_past_the_give_up_time_ends_the_task_dead(
    settings: Any, store: Any, origin: Origin, receiver: Receiver
) -> None:
    from tests.conftest import in_process_worker

    receiver.statuses.extend([503] * 1000)
    with in_process_worker(settings.replace(finalize_give_up_seconds=1.0), store):
        task_id = submit(store, origin, {"v.mp4": b"video"})
        task = wait_for(store, task_id)
    assert task.state.value == "dead" and task.attempts == 1
    assert "HAUL_FINALIZE_GIVE_UP_SECONDS" in task.error and "503" in task.error
    # The files stay where the outage found them: stored, and still staged for inspection
    assert stored(settings, task_id, "v.mp4") == b"video"


def test_a_task_whose_spec_record_is_lost_is_not_run(runtime: Any, store: Any, caplog: Any) -> None:
    from actors.manifest import spec_from_urls
    from actors.outcome import NOTHING
    from actors.stages import run_task

    task_id, _ = store.create(spec_from_urls(["https://cdn.example.com/v.mp4"]), now=time.time())
    store.client.delete(store.spec_key(task_id))
    # Claimed (so its lease runs out and the supervisor ends it), but nothing is fetched
    assert run_task(runtime, task_id) == NOTHING
    assert "spec record is missing" in caplog.text
    assert store.client.hget(store.task_key(task_id), "state") == b"downloading"
    assert not (runtime.settings.staging_dir / task_id).exists()
