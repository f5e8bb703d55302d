"""The ``haul`` command as scripts use it: exit codes, output shapes, nothing enqueued on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from actors.states import State
from actors.store import TaskStore
from tests.processes import haul_cli as haul


def queued_messages(client: redis.Redis) -> int:
    return sum(int(client.llen(key)) for key in client.keys("dramatiq:*") if client.type(key) == b"list")


def test_the_console_script_is_installed() -> None:
    assert (Path(sys.executable).parent / "haul").exists()


def test_submit_prints_the_id_last_and_the_same_key_gives_the_same_task(store: TaskStore) -> None:
    first = haul("submit", "https://cdn.example.com/a.mp4", "--name", "A", "--key", "order-5")
    assert first.returncode == 0, first.stderr
    task_id = first.stdout.strip().splitlines()[-1]
    again = haul("submit", "https://cdn.example.com/a.mp4", "--name", "A", "--key", "order-5")
    assert again.stdout.strip().splitlines()[-1] == task_id
    status = json.loads(haul("status", task_id, "--json").stdout)
    fields = {"id", "name", "state", "attempts", "files_total", "files_done", "bytes_total", "bytes_done", "error"}
    assert fields <= set(status)
    assert status["id"] == task_id and status["state"] == "queued" and status["name"] == "A"
    counts = json.loads(haul("status", "--json").stdout)
    assert counts["queued"] == 1 and counts["done"] == 0
    assert "queued" in haul("status", task_id).stdout


def test_submit_from_a_manifest(store: TaskStore, tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    files = [{"url": "https://x.example/1.mp4", "path": "a/1.mp4", "size": 3}]
    manifest.write_text(json.dumps({"name": "C", "key": "k", "files": files}))
    result = haul("submit", "--manifest", str(manifest))
    task = store.get(result.stdout.strip().splitlines()[-1])
    assert task is not None and task.spec.files[0].path == "a/1.mp4" and task.bytes_total == 3


@pytest.mark.parametrize(
    ("args", "content", "message"),
    [
        ((), None, "nothing to download"),
        (("ftp://example.com/a",), None, "not an http"),
        (("--manifest", "{m}"), "{not json", "not valid JSON"),
        (("--manifest", "{m}"), json.dumps({"files": []}), "non-empty list"),
        (("--manifest", "{m}"), json.dumps({"files": [{"url": "https://x/a", "path": "../../etc/passwd"}]}), "'..'"),
        (
            ("--manifest", "{m}"),
            json.dumps({"files": [{"url": "https://x/a", "path": "a"}, {"url": "https://x/b", "path": "a"}]}),
            "unique",
        ),
        (("--manifest", "{missing}"), None, "cannot be read"),
    ],
)
def test_bad_input_exits_2_and_enqueues_nothing(
    store: TaskStore, tmp_path: Path, args: tuple[str, ...], content: str | None, message: str
) -> None:
    path = tmp_path / "m.json"
    if content is not None:
        path.write_text(content)
    argv = [a.format(m=path, missing=tmp_path / "missing.json") for a in args]
    result = haul("submit", *argv)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""
    assert sum(store.counts().values()) == 0 and queued_messages(store.client) == 0


def test_invalid_settings_exit_2_naming_the_variable() -> None:
    result = haul("status", env={"HAUL_LEASE_SECONDS": "-3"})
    assert result.returncode == 2 and "HAUL_LEASE_SECONDS" in result.stderr


def test_unknown_task_and_unreachable_redis_exit_1(store: TaskStore) -> None:
    assert haul("status", "0" * 32).returncode == 1
    from tests.servers import free_port

    result = haul("status", env={"HAUL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert result.returncode == 1 and "redis-server" in result.stderr


def queued_actors(client: redis.Redis) -> list[str]:
    """Actor names of the messages waiting in Dramatiq's queues."""
    return [json.loads(body)["actor_name"] for key in client.keys("dramatiq:*.msgs") for body in client.hvals(key)]


def test_cancel_then_retry_and_list_by_state(store: TaskStore) -> None:
    task_id = haul("submit", "https://cdn.example.com/a.mp4").stdout.strip()
    cancel = haul("cancel", task_id)
    assert cancel.returncode == 0 and f"task {task_id}: canceled" in cancel.stdout
    assert queued_actors(store.client).count("notify") == 1  # task.canceled goes out
    again = haul("cancel", task_id)
    assert again.returncode == 3 and "already ended" in again.stderr
    listed: list[dict[str, Any]] = json.loads(haul("status", "--state", "canceled", "--json").stdout)
    assert [row["id"] for row in listed] == [task_id]
    assert haul("retry", task_id).returncode == 0
    task = store.get(task_id)
    assert task is not None and task.state.value == "queued"
    assert haul("retry", task_id).returncode == 3  # queued: has not ended


def test_new_webhook_secret_is_usable() -> None:
    from actors.settings import Settings

    secret = haul("webhook", "new-secret").stdout.strip()
    assert Settings.from_env({"HAUL_WEBHOOK_SECRET": secret}).webhook_secrets == (secret,)


def test_retry_of_a_done_task_says_it_is_done(store: TaskStore) -> None:
    task_id = haul("submit", "https://cdn.example.com/a.mp4").stdout.strip()
    claim = store.claim(task_id, worker="w", now=1.0, lease_seconds=30, max_attempts=3, start=State.DOWNLOADING)
    store.finish_download(task_id, claim.token, now=2.0, lease_seconds=30, progress=(1, 1, 1), finalize_limit=0)
    store.release(task_id, claim.token, State.DONE, now=2.0, max_attempts=3)
    result = haul("retry", task_id)
    assert result.returncode == 3 and "is done" in result.stderr and "has not ended" not in result.stderr


def test_a_bad_webhook_option_is_reported_as_the_option() -> None:
    result = haul("submit", "https://cdn.example.com/a.mp4", "--webhook", "notaurl")
    assert result.returncode == 2 and "--webhook" in result.stderr and "manifest" not in result.stderr


def test_submit_reads_a_manifest_from_standard_input(store: TaskStore) -> None:
    files = [{"url": "https://x.example/1.pdf", "path": "a/1.pdf"}]
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "submit", "--manifest", "-"],
        input=json.dumps({"name": "C", "files": files}), capture_output=True, text=True, env=dict(os.environ),
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    task = store.get(result.stdout.strip().splitlines()[-1])
    assert task is not None and task.spec.files[0].path == "a/1.pdf"


def test_submit_takes_accept_options(store: TaskStore) -> None:
    result = haul("submit", "https://cdn.example.com/a", "--accept", "text/plain", "--accept", "Application/JSON")
    assert result.returncode == 0, result.stderr
    task = store.get(result.stdout.strip())
    assert task is not None and task.spec.accept == ("text/plain", "application/json")
    bad = haul("submit", "https://cdn.example.com/a", "--accept", "pdf")
    assert bad.returncode == 2 and "--accept" in bad.stderr
