"""A Node.js client of the HTTP API (issue 15): Node's fetch submits twice under one key, and
the `eventsource` package follows the task with a watch token to task.completed, reconnecting
mid-stream with Last-Event-ID. Real processes throughout: node, ``haul api``, a worker."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from actors.events import EventLog
from actors.store import TaskStore
from supervisor.api.sse import task_sse_id
from tests.apiserver import FULL, api_env, start_api
from tests.processes import running, worker
from tests.servers import Origin, Receiver
from tests.test_api import assert_nothing_missed_or_repeated

pytestmark = pytest.mark.e2e

NODE_DIR = Path(__file__).resolve().parent / "node"


@pytest.fixture(scope="session")
def node_client() -> Path:
    """tests/node with its packages installed (npm ci, from its lock file)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the API's Node.js client tests (apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "eventsource").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, capture_output=True)
    return NODE_DIR / "follow.mjs"


def test_a_node_backend_submits_once_and_follows_its_task_across_a_reconnect(
    tmp_path: Path, node_client: Path, redis_url: str, receiver: Receiver, origin: Origin, store: TaskStore
) -> None:
    env = api_env(tmp_path, redis_url, receiver.url)
    origin.rate = 1024 * 1024
    files = [{"url": origin.put(f"/{n}.mp4", bytes([n]) * 600_000), "path": f"lesson-{n}.mp4"} for n in range(3)]
    started = start_api(tmp_path, env)
    with running(started.process, worker(env, tmp_path / "worker.log")):
        result = subprocess.run(
            ["node", str(node_client)], capture_output=True, text=True, timeout=90,
            env={**env, "HAUL_API": started.url, "HAUL_API_TOKEN": FULL, "HAUL_FILES": json.dumps(files)},
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen: dict[str, Any] = json.loads(result.stdout)
    first, again, events = seen["first"], seen["again"], seen["events"]
    assert first["status"] == 201 and again["status"] == 200 and again["replayed"] == "true"
    assert again["body"]["id"] == first["body"]["id"]
    task_id = first["body"]["id"]
    # Every event the task's stream holds, once each and in order, across the reconnect
    kept = EventLog(store.client, store.prefix).of_task(task_id)
    assert_nothing_missed_or_repeated(
        [(e["id"], e["type"]) for e in events], [task_sse_id(task_id, e.id) for e in kept]
    )
    assert events[-1]["type"] == "task.completed" and events[-1]["data"]["state"] == "done"
    assert sorted(e["data"]["path"] for e in events if e["type"] == "file.completed") == [f["path"] for f in files]
