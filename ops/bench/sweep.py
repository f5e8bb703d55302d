"""Benchmark: supervisor sweep cost with 100,000 stored tasks (none expired, then 1,000 expired).

Starts its own redis-server on a free port. Prints a line per figure and writes
ops/bench/sweep.json. Run: .venv/bin/python ops/bench/sweep.py [--tasks N]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from actors.store import TaskStore
from actors.task import spec_from_urls
from supervisor import sweeps

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--expired", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    logging.disable(logging.ERROR)  # one warning per requeued task is the daemon's business, not ours
    folder = Path(tempfile.mkdtemp(prefix="haul-bench-redis-"))
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--dir", str(folder), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        store = TaskStore(client)
        spec = spec_from_urls(["https://cdn.example.com/v.mp4"])
        now = time.time()
        started = time.perf_counter()
        ids = [store.create(spec, now=now)[0] for _ in range(args.tasks)]
        for i, task_id in enumerate(ids):
            lease = 10 if i < args.expired else 10_000
            store.claim(task_id, worker="bench", now=now, lease_seconds=lease, max_attempts=5)
        print(f"setup: {args.tasks} tasks stored and claimed in {time.perf_counter() - started:.1f}s")

        def timed(at: float) -> float:
            t0 = time.perf_counter()
            sweeps.requeue_stuck(store, at, max_attempts=5, send_claim=lambda _: None, on_dead=lambda _: None)
            return time.perf_counter() - t0

        idle = [timed(now + 5) for _ in range(args.runs)]
        busy = timed(now + 20)  # requeues the expired ones (once: they are queued afterwards)
        memory = int(client.info("memory")["used_memory"])
        result = {
            "tasks": args.tasks,
            "sweep_none_expired_ms_median": round(statistics.median(idle) * 1000, 3),
            "sweep_expired": args.expired,
            "sweep_expired_ms": round(busy * 1000, 1),
            "redis_used_memory_bytes": memory,
        }
        idle_ms = result["sweep_none_expired_ms_median"]
        print(f"sweep, {args.tasks} tasks, none expired: {idle_ms} ms (median of {args.runs})")
        print(f"sweep, {args.tasks} tasks, {args.expired} expired: {result['sweep_expired_ms']} ms")
        (HERE / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
