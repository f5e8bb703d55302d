"""Storage faults with real worker processes: a worker SIGKILLed in the middle of a large
upload into a bucket, and the service going away for a while."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from actors.states import State
from tests.conftest import wait_for
from tests.processes import running, wait_until
from tests.s3server import S3Server
from tests.sentry_sink import SentrySink
from tests.servers import CountingProxy, Origin, Receiver
from tests.test_faults import Stack

MIB = 1024 * 1024
PART = 8 * MIB


@pytest.mark.e2e
def test_a_worker_killed_mid_upload_is_followed_by_one_that_sends_only_the_missing_parts(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    s3 = S3Server(tmp_path / "s3")
    s3.start()
    proxy = CountingProxy(s3.port)
    size = 400 * MIB
    data = os.urandom(size)
    env = {**s3.env(), "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{proxy.port}", "HAUL_S3_PART_BYTES": str(PART),
           "HAUL_S3_CONCURRENCY": "2"}  # fmt: skip
    stack = Stack(tmp_path, receiver, **env)
    del stack.env["HAUL_STORAGE_DIR"]  # the bucket instead (both set is refused)
    client = s3.client()
    parts = -(-size // PART)
    try:
        first = stack.worker(threads=1)
        with running(first, stack.supervisor()):
            task_id = stack.submit(origin, {"course.mp4": data})
            key = f"{stack.store.prefix}uploads:{task_id}"
            # Given the upload under way, killed with about 60% of its parts on the service
            wait_until(lambda: stack.store.client.hget(key, "0") is not None, 120, "the upload to start")
            upload = json.loads(stack.store.client.hget(key, "0") or b"{}")["upload_id"]

            def uploaded() -> int:
                listed = client.list_parts(Bucket="media", Key=f"{task_id}/course.mp4", UploadId=upload)
                return len(listed.get("Parts", []))

            wait_until(lambda: uploaded() >= parts * 0.6, 120, "60% of the parts")
            first.kill()
            at_kill, sent_at_kill = uploaded(), proxy.sent
            # When another worker takes the task over
            with running(stack.worker(threads=1)):
                task = wait_for(stack.store, task_id, timeout=120)
        # Then the file is whole, and the service received the file once, plus at most the
        # parts that were in flight at the kill (two at a time), plus requests' headers
        assert task.state is State.DONE, task.error
        stored = client.get_object(Bucket="media", Key=f"{task_id}/course.mp4")["Body"].read()
        assert stored == data
        assert proxy.sent <= size + 2 * PART + size // 100, (proxy.sent, size, at_kill, sent_at_kill)
        assert 0.55 * parts <= at_kill < parts
        [delivery] = [d for d in receiver.accepted() if d.event["type"] == "task.completed"]
        assert delivery.event["data"]["files"][0]["verified"] == "etag"
    finally:
        stack.close()
        proxy.close()
        s3.stop()


@pytest.mark.e2e
def test_a_service_away_for_a_while_keeps_the_task_waiting_then_done(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    s3 = S3Server(tmp_path / "s3")
    s3.start()
    stack = Stack(tmp_path, receiver, **s3.env(), HAUL_READ_TIMEOUT_SECONDS="2")
    del stack.env["HAUL_STORAGE_DIR"]

    def stuck() -> bool:
        task = stack.store.get(task_id)
        return task is not None and bool(task.error)

    try:
        with running(stack.worker(), stack.supervisor()):
            # Given the service stopped (SIGSTOP: it accepts connections and answers nothing)
            s3.pause()
            task_id = stack.submit(origin, {"v.mp4": os.urandom(2 * MIB)})
            wait_until(stuck, 60, "the first storage error")
            task = stack.store.get(task_id)
            assert task is not None and task.state is State.FINALIZING and task.resting == "outage", task
            assert f"s3://media/{task_id}/v.mp4" in task.error, task.error  # which file, where
            # When it comes back after a while, the task completes on its first attempt
            time.sleep(8)
            s3.resume()
            done = wait_for(stack.store, task_id, timeout=120)
        assert done.state is State.DONE and done.attempts == 1, done.error
        assert s3.client().get_object(Bucket="media", Key=f"{task_id}/v.mp4")["ContentLength"] == 2 * MIB
    finally:
        stack.close()
        s3.resume()
        s3.stop()


@pytest.mark.e2e
def test_a_wrong_secret_is_said_at_start_and_a_file_that_never_stores_is_reported_to_sentry(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    s3, sink = S3Server(tmp_path / "s3"), SentrySink()
    s3.start()
    stack = Stack(tmp_path, receiver, **{**s3.env("shop"), "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
                  HAUL_SENTRY_DSN=sink.dsn, HAUL_FINALIZE_GIVE_UP_SECONDS="2")  # fmt: skip
    del stack.env["HAUL_STORAGE_DIR"]
    try:
        worker = stack.worker()
        with running(worker):
            # The worker says so when it starts, before any task runs
            wait_until(lambda: "storage: HAUL_STORAGE_URL=s3://media/shop" in worker.output(), 30, "the probe's error")
            assert "SignatureDoesNotMatch" in worker.output()
            # A task run anyway waits in finalizing, then ends dead past the give-up time
            task_id = stack.submit(origin, {"lesson-1/intro.mp4": b"video"})
            task = wait_for(stack.store, task_id, {"dead"}, timeout=60)
            wait_until(lambda: any(task_id in json.dumps(e) for e in sink.events()), 15, "the dead task's event")
        # The Sentry event names the task, the file, the bucket and the service's error code
        event = next(e for e in sink.events() if task_id in json.dumps(e))
        tags = dict(event["tags"]) if isinstance(event["tags"], dict) else dict(event["tags"])
        assert tags["task_id"] == task_id and tags["stage"] == "finalizing"
        assert tags["file"] == "lesson-1/intro.mp4" and tags["storage"] == "s3://media/shop"
        assert tags["error_code"] == "s3_signaturedoesnotmatch" == task.error_code
        # The secret is in no log line, no Sentry envelope, no task record
        assert "not-the-secret" not in worker.output() and b"not-the-secret" not in sink.all_bytes()
        assert "not-the-secret" not in task.error
    finally:
        stack.close()
        s3.stop()
        sink.close()
