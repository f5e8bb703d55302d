"""The benchmarks' harness: a scratch Redis, an nginx origin and a webhook receiver on
127.0.0.1, worker processes, and the helpers every benchmark uses (alternating runs, medians)."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from actors.messages import Messages, redis_broker
from actors.settings import Settings
from tests.processes import stack_env
from tests.servers import Receiver, free_port, wait_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MIB, GIB = 1 << 20, 1 << 30
SECRET = "whsec_" + "YmVuY2htYXJrLXNlY3JldC1rZXktMzItYnl0ZXMhIQ=="


class Bench:
    """Redis, nginx and a receiver on 127.0.0.1, in a scratch folder."""

    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.root = Path(tempfile.mkdtemp(prefix="haul-bench-", dir=os.environ.get("HAUL_BENCH_DIR")))
        self.root.chmod(0o755)  # nginx workers run as another user
        self.www = self.root / "www"
        self.www.mkdir()
        self.redis_port, self.nginx_port = free_port(), free_port()
        (self.root / "redis").mkdir()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(self.root / "redis"),
             "--appendonly", "yes", "--appendfsync", os.environ.get("HAUL_BENCH_APPENDFSYNC", "always"), "--save", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.redis_port, "redis-server", process=self.redis)
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.client = redis.Redis(port=self.redis_port)
        conf = self.root / "nginx.conf"
        conf.write_text(f"""
worker_processes 2;
pid {self.root}/nginx.pid;
error_log {self.root}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  log_format bench '$msec $request_uri $status $body_bytes_sent $request_time';
  access_log {self.root}/access.log bench;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{self.nginx_port};
    root {self.www};
    location /slow/ {{ alias {self.www}/; limit_rate 150m; }}
    # A CDN's cap per connection. sendfile would send its first chunk (2 MB) unthrottled.
    location /cdn20/ {{ alias {self.www}/; limit_rate 20m; sendfile off; }}
    location /cdn1/ {{ alias {self.www}/; limit_rate 1m; sendfile off; }}
  }}
}}
""")
        subprocess.run([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf)], check=True)
        wait_port(self.nginx_port, "nginx")
        self.receiver = Receiver(SECRET)

    def url(self, name: str, slow: bool = False) -> str:
        return f"http://127.0.0.1:{self.nginx_port}/{'slow/' if slow else ''}{name}"

    def file(self, name: str, size: int) -> str:
        path = self.www / name
        if not path.exists() or path.stat().st_size != size:
            with path.open("wb") as handle:
                for _ in range(size // MIB):
                    handle.write(os.urandom(MIB))
                handle.write(os.urandom(size % MIB))
        return self.url(name)

    @functools.cached_property
    def messages(self) -> Messages:
        """Claim messages, sent as a backend's client sends them."""
        return Messages(redis_broker(Settings(redis_url=self.redis_url)))

    def env(self, **extra: str) -> dict[str, str]:
        """A test stack's environment (:func:`tests.processes.stack_env`) on this bench's Redis,
        folders and receiver, with its secret and slower retries."""
        retries = {"HAUL_RETRY_MIN_SECONDS": "0.2", "HAUL_RETRY_MAX_SECONDS": "2"}
        return stack_env(self.root, self.redis_url, self.receiver.url, HAUL_WEBHOOK_SECRET=SECRET, **retries, **extra)

    def served(self, uri: str) -> int:
        """Bytes nginx sent for ``uri`` so far (from its access log)."""
        total = 0
        for line in (self.root / "access.log").read_text().splitlines():
            parts = line.split()
            if len(parts) == 5 and parts[1] == uri:
                total += int(parts[3])
        return total

    def request_span(self, uri: str) -> tuple[float, float]:
        """When nginx began and ended serving ``uri`` (its last request; epoch seconds)."""
        for line in reversed((self.root / "access.log").read_text().splitlines()):
            parts = line.split()
            if len(parts) == 5 and parts[1] == uri:
                return float(parts[0]) - float(parts[4]), float(parts[0])
        raise LookupError(f"nginx served no {uri}")

    def close(self) -> None:
        subprocess.run(["/usr/sbin/nginx", "-c", str(self.root / "nginx.conf"), "-s", "stop"], check=False)
        self.redis.terminate()
        self.redis.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


class Worker:
    """``haul worker`` in its own process group."""

    def __init__(self, bench: Bench, threads: int = 2, **extra: str) -> None:
        self.log = (bench.root / f"worker-{time.monotonic_ns()}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "worker", "--processes", "1", "--threads", str(threads)],
            env=bench.env(**extra), cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.child_pids():
            if time.monotonic() > deadline:
                raise RuntimeError("worker did not start")
            time.sleep(0.05)
        time.sleep(1.0)  # imports done, consumers polling

    def child_pids(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except OSError:
            return []

    def peak_rss_kib(self) -> int:
        """Peak resident memory (VmHWM) of the Dramatiq worker process (not the forks)."""
        best = 0
        for pid in self.child_pids():
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"multiprocessing" in cmd or b"dramatiq" in cmd:
                best = max(best, int(status.split("VmHWM:")[1].split()[0]))
        return best

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def submit(bench: Bench, url: str, path: str = "file.bin", sha256: str | None = None) -> str:
    from actors.manifest import spec_from_manifest
    from actors.store import TaskStore

    entry: dict[str, Any] = {"url": url, "path": path}
    if sha256:
        entry["sha256"] = sha256
    store = TaskStore(bench.client)
    task_id, _ = store.create(spec_from_manifest({"files": [entry], "accept": ["*/*"]}), now=time.time())
    bench.messages.claim(task_id)
    return task_id


def wait_done(bench: Bench, task_id: str, timeout: float = 300, poll: float = 0.005) -> float:
    key = f"haul:task:{task_id}"
    deadline = time.monotonic() + timeout
    while True:
        state = bench.client.hget(key, "state")
        if state in (b"done", b"failed", b"dead"):
            if state != b"done":
                raise RuntimeError(f"task {task_id} ended {state!r}: {bench.client.hget(key, 'error')!r}")
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_id} not done after {timeout}s")
        time.sleep(poll)


def curl(url: str, dest: str) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "-s", "-f", "-o", dest, url], check=True)
    return time.perf_counter() - started


def ratio_runs(runs: int, sides: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every side once per round, rotating the order, ``runs`` rounds; seconds per side."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(runs):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            times[name].append(sides[name]())
    return times


def sha256_of(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MIB):
            digest.update(chunk)
    return digest.digest()


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def wait_delivered(bench: Bench, task_id: str, timeout: float = 300) -> float:
    """When task.completed for ``task_id`` reached the receiver (epoch seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for delivery in bench.receiver.accepted():
            if delivery.event["data"]["id"] == task_id:
                return delivery.at
        time.sleep(0.005)
    raise TimeoutError(f"no task.completed for {task_id} after {timeout}s")
