"""A real ``haul api`` process for tests, its tokens, and a reader of its Server-Sent Events."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.processes import Process, running, stack_env, wait_until
from tests.servers import free_port

FULL = "ci-backend-0123456789abcdef"
READ = "ci-reader-0123456789abcdef"
SIGNING = "signing-key-0123456789abcdef"


@dataclass
class Api:
    url: str
    process: Process

    def call(self, method: str, path: str, token: str | None = FULL, **kwargs: Any) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.request(method, self.url + path, headers=headers, timeout=10, **kwargs)


def start_api(tmp_path: Path, env: dict[str, str]) -> Api:
    port = free_port()
    process = Process([sys.executable, "-m", "supervisor.cli", "api"], {**env, "HAUL_API_PORT": str(port)},
                      tmp_path / "api.log")  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_until(up, 20, f"haul api to answer ({tmp_path / 'api.log'})")
    return Api(url, process)


@contextmanager
def running_api(tmp_path: Path, env: dict[str, str]) -> Iterator[Api]:
    """A ``haul api`` process for the block."""
    started = start_api(tmp_path, env)
    with running(started.process):
        yield started


def api_env(tmp_path: Path, redis_url: str, webhook_url: str) -> dict[str, str]:
    """A test stack's environment with a full token, a read token and a signing key."""
    return stack_env(tmp_path, redis_url, webhook_url, HAUL_API_TOKENS=f"backend:{FULL}",
                     HAUL_API_READ_TOKENS=f"dashboard:{READ}", HAUL_API_SIGNING_KEY=SIGNING)  # fmt: skip


def sse(response: requests.Response) -> Iterator[tuple[str, str, Any]]:
    """(id, event, data) of each event of a text/event-stream response; comments skipped."""
    event_id, name, data = "", "message", list[str]()
    for raw in response.iter_lines(decode_unicode=True):
        if raw == "":
            if data:
                yield event_id, name, json.loads("\n".join(data))
            name, data = "message", []
            continue
        if raw.startswith(":"):
            continue
        field, _, value = raw.partition(": ")
        if field == "id":
            event_id = value
        elif field == "event":
            name = value
        elif field == "data":
            data.append(value)
