"""haul's benchmarks, side by side with plain tools, in one run. See ops/bench/run.

Each figure is a median of several runs; each comparison is a ratio measured in the same run
with the two sides alternating. Prints a table and writes ops/bench/results.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ops.bench.api import bench_api_events, bench_api_submit
from ops.bench.control_plane import bench_prune, bench_redis, bench_scrape, bench_sweep
from ops.bench.course import bench_course, bench_course_default, bench_split
from ops.bench.dashboard import bench_dashboard_live, bench_dashboard_pages
from ops.bench.harness import HERE, Bench
from ops.bench.pages import bench_dash, bench_hls
from ops.bench.storage import bench_upload
from ops.bench.tasks import bench_pickup, bench_recovery_and_resume, bench_rss, bench_throughput
from ops.bench.transfer import bench_cli, bench_download, bench_end_to_end, bench_hash


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
    "upload": bench_upload,
    "api_submit": bench_api_submit,
    "api_events": bench_api_events,
    "course": bench_course,
    "course_default": bench_course_default,
    "split": bench_split,
    "hls": bench_hls,
    "dash": bench_dash,
    "dashboard_pages": bench_dashboard_pages,
    "dashboard_live": bench_dashboard_live,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run just these")
    parser.add_argument("--runs", type=int, default=5, help="rounds per comparison (median reported)")
    parser.add_argument("--seconds", type=float, default=60, help="dashboard_live's window (seconds)")
    args = parser.parse_args()
    benchmarks: dict[str, Callable[[Bench], dict[str, Any]]] = {
        **BENCHMARKS,
        "dashboard_live": functools.partial(bench_dashboard_live, seconds=args.seconds),
    }
    bench = Bench(args.runs)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": args.runs,
    }
    try:
        for name in args.only or list(benchmarks):
            started = time.monotonic()
            results[name] = benchmarks[name](bench)
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
