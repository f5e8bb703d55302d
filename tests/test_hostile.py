"""Hostile input end to end: private networks off, only the test origin and receiver
allowlisted, a real worker on real Redis. Every bad task ends with an error naming its cause,
a good task beside them completes, and nothing is written outside staging and storage."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.errors import InvalidTask
from actors.manifest import spec_from_manifest
from actors.settings import Settings
from actors.store import TaskStore
from actors.task import FileSpec, TaskSpec
from tests.conftest import in_process_worker, messages, submit_spec, wait_for
from tests.servers import Fault, Origin, Receiver, free_port

MIB = 1024 * 1024


@pytest.fixture
def strict(settings: Settings, origin: Origin, receiver: Receiver) -> Settings:
    return settings.replace(
        allow_private_networks=False,
        allow_hosts=frozenset({f"127.0.0.1:{origin.port}", f"127.0.0.1:{receiver.port}"}),
        max_attempts=3,
        max_file_bytes=4 * MIB,
        lowest_speed_bytes=200_000,
        lowest_speed_seconds=1,
    )


@pytest.fixture
def hostile(strict: Settings, store: TaskStore) -> Iterator[Settings]:
    with in_process_worker(strict, store, threads=6):
        yield strict


def submit(store: TaskStore, url: str, path: str = "v.mp4", **extra: Any) -> str:
    return submit_spec(spec_from_manifest({"files": [{"url": url, "path": path}], **extra}), store)


def test_hostile_destinations_content_and_limits(
    hostile: Any, store: TaskStore, origin: Origin, receiver: Receiver, tmp_path: Path
) -> None:
    port = origin.port
    good_data = os.urandom(2 * MIB)
    good = submit(store, origin.put("/good.mp4", good_data), path="good.mp4")
    origin.put("/v.mp4", b"video")
    origin.redirects["/to-metadata"] = "http://169.254.169.254/latest/meta-data/iam/"
    origin.redirects["/loop-a"] = "/loop-b"
    origin.redirects["/loop-b"] = "/loop-a"
    origin.put("/login.mp4", b"x")
    origin.fault("/login.mp4", Fault("html"))
    origin.put("/huge.mp4", os.urandom(5 * MIB))
    origin.put("/endless.mp4", os.urandom(5 * MIB))
    origin.fault("/endless.mp4", *[Fault("nolength")] * 2)
    short = os.urandom(3 * MIB)
    origin.put("/short.mp4", short)
    origin.fault("/short.mp4", Fault("drop", after=MIB))
    expected = {
        "metadata IP": ("http://169.254.169.254/latest/meta-data/", "failed", "169.254.169.254"),
        "loopback, other port": (f"http://127.0.0.1:{free_port()}/v.mp4", "failed", "not a public address"),
        "localhost": (f"http://localhost:{port}/v.mp4", "failed", "loopback (by name)"),
        "localhost.": (f"http://localhost.:{port}/v.mp4", "failed", "loopback (by name)"),
        "decimal": (f"http://2130706433:{port}/v.mp4", "failed", "127.0.0.1"),
        "hex": (f"http://0x7f.1:{port}/v.mp4", "failed", "127.0.0.1"),
        "octal": (f"http://0177.0.0.1:{port}/v.mp4", "failed", "127.0.0.1"),
        "ipv4-mapped ipv6": (f"http://[::ffff:127.0.0.1]:{port}/v.mp4", "failed", "not a public address"),
        "ipv6 loopback": (f"http://[::1]:{port}/v.mp4", "failed", "not a public address"),
        "redirect to metadata": (origin.url("/to-metadata"), "failed", "169.254.169.254"),
        "redirect loop": (origin.url("/loop-a"), "failed", "redirect loop"),
        "html for a video": (origin.url("/login.mp4"), "failed", "text/html"),
        "too large by header": (origin.url("/huge.mp4"), "failed", "above the limit"),
        "too large by stream": (origin.url("/endless.mp4"), "failed", "grew past the limit"),
        "short body resumes": (origin.url("/short.mp4"), "done", ""),
    }
    ids = {case: submit(store, url) for case, (url, _, _) in expected.items()}
    for case, (_, state, cause) in expected.items():
        task = wait_for(store, ids[case], timeout=30)
        assert task.state.value == state, (case, task.error)
        if state == "failed":
            assert cause in task.error and ids[case] in task.error, (case, task.error)
            assert task.attempts == 1, (case, task.attempts)
    assert origin.served["/short.mp4"] <= len(short) * 1.05
    assert wait_for(store, good).state.value == "done"
    assert (hostile.storage_dir / good / "good.mp4").read_bytes() == good_data
    assert not origin.requests_for("/latest/meta-data/iam/")
    assert_nothing_outside(tmp_path, hostile)


def test_a_trickling_origin_is_cut_and_retried(hostile: Any, store: TaskStore, origin: Origin) -> None:
    origin.rate = 30_000  # bytes a second, well below the 200,000 the settings demand
    task_id = submit(store, origin.put("/slow.mp4", os.urandom(MIB)))
    task = wait_for(store, task_id, timeout=30)
    assert task.state.value == "dead" and task.attempts == 3
    assert "below HAUL_LOWEST_SPEED_BYTES" in task.error


def test_a_task_larger_than_its_budget_fails_before_filling_the_disk(
    strict: Settings, store: TaskStore, origin: Origin
) -> None:
    files = [{"url": origin.put(f"/part{n}.mp4", os.urandom(3 * MIB)), "path": f"part{n}.mp4"} for n in (1, 2)]
    with in_process_worker(strict.replace(max_task_bytes=5 * MIB), store):
        task_id = submit_spec(spec_from_manifest({"files": files}), store)
        task = wait_for(store, task_id)
    assert task.state.value == "failed" and "HAUL_MAX_TASK_BYTES" in task.error
    # Refused on the second file's Content-Length, side by side or not: never past the budget
    parts = (strict.staging_dir / task_id / ".parts").glob("*.part")
    assert sum(p.stat().st_size for p in parts) <= 5 * MIB


def test_a_symlink_planted_in_the_sandbox_cannot_lead_outside(
    hostile: Any, store: TaskStore, origin: Origin, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    spec = spec_from_manifest({"files": [{"url": origin.put("/v.mp4", b"video"), "path": "sub/v.mp4"}]})
    task_id, _ = store.create(spec, now=0)
    files = hostile.staging_dir / task_id / "files"
    files.mkdir(parents=True)
    (files / "sub").symlink_to(outside)
    messages().claim(task_id)
    task = wait_for(store, task_id)
    assert task.state.value == "failed" and "outside" in task.error
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("path", "cause"),
    [
        ("../../etc/passwd", "'..'"),
        ("/etc/passwd", "absolute"),
        ("a/\x01b", "control"),
        ("nul", "reserved"),
        ("\u0436" * 130 + ".mp4", "264 bytes in UTF-8, longer than the 255 bytes"),
        ("a/\u202eb.mp4", "control"),
        ("a\x85b.mp4", "control"),
    ],
)
def test_unsafe_paths_are_refused_at_submit(store: TaskStore, path: str, cause: str) -> None:
    with pytest.raises(InvalidTask, match=cause) as info:
        spec_from_manifest({"files": [{"url": "https://cdn.example.com/v.mp4", "path": path}]})
    assert repr(path) in str(info.value)
    assert sum(store.counts().values()) == 0


@pytest.mark.parametrize(
    ("path", "cause"),
    [
        ("missing/../../../../escape.mp4", "has a '..' component"),
        ("\u0436" * 130 + ".mp4", "is too long for the filesystem"),
    ],
)
def test_a_spec_that_skipped_submit_validation_fails_at_once_inside_its_sandbox(
    hostile: Any, store: TaskStore, origin: Origin, tmp_path: Path, path: str, cause: str
) -> None:
    """A spec written to the store directly (no submit check): the sandbox is the last line."""
    spec = TaskSpec(files=(FileSpec(url=origin.put("/v.mp4", b"video"), path=path),))
    task_id, _ = store.create(spec, now=0)
    messages().claim(task_id)
    task = wait_for(store, task_id)
    assert task.state.value == "failed" and task.attempts == 1, task.error
    assert cause in task.error and task_id in task.error and repr(path) in task.error
    assert not (tmp_path / "escape.mp4").exists()
    assert_nothing_outside(tmp_path, hostile)


def assert_nothing_outside(root: Path, settings: Any) -> None:
    allowed = (settings.staging_dir, settings.storage_dir)
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            assert any(path.is_relative_to(a) for a in allowed), f"{path} written outside staging and storage"
