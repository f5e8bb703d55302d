"""End to end with real processes: ``dramatiq actors.worker`` as the worker, ``haul submit`` as the
client, a real origin and a webhook receiver that verifies every signature."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.store import TaskStore
from tests.conftest import eventually_gone, wait_for
from tests.servers import Fault, Origin, Receiver

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def stack_env(tmp_path: Path, redis_url: str, receiver: Receiver) -> dict[str, str]:
    from tests.processes import stack_env as make

    return make(tmp_path, redis_url, receiver.url)


@pytest.fixture
def worker_process(stack_env: dict[str, str], store: TaskStore, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "actors.worker", "--processes", "1", "--threads", "2"],
        cwd=REPO,
        env=stack_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
    log.close()


def haul(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args], capture_output=True, text=True, env=env, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_submit_through_dramatiq_worker_process_to_storage_and_signed_webhook(
    worker_process: Any, stack_env: dict[str, str], store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    data = os.urandom(3 * 1024 * 1024)
    url = origin.put("/course/lesson-1.mp4", data)
    origin.fault("/course/lesson-1.mp4", Fault("status", code=503), Fault("drop", after=1024 * 1024))
    task_id = haul(stack_env, "submit", url, "--name", "Course 1", "--key", "order-e2e")
    assert haul(stack_env, "submit", url, "--name", "Course 1", "--key", "order-e2e") == task_id
    task = wait_for(store, task_id, timeout=60)
    assert task.state.value == "done", task.error
    assert task.attempts == 3
    assert (Path(stack_env["HAUL_STORAGE_DIR"]) / task_id / "lesson-1.mp4").read_bytes() == data
    [delivery] = receiver.accepted()
    assert delivery.verified and delivery.event["data"]["id"] == task_id
    assert origin.served["/course/lesson-1.mp4"] <= len(data) * 1.02
    assert eventually_gone(Path(stack_env["HAUL_STAGING_DIR"]) / task_id)


def test_worker_metrics_through_dramatiq_prometheus_middleware(
    stack_env: dict[str, str], store: TaskStore, origin: Origin, receiver: Receiver, tmp_path: Path
) -> None:
    import requests

    from tests.processes import Process, running, wait_until
    from tests.servers import free_port

    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "gauge_livesum_99999.db").write_bytes(b"left by a SIGKILLed process")
    env = {**stack_env, "HAUL_WORKER_METRICS_PORT": str(port), "HAUL_WORKER_METRICS_DIR": str(metrics_dir)}
    worker = Process(
        [sys.executable, "-m", "supervisor.cli", "worker", "--processes", "1", "--threads", "2"],
        env,
        tmp_path / "worker.log",
    )
    with running(worker):
        task_id = haul(env, "submit", origin.put("/m.mp4", b"media"))
        assert wait_for(store, task_id, timeout=60).state.value == "done"

        def scraped() -> str:
            try:
                return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.RequestException:
                return ""

        wait_until(lambda: 'dramatiq_messages_total{actor_name="claim"' in scraped(), 20, "worker metrics")
        text = scraped()
        assert 'dramatiq_messages_total{actor_name="claim",queue_name="claim"}' in text
        assert not (metrics_dir / "gauge_livesum_99999.db").exists()
        worker.terminate()


def test_haul_up_runs_a_whole_stack_and_stops_it(tmp_path: Path, origin: Origin) -> None:
    import redis as redis_lib

    from tests.processes import Process, base_env, health, running, wait_until
    from tests.servers import free_port

    redis_port, sup_port = free_port(), free_port()
    env = base_env(
        HAUL_HOME=str(tmp_path / "home"),
        HAUL_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        HAUL_SUPERVISOR_PORT=str(sup_port),
        HAUL_WORKER_PROCESSES="1",
    )
    stack = Process([sys.executable, "-m", "supervisor.cli", "up"], env, tmp_path / "up.log")
    with running(stack):
        wait_until(lambda: (health(sup_port) or {}).get("role") == "leader", 30, "the supervisor to lead")
        task_id = haul(env, "submit", origin.put("/first.mp4", b"first run"))
        store = TaskStore.from_url(env["HAUL_REDIS_URL"])
        assert wait_for(store, task_id, timeout=60).state.value == "done"
        assert (tmp_path / "home" / "storage" / task_id / "first.mp4").read_bytes() == b"first run"
        store.client.close()
        took = stack.terminate(timeout=40)
    assert took < 40 and stack.popen.returncode == 0, stack.output()
    assert (tmp_path / "home" / "redis" / "appendonlydir").is_dir()
    try:
        redis_lib.Redis(port=redis_port, socket_connect_timeout=0.5).ping()
        raise AssertionError("redis-server still running after haul up stopped")
    except redis_lib.ConnectionError:
        pass
