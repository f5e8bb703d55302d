"""Fault tests with real processes: SIGKILL and SIGTERM a worker mid-download, kill the leading
supervisor. Worker processes are real ``dramatiq actors.worker``; the origin is throttled so that a
download is still running when the fault hits."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from actors.store import TaskStore
from tests import processes
from tests.conftest import wait_for
from tests.processes import running, wait_until
from tests.servers import Origin, Receiver, free_port

pytestmark = pytest.mark.e2e
MIB = 1024 * 1024


@pytest.fixture
def env(tmp_path: Path, redis_url: str, receiver: Receiver) -> dict[str, str]:
    return processes.stack_env(tmp_path, redis_url, receiver.url, HAUL_LEASE_SECONDS="3", HAUL_SWEEP_SECONDS="0.5")


def submit(env: dict[str, str], url: str) -> str:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "submit", url], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def downloading(store: TaskStore, task_id: str, at_least: int) -> Any:
    def check() -> bool:
        task = store.get(task_id)
        return task is not None and task.state.value == "downloading" and task.bytes_done >= at_least

    return check


def test_sigkill_mid_download_resumes_on_another_worker_through_the_supervisor(
    env: dict[str, str], store: TaskStore, origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(12 * MIB)
    origin.rate = 6 * MIB
    url = origin.put("/course.mp4", data)
    first = processes.worker(env, tmp_path / "w1.log")
    sup = processes.supervisor(env, tmp_path / "sup.log")
    with running(first, sup):
        task_id = submit(env, url)
        wait_until(downloading(store, task_id, 4 * MIB), 30, "the download to pass 4 MiB")
        # When the worker's whole process group is SIGKILLed mid-download ...
        first.kill()
        killed_at = time.monotonic()
        second = processes.worker(env, tmp_path / "w2.log")
        with running(second):
            # ... the supervisor requeues after the lease, and the second worker resumes
            task = wait_for(store, task_id, timeout=60)
            recovery = time.monotonic() - killed_at
    assert task.state.value == "done", task.error
    assert task.attempts == 2
    stored = Path(env["HAUL_STORAGE_DIR"]) / task_id / "course.mp4"
    assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert origin.served["/course.mp4"] <= len(data) * 1.15, origin.served
    assert len(origin.requests_for("/course.mp4")) == 2
    assert "Range" in origin.requests_for("/course.mp4")[1].headers
    print(f"recovery after SIGKILL: {recovery:.1f}s to done (lease 3s, sweep 0.5s)")


def test_sigterm_mid_download_exits_fast_and_the_task_resumes_elsewhere(
    env: dict[str, str], store: TaskStore, origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(12 * MIB)
    origin.rate = 4 * MIB
    url = origin.put("/course.mp4", data)
    first = processes.worker(env, tmp_path / "w1.log")
    with running(first):
        task_id = submit(env, url)
        wait_until(downloading(store, task_id, 2 * MIB), 30, "the download to pass 2 MiB")
        second = processes.worker(env, tmp_path / "w2.log")
        with running(second):
            took = first.terminate(timeout=30)
            # Handed back at once: no lease expiry needed, and the attempt is given back
            task = wait_for(store, task_id, timeout=60)
    assert took < 10, f"worker took {took:.1f}s to stop"
    assert task.state.value == "done", task.error
    assert task.attempts == 1
    stored = Path(env["HAUL_STORAGE_DIR"]) / task_id / "course.mp4"
    assert stored.read_bytes() == data
    assert origin.served["/course.mp4"] <= len(data) * 1.15
    assert "handing the task back" in first.output() or "handed back" in first.output()


def test_two_supervisors_one_sweeps_and_the_standby_takes_over(
    env: dict[str, str], store: TaskStore, tmp_path: Path
) -> None:
    ports = [free_port(), free_port()]
    sups = [
        processes.supervisor({**env, "HAUL_SUPERVISOR_PORT": str(port)}, tmp_path / f"sup{i}.log")
        for i, port in enumerate(ports)
    ]
    with running(*sups):
        wait_until(lambda: all(processes.health(p) for p in ports), 30, "both supervisors to answer")
        roles = {port: str((processes.health(port) or {}).get("role")) for port in ports}
        assert sorted(roles.values()) == ["leader", "standby"]
        leader = next(i for i, port in enumerate(ports) if roles[port] == "leader")
        standby_port = ports[1 - leader]
        sups[leader].kill()
        killed = time.monotonic()
        wait_until(lambda: (processes.health(standby_port) or {}).get("role") == "leader", 10, "the takeover")
        takeover = time.monotonic() - killed
    assert takeover <= 3 * 0.5 + 1.0, takeover
