"""``haul up``: a whole haul on one machine for a first run, in the current folder.

Starts a redis-server in ``.haul/redis`` (append-only file on, so a restart loses nothing)
unless one already answers at ``HAUL_REDIS_URL``, then the workers and the supervisor, and
stops them all on Ctrl-C, SIGTERM or SIGHUP. Private networks are allowed by default here,
since a first run usually downloads from a server on the same machine.

Each child runs in a session (and process group) of its own, so a terminal's Ctrl-C, which
goes to every process of the foreground group, reaches ``haul up`` alone; it then stops the
children in order: the workers first (they hand in-flight tasks back, which needs Redis), the
supervisor, Redis last. Were Redis stopped at the same time, a downloading task would stay
``downloading`` until its lease ran out, burn an attempt and start its file again from 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import redis

from actors.settings import Settings

#: Seconds to wait for a started redis-server to answer.
REDIS_START_SECONDS = 10.0
#: Seconds a child gets to stop after SIGTERM (workers: to hand their tasks back) before its
#: whole process group is killed.
STOP_SECONDS = 30.0
#: Signals that stop the local stack (SIGHUP: the terminal was closed).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def local_environment(environ: Mapping[str, str], home: Path) -> dict[str, str]:
    env = dict(environ)
    env.setdefault("HAUL_STAGING_DIR", str(home / "staging"))
    env.setdefault("HAUL_STORAGE_DIR", str(home / "storage"))
    env.setdefault("HAUL_ALLOW_PRIVATE_NETWORKS", "1")
    return env


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def start_redis(url: str, home: Path) -> subprocess.Popen[bytes]:
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.hostname not in {"127.0.0.1", "localhost", "::1"}:
        raise SystemExit(f"haul up: nothing answers at HAUL_REDIS_URL ({parts.hostname}) and it is not local; start it")
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("haul up: redis-server is not installed (Debian: apt-get install redis-server)")
    folder = home / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        server,
        "--bind", parts.hostname if parts.hostname != "localhost" else "127.0.0.1",
        "--port", str(parts.port or 6379),
        "--dir", str(folder),
        "--appendonly", "yes",
        "--appendfsync", "always",  # a task acknowledged to the caller survives a crash of Redis
        "--protected-mode", "yes",
    ]  # fmt: skip
    with (folder / "redis.log").open("ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + REDIS_START_SECONDS
    while not redis_answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"haul up: redis-server did not start; see {folder / 'redis.log'}")
        time.sleep(0.1)
    return process


def stop_child(name: str, child: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child itself (Dramatiq's master passes it on to its worker processes, as
    systemd's KillMode=mixed does), wait, and kill its whole process group if it hangs."""
    if child.poll() is not None:
        return
    print(f"haul up: stopping {name}", flush=True)
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        print(f"haul up: {name} did not stop in {STOP_SECONDS:.0f}s; killing it", file=sys.stderr, flush=True)
        try:
            os.killpg(child.pid, signal.SIGKILL)  # its group id is its pid: it is not reaped yet
        except ProcessLookupError:
            pass
        child.wait()


def run_local_stack(environ: Mapping[str, str]) -> int:
    home = Path(environ.get("HAUL_HOME", ".haul")).absolute()
    env = local_environment(environ, home)
    settings = Settings.from_env(env)
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    for signum in STOP_SIGNALS:  # before any child starts: a Ctrl-C now still stops in order
        signal.signal(signum, _stop)
    redis_child: subprocess.Popen[bytes] | None = None
    children: list[tuple[str, subprocess.Popen[bytes]]] = []  # in stopping order
    status = 0
    try:
        if not redis_answers(settings.redis_url):
            redis_child = start_redis(settings.redis_url, home)
            print(f"haul up: redis-server started in {home / 'redis'}", flush=True)
        from supervisor.cli import worker_command, worker_environment

        if not stopping:  # a signal while Redis was starting: start nothing more
            worker_env = {**env, **worker_environment(settings)}
            workers = subprocess.Popen(worker_command(settings), env=worker_env, start_new_session=True)
            children.append(("workers", workers))
            supervisor = subprocess.Popen([sys.executable, "-m", "supervisor"], env=env, start_new_session=True)
            children.append(("supervisor", supervisor))
            print(
                f"haul up: workers and supervisor running; files land in {settings.storage_dir}; "
                f"health and metrics on http://{settings.supervisor_host}:{settings.supervisor_port}/healthz\n"
                "haul up: in another shell: haul submit URL, then haul status ID. Ctrl-C stops everything.",
                flush=True,
            )
        if redis_child is not None:
            children.append(("redis-server", redis_child))
        while not stopping:
            for name, child in children:
                if child.poll() is not None:
                    print(f"haul up: {name} exited with {child.returncode}; stopping", file=sys.stderr, flush=True)
                    status, stopping = 1, True
            time.sleep(0.2)
    finally:
        if redis_child is not None and all(child is not redis_child for _, child in children):
            children.append(("redis-server", redis_child))  # a later step failed
        for name, child in children:  # workers, then the supervisor, then Redis
            stop_child(name, child)
    print("haul up: stopped", flush=True)
    return status
