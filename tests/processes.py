"""Real haul processes for end-to-end and fault tests: workers, supervisors, the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent


def base_env(**haul: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAUL_")}
    env.update(haul)
    return env


def stack_env(tmp_path: Path, redis_url: str, webhook_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a test stack's processes: its Redis, folders, receiver, quick retries."""
    from tests.conftest import WEBHOOK_SECRET

    env = base_env(
        HAUL_REDIS_URL=redis_url,
        HAUL_STAGING_DIR=str(tmp_path / "staging"),
        HAUL_STORAGE_DIR=str(tmp_path / "storage"),
        HAUL_WEBHOOK_URL=webhook_url,
        HAUL_WEBHOOK_SECRET=WEBHOOK_SECRET,
        HAUL_ALLOW_PRIVATE_NETWORKS="1",
        HAUL_RETRY_MIN_SECONDS="0.1",
        HAUL_RETRY_MAX_SECONDS="0.5",
        HAUL_SUPERVISOR_PORT="0",
    )
    env.update(overrides)
    return env


class Process:
    """A child started in its own session, so the whole group (Dramatiq forks) can be killed."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self.log = log.open("ab")
        self.popen = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def kill(self) -> None:
        """SIGKILL every process of the group: what the OOM killer or a lost host does."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def terminate(self, timeout: float = 30) -> float:
        """SIGTERM the group leader as systemd does (KillMode=mixed); return seconds to exit."""
        started = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        finally:
            if self.popen.poll() is None:
                self.kill()
        return time.monotonic() - started

    def close(self) -> None:
        if self.popen.poll() is None:
            self.kill()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def haul_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``haul ARGS`` (the real CLI, in a process of its own) with this environment plus ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def worker(env: dict[str, str], log: Path, threads: int = 2) -> Process:
    """``haul worker`` with one process: Dramatiq under haul's prefetch setting."""
    return Process(
        [sys.executable, "-m", "supervisor.cli", "worker", "--processes", "1", "--threads", str(threads)], env, log
    )


def supervisor(env: dict[str, str], log: Path) -> Process:
    return Process([sys.executable, "-m", "supervisor"], env, log)


@contextmanager
def running(*processes: Process) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            process.close()


def health(port: int) -> dict[str, object] | None:
    try:
        response = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    except requests.RequestException:
        return None
    body: dict[str, object] = response.json()
    return body


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def drained(redis_url: str, timeout: float = 30.0) -> None:
    """Wait until every message sent so far to the workers on ``redis_url`` (delayed ones too)
    is handled and acknowledged, whichever process holds it: Dramatiq keeps a message in Redis
    until its ack. A check that nothing more happened is then deterministic, not a hope."""
    from actors.messages import QUEUES, redis_broker
    from actors.settings import Settings

    broker = redis_broker(Settings(redis_url=redis_url))
    try:
        for queue in QUEUES:
            broker.join(queue, timeout=int(timeout * 1000))
    finally:
        broker.close()


def submitted(env: dict[str, str], manifest: Path) -> str:
    """The task's id, once ``haul submit`` took the manifest: a page file is refused until a
    worker has said in the registry that it resolves pages."""
    deadline = time.monotonic() + 30
    while True:
        result = subprocess.run(
            [sys.executable, "-m", "supervisor.cli", "submit", "--manifest", str(manifest)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if result.returncode == 0:
            return result.stdout.strip().splitlines()[-1]
        assert time.monotonic() < deadline and "resolve" in result.stderr, result.stderr
        time.sleep(0.5)
