"""Benchmarks of how fast bytes move: the download stage against curl, hashing, end to end
in process and through the CLI (with where its time goes)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ops.bench.harness import (
    GIB,
    REPO,
    Bench,
    Worker,
    curl,
    med,
    ratio_runs,
    sha256_of,
    submit,
    wait_delivered,
    wait_done,
)


def curl_to_disk(url: str, out: Path, *, synced: bool = False) -> float:
    """curl into a file in ``out``, then with ``synced`` ``sync FILE``: the same durability haul
    gives (it fsyncs before renaming)."""
    started = time.perf_counter()
    curl(url, str(out / "curl.bin"))
    if synced:
        subprocess.run(["sync", str(out / "curl.bin")], check=True)
    took = time.perf_counter() - started
    (out / "curl.bin").unlink()
    return took


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

    haul(False)()  # warm up: connection pool, page cache of the source file
    times = ratio_runs(
        bench.runs,
        {"haul": haul(False), "haul_sha256": haul(True), "curl_disk": lambda: curl_to_disk(url, out),
         "curl_disk_synced": lambda: curl_to_disk(url, out, synced=True), "curl_null": lambda: curl(url, "/dev/null")},
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


def cli_run(bench: Bench, url: str, env: dict[str, str], phases: dict[str, list[float]]) -> float:
    """One ``haul submit`` of ``url`` until its webhook arrived (seconds); ``phases`` gets the
    CLI's own time, the pickup until nginx began serving, the transfer and the rest."""
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
    spans = (exited - started, asked - exited, served - asked, arrived - served)
    for phase, seconds in zip(phases, spans, strict=True):
        phases[phase].append(seconds)
    shutil.rmtree(bench.root / "storage" / task_id, ignore_errors=True)
    return arrived - started


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
            return cli_run(bench, url, env, phases)

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
