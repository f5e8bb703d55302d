"""Benchmarks of storing: a 1 GiB upload from staging into ``rclone serve s3`` by haul's S3
storage, against ``rclone copyto`` and boto3's ``upload_file`` (default TransferConfig) to the
same server, alternating in one run; and the peak memory of a process storing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

from ops.bench.harness import GIB, REPO, Bench, med, ratio_runs
from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server

#: One haul upload in a process of its own: prints its seconds and its peak RSS (KiB).
HAUL_UPLOAD = """
import json, os, resource, sys, time
from pathlib import Path
from actors.s3storage import S3Storage
from actors.sandbox import Sandbox
from actors.storagetarget import S3Access, StorageTarget
from actors.task import FileSpec
staging, endpoint = Path(sys.argv[1]), sys.argv[2]
access = S3Access(region="us-east-1", endpoint_url=endpoint, access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                  secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"])
storage = S3Storage(StorageTarget("s3", bucket="media", prefix="haul"), access, key_template="{task_id}/{path}")
sandbox = Sandbox(staging, sys.argv[3])
started = time.perf_counter()
storage.commit(sandbox, [FileSpec(url="https://origin.example/big.bin", path="big.bin")])
took = time.perf_counter() - started
print(json.dumps({"seconds": took, "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

BOTO3_UPLOAD = """
import sys, time, boto3
from botocore.config import Config
client = boto3.client("s3", endpoint_url=sys.argv[2], region_name="us-east-1",
                      config=Config(s3={"addressing_style": "path"}))
started = time.perf_counter()
client.upload_file(sys.argv[1], "media", sys.argv[3])
print(time.perf_counter() - started)
"""


def bench_upload(bench: Bench) -> dict[str, Any]:
    """14: 1 GiB from staging into an S3 server: haul vs rclone copyto vs boto3 upload_file.
    (Past 50 lines: the three sides are set up here, beside the figures they feed.)"""
    server = S3Server(bench.root / "s3")
    server.start()
    from actors.sandbox import Sandbox
    from actors.task import FileSpec

    staging = bench.root / "upload-staging"
    source = Sandbox(staging, uuid.uuid4().hex).file(FileSpec(url="https://origin.example/big.bin", path="big.bin"))
    source.parent.mkdir(parents=True, exist_ok=True)
    with source.open("wb") as handle:
        for _ in range(GIB // (1 << 20)):
            handle.write(os.urandom(1 << 20))
    env = {**os.environ, "RCLONE_CONFIG": str(bench.root / "rclone.conf"), "RCLONE_CONFIG_B_TYPE": "s3",
           "RCLONE_CONFIG_B_PROVIDER": "Other", "RCLONE_CONFIG_B_ENDPOINT": server.endpoint,
           "RCLONE_CONFIG_B_ACCESS_KEY_ID": ACCESS_KEY, "RCLONE_CONFIG_B_SECRET_ACCESS_KEY": SECRET_KEY,
           "RCLONE_CONFIG_B_FORCE_PATH_STYLE": "true", "RCLONE_CONFIG_B_REGION": "us-east-1"}  # fmt: skip
    keys = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    rss: list[int] = []

    def haul() -> float:
        """A task of its own each run (the object's key names it), so nothing is skipped."""
        run_id = uuid.uuid4().hex
        placed = Sandbox(staging, run_id).file(FileSpec(url="https://origin.example/big.bin", path="big.bin"))
        placed.parent.mkdir(parents=True)
        os.link(source, placed)
        answer = subprocess.run(
            [sys.executable, "-c", HAUL_UPLOAD, str(staging), server.endpoint, run_id],
            cwd=REPO, env=keys, capture_output=True, text=True,
        )  # fmt: skip
        if answer.returncode != 0:
            raise RuntimeError(f"haul's upload failed: {answer.stderr[-2000:]}")
        figures = json.loads(answer.stdout.splitlines()[-1])
        rss.append(int(figures["rss_kib"]))
        return float(figures["seconds"])

    def rclone() -> float:
        from actors.rclonestorage import rclone_binary

        started = time.perf_counter()
        target = f"b:media/rclone/{uuid.uuid4().hex}/big.bin"
        subprocess.run([rclone_binary(), "copyto", str(source), target], env=env, check=True)
        return time.perf_counter() - started

    def boto3() -> float:
        answer = subprocess.run(
            [sys.executable, "-c", BOTO3_UPLOAD, str(source), server.endpoint, f"boto3/{uuid.uuid4().hex}/big.bin"],
            env=keys,
            capture_output=True,
            text=True,
            check=True,
        )
        return float(answer.stdout.strip())

    try:
        times = ratio_runs(bench.runs, {"haul": haul, "rclone": rclone, "boto3": boto3})
    finally:
        server.stop()
    rate = {name: round(GIB / med(t) / 1e6) for name, t in times.items()}
    faster = [min(r, b) for r, b in zip(times["rclone"], times["boto3"], strict=True)]
    return {
        "MB/s": rate,
        "haul / faster of rclone and boto3": round(med([f / h for h, f in zip(times["haul"], faster, strict=True)]), 2),
        "peak RSS of the storing process MiB": round(max(rss) / 1024, 1),
    }
