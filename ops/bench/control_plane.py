"""Benchmarks of the control plane: the requeue sweep, Redis memory and idle load, prune,
and a /metrics scrape with many stored tasks."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from ops.bench.harness import (
    REPO,
    Bench,
    Worker,
    med,
)


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
    """9: Redis memory per finished task (its record, spec, key, state entry, its own event
    stream and its events in the stream of all tasks); Redis commands per second of idle
    processes."""
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
        # progress as a worker writes it: each renewal a task.progress (the last one kept), then
        # the file's file.completed with the download's end, as a real run leaves its events
        for done in (20, 40, 60):
            store.heartbeat(task_id, c.token, now=time.time() + done, lease_seconds=60,
                            bytes_done=done * 1024 * 1024, bytes_total=73400320, files_done=0)  # fmt: skip
        store.finish_download(task_id, c.token, now=time.time() + 70, lease_seconds=60,
                              progress=(73400320, 73400320, 1), finalize_limit=0)  # fmt: skip
        store.release(
            task_id,
            c.token,
            State.DONE,
            now=time.time() + 80,
            max_attempts=5,
            stored=[{"path": "lesson-01.mp4", "size": 73400320, "location": "/srv/media/x/lesson-01.mp4"}],
        )
    per_task = (int(client.info("memory")["used_memory"]) - before) / tasks
    # The stream of all tasks is capped (HAUL_EVENTS_RETAIN, 100,000 events), not kept per task
    everything = f"{store.prefix}events"
    stream_bytes, stream_events = int(client.memory_usage(everything, samples=0) or 0), int(client.xlen(everything))
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
        "bytes per finished task, all in": round(per_task),
        "bytes per finished task, without the (capped) stream of all tasks": round(per_task - stream_bytes / tasks),
        "stream of all tasks: bytes per event (at most HAUL_EVENTS_RETAIN events)": round(
            stream_bytes / max(stream_events, 1)
        ),
        "idle worker process (8 threads) commands/s": round(commands_per_second(worker), 1),
        "idle supervisor commands/s": round(commands_per_second(supervisor), 1),
    }


def copies(store: Any, template: str, count: int, *, keyed: bool = False) -> list[str]:
    """``count`` records like ``template``'s (its fields, spec and state entry) under new ids,
    each with its own idempotency key when ``keyed``: what create, claim and release leave,
    written pipelined instead of three fsynced scripts per task."""

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
    200 of them holding download slots on 20 hosts. (Past 50 lines: the store is filled here, in
    the shape the scrape reads, beside the figures it gives.)"""
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
