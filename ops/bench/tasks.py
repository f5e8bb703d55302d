"""Benchmarks of how tasks flow: a worker's memory, throughput against a bare Dramatiq actor,
idle pickup, recovery after SIGKILL and resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from ops.bench.harness import (
    GIB,
    MIB,
    REPO,
    Bench,
    Worker,
    med,
    ratio_runs,
    sha256_of,
    submit,
    wait_done,
)


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
