"""``haul webhook listen``: a real receiver process verifies deliveries signed as haul's sender
signs them, prints one line per verified delivery and answers 204; a bad signature gets 401."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from actors.webhook import sign
from tests.conftest import WEBHOOK_SECRET
from tests.processes import REPO, base_env, wait_until
from tests.servers import free_port

OTHER_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    secret_file = tmp_path / "secret"
    secret_file.write_text(WEBHOOK_SECRET + "\n")
    port = free_port()
    out = tmp_path / "listen.out"
    with out.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "webhook", "listen", "--port", str(port), "--secret-file",
             str(secret_file)],
            cwd=REPO, env=base_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        wait_until(lambda: "receiving on" in out.read_text(), 15, "the listener to start")
        yield f"http://127.0.0.1:{port}/", out, process
    finally:
        process.terminate()
        process.wait(10)


def post(url: str, secret: str, event_id: str, body: Mapping[str, object]) -> int:
    text = json.dumps(body, separators=(",", ":"))
    now = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign([secret], event_id, datetime.fromtimestamp(now, tz=UTC), text),
    }
    return requests.post(url, data=text.encode(), headers=headers, timeout=5).status_code


def test_listen_prints_each_verified_delivery_and_refuses_a_bad_signature(
    listener: tuple[str, Path, subprocess.Popen[str]],
) -> None:
    url, out, process = listener
    event = {
        "type": "task.completed",
        "timestamp": "2026-01-01T00:00:00Z",
        "data": {
            "id": "t123",
            "name": "",
            "key": None,
            "error": None,
            "files": [{"path": "a/b.mp4"}, {"path": "c.srt"}],
        },
    }
    # When haul's signer signs a delivery with the listener's secret, it is accepted and printed
    assert post(url, WEBHOOK_SECRET, "t123.task.completed.0", event) == 204
    # When another secret signed it, it is refused and said so
    assert post(url, OTHER_SECRET, "t124.task.completed.0", event) == 401
    wait_until(lambda: "refused" in out.read_text(), 5, "the refusal to be printed")
    output = out.read_text()
    assert "task.completed  task t123  files: a/b.mp4, c.srt" in output, output
    assert "t124" in output and "Traceback" not in output, output
    assert process.poll() is None


def test_listen_without_any_secret_says_how_to_get_one(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "webhook", "listen", "--port", "0"],
        cwd=tmp_path, env=base_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "--secret-file" in result.stderr, result.stderr
