"""``haul up``'s Redis: one that keeps every write it acknowledged, chosen or started.

With HAUL_REDIS_URL unset, haul up runs a redis-server of its own in ``$HAUL_HOME/redis`` on a
free 127.0.0.1 port (the one recorded last time when it is free) and records its URL in
``$HAUL_HOME/redis.url``; it never takes whatever answers at 127.0.0.1:6379 (Debian's package runs
one there that only snapshots). With HAUL_REDIS_URL set, it uses that Redis if it answers with
an append-only file synced on every write, refuses one that does not, and starts one there if
nothing answers and the URL is local. See :mod:`supervisor.local`.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from actors.settings import DEFAULT_HOME, REDIS_URL_FILE

#: Seconds to wait for a started redis-server to answer.
REDIS_START_SECONDS = 10.0
#: Host names of HAUL_REDIS_URL for which haul up may start the Redis itself.
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
#: Exit statuses, as the haul command's: the operation failed; bad input or configuration.
EXIT_FAILED = 1
EXIT_USAGE = 2

#: How haul up tells the user what it chose, and why.
Say = Callable[[str], None]


class UpRefused(Exception):
    """``haul up`` cannot go on; the message says why and what to do."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)


def redis_answers(url: str) -> bool:
    """Whether a Redis answers PING at ``url`` (one still loading its data does not yet)."""
    try:
        with _client(url) as client:
            return bool(client.ping())
    except redis.AuthenticationError as exc:
        raise UpRefused(f"the Redis at HAUL_REDIS_URL ({where(url)}) refused haul's credentials ({exc}); fix the "
                        "password in HAUL_REDIS_URL") from None  # fmt: skip
    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
        return False


def where(url: str) -> str:
    """A Redis URL without its credentials, for messages."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


def start_redis(host: str, port: int, folder: Path) -> subprocess.Popen[bytes]:
    """A redis-server on ``host:port`` keeping its data in ``folder``, every write synced to its
    append-only file before it is acknowledged; returned once it answers."""
    server = shutil.which("redis-server")
    if server is None:
        raise UpRefused("redis-server is not installed (Debian: apt-get install redis-server)", EXIT_FAILED)
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        server,
        "--bind", "127.0.0.1" if host == "localhost" else host,
        "--port", str(port),
        "--dir", str(folder),
        "--appendonly", "yes",
        "--appendfsync", "always",  # a task acknowledged to the caller survives a crash of Redis
        "--protected-mode", "yes",
    ]  # fmt: skip
    with (folder / "redis.log").open("ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"redis://{'[::1]' if host == '::1' else host}:{port}/0"
    deadline = time.monotonic() + REDIS_START_SECONDS
    while not redis_answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise UpRefused(f"redis-server did not start on {host}:{port}; see {folder / 'redis.log'}", EXIT_FAILED)
        time.sleep(0.1)
    return process


def choose_redis(
    environ: Mapping[str, str], home: Path, avoid_port: int, say: Say
) -> tuple[str, subprocess.Popen[bytes] | None]:
    """The Redis this stack uses (see the module docstring), and the process when it started one."""
    url = environ.get("HAUL_REDIS_URL", "")
    if not url:
        return own_redis(home, avoid_port, say)
    folder = home / "redis"
    if redis_answers(url):
        from supervisor.limits import redis_persistence  # here: it loads Dramatiq, which haul status must not

        with _client(url) as client:
            persistence = redis_persistence(client)
        if persistence.problems:
            raise UpRefused(
                f"the Redis at HAUL_REDIS_URL ({where(url)}) would lose writes it acknowledged: "
                f"{persistence.problems[0]}. Or unset HAUL_REDIS_URL, and haul up runs a Redis of its own in {folder}"
            )
        say(f"using the Redis at HAUL_REDIS_URL ({where(url)}): it answers, and {persistence.summary}")
        return url, None
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.hostname not in LOCAL_HOSTS:
        raise UpRefused(
            f"nothing answers at HAUL_REDIS_URL ({where(url)}) and it is not on this machine; start it, or unset "
            "HAUL_REDIS_URL and haul up runs a Redis of its own",
            EXIT_FAILED,
        )
    port = parts.port or 6379
    if port == avoid_port:
        raise UpRefused(f"HAUL_REDIS_URL and HAUL_SUPERVISOR_PORT both name port {port}; change one")
    process = start_redis(parts.hostname, port, folder)
    say(
        f"nothing answered at HAUL_REDIS_URL ({where(url)}), so it runs a redis-server there (append-only file, "
        f"appendfsync always), data in {folder}"
    )
    return url, process


def own_redis(home: Path, avoid_port: int, say: Say) -> tuple[str, subprocess.Popen[bytes]]:
    """Start haul up's own redis-server in ``home/redis``, on the port recorded last time when it
    is free (else any free one), and record its URL in ``home/redis.url``."""
    folder = home / "redis"
    recorded = recorded_port(home)
    port = None
    if recorded is not None and recorded != avoid_port:
        if port_free("127.0.0.1", recorded):
            port = recorded
        elif serves(recorded, folder):  # two servers on one data folder would corrupt it
            raise UpRefused(
                f"a redis-server already serves {folder} on 127.0.0.1:{recorded}: another haul up runs in this "
                f"folder, or an earlier one was killed; stop it (redis-cli -p {recorded} shutdown) and start again"
            )
    if port is None:
        port = free_port(avoid_port)
    process = start_redis("127.0.0.1", port, folder)
    url = f"redis://127.0.0.1:{port}/0"
    record = home / REDIS_URL_FILE
    temporary = record.with_name(record.name + ".tmp")
    temporary.write_text(url + "\n", encoding="utf-8")
    os.replace(temporary, record)
    found_by = (
        "haul commands run in this folder find it there"
        if home == Path(DEFAULT_HOME).absolute()
        else f"haul commands run with HAUL_HOME={home} find it there"
    )
    say(
        f"HAUL_REDIS_URL is not set, so haul up runs a redis-server of its own on 127.0.0.1:{port} (append-only "
        f"file, appendfsync always), data in {folder}; its URL is in {record}, and {found_by}"
    )
    return url, process


def recorded_port(home: Path) -> int | None:
    """The port of the Redis haul up last ran for ``home``, if it recorded one."""
    try:
        parts = urlsplit((home / REDIS_URL_FILE).read_text(encoding="utf-8").strip())
        return parts.port if parts.hostname == "127.0.0.1" else None
    except (OSError, ValueError):
        return None


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port`` (bound as servers bind: SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno != errno.EADDRINUSE  # another error (an address not local): not ours to judge
    return True


def free_port(avoid: int, host: str = "127.0.0.1") -> int:
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port != avoid:
            return port


def serves(port: int, folder: Path) -> bool:
    """Whether the Redis on 127.0.0.1:``port`` keeps its data in ``folder``."""
    try:
        with redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=1) as client:
            found: Any = client.config_get("dir").get("dir")
    except redis.RedisError:
        return False
    return found is not None and Path(found).resolve() == folder.resolve()
