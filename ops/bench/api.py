"""Benchmarks of the HTTP API (issue 15): submits per second through one ``haul api`` process
under 32 concurrent keep-alive connections from wrk, against the in-process client,
alternating; and 1,000 Server-Sent Events subscribers over 100 tasks' streams while each task
reports progress once a second: delivery latency from the state change to its receipt, and the
API process's peak RSS."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ops.bench.harness import REPO, Bench, med, ratio_runs
from tests.servers import free_port, wait_port

HERE = Path(__file__).resolve().parent

TOKEN = "bench-token-0123456789abcdef"
CONNECTIONS, SECONDS = 32, 10
SUBSCRIBERS, STREAMED_TASKS = 1000, 100

#: wrk's script: a POST of a new task under an Idempotency-Key of its own each time (a table's
#: address makes each thread's prefix unique). The token is in the script file, not on argv.
SUBMIT_LUA = """
local prefix, n = nil, 0
init = function(args) prefix = tostring({}):gsub("table: ", "") end
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/tasks", {["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer %s", ["Idempotency-Key"] = prefix .. "-" .. n},
    '{"urls": ["https://cdn.example.com/course/lesson.mp4"]}')
end
"""


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def start_api(bench: Bench, **extra: str) -> tuple[subprocess.Popen[bytes], int]:
    """``haul api`` on a free port, with the bench's token (and ``extra`` settings)."""
    port = free_port()
    env = bench.env(HAUL_API_PORT=str(port), HAUL_API_TOKENS=f"bench:{TOKEN}", **extra)
    api = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "api"], env=env, cwd=REPO,
                           stdout=(bench.root / "api.log").open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    wait_port(port, "haul api", process=api)
    return api, port


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)


def bench_api_submit(bench: Bench) -> dict[str, Any]:
    """15: submits per second, wrk through one haul api process vs the in-process client."""
    from actors.client import Client
    from actors.settings import Settings

    api, port = start_api(bench)
    script = bench.root / "submit.lua"
    script.write_text(SUBMIT_LUA.replace("%s", TOKEN))
    latency: dict[str, list[float]] = {"p50 ms": [], "p99 ms": []}
    client = Client(Settings.from_env(bench.env()))
    client_latency: list[float] = []

    def over_http() -> float:
        answer = subprocess.run(
            ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--latency", "-s", str(script),
             f"http://127.0.0.1:{port}"], capture_output=True, text=True, check=True,
        )  # fmt: skip
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", answer.stdout)[1])  # type: ignore[index]
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", answer.stdout)
        if errors:
            raise RuntimeError(f"wrk: {errors[1]} failed submits:\n{answer.stdout}")
        for name, share in (("p50 ms", "50%"), ("p99 ms", "99%")):
            value, unit = re.search(rf"{share}\s+([\d.]+)(us|ms|s)", answer.stdout).groups()  # type: ignore[union-attr]
            latency[name].append(float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit])
        return rate

    def in_process() -> float:
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < SECONDS:
            before = time.perf_counter()
            client.submit(["https://cdn.example.com/course/lesson.mp4"], key=f"in-process-{uuid.uuid4().hex}")
            client_latency.append((time.perf_counter() - before) * 1000)
            done += 1
        return done / (time.perf_counter() - started)

    try:
        rates = ratio_runs(bench.runs, {"api": over_http, "client": in_process})
        rss = peak_rss_mib(api.pid)
    finally:
        api.terminate()
        api.wait(30)
        client.close()
    return {
        "submits/s through haul api (wrk, 32 connections)": round(med(rates["api"])),
        "latency p50 / p99 ms": [round(med(latency["p50 ms"]), 1), round(med(latency["p99 ms"]), 1)],
        "submits/s in-process client (one thread)": round(med(rates["client"])),
        "in-process latency p50 / p99 ms": [
            round(percentile(client_latency, 0.5), 2),
            round(percentile(client_latency, 0.99), 2),
        ],  # fmt: skip
        "api / in-process": round(med([a / c for a, c in zip(rates["api"], rates["client"], strict=True)]), 2),
        "haul api peak RSS MiB": rss,
    }


def bench_api_events(bench: Bench, seconds: float = 20) -> dict[str, Any]:
    """15: 1,000 SSE subscribers over 100 tasks, each reporting progress once a second."""
    from actors.manifest import spec_from_urls
    from actors.states import State
    from actors.store import Renewal, TaskStore

    store = TaskStore.from_url(bench.redis_url)
    tokens = {}
    for n in range(STREAMED_TASKS):
        task_id, _ = store.create(spec_from_urls([f"https://cdn.example.com/{n}.mp4"]), now=time.time())
        tokens[task_id] = store.claim(task_id, worker="bench:1", now=time.time(), lease_seconds=600,
                                      max_attempts=5, start=State.DOWNLOADING).token  # fmt: skip
    api, port = start_api(bench)
    subscribers = subprocess.Popen(
        ["node", str(HERE / "subscribers.mjs")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "BENCH_PORT": str(port), "BENCH_TOKEN": TOKEN, "BENCH_TASKS": ",".join(tokens),
             "BENCH_COUNT": str(SUBSCRIBERS), "BENCH_SECONDS": str(seconds)},
    )  # fmt: skip
    stop = threading.Event()

    def progress() -> None:
        done = 0
        while not stop.is_set():
            done += 1024 * 1024
            renewals = [Renewal(t, token, (done, 100 * 1024 * 1024, 0)) for t, token in tokens.items()]
            store.renew_many(renewals, now=time.time(), lease_seconds=600)
            stop.wait(1.01)  # progress events are at most one a second per task

    try:
        assert subscribers.stdout is not None
        if subscribers.stdout.readline().strip() != "connected":
            raise RuntimeError("the subscribers did not connect")
        producer = threading.Thread(target=progress, daemon=True)
        producer.start()
        latencies: list[float] = json.loads(subscribers.stdout.readline())
        stop.set()
        producer.join()
        rss = peak_rss_mib(api.pid)
    finally:
        stop.set()
        subscribers.kill()
        api.terminate()
        api.wait(30)
    expected = SUBSCRIBERS * seconds  # about one progress event a second per subscriber
    return {
        "subscribers / tasks": f"{SUBSCRIBERS} / {STREAMED_TASKS}",
        "events received": len(latencies),
        "events received / expected (1 a second each)": round(len(latencies) / expected, 2),
        "delivery latency p50 / p99 ms": [round(percentile(latencies, 0.5), 1), round(percentile(latencies, 0.99), 1)],
        "haul api peak RSS MiB": rss,
    }
