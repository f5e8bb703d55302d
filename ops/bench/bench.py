"""haul's benchmarks, side by side with plain tools, in one run. See ops/bench/run.

Each figure is a median of several runs; each comparison is a ratio measured in the same run
with the two sides alternating. Prints a table and writes ops/bench/results.json.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from actors.messages import Messages, redis_broker
from actors.settings import Settings
from tests.servers import Receiver, free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MIB, GIB = 1 << 20, 1 << 30
SECRET = "whsec_" + "YmVuY2htYXJrLXNlY3JldC1rZXktMzItYnl0ZXMhIQ=="


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


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
        wait_port(self.redis_port)
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
  }}
}}
""")
        subprocess.run([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf)], check=True)
        wait_port(self.nginx_port)
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
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAUL_")}
        env.update(
            HAUL_REDIS_URL=self.redis_url,
            HAUL_STAGING_DIR=str(self.root / "staging"),
            HAUL_STORAGE_DIR=str(self.root / "storage"),
            HAUL_WEBHOOK_URL=self.receiver.url,
            HAUL_WEBHOOK_SECRET=SECRET,
            HAUL_ALLOW_PRIVATE_NETWORKS="1",
            HAUL_SUPERVISOR_PORT="0",
            HAUL_RETRY_MIN_SECONDS="0.2",
            HAUL_RETRY_MAX_SECONDS="2",
        )
        env.update(extra)
        return env

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


# -- the benchmarks -------------------------------------------------------------------------


def bench_download(bench: Bench) -> dict[str, Any]:
    """1 and 2a: the download stage alone (warm process) vs curl, with and without sha256."""
    from actors.fetch import Fetcher
    from actors.httprules import FetchRules
    from actors.netguard import DestinationPolicy
    from actors.resume import discard_part
    from actors.task import FileSpec

    url = bench.file("big.bin", GIB)
    digest = sha256_of(bench.www / "big.bin").hex()
    fetcher = Fetcher(DestinationPolicy(True), connect_timeout=5, read_timeout=60)
    out = bench.root / "out"
    out.mkdir(exist_ok=True)

    def haul(sha: bool) -> Callable[[], float]:
        def run() -> float:
            part = out / "0.part"
            discard_part(part)
            spec = FileSpec(url=url, path="big.bin", sha256=digest if sha else None)
            started = time.perf_counter()
            fetcher.fetch(spec, part, task_id="bench", on_progress=lambda _: None, rules=FetchRules())
            took = time.perf_counter() - started
            discard_part(part)
            return took

        return run

    def curl_disk() -> float:
        took = curl(url, str(out / "curl.bin"))
        (out / "curl.bin").unlink()
        return took

    def curl_disk_synced() -> float:
        """curl, then ``sync FILE``: the same durability haul gives (it fsyncs before renaming)."""
        started = time.perf_counter()
        curl(url, str(out / "curl.bin"))
        subprocess.run(["sync", str(out / "curl.bin")], check=True)
        took = time.perf_counter() - started
        (out / "curl.bin").unlink()
        return took

    haul(False)()  # warm up: connection pool, page cache of the source file
    times = ratio_runs(
        bench.runs,
        {"haul": haul(False), "haul_sha256": haul(True), "curl_disk": curl_disk,
         "curl_disk_synced": curl_disk_synced, "curl_null": lambda: curl(url, "/dev/null")},
    )  # fmt: skip
    gbps = {name: GIB / med(t) / 1e9 for name, t in times.items()}
    vs_curl = [c / h for h, c in zip(times["haul"], times["curl_disk"], strict=True)]
    vs_ceiling = [c / h for h, c in zip(times["haul"], times["curl_null"], strict=True)]
    sha_vs_curl = [c / h for h, c in zip(times["haul_sha256"], times["curl_disk"], strict=True)]
    vs_synced = [c / h for h, c in zip(times["haul"], times["curl_disk_synced"], strict=True)]
    return {
        "GB/s": {k: round(v, 2) for k, v in gbps.items()},
        "haul / curl to disk": round(med(vs_curl), 2),
        "haul / ceiling": round(med(vs_ceiling), 2),
        "haul with sha256 / curl to disk": round(med(sha_vs_curl), 2),
        "haul / (curl to disk + sync)": round(med(vs_synced), 2),
    }


def bench_hash(bench: Bench) -> dict[str, Any]:
    """HAUL_HASH's cost: the download stage alone (warm process) of a 1 GiB file the task gives
    no sha256 for, hashed as it arrives (``sha256``, the default) or not (``none``), alternating."""
    from actors.fetch import Fetcher
    from actors.httprules import FetchRules
    from actors.netguard import DestinationPolicy
    from actors.resume import discard_part
    from actors.task import FileSpec

    url = bench.file("big.bin", GIB)
    expected = sha256_of(bench.www / "big.bin").hex()
    fetcher = Fetcher(DestinationPolicy(True), connect_timeout=5, read_timeout=60)
    out = bench.root / "out"
    out.mkdir(exist_ok=True)
    spec = FileSpec(url=url, path="big.bin")

    def haul(file_hash: str) -> Callable[[], float]:
        def run() -> float:
            part = out / "0.part"
            discard_part(part)
            digests: list[str] = []
            on_sha256 = digests.append if file_hash == "sha256" else None
            started = time.perf_counter()
            fetcher.fetch(
                spec, part, task_id="bench", on_progress=lambda _: None, rules=FetchRules(), on_sha256=on_sha256
            )
            took = time.perf_counter() - started
            discard_part(part)
            if digests != ([expected] if on_sha256 else []):
                raise RuntimeError(f"HAUL_HASH={file_hash}: got sha256 {digests}, expected {expected}")
            return took

        return run

    haul("none")()  # warm up: connection pool, page cache of the source file
    times = ratio_runs(bench.runs, {"HAUL_HASH=none": haul("none"), "HAUL_HASH=sha256": haul("sha256")})
    cost = [h / n for n, h in zip(times["HAUL_HASH=none"], times["HAUL_HASH=sha256"], strict=True)]
    return {
        "GB/s": {k: round(GIB / med(t) / 1e9, 2) for k, t in times.items()},
        "seconds per GiB": {k: [round(x, 2) for x in t] for k, t in times.items()},
        "sha256 time / none time": round(med(cost), 3),
    }


def bench_end_to_end(bench: Bench) -> dict[str, Any]:
    """2b: haul submit to done (storage on the same filesystem, webhook included) vs curl."""
    url = bench.file("big.bin", GIB)
    worker = Worker(bench, threads=2)
    out = bench.root / "out"
    out.mkdir(exist_ok=True)

    def haul() -> float:
        started = time.time()
        task_id = submit(bench, url)
        took = wait_done(bench, task_id) - started
        shutil.rmtree(bench.root / "storage" / task_id, ignore_errors=True)
        return took

    def curl_disk() -> float:
        took = curl(url, str(out / "curl.bin"))
        (out / "curl.bin").unlink()
        return took

    try:
        haul()
        times = ratio_runs(bench.runs, {"haul": haul, "curl_disk": curl_disk})
    finally:
        worker.stop()
    return {
        "haul end to end s": round(med(times["haul"]), 2),
        "curl to disk s": round(med(times["curl_disk"]), 2),
        "haul end to end / curl to disk": round(
            med([c / h for h, c in zip(times["haul"], times["curl_disk"], strict=True)]), 2
        ),
    }


def bench_cli(bench: Bench) -> dict[str, Any]:
    """12: what a user sees: from starting ``haul submit`` for a 2 GiB file to its webhook's
    arrival, against the loopback ceiling ``curl -o /dev/null`` (alternating, in one run), with
    HAUL_HASH=none and sha256; hashlib's own sha256 rate over the same (cached) file; and where
    the time goes: the CLI, its claim's pickup until the origin's request, the transfer, and
    from the transfer's end to the webhook (sync, finalize, delivery)."""
    url = bench.file("cli.bin", 2 * GIB)
    size = 2 * GIB
    result: dict[str, Any] = {}
    for mode in ("none", "sha256"):
        worker = Worker(bench, threads=2, HAUL_HASH=mode)
        env = bench.env(HAUL_HASH=mode)
        phases: dict[str, list[float]] = {"cli": [], "pickup": [], "transfer": [], "to webhook": []}

        def haul(env: dict[str, str] = env, phases: dict[str, list[float]] = phases) -> float:
            run_url = f"{url}?run={uuid.uuid4().hex}"
            started = time.time()
            submitted = subprocess.run(
                [sys.executable, "-m", "supervisor.cli", "submit", "--accept", "*/*", run_url],
                env=env, cwd=REPO, capture_output=True, text=True,
            )  # fmt: skip
            exited = time.time()
            if submitted.returncode != 0:
                raise RuntimeError(f"haul submit exited {submitted.returncode}: {submitted.stderr}")
            task_id = submitted.stdout.split()[-1]
            arrived = wait_delivered(bench, task_id)
            asked, served = bench.request_span(urlsplit(run_url)._replace(scheme="", netloc="").geturl())
            for phase, seconds in zip(
                phases, (exited - started, asked - exited, served - asked, arrived - served), strict=True
            ):
                phases[phase].append(seconds)
            shutil.rmtree(bench.root / "storage" / task_id, ignore_errors=True)
            return arrived - started

        try:
            haul()  # warm: the worker's first task
            for values in phases.values():
                values.clear()
            times = ratio_runs(bench.runs, {"haul": haul, "curl": lambda: curl(url, "/dev/null")})
        finally:
            worker.stop()
        result[f"haul CLI, HAUL_HASH={mode} MB/s"] = round(size / med(times["haul"]) / 1e6)
        result[f"haul CLI, HAUL_HASH={mode} / curl -o /dev/null"] = round(
            med([c / h for h, c in zip(times["haul"], times["curl"], strict=True)]), 2
        )
        result[f"curl -o /dev/null MB/s (beside HAUL_HASH={mode})"] = round(size / med(times["curl"]) / 1e6)
        result[f"HAUL_HASH={mode} phases s (median)"] = {k: round(med(v), 3) for k, v in phases.items()}
    hashing = []
    for _ in range(bench.runs):
        started = time.perf_counter()
        sha256_of(bench.www / "cli.bin")
        hashing.append(time.perf_counter() - started)
    result["hashlib sha256 MB/s"] = round(size / med(hashing) / 1e6)
    result["haul CLI sha256 / hashlib sha256"] = round(
        result["haul CLI, HAUL_HASH=sha256 MB/s"] / result["hashlib sha256 MB/s"], 2
    )
    return result


def wait_delivered(bench: Bench, task_id: str, timeout: float = 300) -> float:
    """When task.completed for ``task_id`` reached the receiver (epoch seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for delivery in bench.receiver.accepted():
            if delivery.event["data"]["id"] == task_id:
                return delivery.at
        time.sleep(0.005)
    raise TimeoutError(f"no task.completed for {task_id} after {timeout}s")


def bench_rss(bench: Bench) -> dict[str, Any]:
    """3: peak RSS of a worker process downloading 64 MiB, and 1 GiB."""
    result = {}
    for name, size in (("64MiB", 64 * MIB), ("1GiB", GIB)):
        url = bench.file(f"rss-{name}.bin", size)
        worker = Worker(bench, threads=1)
        try:
            wait_done(bench, submit(bench, url))
            result[f"peak RSS {name} MiB"] = round(worker.peak_rss_kib() / 1024, 1)
        finally:
            worker.stop()
    result["difference MiB"] = round(result["peak RSS 1GiB MiB"] - result["peak RSS 64MiB MiB"], 1)
    return result


def bench_throughput(bench: Bench, tasks: int = 2000) -> dict[str, Any]:
    """4: tasks/s for 64 KiB files, 1 process x 8 threads, haul vs a bare Dramatiq actor."""
    from dramatiq import Message
    from dramatiq.brokers.redis import RedisBroker

    url = bench.file("small.bin", 64 * 1024)

    def haul() -> float:
        worker = Worker(bench, threads=8)
        try:
            started = time.time()
            ids = [submit(bench, f"{url}?n={n}") for n in range(tasks)]
            for task_id in ids:
                wait_done(bench, task_id, poll=0.01)
            return tasks / (time.time() - started)
        finally:
            worker.stop()

    def bare() -> float:
        env = {**os.environ, "BARE_REDIS_URL": bench.redis_url}
        log = (bench.root / "bare.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "ops.bench.bare", "--processes", "1", "--threads", "8"],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            time.sleep(2.0)
            broker = RedisBroker(url=bench.redis_url, namespace="bare")  # type: ignore[no-untyped-call]
            bench.client.delete("bare:done")
            (bench.root / "bare").mkdir(exist_ok=True)
            started = time.time()
            for n in range(tasks):
                path = str(bench.root / "bare" / f"{n}.bin")
                broker.enqueue(
                    Message(queue_name="bare", actor_name="fetch", args=(f"{url}?n={n}", path, bench.receiver.url),
                            kwargs={}, options={})
                )  # fmt: skip
            while int(bench.client.get("bare:done") or 0) < tasks:
                time.sleep(0.01)
            return tasks / (time.time() - started)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            log.close()

    rates = ratio_runs(bench.runs, {"haul": haul, "bare": bare})
    return {
        "haul tasks/s": round(med(rates["haul"]), 1),
        "bare actor tasks/s": round(med(rates["bare"]), 1),
        "haul / bare": round(med([h / b for h, b in zip(rates["haul"], rates["bare"], strict=True)]), 2),
    }


def bench_pickup(bench: Bench, count: int = 100) -> dict[str, Any]:
    """5: idle pickup, submit to the first byte requested at the origin."""
    url = bench.file("tiny.bin", 1024)
    worker = Worker(bench, threads=2)
    latencies = []
    try:
        for n in range(count):
            time.sleep(0.3)  # idle between tasks
            submitted = time.time()
            task_id = submit(bench, f"{url}?pickup={n}")
            wait_done(bench, task_id)
            for line in (bench.root / "access.log").read_text().splitlines():
                if f"pickup={n} " in line + " ":
                    latencies.append(float(line.split()[0]) - submitted)
                    break
    finally:
        worker.stop()
    latencies.sort()
    return {
        "p50 ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "p99 ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1),
        "samples": len(latencies),
    }


def bench_recovery_and_resume(bench: Bench, rounds: int = 3) -> dict[str, Any]:
    """6 and 7: SIGKILL mid-download; time until bytes flow on another worker; bytes served;
    and the same with the file changed on the origin in between. Medians of ``rounds``."""
    extra = {"HAUL_LEASE_SECONDS": "10", "HAUL_SWEEP_SECONDS": "2"}
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "supervisor"], env=bench.env(**extra), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        kept = [kill_and_resume(bench, extra, n, changed=False) for n in range(rounds)]
        changed = [kill_and_resume(bench, extra, n, changed=True) for n in range(rounds)]
    finally:
        os.killpg(supervisor.pid, signal.SIGTERM)
        supervisor.wait(30)
    return {
        "recovery s (lease 10 s, sweep 2 s)": round(med([r[0] for r in kept]), 1),
        "recovery s, each round": [round(r[0], 1) for r in kept],
        "resume: bytes served / size": round(med([r[1] for r in kept]), 4),
        "resume: file intact, every round": all(r[2] for r in kept),
        "changed file: result is the new file, intact, every round": all(r[2] for r in changed),
    }


def kill_and_resume(bench: Bench, extra: dict[str, str], round_: int, *, changed: bool) -> tuple[float, float, bool]:
    """One round: a worker killed at ~50% of a 1 GiB file, another takes over. Returns seconds
    from the kill to bytes flowing again, bytes served / size, and whether the result is intact."""
    name = f"resume-{int(changed)}.bin"
    bench.file(name, GIB)
    uri = f"/slow/{name}?round={round_}"
    first, second = Worker(bench, threads=1, **extra), None
    try:
        task_id = submit(bench, bench.url(name, slow=True) + f"?round={round_}")
        key = f"haul:task:{task_id}"
        while int(bench.client.hget(key, "bytes_done") or 0) < GIB // 2:
            time.sleep(0.02)
        first.kill()
        killed = time.time()
        at_kill = int(bench.client.hget(key, "bytes_done") or 0)
        if changed:
            new = bench.www / name
            with new.open("r+b") as handle:
                handle.seek(GIB // 4)
                handle.write(os.urandom(MIB))
            os.utime(new, (time.time() + 5 + round_, time.time() + 5 + round_))
        second = Worker(bench, threads=1, **extra)
        flowing = -1.0
        while True:
            holder = bench.client.hget(key, "worker") or b""
            worker_id = holder.decode() if isinstance(holder, bytes) else holder
            if (
                flowing < 0
                and worker_id.endswith(f":{second.child_pids()[0]}")
                and int(bench.client.hget(key, "bytes_done") or 0) > (0 if changed else at_kill)
            ):
                flowing = time.time() - killed
            if bench.client.hget(key, "state") == b"done":
                break
            time.sleep(0.02)
        stored = bench.root / "storage" / task_id / "file.bin"
        intact = sha256_of(stored) == sha256_of(bench.www / name)
        shutil.rmtree(stored.parent, ignore_errors=True)
        return flowing, bench.served(uri) / GIB, intact
    finally:
        first.kill()
        if second is not None:
            second.stop()


def bench_sweep(bench: Bench, tasks: int = 100_000, expired: int = 1000) -> dict[str, Any]:
    """8: supervisor sweep with 100,000 stored tasks, none expired and 1,000 expired."""
    from actors.manifest import spec_from_urls
    from actors.store import TaskStore
    from supervisor import sweeps

    logging.getLogger("supervisor.sweeps").setLevel(logging.ERROR)  # a warning per requeued task
    client = redis.Redis(port=bench.redis_port, db=1)
    store = TaskStore(client)
    spec = spec_from_urls(["https://cdn.example.com/v.mp4"])
    now = time.time()
    ids = [store.create(spec, now=now)[0] for _ in range(tasks)]
    for i, task_id in enumerate(ids):
        store.claim(task_id, worker="bench", now=now, lease_seconds=10 if i < expired else 10**6, max_attempts=5)

    def sweep(at: float) -> float:
        started = time.perf_counter()
        sweeps.requeue_stuck(store, at, max_attempts=bench.runs + 1, send_claim=lambda _: None, on_dead=lambda _: None)
        return time.perf_counter() - started

    idle = med([sweep(now + 5) for _ in range(7)])
    busy = [sweep(now + 20)]
    for round_ in range(1, bench.runs):  # the same 1,000 expire again, claimed later each round
        at = now + 1000 * round_
        for task_id in ids[:expired]:
            store.claim(task_id, worker="bench", now=at, lease_seconds=10, max_attempts=bench.runs + 1)
        busy.append(sweep(at + 20))
    client.flushdb()
    return {"none expired ms": round(idle * 1000, 2), f"{expired} expired ms": round(med(busy) * 1000, 1)}


def bench_redis(bench: Bench, tasks: int = 10_000, idle_seconds: float = 10) -> dict[str, Any]:
    """9: Redis memory per finished task; Redis commands per second of idle processes."""
    from actors.manifest import spec_from_manifest
    from actors.states import State
    from actors.store import TaskStore

    client = redis.Redis(port=bench.redis_port, db=2)
    store = TaskStore(client)
    spec = spec_from_manifest(
        {"name": "Course 12 - lesson", "key": "order", "files": [{"url": "https://cdn.example.com/c/12/lesson-01.mp4",
                                                                   "path": "lesson-01.mp4", "size": 73400320}]}
    )  # fmt: skip
    before = int(client.info("memory")["used_memory"])
    for n in range(tasks):
        task_id, _ = store.create(spec.__class__(files=spec.files, name=spec.name, key=f"order-{n}"), now=time.time())
        c = store.claim(task_id, worker="bench:1", now=time.time(), lease_seconds=60, max_attempts=5)
        store.advance(task_id, c.token, State.CLAIMED, State.DOWNLOADING, now=time.time(), lease_seconds=60)
        store.advance(task_id, c.token, State.DOWNLOADING, State.FINALIZING, now=time.time(), lease_seconds=60)
        store.release(task_id, c.token, State.DONE, now=time.time(), max_attempts=5)
    per_task = (int(client.info("memory")["used_memory"]) - before) / tasks
    client.flushdb()

    def commands_per_second(start: Callable[[], Callable[[], None]]) -> float:
        stop = start()
        time.sleep(3)
        first = int(bench.client.info("stats")["total_commands_processed"])
        time.sleep(idle_seconds)
        last = int(bench.client.info("stats")["total_commands_processed"])
        stop()
        return (last - first - 1) / idle_seconds

    def worker() -> Callable[[], None]:
        w = Worker(bench, threads=8)
        return w.stop

    def supervisor() -> Callable[[], None]:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor"], env=bench.env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

        def stop() -> None:
            proc.terminate()
            proc.wait(30)

        return stop

    return {
        "bytes per finished task": round(per_task),
        "idle worker process (8 threads) commands/s": round(commands_per_second(worker), 1),
        "idle supervisor commands/s": round(commands_per_second(supervisor), 1),
    }


def copies(store: Any, template: str, count: int, *, keyed: bool = False) -> list[str]:
    """``count`` records like ``template``'s (its fields, spec and state entry) under new ids,
    each with its own idempotency key when ``keyed``: what create, claim and release leave,
    written pipelined instead of three fsynced scripts per task."""
    import uuid

    from actors.states import State

    fields = store.client.hgetall(store.task_key(template))
    spec = store.client.get(store.spec_key(template))
    state = State(fields[b"state"].decode())
    score = store.client.zscore(store.state_key(state), template)
    pipe = store.client.pipeline(transaction=False)
    ids = []
    for _ in range(count):
        task_id = uuid.uuid4().hex
        record = dict(fields)
        if keyed:
            record[b"key"] = f"bench-{task_id}"
            pipe.set(f"{store.prefix}key:bench-{task_id}", task_id)
        pipe.hset(store.task_key(task_id), mapping=record)
        pipe.set(store.spec_key(task_id), spec)
        pipe.zadd(store.state_key(state), {task_id: score})
        ids.append(task_id)
        if len(pipe) >= 4000:
            pipe.execute()
    pipe.execute()
    return ids


def bench_prune(bench: Bench, records: int = 20_000) -> dict[str, Any]:
    """10: prune, records deleted per second, from 20,000 done tasks (each with an idempotency
    key) past their retention; and what that sustains with one sweep a minute."""
    from actors.manifest import spec_from_manifest
    from actors.states import State
    from actors.store import TaskStore
    from supervisor import sweeps
    from supervisor.jobs import PRUNE_SECONDS

    client = redis.Redis(port=bench.redis_port, db=3)
    store = TaskStore(client)
    staging = bench.root / "prune-staging"
    staging.mkdir(exist_ok=True)
    retain = 3600.0

    def run() -> tuple[float, int, int]:
        now = time.time()
        spec = spec_from_manifest({"key": "template", "files": [{"url": "https://cdn.example.com/v.mp4", "path": "v"}]})
        template, _ = store.create(spec, now=now)
        claim = store.claim(template, worker="bench:1", now=now, lease_seconds=60, max_attempts=5)
        store.release(template, claim.token, State.DONE, now=now, max_attempts=5)
        copies(store, template, records - 1, keyed=True)
        sweeps_run, first = 0, 0
        started = time.perf_counter()
        while store.counts()[State.DONE]:
            outcome = sweeps.prune(store, staging, now + retain + 1, retain_seconds=retain)
            sweeps_run, first = sweeps_run + 1, first or sum(outcome.values())
        took = time.perf_counter() - started
        if client.dbsize() != 1:  # the staged bytes total (0) only
            raise RuntimeError(f"prune left {client.dbsize()} keys")
        return records / took, first, sweeps_run

    rounds = [run() for _ in range(bench.runs)]
    rate = med([r[0] for r in rounds])
    # A sweep a minute, each removing what it finds up to its time budget
    per_sweep = rounds[0][1] if rounds[0][1] < records else rate * sweeps.DEFAULT_PRUNE_BUDGET_SECONDS
    client.flushdb()
    return {
        "prune records/s": round(rate),
        f"records one sweep removed (of {records})": rounds[0][1],
        f"sustained records/s (one sweep per {PRUNE_SECONDS:.0f} s)": round(per_sweep / PRUNE_SECONDS, 1),
    }


def bench_scrape(bench: Bench, tasks: int = 100_000, claimed: int = 200, hosts: int = 20) -> dict[str, Any]:
    """11: one GET of the supervisor's /metrics with 100,000 tasks stored (some 300,000 keys),
    200 of them holding download slots on 20 hosts."""
    import urllib.request

    from actors.manifest import spec_from_manifest
    from actors.registry import WorkerRegistry
    from actors.states import State
    from actors.store import StageLimits, TaskStore
    from supervisor.http import create_server, serve_in_background
    from supervisor.metrics import Metrics

    client = redis.Redis(port=bench.redis_port, db=4)
    store = TaskStore(client)
    now = time.time()

    def task(n: int, key: str | None = None) -> str:
        entry = {"url": f"https://cdn{n % hosts}.example.com/v{n}.mp4", "path": "v.mp4"}
        return store.create(spec_from_manifest({"files": [entry], **({"key": key} if key else {})}), now=now)[0]

    done = task(0, key="template")
    claim = store.claim(done, worker="bench:1", now=now, lease_seconds=60, max_attempts=5)
    store.release(done, claim.token, State.DONE, now=now, max_attempts=5)
    copies(store, done, tasks - claimed - tasks // 10 - 1, keyed=True)
    copies(store, task(1), tasks // 10 - 1)  # queued
    limits = StageLimits(downloads=claimed, downloads_per_host=claimed)
    for n in range(claimed):
        store.claim(task(n), worker="bench:1", now=now, lease_seconds=3600, max_attempts=5, limits=limits)
    limit_settings = {"download": claimed, "download_per_host": claimed, "finalize": 4, "staging_bytes": 0}
    metrics = Metrics(store, WorkerRegistry(client, store.prefix), lambda: now, limit_settings)
    server = create_server("127.0.0.1", 0, metrics.registry, lambda: (True, {}))
    serve_in_background(server)
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"

    def scrape() -> float:
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
        took = time.perf_counter() - started
        if b'haul_stage_slots_in_use{slots="download"} ' + str(claimed).encode() not in body:
            raise RuntimeError("the scrape does not show the download slots in use")
        return took

    try:
        scrape()
        before = int(client.info("stats")["total_commands_processed"])
        times = [scrape() for _ in range(20)]
        per_scrape = (int(client.info("stats")["total_commands_processed"]) - before - 1) / len(times)
    finally:
        server.shutdown()
        server.server_close()
    stored = sum(store.counts().values())
    keys = client.dbsize()
    client.flushdb()
    return {
        "tasks stored": stored,
        "keys in the database": keys,
        "scrape ms (median of 20)": round(med(times) * 1000, 2),
        "scrape ms (slowest of 20)": round(max(times) * 1000, 2),
        "Redis commands per scrape": round(per_scrape, 1),
    }


def compare(results: dict[str, Any]) -> None:
    """Figures of two benchmarks of the same run set side by side."""
    if "prune" in results and "throughput" in results:
        prune, throughput = results["prune"], results["throughput"]["haul tasks/s"]
        sustained = next(v for k, v in prune.items() if k.startswith("sustained"))
        prune["haul tasks/s (throughput, same run)"] = throughput
        prune["sustained prune / haul tasks/s"] = round(sustained / throughput, 1)
        prune["prune records/s / haul tasks/s"] = round(prune["prune records/s"] / throughput, 1)
        print("prune vs throughput")
        for key in list(prune)[-3:]:
            print(f"  {key}: {prune[key]}", flush=True)


BENCHMARKS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "download": bench_download,
    "hash": bench_hash,
    "end_to_end": bench_end_to_end,
    "rss": bench_rss,
    "throughput": bench_throughput,
    "prune": bench_prune,
    "pickup": bench_pickup,
    "recovery_resume": bench_recovery_and_resume,
    "sweep": bench_sweep,
    "scrape": bench_scrape,
    "redis": bench_redis,
    "cli": bench_cli,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run just these")
    parser.add_argument("--runs", type=int, default=5, help="rounds per comparison (median reported)")
    args = parser.parse_args()
    bench = Bench(args.runs)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": args.runs,
    }
    try:
        for name in args.only or list(BENCHMARKS):
            started = time.monotonic()
            results[name] = BENCHMARKS[name](bench)
            print(f"{name} ({time.monotonic() - started:.0f}s)", flush=True)
            for key, value in results[name].items():
                print(f"  {key}: {value}", flush=True)
        compare(results)
    finally:
        bench.close()
        (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {HERE / 'results.json'}")


if __name__ == "__main__":
    main()
