"""HAUL_LOG_FORMAT=json: every line a real worker, supervisor or ``haul up`` writes is one JSON
object, redacted as text lines are (no webhook secret, no URL query string)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import redis

from tests.conftest import WEBHOOK_SECRET
from tests.processes import REPO, base_env, running, stack_env, supervisor, wait_until, worker
from tests.servers import Origin, Receiver

#: A signed URL's query: as good as a password, it must never reach a log.
QUERY_SECRET = "X-Amz-Signature=querysecret0123456789"


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line of ``text`` as JSON; fails on the first one that is not an object with the keys."""
    lines = []
    for line in text.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n{text}") from None
        assert isinstance(parsed, dict) and {"time", "level", "logger", "message", "process", "thread"} <= set(parsed)
        assert str(parsed["time"]).endswith("+00:00"), parsed
        lines.append(parsed)
    return lines


def test_worker_and_supervisor_write_json_lines_without_secrets(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, origin: Origin, receiver: Receiver
) -> None:
    # Given a worker and a supervisor logging JSON
    env = stack_env(tmp_path, redis_url, receiver.url, HAUL_LOG_FORMAT="json", HAUL_SWEEP_SECONDS="0.2")
    workers = worker(env, tmp_path / "worker.log")
    sup = supervisor(env, tmp_path / "supervisor.log")
    with running(workers, sup):
        wait_until(lambda: redis_client.hlen("haul:workers") > 0, 20, "the worker to register")
        # When a task with a signed URL fails at its origin (404), which the worker logs
        url = origin.url("/missing.mp4") + "?" + QUERY_SECRET
        submitted = subprocess.run(
            [sys.executable, "-m", "supervisor.cli", "submit", url],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        task_id = submitted.stdout.split()[-1]
        wait_until(lambda: task_id in workers.output(), 20, "the worker to log the task")
        wait_until(lambda: "leader" in sup.output(), 20, "the supervisor to log")
        workers.terminate()
        sup.terminate()
    # Then every line of both is a JSON object, and neither secret is anywhere
    for process in (workers, sup):
        output = process.output()
        assert json_lines(output), output
        assert WEBHOOK_SECRET not in output and WEBHOOK_SECRET.removeprefix("whsec_") not in output
        assert QUERY_SECRET not in output and "querysecret" not in output, output
    messages = [line["message"] for line in json_lines(workers.output())]
    assert any("Dramatiq" in str(m) and "booting" in str(m) for m in messages), messages  # the main process too


def test_haul_up_writes_json_lines_too(tmp_path: Path) -> None:
    # Given HAUL_LOG_FORMAT=json and a worker metrics port that is taken
    with socket.create_server(("127.0.0.1", 0)) as taken:
        env = base_env(
            HAUL_LOG_FORMAT="json", HAUL_HOME=str(tmp_path / "home"), HAUL_SUPERVISOR_PORT="0",
            HAUL_WORKER_METRICS_PORT=str(taken.getsockname()[1]),
        )  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "supervisor.cli", "up"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    # Then haul up refuses, in JSON lines, and its last line says it stopped
    assert result.returncode == 2, result.stdout + result.stderr
    lines = json_lines(result.stdout + result.stderr)
    assert any("HAUL_WORKER_METRICS_PORT" in str(line["message"]) for line in lines), lines
    assert lines[-1]["message"] == "stopped" and lines[-1]["logger"] == "haul.up", lines
