"""Benchmarks over a CDN that caps each connection (issue 16): nginx with ``limit_rate`` per
connection (20 MB/s, and 1 MB/s with files a twentieth the size) on 127.0.0.1. A course, haul
end to end with HAUL_TASK_PARALLEL_FILES=16 against ``aria2c -j16`` and ``curl --parallel
--parallel-max 16``, and files at once from 1 to 8; one 1 GiB file split over 16 connections
against ``aria2c -x16 -s16``, and haul's defaults against one connection unthrottled."""

from __future__ import annotations

import functools
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

from ops.bench.harness import GIB, MIB, Bench, Worker, med, ratio_runs, wait_done

FILES = 100


def submit_course(bench: Bench, urls: list[str]) -> str:
    from actors.manifest import spec_from_manifest
    from actors.store import TaskStore

    entries = [{"url": url, "path": f"lesson-{n:03}.bin"} for n, url in enumerate(urls)]
    spec = spec_from_manifest({"files": entries, "accept": ["*/*"]})
    task_id, _ = TaskStore(bench.client).create(spec, now=time.time())
    bench.messages.claim(task_id)
    return task_id


def haul_course(bench: Bench, urls: list[str]) -> float:
    """Seconds from submitting the course to its task being done (a worker is running)."""
    started = time.time()
    task_id = submit_course(bench, urls)
    took = wait_done(bench, task_id, timeout=1800) - started
    shutil.rmtree(bench.root / "storage" / task_id, ignore_errors=True)
    return took


def course_sides(bench: Bench, urls: list[str], parallel: int) -> dict[str, Any]:
    """haul (a worker with ``parallel`` files at once), aria2c and curl, alternating."""
    out = bench.root / "course-out"

    def tool(command: list[str]) -> float:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        took = time.perf_counter() - started
        shutil.rmtree(out, ignore_errors=True)
        return took

    listing = bench.root / "course-urls.txt"
    listing.write_text("".join(f"{url}\n out=lesson-{n:03}.bin\n" for n, url in enumerate(urls)))
    config = bench.root / "course-curl.txt"
    config.write_text("".join(f'url = "{url}"\noutput = "lesson-{n:03}.bin"\n' for n, url in enumerate(urls)))
    aria2c = ["aria2c", "-x16", "-s16", f"-j{parallel}", "--file-allocation=none", "-q", "-i", str(listing)]
    curl = ["curl", "-s", "-f", "--parallel", "--parallel-max", str(parallel), "-K", str(config)]
    worker = Worker(bench, threads=1, HAUL_TASK_PARALLEL_FILES=str(parallel))
    try:
        sides = {"haul": lambda: haul_course(bench, urls), "curl": lambda: tool(curl)}
        if shutil.which("aria2c"):
            sides["aria2c"] = lambda: tool(aria2c)
        times = ratio_runs(bench.runs, sides)
    finally:
        worker.stop()
    result: dict[str, Any] = {f"{name} s": round(med(seconds), 2) for name, seconds in times.items()}
    for other in ("aria2c", "curl"):
        if other in times:
            ratios = [o / h for h, o in zip(times["haul"], times[other], strict=True)]
            result[f"haul speed / {other}"] = round(med(ratios), 2)
    return result


def bench_course(bench: Bench) -> dict[str, Any]:
    """16: 100 files over 20 MB/s and 1 MB/s per connection, 16 at once, vs aria2c and curl."""
    results: dict[str, Any] = {}
    for location, size in (("cdn20", 20 * MIB), ("cdn1", MIB)):
        for n in range(FILES):
            bench.file(f"course-{size}-{n:03}.bin", size)
        urls = [f"http://127.0.0.1:{bench.nginx_port}/{location}/course-{size}-{n:03}.bin" for n in range(FILES)]
        results[f"{FILES} x {size // MIB} MiB at {location[3:]} MB/s per connection, 16 at once"] = course_sides(
            bench, urls, 16
        )
    return results


def bench_course_default(bench: Bench) -> dict[str, Any]:
    """16: HAUL_TASK_PARALLEL_FILES at 1, 2, 4 and 8, on 24 x 20 MiB over 20 MB/s per
    connection and over the unthrottled origin: what the default is chosen by. One worker at a
    time (they would share the queue), started before each run's clock."""
    for n in range(24):
        bench.file(f"course-{20 * MIB}-{n:03}.bin", 20 * MIB)
    results: dict[str, Any] = {}
    for location in ("cdn20", ""):
        prefix = f"http://127.0.0.1:{bench.nginx_port}/{location + '/' if location else ''}"
        urls = [f"{prefix}course-{20 * MIB}-{n:03}.bin" for n in range(24)]

        def run(width: int, urls: list[str] = urls) -> float:
            worker = Worker(bench, threads=1, HAUL_TASK_PARALLEL_FILES=str(width))
            try:
                return haul_course(bench, urls)
            finally:
                worker.stop()

        sides: dict[str, Callable[[], float]] = {
            f"{width} at once s": functools.partial(run, width) for width in (1, 2, 4, 8)
        }
        times = ratio_runs(bench.runs, sides)
        results[location or "unthrottled"] = {name: round(med(seconds), 2) for name, seconds in times.items()}
    return results


def bench_split(bench: Bench) -> dict[str, Any]:
    """16a: one 1 GiB file over 20 MB/s per connection, haul with HAUL_SPLIT=16 vs ``aria2c
    -x16 -s16``; and the unthrottled origin of benchmark 1, haul's defaults vs one connection
    (HAUL_SPLIT=1, before splitting existed), end to end."""
    bench.file("big.bin", GIB)
    capped = f"http://127.0.0.1:{bench.nginx_port}/cdn20/big.bin"
    out = bench.root / "split-out"

    def aria2c() -> float:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        started = time.perf_counter()
        subprocess.run(["aria2c", "-x16", "-s16", "--file-allocation=none", "-q", "-d", str(out), capped],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        took = time.perf_counter() - started
        shutil.rmtree(out, ignore_errors=True)
        return took

    def haul(url: str, **env: str) -> float:
        worker = Worker(bench, threads=1, **env)
        try:
            return haul_course(bench, [url])
        finally:
            worker.stop()

    results: dict[str, Any] = {}
    times = ratio_runs(bench.runs, {"haul": functools.partial(haul, capped, HAUL_SPLIT="16"), "aria2c": aria2c})
    results["1 GiB at 20 MB/s per connection, 16 connections"] = {
        "haul s": round(med(times["haul"]), 2), "aria2c s": round(med(times["aria2c"]), 2),
        "haul speed / aria2c": round(med([a / h for h, a in zip(times["haul"], times["aria2c"], strict=True)]), 2),
    }  # fmt: skip
    plain = bench.url("big.bin")
    times = ratio_runs(bench.runs, {"defaults": functools.partial(haul, plain),
                                    "one connection": functools.partial(haul, plain, HAUL_SPLIT="1")})  # fmt: skip
    results["1 GiB unthrottled (benchmark 1's origin)"] = {
        "defaults s": round(med(times["defaults"]), 2), "one connection s": round(med(times["one connection"]), 2),
        "defaults speed / one connection": round(
            med([o / d for d, o in zip(times["defaults"], times["one connection"], strict=True)]), 2
        ),
    }  # fmt: skip
    return results
