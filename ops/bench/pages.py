"""Benchmarks of page files (issue 17): a recording made by ffmpeg, served by nginx on 127.0.0.1
with a page that shows it, as an HLS stream and as a DASH presentation of separate video and
audio (which both sides download as two tracks and merge); haul end to end (resolve,
fragments, join) against ``yt-dlp -N`` with the same fragment concurrency and the same ffmpeg,
same run, alternating."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops.bench.harness import Bench, Worker, med, ratio_runs, wait_done
from tests import media

#: The recording: minutes of 640x360 video and sound, cut in fragments of a second.
SECONDS = 300
#: Fragments at once, on both sides (haul: HAUL_SPLIT; yt-dlp: -N).
AT_ONCE = 4
#: The recording's picture.
SIZE = "640x360"


def make_hls(folder: Path) -> tuple[str, int]:
    """An HLS stream in ``folder`` (made once): its playlist's name, and its fragments."""
    if not (folder / "index.m3u8").exists():
        media.make_hls(folder, SECONDS, SIZE)
    return "index.m3u8", len(list(folder.glob("seg-*.ts")))


def make_dash(folder: Path) -> tuple[str, int]:
    """A DASH presentation in ``folder`` (made once), video and audio apart: its manifest's
    name, and its fragments."""
    if not (folder / "manifest.mpd").exists():
        media.make_dash(folder, SECONDS, SIZE, video_file=False)
    return "manifest.mpd", len(list(folder.glob("chunk-*.m4s")))


def bench_page(bench: Bench, name: str, make: Callable[[Path], tuple[str, int]], source: str) -> dict[str, Any]:
    """Seconds from submit to done for haul, from start to exit for yt-dlp; fragments a second."""
    from actors.manifest import spec_from_manifest
    from actors.store import TaskStore
    from actors.tracks import ffmpeg_path

    folder = bench.www / name
    folder.mkdir(exist_ok=True)
    manifest, fragments = make(folder)
    (bench.www / f"{name}.html").write_text(
        "<!doctype html><html><head><title>Lecture</title></head>"
        f'<body><video controls><source src="/{name}/{manifest}" type="{source}"></video></body></html>'
    )
    page = bench.url(f"{name}.html")
    out = bench.root / f"{name}-out"

    def haul() -> float:
        worker = Worker(bench, threads=1, HAUL_SPLIT=str(AT_ONCE), HAUL_HOST_MIN_INTERVAL_SECONDS="0")
        try:
            started = time.time()
            spec = spec_from_manifest({"files": [{"page": page, "path": "lecture.mp4"}]})
            task_id, _ = TaskStore(bench.client).create(spec, now=time.time())
            bench.messages.claim(task_id)
            took = wait_done(bench, task_id, timeout=600) - started
            shutil.rmtree(bench.root / "storage" / task_id, ignore_errors=True)
            return took
        finally:
            worker.stop()

    def yt_dlp() -> float:
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run(
            [str(Path(sys.executable).with_name("yt-dlp")), "-q", "--no-warnings", "-N", str(AT_ONCE),
             "--ffmpeg-location", ffmpeg_path(), "-o", str(out / "lecture.%(ext)s"), page],
            check=True,
        )  # fmt: skip
        took = time.perf_counter() - started
        shutil.rmtree(out, ignore_errors=True)
        return took

    times = ratio_runs(bench.runs, {"haul": haul, "yt-dlp": yt_dlp})
    return {
        f"{SECONDS} s {name}, {fragments} fragments, {AT_ONCE} at once": {
            "haul s": round(med(times["haul"]), 2), "yt-dlp s": round(med(times["yt-dlp"]), 2),
            "haul speed / yt-dlp": round(med([y / h for h, y in zip(times["haul"], times["yt-dlp"], strict=True)]), 2),
            "haul fragments/s": round(fragments / med(times["haul"]), 1),
        }
    }  # fmt: skip


def bench_hls(bench: Bench) -> dict[str, Any]:
    """A page's HLS stream (one track of MPEG-TS fragments)."""
    return bench_page(bench, "hls", make_hls, "application/x-mpegURL")


def bench_dash(bench: Bench) -> dict[str, Any]:
    """A page's DASH presentation of separate video and audio (two tracks of fMP4 fragments, merged)."""
    return bench_page(bench, "dash", make_dash, "application/dash+xml")
