"""What the backend is told when a task ends (issue 12): a final error that never promises a
retry, machine-readable fields in task.failed, and a sha256 for every file in task.completed.
A real Dramatiq worker on the real Redis broker, a real origin and a real receiver."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import pytest

from actors.errors import (
    ChecksumMismatch,
    ForbiddenDestination,
    OriginRejected,
    OriginUnavailable,
    StorageUnavailable,
    TooLarge,
    TransientError,
    UnexpectedContent,
    UnsafePath,
)
from actors.manifest import spec_from_manifest
from actors.redact import display_url
from actors.settings import Settings, SettingsError
from tests.conftest import in_process_worker, submit_spec, wait_for
from tests.servers import Delivery, Fault, Origin, Receiver

MIB = 1024 * 1024


def submit(store: Any, files: list[tuple[str, str]]) -> str:
    return submit_spec(spec_from_manifest({"files": [{"url": u, "path": p} for u, p in files]}), store)


def deliveries(receiver: Receiver, kind: str, count: int = 1, timeout: float = 10.0) -> list[Delivery]:
    deadline = time.monotonic() + timeout
    while len([d for d in receiver.accepted() if d.event["type"] == kind]) < count:
        assert time.monotonic() < deadline, f"no {kind} accepted in {timeout}s: {receiver.received()}"
        time.sleep(0.02)
    return [d for d in receiver.accepted() if d.event["type"] == kind]


def test_every_error_class_has_a_code_and_origin_rejections_carry_their_status() -> None:
    assert OriginRejected("gone", status=404).code == "origin_404"
    assert OriginRejected("gone", status=410).code == "origin_410"
    assert OriginUnavailable("busy").code == "origin_unavailable"
    assert OriginUnavailable("slow", code="timeout").code == "timeout"
    assert StorageUnavailable("full").code == "storage"
    assert TransientError("?").code == "attempts_exhausted"
    codes = {cls("x").code for cls in (TooLarge, UnexpectedContent, ChecksumMismatch, ForbiddenDestination, UnsafePath)}
    assert codes == {"too_large", "unexpected_content", "checksum", "forbidden_destination", "invalid_path"}


def test_haul_hash_is_sha256_by_default_and_refuses_unknown_values() -> None:
    assert Settings.from_env({}).file_hash == "sha256"
    assert Settings.from_env({"HAUL_HASH": "none"}).file_hash == "none"
    with pytest.raises(SettingsError, match="HAUL_HASH"):
        Settings.from_env({"HAUL_HASH": "md5"})


def test_a_dead_task_says_its_attempts_are_used_and_task_failed_says_why_in_fields(
    worker: Any, store: Any, origin: Origin, receiver: Receiver
) -> None:
    # Given an origin that answers 503 to every request of the second file
    ok = origin.put("/a.mp4", b"first")
    busy = origin.put("/b.mp4", b"second")
    origin.fault("/b.mp4", *[Fault("status", code=503)] * 10)
    # When the task has used its 5 attempts
    task_id = submit(store, [(ok, "a.mp4"), (busy + "?token=s3cret", "b.mp4")])
    task = wait_for(store, task_id)
    # Then its error says what happened and that the attempts are used, never "will retry"
    assert task.state.value == "dead" and task.attempts == 5
    assert "503" in task.error and task.error.endswith("; all 5 attempts are used")
    assert "will retry" not in task.error
    record = store.client.hgetall(store.task_key(task_id))
    assert (record[b"error_code"], record[b"error_file"]) == (b"origin_unavailable", b"b.mp4")
    # And task.failed carries the same, plus fields a backend decides on without parsing prose
    [delivery] = deliveries(receiver, "task.failed")
    data = delivery.event["data"]
    assert data["error"] == task.error
    assert (data["state"], data["error_code"], data["attempts"]) == ("dead", "origin_unavailable", 5)
    assert data["error_file"] == {"path": "b.mp4", "url": display_url(busy + "?token=s3cret")}
    assert b"s3cret" not in delivery.body  # signed URLs are secrets


def test_a_404_fails_with_its_code_file_and_url_and_every_try_sends_the_same_body(
    worker: Any, store: Any, origin: Origin, receiver: Receiver
) -> None:
    # Given a receiver that refuses the first try of the notice
    receiver.statuses.extend([500])
    ok = origin.put("/a.mp4", b"first")
    gone = origin.url("/gone.mp4")
    task_id = submit(store, [(ok, "a.mp4"), (gone, "lesson/gone.mp4")])
    task = wait_for(store, task_id)
    assert task.state.value == "failed" and task.attempts == 1 and "will retry" not in task.error
    # When the second try is accepted
    [accepted] = deliveries(receiver, "task.failed")
    # Then both tries carried one id and one body (the receiver dedupes on the id)
    tries = [d for d in receiver.received() if d.event["type"] == "task.failed"]
    assert len(tries) == 2 and tries[0].answered == 500
    assert {d.id for d in tries} == {accepted.id} and {d.body for d in tries} == {accepted.body}
    data = accepted.event["data"]
    assert (data["state"], data["error_code"], data["attempts"]) == ("failed", "origin_404", 1)
    assert data["error_file"] == {"path": "lesson/gone.mp4", "url": gone}


def test_an_origin_that_never_answers_in_time_ends_dead_with_code_timeout(
    settings: Any, store: Any, origin: Origin, receiver: Receiver
) -> None:
    url = origin.put("/v.mp4", b"video")
    origin.fault("/v.mp4", *[Fault("slow_headers", seconds=1.0)] * 3)
    quick = settings.replace(read_timeout_seconds=0.3, max_attempts=2)
    with in_process_worker(quick, store):
        task_id = submit(store, [(url, "v.mp4")])
        task = wait_for(store, task_id)
        assert task.state.value == "dead" and task.error.endswith("; all 2 attempts are used")
        [delivery] = deliveries(receiver, "task.failed")
    data = delivery.event["data"]
    assert (data["state"], data["error_code"], data["attempts"]) == ("dead", "timeout", 2)


@pytest.mark.parametrize("file_hash", ["sha256", "none"])
def test_task_completed_carries_every_files_sha256_unless_haul_hash_is_none(
    settings: Any, store: Any, origin: Origin, receiver: Receiver, file_hash: str
) -> None:
    # Given a file without a sha256 in the task whose first transfer is cut (so it resumes),
    # and one whose sha256 the task gives
    cut, given = os.urandom(3 * MIB), b"given"
    origin.fault("/cut.mp4", Fault("drop", after=MIB + 7))
    files = [(origin.put("/cut.mp4", cut), "cut.mp4")]
    spec = spec_from_manifest(
        {"files": [{"url": u, "path": p} for u, p in files]
         + [{"url": origin.put("/given.mp4", given), "path": "given.mp4",
             "sha256": hashlib.sha256(given).hexdigest()}]}
    )  # fmt: skip
    with in_process_worker(settings.replace(file_hash=file_hash), store):
        task_id = submit_spec(spec, store)
        assert wait_for(store, task_id).state.value == "done"
        [delivery] = deliveries(receiver, "task.completed")
    sums = {f["path"]: f.get("sha256") for f in delivery.event["data"]["files"]}
    assert origin.requests_for("/cut.mp4")[1].headers["Range"] == f"bytes={MIB + 7}-"
    expected_cut = hashlib.sha256(cut).hexdigest() if file_hash == "sha256" else None
    assert sums == {"cut.mp4": expected_cut, "given.mp4": hashlib.sha256(given).hexdigest()}


def test_a_task_whose_completion_cannot_be_signed_fails_at_claim_before_any_byte(
    settings: Any, store: Any, origin: Origin, receiver: Receiver
) -> None:
    # Given workers without a signing secret, and a task naming its own receiver ...
    unsigned = settings.replace(webhook_url=None, webhook_secrets=())
    url = origin.put("/course.mp4", os.urandom(4096))
    spec = spec_from_manifest({"webhook": receiver.url, "files": [{"url": url, "path": "course.mp4"}]})
    with in_process_worker(unsigned, store, threads=1):
        task = wait_for(store, submit_spec(spec, store), timeout=20)
    # ... it fails at once, saying what to set, and the origin is never asked for a byte
    assert task.state.value == "failed" and task.error_code == "no_webhook_secret", task
    assert "HAUL_WEBHOOK_SECRET" in task.error and task.attempts == 1
    assert origin.requests_for("/course.mp4") == []
