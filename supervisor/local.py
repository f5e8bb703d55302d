"""``haul up``: a whole haul on one machine for a first run, in the current folder.

Starts a redis-server in ``.haul/redis`` (append-only file on, so a restart loses nothing)
unless one already answers at ``HAUL_REDIS_URL``, then the workers and the supervisor, and
stops them all on
Ctrl-C or SIGTERM. Private networks are allowed by default here, since a first run usually
downloads from a server on the same machine.
"""

from __future__ import annotations

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
#: Seconds a worker gets to hand its tasks back after SIGTERM.
STOP_SECONDS = 30.0


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
    process = subprocess.Popen(command, stdout=(folder / "redis.log").open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + REDIS_START_SECONDS
    while not redis_answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"haul up: redis-server did not start; see {folder / 'redis.log'}")
        time.sleep(0.1)
    return process


def run_local_stack(environ: Mapping[str, str]) -> int:
    home = Path(environ.get("HAUL_HOME", ".haul")).absolute()
    env = local_environment(environ, home)
    settings = Settings.from_env(env)
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    if not redis_answers(settings.redis_url):
        children.append(("redis-server", start_redis(settings.redis_url, home)))
        print(f"haul up: redis-server started in {home / 'redis'}", flush=True)
    from supervisor.cli import worker_command, worker_environment

    workers = subprocess.Popen(worker_command(settings), env={**env, **worker_environment(settings)})
    children.append(("workers", workers))
    children.append(("supervisor", subprocess.Popen([sys.executable, "-m", "supervisor"], env=env)))
    print(
        f"haul up: workers and supervisor running; files land in {settings.storage_dir}; "
        f"health and metrics on http://{settings.supervisor_host}:{settings.supervisor_port}/healthz\n"
        "haul up: in another shell: haul submit URL, then haul status ID. Ctrl-C stops everything.",
        flush=True,
    )
    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    status = 0
    while not stop:
        for name, child in children:
            if child.poll() is not None:
                print(f"haul up: {name} exited with {child.returncode}; stopping", file=sys.stderr)
                status, stop = 1, True
        time.sleep(0.5)
    for _, child in reversed(children):  # supervisor and workers first, Redis last
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
    return status
