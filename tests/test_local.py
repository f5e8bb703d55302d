"""``haul up`` end to end: a terminal's Ctrl-C (SIGINT to the whole foreground process group)
stops the local stack in order, so the task being downloaded is handed back, not left behind;
which Redis it uses (its own, recorded for other shells, unless HAUL_REDIS_URL is set) and the
Redis it refuses. Past 300 lines: each scenario starts a real stack of its own."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from standardwebhooks import Webhook

from actors.settings import DEFAULT_SUPERVISOR_PORT
from actors.store import TaskStore
from tests.conftest import part_bytes
from tests.processes import REPO, base_env, health, stack_env, wait_until
from tests.redisserver import RedisServer
from tests.servers import Origin, Receiver, free_port

MIB = 1024 * 1024
#: Bytes per second the origin sends: the download is still going when Ctrl-C comes.
ORIGIN_RATE = 512 * 1024


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), None if gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[tuple[int, str]]:
    """Every process below ``pid`` as (pid, start time): haul up's children live in sessions of
    their own, so a failed test must find them to clean up, and only them."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def alive(process: tuple[int, str]) -> bool:
    """Still running (a zombie is not), and not a later process that got the same pid."""
    fields = _stat(process[0])
    return fields is not None and fields[19] == process[1] and fields[0] != "Z"


@pytest.fixture
def slow_origin() -> Iterator[Origin]:
    server = Origin()
    server.rate = ORIGIN_RATE
    yield server
    server.close()


def test_ctrl_c_stops_haul_up_in_order_and_the_download_is_handed_back(
    tmp_path: Path, slow_origin: Origin, receiver: Receiver
) -> None:
    home = tmp_path / "home"
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"  # nothing answers there: haul up starts its own Redis
    env = stack_env(
        tmp_path, url, receiver.url,
        HAUL_HOME=str(home), HAUL_LEASE_SECONDS="30", HAUL_WORKER_PROCESSES="1", HAUL_WORKER_THREADS="2",
    )  # fmt: skip
    file_url = slow_origin.put("/lecture.mp4", os.urandom(8 * MIB))
    log_path = tmp_path / "up.log"
    with log_path.open("ab") as log:
        # Started in a session of its own, as a shell starts a foreground job in its own group
        up = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "up"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    client = redis.Redis.from_url(url)
    store = TaskStore(client)
    leftovers: list[tuple[int, str]] = []
    try:
        wait_until(lambda: _answers(client) and client.hlen("haul:workers") > 0, 20, "haul up's worker to register")
        submitted = subprocess.run(
            [sys.executable, "-m", "supervisor.cli", "submit", file_url],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        task_id = submitted.stdout.split()[-1]
        sandbox = tmp_path / "staging" / task_id

        def under_way() -> bool:
            task = store.get(task_id)
            return task is not None and task.state.value == "downloading" and part_bytes(sandbox) >= MIB // 2

        wait_until(under_way, 15, "the download to be under way")
        leftovers = descendants(up.pid)
        # When Ctrl-C is pressed: the terminal sends SIGINT to every process of its foreground group
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(30) == 0, log_path.read_text()
    finally:
        client.close()
        if up.poll() is None:
            up.kill()
        for process in leftovers:
            if alive(process):
                os.kill(process[0], signal.SIGKILL)
        up.wait(10)
    output = log_path.read_text()
    # The workers stopped first, Redis last, and haul up said it was done
    order = [output.find(f"haul up: stopping {name}") for name in ("workers", "supervisor", "redis-server")]
    assert -1 not in order and order == sorted(order), output
    assert output.rstrip().endswith("haul up: stopped"), output
    assert len(leftovers) >= 4 and not any(alive(p) for p in leftovers), "haul up left processes behind"
    # Then, with haul up's Redis data: the task was handed back, its attempt refunded, its bytes kept
    server = RedisServer(home / "redis", appendonly=True, port=port)
    server.start()
    try:
        restarted = redis.Redis.from_url(server.url)
        task = TaskStore(restarted).get(task_id)
        assert task is not None
        assert task.state.value == "queued" and task.attempts == 0, task
        assert part_bytes(sandbox) >= MIB // 2
        # The worker unregistered on its way out: no false "stopped sending heartbeats" later
        assert restarted.hlen("haul:workers") == 0
        restarted.close()
    finally:
        server.stop()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def haul_up(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "up"],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def stop_up(up: subprocess.Popen[bytes]) -> int:
    """Ctrl-C, as a terminal sends it; kill what is left if it hangs."""
    leftovers = descendants(up.pid)
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGINT)
    try:
        return up.wait(40)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        for process in leftovers:
            if alive(process):
                os.kill(process[0], signal.SIGKILL)


def haul(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(("appendonly", "fsync"), [("no", "always"), ("yes", "everysec")])
def test_haul_up_refuses_a_redis_at_haul_redis_url_that_may_lose_writes(
    tmp_path: Path, appendonly: str, fsync: str
) -> None:
    # Given a redis-server at HAUL_REDIS_URL without an append-only file, or one synced once a second
    server = RedisServer(tmp_path / "redis")
    server.start()
    client = redis.Redis.from_url(server.url)
    client.config_set("appendonly", appendonly)
    client.config_set("appendfsync", fsync)
    env = base_env(HAUL_REDIS_URL=server.url, HAUL_HOME=str(tmp_path / "home"), HAUL_SUPERVISOR_PORT=str(free_port()))
    up = haul_up(env, tmp_path, tmp_path / "up.log")
    try:
        # When haul up starts, it refuses it, says how to fix it, and starts nothing
        assert up.wait(30) == 2
        output = (tmp_path / "up.log").read_text()
        assert f"127.0.0.1:{server.port}" in output and "appendfsync always" in output, output
        assert "unset HAUL_REDIS_URL" in output, output
        assert client.hlen("haul:workers") == 0 and not (tmp_path / "home" / "redis").exists()
    finally:
        if up.poll() is None:
            stop_up(up)
        client.close()
        server.stop()


@pytest.mark.parametrize(
    ("variable", "others"),
    [("HAUL_SUPERVISOR_PORT", {}), ("HAUL_WORKER_METRICS_PORT", {"HAUL_SUPERVISOR_PORT": "0"})],
)
def test_haul_up_stops_before_starting_anything_when_a_port_it_was_given_is_taken(
    tmp_path: Path, variable: str, others: dict[str, str]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = base_env(**{variable: str(port)}, **others, HAUL_HOME=str(tmp_path / "home"))
        up = haul_up(env, tmp_path, tmp_path / "up.log")
        try:
            assert up.wait(30) == 2
        finally:
            if up.poll() is None:
                stop_up(up)
    output = (tmp_path / "up.log").read_text()
    assert f"127.0.0.1:{port} is in use" in output and variable in output, output
    assert not (tmp_path / "home").exists()  # no Redis, no workers
    assert output.rstrip().endswith("haul up: stopped") and "Traceback" not in output, output


@pytest.mark.parametrize("command", [["worker"], ["supervisor"]])
def test_workers_and_supervisor_refuse_a_webhook_url_without_a_secret(tmp_path: Path, command: list[str]) -> None:
    env = base_env(HAUL_WEBHOOK_URL="http://127.0.0.1:9/hooks", HAUL_HOME=str(tmp_path / "home"))
    result = haul(REPO, env, *command)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "HAUL_WEBHOOK_SECRET" in result.stderr, result.stderr
    assert "haul webhook new-secret" in result.stderr


def _taken(port: int) -> socket.socket | None:
    """Listen on 127.0.0.1:``port``; None when something else already does (taken either way)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        return None
    return sock


def test_a_first_run_without_port_or_secret_settings_picks_a_port_makes_a_secret_and_listen_verifies(
    tmp_path: Path, origin: Origin
) -> None:
    # Given 9310 taken, no HAUL_SUPERVISOR_PORT, no webhook secret, and haul not on PATH
    listen_port = free_port()
    env = base_env(HAUL_WORKER_PROCESSES="1", HAUL_WORKER_THREADS="2", PATH="/usr/bin:/bin")
    blocker = _taken(DEFAULT_SUPERVISOR_PORT)
    log = tmp_path / "up.log"
    listener: subprocess.Popen[bytes] | None = None
    try:
        up = haul_up(env, tmp_path, log)
        try:
            wait_until(lambda: "workers, supervisor and API running" in log.read_text(), 30, "haul up to start")
            output = log.read_text()
            # It serves the supervisor on another port, and says which
            found = re.search(r"health and metrics on http://127\.0\.0\.1:(\d+)/healthz", output)
            assert found is not None and int(found[1]) != DEFAULT_SUPERVISOR_PORT, output
            wait_until(lambda: health(int(found[1])) is not None, 20, "the supervisor on the chosen port")
            # It made a secret, readable by its owner only, and said where and how to read it
            secret_file = tmp_path / ".haul" / "webhook-secret"
            secret = secret_file.read_text().strip()
            assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
            assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
            assert output.count("webhook-secret") >= 2 and "cat .haul/webhook-secret" in output, output
            assert secret not in output
            # Its hint names a haul that works from here, not a bare `haul`
            script = Path(sys.executable).parent / "haul"
            assert f"in another shell: {script} submit URL" in output, output
            # When haul webhook listen runs with that secret and a task is done
            listen_log = tmp_path / "listen.log"
            with listen_log.open("ab") as out:
                listener = subprocess.Popen(
                    [str(script), "webhook", "listen", "--port", str(listen_port), "--secret-file",
                     ".haul/webhook-secret"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            wait_until(lambda: "receiving on" in listen_log.read_text(), 15, "the listener")
            webhook = f"http://127.0.0.1:{listen_port}/"
            submitted = haul(tmp_path, env, "submit", "--webhook", webhook, origin.put("/first.mp4", b"first run"))
            assert submitted.returncode == 0, submitted.stderr
            task_id = submitted.stdout.split()[-1]
            # Then the listener verified and printed the delivery
            wait_until(lambda: f"task.completed  task {task_id}  files: first.mp4" in listen_log.read_text(), 30,
                       "the verified delivery")  # fmt: skip
        finally:
            stopped = stop_up(up)
    finally:
        if listener is not None:
            listener.terminate()
            listener.wait(10)
        if blocker is not None:
            blocker.close()
    assert stopped == 0
    output = log.read_text()
    assert output.rstrip().endswith("haul up: stopped") and "Traceback" not in output, output


def _answers_http(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_without_haul_redis_url_haul_up_runs_its_own_redis_and_other_shells_find_it(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    # Given no HAUL_REDIS_URL and no HAUL_HOME: haul up's home is ./.haul; and a receiver in
    # HAUL_WEBHOOK_URL without a secret, which haul up makes (workers alone would refuse)
    env = base_env(
        HAUL_SUPERVISOR_PORT=str(free_port()), HAUL_API_PORT=str(free_port()), HAUL_WORKER_PROCESSES="1",
        HAUL_WORKER_THREADS="2", HAUL_WEBHOOK_URL=receiver.url,
    )  # fmt: skip
    record = tmp_path / ".haul" / "redis.url"
    up = haul_up(env, tmp_path, tmp_path / "up.log")
    try:
        wait_until(record.exists, 20, "haul up to record its Redis")
        url = record.read_text().strip()
        client = redis.Redis.from_url(url)
        wait_until(lambda: _answers(client) and client.hlen("haul:workers") > 0, 20, "haul up's worker to register")
        # It said which Redis and why, and that Redis keeps every acknowledged write
        output = (tmp_path / "up.log").read_text()
        assert "HAUL_REDIS_URL is not set, so haul up runs a redis-server of its own" in output, output
        receiver.webhook = Webhook((tmp_path / ".haul" / "webhook-secret").read_text().strip())
        assert client.config_get("append*") | client.config_get("dir") == {
            "appendonly": "yes", "appendfsync": "always", "appendfilename": "appendonly.aof",
            "appenddirname": "appendonlydir", "dir": str(tmp_path / ".haul" / "redis"),
        }  # fmt: skip
        # When another shell in the same folder submits and asks, it reaches that Redis
        submitted = haul(tmp_path, env, "submit", origin.put("/first.mp4", b"first run"))
        assert submitted.returncode == 0, submitted.stderr
        task_id = submitted.stdout.split()[-1]

        def done() -> bool:
            status = haul(tmp_path, env, "status", task_id, "--json")
            return status.returncode == 0 and json.loads(status.stdout)["state"] == "done"

        wait_until(done, 30, "the task to be done, as haul status sees it")
        assert (tmp_path / ".haul" / "storage" / task_id / "first.mp4").read_bytes() == b"first run"
        assert [(d.event["type"], d.verified) for d in receiver.accepted()] == [("task.completed", True)]
        client.close()
    finally:
        stopped = stop_up(up)
    assert stopped == 0
    # Then a second haul up finds the same Redis, on the same port, with its data
    up = haul_up(env, tmp_path, tmp_path / "up2.log")
    try:
        started = "workers, supervisor and API running"
        wait_until(lambda: started in (tmp_path / "up2.log").read_text(), 20, "the restart")
        assert record.read_text().strip() == url
        status = haul(tmp_path, env, "status", task_id, "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["state"] == "done", status.stderr
        # Its HTTP API serves the same tasks (no token: loopback only)
        api = f"http://127.0.0.1:{env['HAUL_API_PORT']}"
        wait_until(lambda: _answers_http(f"{api}/healthz"), 20, "haul up's API")
        assert requests.get(f"{api}/v1/tasks/{task_id}", timeout=5).json()["state"] == "done"
        [shown] = json.loads(status.stdout)["files"]  # where the file went, as task.completed said
        assert shown["location"] == str(tmp_path / ".haul" / "storage" / task_id / "first.mp4")
    finally:
        stopped = stop_up(up)
    assert stopped == 0
