"""Property test of the whole pipeline under randomized timing.

A persistent redis-server (the fault suite's ``Stack``), three real worker processes and a
real supervisor, with short leases; tasks of 1 to 3 files (64 KiB - 2 MiB, some declaring
sha256 and size, some only size, some nothing) from a throttled origin, arriving over the
first seconds. Everything random comes from one seed: the plan (tasks, sizes, which files
fail on purpose, the faults scripted per file) and the schedule of the chaos loop. While the
tasks run, at random moments:

- an origin file is replaced by a new version while it is being downloaded (its ETag
  changes, so a resume must restart the file): either the transfer is cut right after the
  change and the resume waits for slow headers, or it stalls right after the change, or the
  chaos loop replaces a file that is in flight;
- slow response headers, stalls mid-body (all shorter than the read timeout) and cut bodies;
- webhook deliveries that the receiver holds longer than the lease, and receiver 500s;
- SIGTERM of a worker (a graceful stop: its downloads hand their tasks back) and SIGKILL of
  a worker (its tasks come back through the supervisor), each replaced by a new worker;
  victims are mostly workers that hold a task, preferably one whose file just changed;
- ``haul cancel ID`` through the real CLI (``python -m supervisor.cli cancel ID``), mostly on
  tasks that are finalizing, some on tasks that already ended; exit 0 = canceled, exit 3 =
  refused (the completion is being announced, or the task had ended), exit 1 = the call failed
  (Redis unreachable: whether it landed is unknown), all recorded;
- Redis forgetting its latest writes (a host crash with AOF everysec, an RDB-only Redis
  restarted from its last snapshot, a replica that had not caught up promoted): the test
  copies Redis's append-only folder, and 1.5-5 s later SIGKILLs Redis and starts it, on the
  same port, from that copy. Tasks whose submission Redis forgot are submitted again with
  the same idempotency key (they get a new task id; the forgotten id is checked apart), and
  every other one is submitted again too (its key must still name it). Throughout, a sampler
  reads every task's fencing token and holder (the claim's worker) ten times a second.

Two tasks in twelve carry a file that must fail for good (a wrong sha256 in the manifest, or
a URL the origin answers 404). Then it waits until every task reached a final state and the
notice each one owes was accepted by the receiver (or a settle time passed), stops every
process, and checks:

- P0  every task reached done, failed, dead or canceled in time; a task with nothing wrong
  with it never ends ``failed`` and a task meant to fail never ends ``done``.
- P1  every stored file equals one whole version the origin served for that path (by sha256;
  a mismatch is diagnosed, e.g. "bytes 0-N of version 1, the rest of version 2"), and the
  sha256/size the manifest declares; storage holds nothing but ``<task id>/<path>`` of done
  tasks (no files of other tasks, no temporaries).
- P2  the final state agrees with what the receiver accepted (for the task's run):
  ``done`` <=> an accepted ``task.completed`` and no accepted ``task.failed``/``task.canceled``;
  ``failed``/``dead`` => an accepted ``task.failed`` and no accepted ``task.completed``;
  ``canceled`` => an accepted ``task.canceled`` and no accepted ``task.completed``. A cancel
  that exited 0 means the task ended ``canceled``; one that exited 1 means it did not, and
  was justified: the task had already ended, or it ended done and its first
  ``task.completed`` reached the receiver at most ANNOUNCE_SLACK seconds after the refusal
  (unless the test stopped its worker in between). Any other exit status is a violation.
- P3  every ``task.completed`` delivery of a task carries one and the same webhook-id,
  ``<task id>.task.completed.<run>``; every delivery's id is ``<task id>.<type>.<run>`` of its
  body, and every signature verifies.
- P4  no task is ``dead`` unless the runs the test itself ended reach HAUL_MAX_ATTEMPTS: the
  SIGKILLs that hit it (a worker killed while holding it, read from Redis right after the
  kill), plus the origin faults scripted on its files and the replacements of its files (each
  may cost one run: a cut body, a stall or slow header beyond the lease fence, a second
  change within one run). With HAUL_MAX_ATTEMPTS=12, at most 4 scripted faults per task and
  a few replacements, that takes 5 or more SIGKILL hits on one task, so in practice: no task
  is dead. Lease expiries of a live worker (a slow
  receiver outlasting the lease, a hung finalize) are not excused. Tasks that used more runs
  than the test explains are listed in the report as a note.
- P5  staging holds nothing for done tasks (unless the test SIGKILLed the worker just after
  it marked the task done, before its clean-up).
- R0  a rollback loses nothing acknowledged before its copy was taken: every task created
  before the copy still exists after the restore, and submitting it again with its key
  returns the same task.
- R1  a fencing token is never issued twice: one token of a task is never seen with two
  holders, and a token first seen after others is larger than all of them (a token issued
  after a restore is above every token issued before it; a counter would go back).
- E0  a task's events, streamed by a real ``haul api`` (Server-Sent Events, replayed from the
  start), are exactly what its event stream holds, and its state events walk the state machine
  from ``queued`` to the state it ended in, with no repeated state and the final event last.
- R2  a task is never done twice with different files: every ``task.completed`` delivery of
  a task (of a forgotten task id too) names files that storage holds as it arrives, with the
  same bytes for every delivery, and a done task's files at the end are those bytes.

What a rollback cannot undo, excused and listed in the report under "rollback" (never
excused: R0, R1, P1's whole versions, P3's one webhook-id): when Redis forgets how a task
ended (its ``task.completed``, ``task.failed`` or ``task.canceled`` went out before the
restore, and in the copy the task had not ended, nor, for ``task.completed``, started to
announce), the task runs again. It downloads its files again and announces again under the
same webhook-id, with the new announcement's timestamp in the body; if the origin changed a
file meanwhile, storage now holds the newer version, which the second ``task.completed``
describes (R2 excused when the versions only move forward; the body differs from the first).
Since Redis forgot the first announcement, a cancel can now win: the backend may hear
``task.canceled`` after ``task.completed``, and the files stay in storage (P1/P2 excused for
that task). A cancel acknowledged between copy and restore may be forgotten (P2 excused for
cancels overlapping that window, exit codes other than 0/1 while Redis was down included).
A forgotten task id that completed before the restore leaves its files in storage (they must
still be whole versions), and the backend hears completions of two task ids for one key. A
rollback may cost a task one more run (P4).

Run (CI size, 24 tasks: 30-50 s when every notice arrives, about 80 s when some never do,
since it then waits out the settle time)::

    .venv/bin/python -m pytest tests/test_guarantees.py -s

Long run (300 tasks, about 5 minutes), and a replay of a failure (the seed is printed at the start and in every failure;
a replay repeats the plan and the fault schedule, while the interleaving is up to the
machine)::

    .venv/bin/python -m pytest tests/test_guarantees.py -s --guarantee-tasks 300
    .venv/bin/python -m pytest tests/test_guarantees.py -s --guarantee-seed 1234567 --guarantee-tasks 24

The full report (every violation, every stop, cancel and replacement) is written to
``guarantees-report.txt`` in the test's tmp_path, next to the worker and supervisor logs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from actors.manifest import spec_from_manifest
from actors.messages import Messages, redis_broker
from actors.settings import Settings
from actors.states import State
from actors.task import Task
from tests.processes import REPO, Process
from tests.servers import Delivery, Fault, Origin, Receiver, etag_of
from tests.test_faults import Stack

pytestmark = pytest.mark.e2e

KIB, MIB = 1024, 1024 * 1024
LEASE_SECONDS = 3
SWEEP_SECONDS = 0.5
READ_TIMEOUT_SECONDS = 5.0
MAX_ATTEMPTS = 12
WORKERS, THREADS = 3, 2
#: Bytes per second of each origin response: a 2 MiB file takes 2 s, so faults meet transfers.
ORIGIN_RATE = MIB
#: Receiver: share of deliveries answered 500, share held longer than the lease (but shorter
#: than the read timeout, so the sender hears the answer).
RECEIVER_500_SHARE = 0.15
RECEIVER_SLOW_SHARE = 0.25
SLOW_DELIVERY_SECONDS = (LEASE_SECONDS + 0.5, READ_TIMEOUT_SECONDS - 0.7)
#: Longest stall or slow header the origin scripts (shorter than the read timeout).
PAUSE_SECONDS = (0.5, READ_TIMEOUT_SECONDS - 1.0)
#: Most scripted faults on one task's files (see P4), most versions of one origin file.
MAX_FAULTS_PER_TASK = 4
MAX_VERSIONS = 4
#: A graceful stop that takes longer than this is finished with SIGKILL (and counted as one).
TERM_GRACE_SECONDS = 20.0
#: A refused cancel of a task that then ended done: its first task.completed must reach the
#: receiver within this many seconds after the refusal (the announcement had started).
ANNOUNCE_SLACK = 3.0
#: Lines per property in the assertion message (the report file has all).
MESSAGE_LINES = 25
#: A Redis restore comes this long (seconds) after its copy was taken.
ROLLBACK_DELAY_SECONDS = (1.5, 5.0)
#: The token sampler's pause between two reads of every task (seconds).
SAMPLE_SECONDS = 0.1


def timeout_for(count: int) -> int:
    """The per-test timeout: the run's own deadlines (below) plus start-up and stop margins."""
    return int(240 + run_seconds(count) + settle_seconds(count))


def run_seconds(count: int) -> float:
    """How long the tasks get to reach a final state."""
    return 90 + 2.5 * count


def settle_seconds(count: int) -> float:
    """How long the owed notices get to arrive once every task has ended."""
    return 30 + count / 10


def chaos_seconds(count: int) -> float:
    """How long faults are injected (after that the run only waits for the tasks to end)."""
    return 20 + 1.0 * count


def rollbacks_for(count: int) -> int:
    """Redis rollbacks in a run: two in the CI size, one per 30 tasks in a long run."""
    return max(2, count // 30)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The size comes from ``--guarantee-tasks``; the timeout marker goes with it."""
    if "guarantee_tasks" in metafunc.fixturenames:
        count = int(metafunc.config.getoption("--guarantee-tasks"))
        metafunc.parametrize(
            "guarantee_tasks",
            [pytest.param(count, id=f"{count}-tasks", marks=pytest.mark.timeout(timeout_for(count)))],
        )


# -- the plan -------------------------------------------------------------------------------


@dataclass
class FilePlan:
    origin_path: str
    path: str
    size: int
    #: What the manifest declares: 'sha256+size', 'size' or 'nothing'.
    declares: str
    #: '' (a good file), 'wrong-sha256' (the manifest's sha256 is of other bytes), 'missing' (404).
    bad: str = ""
    #: Scripted faults, as (kind, parameters): turned into Fault objects at submit.
    faults: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def replaceable(self) -> bool:
        """A new version is still a valid answer (no sha256 declared; a declared size is kept)."""
        return self.declares != "sha256+size" and not self.bad


@dataclass
class TaskPlan:
    index: int
    files: list[FilePlan]
    arrival: float
    task_id: str = ""
    #: The manifest it was submitted with, and when the submission was acknowledged.
    manifest: dict[str, Any] = field(default_factory=dict)
    submitted_at: float = 0.0

    @property
    def bad(self) -> bool:
        return any(f.bad for f in self.files)

    @property
    def scripted_faults(self) -> int:
        return sum(len(f.faults) for f in self.files)


def version_bytes(seed: int, origin_path: str, number: int, size: int) -> bytes:
    return random.Random(f"{seed}:{origin_path}:{number}").randbytes(size)


def make_plan(seed: int, count: int) -> list[TaskPlan]:
    rng = random.Random(seed)
    bad_tasks = set(rng.sample(range(count), max(1, count // 6))) if count >= 3 else set()
    spread = min(15.0, 0.5 * count)
    plans = []
    for index in range(count):
        files = []
        for k in range(rng.randint(1, 3)):
            path = rng.choice([f"part{k}.bin", f"lesson-{k}/video.mp4", f"media/{k}/clip {k}.mp4"])
            declares = rng.choice(["sha256+size", "size", "nothing"])
            files.append(FilePlan(f"/g{index}/f{k}.bin", path, rng.randrange(64 * KIB, 2 * MIB), declares))
        if index in bad_tasks:
            victim = rng.choice(files)
            victim.bad = rng.choice(["wrong-sha256", "missing"])
            if victim.bad == "wrong-sha256":
                victim.declares = "sha256+size"
        budget = MAX_FAULTS_PER_TASK
        for f in files:
            if f.bad:
                continue
            for _ in range(2):  # a first fault, maybe a second one for a later request
                kind = rng.choices(
                    ["none", "slow_headers", "stall", "drop", "replace_drop", "replace_stall"],
                    weights=[45, 10, 12, 8, 15, 10],
                )[0]
                after = rng.randrange(0, f.size)
                pause = rng.uniform(*PAUSE_SECONDS)
                if kind.startswith("replace") and not f.replaceable:
                    kind = "stall"
                cost = 2 if kind == "replace_drop" else 1  # the cut and the slow resume
                if kind == "none" or cost > budget:
                    break
                budget -= cost
                if kind == "replace_drop":  # the resume's slow headers mostly outlast the lease fence (80%)
                    f.faults.append((kind, after, rng.uniform(2.0, READ_TIMEOUT_SECONDS - 1.0)))
                elif kind in ("slow_headers",):
                    f.faults.append((kind, pause))
                elif kind == "drop":
                    f.faults.append((kind, after))
                else:
                    f.faults.append((kind, after, pause))
                if rng.random() > 0.25:
                    break
        plans.append(TaskPlan(index, files, arrival=rng.uniform(0, spread)))
    plans.sort(key=lambda p: p.arrival)
    return plans


# -- records --------------------------------------------------------------------------------


@dataclass
class Stop:
    """A worker the test stopped."""

    kind: str  # 'SIGKILL', 'SIGTERM', 'SIGTERM then SIGKILL'
    at: float
    log: str
    #: Tasks the worker held (active, its pid) when it was stopped.
    held: set[str] = field(default_factory=set)
    #: Tasks it had marked done within the last 2 s (its clean-up may not have run).
    just_done: set[str] = field(default_factory=set)
    exit_seconds: float | None = None


@dataclass
class CancelCall:
    task_id: str
    state_before: str
    started: float
    ended: float = 0.0
    code: int | None = None
    output: str = ""


@dataclass
class Replacement:
    at: float
    origin_path: str
    task_id: str
    version: int
    how: str


@dataclass
class Rollback:
    """A copy of Redis's data, and the SIGKILL and restart from it a few seconds later."""

    copied_at: float
    copy: Path
    #: time.monotonic() when the restore is due.
    due: float
    killed_at: float = 0.0
    back_at: float = 0.0
    #: Every task of the run as Redis held it right after the restart (None: forgotten).
    restored: dict[str, Task | None] = field(default_factory=dict)
    #: Forgotten task id -> the id its submission again got.
    resubmitted: dict[str, str] = field(default_factory=dict)


@dataclass
class Completion:
    """A ``task.completed`` delivery, with the sha256 of each file it names as storage held it
    when the delivery arrived ('' for a file storage did not hold)."""

    task_id: str
    webhook_id: str
    at: float
    timestamp: str
    files: dict[str, str]


class TokenSampler:
    """R1: reads every task's fencing token and holder (the worker of the claim that issued it;
    requeue, cancel, retry and finalize issue tokens without changing it) ten times a second,
    and records a token seen with two holders, or a new token below one seen before."""

    def __init__(self, url: str, key: Callable[[str], str], ids: Callable[[], list[str]], t0: float) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.key, self.ids, self.t0 = key, ids, t0
        self.holder: dict[tuple[str, int], tuple[str, float]] = {}
        self.highest: dict[str, int] = {}
        self.violations: list[str] = []
        self.samples = 0
        #: Held while Redis is restored: the first read after it takes the restored tokens as seen.
        self.paused = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="token-sampler", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(SAMPLE_SECONDS):
            with self.paused:
                try:
                    self.sample(restored=False)
                except redis.RedisError:
                    pass  # Redis restarting, or a worker stop in the way: the next read

    def sample(self, *, restored: bool) -> None:
        """Read every task's token; ``restored``: right after a restore, whose tokens may be
        old ones never seen (issued and replaced between two reads before the restore)."""
        ids = self.ids()
        pipe = self.client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(self.key(task_id), "token", "worker")
        at = time.time()
        for task_id, (token, worker) in zip(ids, pipe.execute(), strict=True):
            if token is None:
                continue
            value, holder = int(token), (worker or b"").decode()
            seen = self.holder.get((task_id, value))
            if seen is None:
                if not restored and value < self.highest.get(task_id, 0):
                    self.violations.append(
                        f"task {task_id}: token {value} (holder {holder!r}) first seen at +{at - self.t0:.1f}s, "
                        f"below token {self.highest[task_id]} seen before: tokens went back"
                    )
                self.holder[(task_id, value)] = (holder, at)
                self.highest[task_id] = max(self.highest.get(task_id, 0), value)
            elif seen[0] != holder:
                self.violations.append(
                    f"task {task_id}: token {value} held by {seen[0]!r} (seen at +{seen[1] - self.t0:.1f}s) and by "
                    f"{holder!r} (at +{at - self.t0:.1f}s): one token issued twice"
                )
                self.holder[(task_id, value)] = (holder, at)
        self.samples += 1

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(10)
        self.client.close()


def group_pids() -> dict[int, set[int]]:
    """Process group -> pids, from /proc."""
    groups: dict[int, set[int]] = defaultdict(set)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        groups[int(fields[2])].add(int(entry))
    return groups


def pid_of(worker: str) -> int | None:
    tail = worker.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    lo = 0
    step = 64 * KIB
    while lo + step <= n and a[lo : lo + step] == b[lo : lo + step]:
        lo += step
    while lo < n and a[lo] == b[lo]:
        lo += 1
    return lo


def describe_bytes(stored: bytes, versions: list[bytes]) -> str:
    """Why ``stored`` is none of ``versions``: a splice of two, or how far it follows each."""
    for i, a in enumerate(versions, start=1):
        p = common_prefix(stored, a)
        for j, b in enumerate(versions, start=1):
            if j != i and len(b) == len(stored) and p < len(stored) and stored[p:] == b[p:]:
                return f"a splice: bytes 0-{p - 1} are version {i}'s, bytes {p}-{len(stored) - 1} version {j}'s"
    follows = ", ".join(f"v{i} {common_prefix(stored, v)} of {len(v)} bytes" for i, v in enumerate(versions, start=1))
    return f"not a splice of two versions; it starts like {follows}"


def short(digest: str) -> str:
    return digest[:12]


def _epoch(timestamp: str) -> float:
    """Seconds since the epoch of an event's ISO timestamp (infinity if it has none)."""
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")


# -- the run --------------------------------------------------------------------------------


class Run:
    def __init__(self, stack: Stack, origin: Origin, receiver: Receiver, seed: int, count: int, tmp_path: Path) -> None:
        self.stack, self.origin, self.receiver = stack, origin, receiver
        self.seed, self.count, self.tmp_path = seed, count, tmp_path
        self.plans = make_plan(seed, count)
        self.by_id: dict[str, TaskPlan] = {}
        self.by_origin_path: dict[str, tuple[TaskPlan, FilePlan]] = {}
        self.chaos_rng = random.Random(seed * 7919 + 1)
        self.receiver_rng = random.Random(seed * 7919 + 2)
        receiver.rng = random.Random(seed * 7919 + 3)
        self.lock = threading.Lock()
        self.t0 = time.time()
        self.workers: list[Process] = []
        self.stopping: list[tuple[Process, Stop, set[int]]] = []
        self.supervisor: Process | None = None
        self.stops: list[Stop] = []
        self.cancels: list[CancelCall] = []
        self.cancel_threads: list[threading.Thread] = []
        self.cancel_popens: list[subprocess.Popen[str]] = []
        self.replacements: list[Replacement] = []
        self.slow_deliveries = 0
        self.holding = 0  # deliveries the receiver is holding right now
        self.quiet = False  # stop holding deliveries (the end of the run)
        self.messages: Messages | None = None
        self.submitted = 0
        self.ended: set[str] = set()
        self.phase_times: dict[str, float] = {}
        self.rollback_rng = random.Random(seed * 7919 + 4)
        self.rollbacks: list[Rollback] = []
        self.pending: Rollback | None = None
        #: Task ids whose submission Redis forgot (submitted again under a new id).
        self.forgotten: dict[str, TaskPlan] = {}
        self.completions: list[Completion] = []
        self.sampler: TokenSampler | None = None
        self.lost: list[str] = []  # R0
        self.undone: list[str] = []  # what the rollbacks undid (excused), filled by check()

    # -- helpers ----------------------------------------------------------------------------

    def rel(self, at: float) -> str:
        return f"+{at - self.t0:.1f}s"

    def replay(self) -> str:
        return (
            f"seed {self.seed}; replay: .venv/bin/python -m pytest tests/test_guarantees.py -s "
            f"--guarantee-seed {self.seed} --guarantee-tasks {self.count}"
        )

    def start_worker(self) -> Process:
        return self.stack.worker(threads=THREADS)

    def replace(self, origin_path: str, how: str) -> None:
        """Put a new version of ``origin_path`` on the origin (same size if the manifest says one)."""
        plan, f = self.by_origin_path[origin_path]
        with self.lock:
            number = len(self.origin.versions[origin_path]) + 1
            if number > MAX_VERSIONS:
                return
            size = (
                f.size
                if f.declares == "size"
                else random.Random(f"{self.seed}:{origin_path}:{number}:size").randrange(64 * KIB, 2 * MIB)
            )
            self.origin.put(origin_path, version_bytes(self.seed, origin_path, number, size))
            self.replacements.append(Replacement(time.time(), origin_path, plan.task_id, number, how))

    def faults_for(self, f: FilePlan) -> list[Fault]:
        faults = []
        for spec in f.faults:
            kind = spec[0]
            if kind == "slow_headers":
                faults.append(Fault("slow_headers", seconds=spec[1]))
            elif kind == "stall":
                faults.append(Fault("stall", after=spec[1], seconds=spec[2]))
            elif kind == "drop":
                faults.append(Fault("drop", after=spec[1]))
            elif kind == "replace_drop":
                replace = self._replacer(f.origin_path, "scripted: changed, then the transfer was cut")
                faults.append(Fault("drop", after=spec[1], midway=replace))
                faults.append(Fault("slow_headers", seconds=spec[2]))
            elif kind == "replace_stall":
                replace = self._replacer(f.origin_path, "scripted: changed, then the transfer stalled")
                faults.append(Fault("stall", after=spec[1], seconds=spec[2], midway=replace))
        return faults

    def _replacer(self, origin_path: str, how: str) -> Callable[[], None]:
        return lambda: self.replace(origin_path, how)

    def record_completion(self, delivery: Delivery) -> None:
        """R2: what storage holds of each file a task.completed names, as it arrives."""
        try:
            event = delivery.event
        except ValueError:
            return
        if event.get("type") != "task.completed" or not delivery.verified:
            return
        files = {}
        for f in event.get("data", {}).get("files", []):
            try:
                files[str(f["path"])] = hashlib.sha256(Path(f["location"]).read_bytes()).hexdigest()
            except (OSError, KeyError, TypeError):
                files[str(f.get("path"))] = ""
        completion = Completion(task_of(delivery), delivery.id, delivery.at, str(event.get("timestamp")), files)
        with self.lock:
            self.completions.append(completion)

    def on_delivery(self, delivery: Delivery) -> None:
        self.record_completion(delivery)
        with self.lock:
            slow = self.receiver_rng.random() < RECEIVER_SLOW_SHARE
            pause = self.receiver_rng.uniform(*SLOW_DELIVERY_SECONDS)
            if slow and not self.quiet:
                self.slow_deliveries += 1
                self.holding += 1
            else:
                slow = False
        if slow:
            try:
                time.sleep(pause)
            finally:
                with self.lock:
                    self.holding -= 1

    def submit_due(self) -> None:
        now = time.time() - self.t0
        while self.submitted < len(self.plans) and self.plans[self.submitted].arrival <= now:
            plan = self.plans[self.submitted]
            entries = []
            for f in plan.files:
                data = version_bytes(self.seed, f.origin_path, 1, f.size)
                if f.bad != "missing":
                    self.origin.put(f.origin_path, data)
                entry: dict[str, Any] = {"url": self.origin.url(f.origin_path), "path": f.path}
                if f.declares in ("sha256+size", "size"):
                    entry["size"] = f.size
                if f.declares == "sha256+size":
                    entry["sha256"] = hashlib.sha256(b"other bytes" if f.bad else data).hexdigest()
                entries.append(entry)
                self.origin.fault(f.origin_path, *self.faults_for(f))
            plan.manifest = {
                "name": f"guarantee {plan.index}",
                "key": f"guarantee-{self.seed}-{plan.index}",
                "files": entries,
            }
            task_id, _ = self.stack.store.create(spec_from_manifest(plan.manifest), now=time.time())
            plan.submitted_at = time.time()
            plan.task_id = task_id
            with self.lock:
                self.by_id[task_id] = plan
            for f in plan.files:
                self.by_origin_path[f.origin_path] = (plan, f)
            self.send_claim(task_id)
            self.submitted += 1

    def send_claim(self, task_id: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert self.messages is not None, "the run has not started"
                self.messages.claim(task_id)
                return
            except redis.ConnectionError:  # a stale connection to the Redis before a restore
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def known_ids(self) -> list[str]:
        with self.lock:
            return [*self.by_id, *self.forgotten]

    def tasks(self, ids: list[str] | None = None) -> dict[str, Task]:
        found = {}
        for task_id in self.by_id if ids is None else ids:
            task = self.stack.store.get(task_id)
            if task is not None:
                found[task_id] = task
        return found

    def all_ended(self) -> bool:
        if self.submitted < len(self.plans):
            return False
        counts = self.stack.store.counts()
        return sum(n for state, n in counts.items() if state.final) >= len(self.plans)

    # -- chaos ------------------------------------------------------------------------------

    def holders(self) -> tuple[dict[int, set[str]], dict[str, Task]]:
        """Worker index -> tasks it holds (active, its pid), and the live tasks read."""
        live = self.tasks([i for i in self.by_id if i not in self.ended])
        for task_id, task in live.items():
            if task.state.final:
                self.ended.add(task_id)
        groups = group_pids()
        index_of = {pid: n for n, w in enumerate(self.workers) for pid in groups.get(w.popen.pid, ())}
        held: dict[int, set[str]] = defaultdict(set)
        for task_id, task in live.items():
            pid = pid_of(task.worker)
            if task.state.active and pid in index_of:
                held[index_of[pid]].add(task_id)
        return held, live

    def pick_victim(self) -> int:
        r1, r2 = self.chaos_rng.random(), self.chaos_rng.random()
        held, _ = self.holders()
        recent = {r.task_id for r in self.replacements if r.at > time.time() - 4}
        changed = sorted(n for n, ids in held.items() if ids & recent)
        busy = sorted(held)
        if r1 < 0.4 and changed:
            return changed[int(r2 * len(changed))]
        if r1 < 0.9 and busy:
            return busy[int(r2 * len(busy))]
        return int(r2 * len(self.workers))

    def _snapshot_stop(self, stop: Stop, pids: set[int], before: set[str]) -> None:
        """Fill in what a stopped worker held; read right after it died, when nobody else can
        have taken its tasks yet (their leases still run), and united with what it held before."""
        stop.held |= before
        for task_id, task in self.tasks().items():
            if pid_of(task.worker) not in pids:
                continue
            if task.state.active:
                stop.held.add(task_id)
            elif task.state is State.DONE and task.updated_at >= stop.at - 2:
                stop.just_done.add(task_id)

    def _held_by(self, pids: set[int]) -> set[str]:
        return {
            task_id
            for task_id, task in self.tasks([i for i in self.by_id if i not in self.ended]).items()
            if task.state.active and pid_of(task.worker) in pids
        }

    def stop_worker(self) -> None:
        victim = self.pick_victim()
        kill = self.chaos_rng.random() < 0.55
        proc = self.workers[victim]
        pids = group_pids().get(proc.popen.pid, set()) | {proc.popen.pid}
        before = self._held_by(pids)
        if kill:
            proc.kill()
            stop = Stop("SIGKILL", time.time(), proc.log_path.name)
            self._snapshot_stop(stop, pids, before)
            proc.close()
        else:
            stop = Stop("SIGTERM", time.time(), proc.log_path.name, held=before)
            try:
                proc.popen.send_signal(signal.SIGTERM)  # the group leader, as systemd's KillMode=mixed
            except ProcessLookupError:
                pass
            self.stopping.append((proc, stop, pids))
        self.stops.append(stop)
        self.workers[victim] = self.start_worker()

    def reap(self, force: bool = False) -> None:
        """Collect gracefully stopping workers; SIGKILL one that takes too long."""
        for entry in list(self.stopping):
            proc, stop, pids = entry
            if proc.popen.poll() is not None:
                stop.exit_seconds = time.time() - stop.at
                proc.close()
                self.stopping.remove(entry)
            elif force or time.time() - stop.at > TERM_GRACE_SECONDS:
                proc.kill()
                stop.kind = "SIGTERM then SIGKILL"
                stop.exit_seconds = None
                stop.held = set()  # what it held at SIGTERM was handed back, or is still held now:
                self._snapshot_stop(stop, pids, set())
                proc.close()
                self.stopping.remove(entry)

    def cancel(self) -> None:
        r1, r2 = self.chaos_rng.random(), self.chaos_rng.random()
        canceled = {c.task_id for c in self.cancels}
        _, live = self.holders()
        finalizing = sorted(i for i, t in live.items() if t.state is State.FINALIZING and i not in canceled)
        running = sorted(i for i, t in live.items() if not t.state.final and i not in canceled)
        ended = sorted(i for i in self.by_id if i in self.ended and i not in canceled)
        if r1 < 0.55 and finalizing:
            target = finalizing[int(r2 * len(finalizing))]
        elif r1 < 0.9 and running:
            target = running[int(r2 * len(running))]
        elif ended:
            target = ended[int(r2 * len(ended))]
        else:
            return
        task = live.get(target) or self.stack.store.get(target)
        call = CancelCall(target, task.state.value if task else "?", time.time())
        self.cancels.append(call)
        thread = threading.Thread(target=self._run_cancel, args=(call,), daemon=True)
        self.cancel_threads.append(thread)
        thread.start()

    def _run_cancel(self, call: CancelCall) -> None:
        popen = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "cancel", call.task_id],
            cwd=REPO, env=self.stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        with self.lock:
            self.cancel_popens.append(popen)
        try:
            out, _ = popen.communicate(timeout=60)
            call.code = popen.returncode
        except subprocess.TimeoutExpired:
            popen.kill()
            out, _ = popen.communicate()
            call.code = None
        call.ended = time.time()
        call.output = " ".join((out or "").split())[-300:]

    def replace_in_flight(self) -> None:
        r = self.chaos_rng.random()
        candidates = [
            p
            for p in self.origin.paths_in_flight()
            if p in self.by_origin_path
            and self.by_origin_path[p][1].replaceable
            and self.by_origin_path[p][0].task_id not in self.ended
        ]
        if candidates:
            self.replace(candidates[int(r * len(candidates))], "chaos: changed while a body was in flight")

    # -- Redis rollbacks ---------------------------------------------------------------------

    def take_copy(self, delay: float) -> None:
        """Copy Redis's data now; the restore from it is due ``delay`` seconds later."""
        at = time.time()
        copy = self.stack.redis.snapshot(self.tmp_path / f"redis-copy-{len(self.rollbacks) + 1}")
        self.pending = Rollback(at, copy, time.monotonic() + delay)
        self.rollbacks.append(self.pending)

    def restore(self) -> None:
        """SIGKILL Redis and start it from the pending copy; read what it came back with, and
        submit every task again with its key (a new id for a task Redis forgot)."""
        rollback, self.pending = self.pending, None
        assert rollback is not None and self.sampler is not None
        with self.sampler.paused:
            rollback.killed_at = time.time()
            self.stack.redis.restore(rollback.copy)
            rollback.back_at = time.time()
            rollback.restored = {task_id: self.stack.store.get(task_id) for task_id in self.known_ids()}
            self.sampler.sample(restored=True)
        self.ended = {i for i, t in rollback.restored.items() if t is not None and t.state.final}
        for plan in self.plans[: self.submitted]:
            old = plan.task_id
            task_id, created = self.stack.store.create(spec_from_manifest(plan.manifest), now=time.time())
            if rollback.restored.get(old) is not None:
                if task_id != old or created:
                    self.lost.append(
                        f"task {old} (#{plan.index}) survived the restore at {self.rel(rollback.killed_at)}, but "
                        f"submitting it again with its key gave task {task_id} (created: {created})"
                    )
                continue
            if plan.submitted_at < rollback.copied_at:
                self.lost.append(
                    f"task {old} (#{plan.index}), submitted at {self.rel(plan.submitted_at)}, is gone after the "
                    f"restore at {self.rel(rollback.killed_at)} of a copy taken at {self.rel(rollback.copied_at)}"
                )
            rollback.resubmitted[old] = task_id
            plan.task_id = task_id
            with self.lock:
                self.forgotten[old] = self.by_id.pop(old)
                self.by_id[task_id] = plan
            if created:
                self.send_claim(task_id)

    def rolled_back_ends(self) -> dict[str, str]:
        """Tasks whose end Redis forgot: a task.completed, task.failed or task.canceled went out
        before a restore whose copy had the task neither ended nor (for task.completed)
        announcing; with the evidence."""
        found: dict[str, str] = {}
        ends = ("task.completed", "task.failed", "task.canceled")
        received = [d for d in self.receiver.received() if d.verified and d.event.get("type") in ends]
        for rollback in self.rollbacks:
            for task_id, task in rollback.restored.items():
                if task is None or task.state.final:
                    continue
                for d in received:
                    if task_of(d) != task_id or run_of(d) != task.run:
                        continue
                    kind = d.event["type"]
                    if kind == "task.completed":
                        announced = _epoch(str(d.event.get("timestamp")))
                        lost = not task.announced and announced < rollback.killed_at
                    else:
                        lost = d.at < rollback.back_at
                    if lost and task_id not in found:
                        found[task_id] = (
                            f"{kind} received at {self.rel(d.at)}, yet Redis restored at "
                            f"{self.rel(rollback.killed_at)} (copy of {self.rel(rollback.copied_at)}) had the task "
                            f"{task.state.value}" + ("" if kind != "task.completed" else ", not announcing")
                        )
        return found

    # -- phases -----------------------------------------------------------------------------

    def execute(self) -> None:

        self.origin.rate = ORIGIN_RATE
        self.receiver.fail_share = RECEIVER_500_SHARE
        self.receiver.on_delivery = self.on_delivery
        self.messages = Messages(redis_broker(Settings(redis_url=self.stack.redis.url)))
        self.workers = [self.start_worker() for _ in range(WORKERS)]
        self.supervisor = self.stack.supervisor()
        self.t0 = time.time()
        self.sampler = TokenSampler(self.stack.redis.url, self.stack.store.task_key, self.known_ids, self.t0)
        rng = self.chaos_rng
        start = time.monotonic()
        chaos_end = start + chaos_seconds(self.count)
        deadline = start + run_seconds(self.count)
        cancel_budget = max(3, self.count // 8)
        next_stop = start + rng.uniform(3, 5)
        next_replace = start + rng.uniform(1, 3)
        next_cancel = start + rng.uniform(3, 6)
        # Copies, each restored 1.5-5 s later: the first while tasks still arrive (so Redis forgets
        # some submissions), the others in equal slices of the busiest part of the run
        first = 2 + self.rollback_rng.uniform(0, 0.8 * min(15.0, 0.5 * self.count))
        later, more = first + ROLLBACK_DELAY_SECONDS[1] + 1, rollbacks_for(self.count) - 1
        span = max(3 + min(0.6 * self.count, chaos_seconds(self.count) - 10) - later, 4.0) / max(more, 1)
        copies = [start + first] + [start + later + span * (k + self.rollback_rng.random()) for k in range(more)]
        while time.monotonic() < deadline:
            self.submit_due()
            self.reap()
            if self.pending is not None and time.monotonic() >= self.pending.due:
                self.restore()
            elif self.pending is None and copies and time.monotonic() >= copies[0]:
                copies.pop(0)
                self.take_copy(self.rollback_rng.uniform(*ROLLBACK_DELAY_SECONDS))
            if self.all_ended() and self.pending is None:
                break
            now = time.monotonic()
            if now < chaos_end:
                if now >= next_stop:
                    self.stop_worker()
                    next_stop = time.monotonic() + rng.uniform(2.5, 5)
                if now >= next_replace:
                    self.replace_in_flight()
                    next_replace = time.monotonic() + rng.uniform(1, 3)
                if now >= next_cancel and len(self.cancels) < cancel_budget:
                    self.cancel()
                    next_cancel = time.monotonic() + rng.uniform(2, 6)
            time.sleep(0.2)
        self.phase_times["run"] = time.monotonic() - start
        for thread in self.cancel_threads:
            thread.join(70)
        # Every task ended (or the deadline passed): wait for the notices each one owes.
        settle_start = time.monotonic()
        settle_deadline = settle_start + (settle_seconds(self.count) if self.all_ended() else 5)
        while time.monotonic() < settle_deadline:
            self.reap()
            if not self.owed_notices(self.tasks()):
                break
            time.sleep(0.5)
        self.phase_times["settle"] = time.monotonic() - settle_start
        self.shut_down()

    def owed_notices(self, tasks: dict[str, Task]) -> list[str]:
        accepted = self.accepted_by_task()
        owed = []
        for task_id, task in tasks.items():
            wanted = {
                State.DONE: "task.completed",
                State.FAILED: "task.failed",
                State.DEAD: "task.failed",
                State.CANCELED: "task.canceled",
            }.get(task.state)
            if wanted is not None and not any(
                d.event.get("type") == wanted and run_of(d) == task.run for d in accepted.get(task_id, [])
            ):
                owed.append(task_id)
        return owed

    def accepted_by_task(self) -> dict[str, list[Delivery]]:
        grouped: dict[str, list[Delivery]] = defaultdict(list)
        for d in self.receiver.accepted():
            grouped[task_of(d)].append(d)
        return grouped

    def shut_down(self) -> None:
        """Stop every process (gracefully first), then let held deliveries finish."""
        with self.lock:
            self.quiet = True
        while self.stopping and any(time.time() - stop.at < TERM_GRACE_SECONDS for _, stop, _ in self.stopping):
            self.reap()
            time.sleep(0.1)
        self.reap()
        stopping = [w for w in self.workers if w.popen.poll() is None]
        for w in stopping:
            try:
                w.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + TERM_GRACE_SECONDS
        for w in stopping:
            try:
                w.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.close_all()
        end = time.monotonic() + SLOW_DELIVERY_SECONDS[1] + 2
        while time.monotonic() < end:
            with self.lock:
                if not self.holding:
                    break
            time.sleep(0.1)

    def close_all(self) -> None:
        """Every process this run started, whatever happened (safe to call twice)."""
        if self.sampler is not None:
            self.sampler.stop()
        for w in self.workers:
            w.close()
        self.reap(force=True)
        if self.supervisor is not None:
            self.supervisor.close()
        with self.lock:
            popens = list(self.cancel_popens)
        for popen in popens:
            if popen.poll() is None:
                popen.kill()
                popen.wait(10)
        if self.messages is not None:
            self.messages.broker.close()
            self.messages = None
        self.receiver.on_delivery = None

    # -- checks -----------------------------------------------------------------------------

    def check(self) -> tuple[dict[str, list[str]], list[str], str]:
        """Violations per property, notes, and the summary line."""
        tasks = self.tasks()
        violations: dict[str, list[str]] = {p: [] for p in ("P0", "P1", "P2", "P3", "P4", "P5", "R0", "R1", "R2", "E0")}
        notes: list[str] = []
        #: What a rollback cannot undo (see the module docstring): excused, and listed.
        undone: list[str] = []
        rolled = self.rolled_back_ends()
        received = self.receiver.received()
        by_task: dict[str, list[Delivery]] = defaultdict(list)
        for d in received:
            by_task[task_of(d)].append(d)
        hits: Counter[str] = Counter()
        for stop in self.stops:
            if "SIGKILL" in stop.kind:
                hits.update(stop.held)
        replaced: Counter[str] = Counter(r.task_id for r in self.replacements)
        rollback_runs: Counter[str] = Counter(
            task_id
            for rollback in self.rollbacks
            for task_id, task in rollback.restored.items()
            if task is not None and not task.state.final
        )

        def label(task_id: str) -> str:
            task = tasks.get(task_id)
            plan = self.by_id.get(task_id) or self.forgotten.get(task_id)
            state = (
                task.state.value
                if task
                else "forgotten by a rollback"
                if task_id in self.forgotten
                else "missing record"
            )
            return f"task {task_id} (#{plan.index if plan else '?'}, {state})"

        def in_window(started: float, ended: float) -> bool:
            """Whether [started, ended] overlaps a rollback's copy-to-restart window."""
            return any(r.copied_at <= ended and started <= r.back_at + 1 for r in self.rollbacks)

        def show(ds: list[Delivery]) -> str:
            return "[" + ", ".join(f"{d.event.get('type', '?')} {d.answered} {self.rel(d.at)}" for d in ds) + "]"

        # P0: every task ended, and as the plan says it may
        for task_id, plan in self.by_id.items():
            task = tasks.get(task_id)
            if task is None:
                violations["P0"].append(f"{label(task_id)}: its record is gone")
                continue
            if not task.state.final:
                violations["P0"].append(
                    f"{label(task_id)}: never reached a final state (attempts {task.attempts}, "
                    f"lease until {self.rel(task.lease_until) if task.lease_until else '-'}, error {task.error!r})"
                )
            elif task.state is State.FAILED and not plan.bad:
                violations["P0"].append(
                    f"{label(task_id)}: failed although nothing the test did to it is permanent: {task.error!r}"
                )
            elif task.state is State.DONE and plan.bad:
                meant = ", ".join(f"{f.path} {f.bad}" for f in plan.files if f.bad)
                violations["P0"].append(f"{label(task_id)}: done although a file must fail ({meant})")

        # P1: storage
        storage = self.stack.storage
        expected: dict[str, tuple[str, FilePlan]] = {}
        for task_id, task in tasks.items():
            if task.state is State.DONE:
                for f in self.by_id[task_id].files:
                    expected[f"{task_id}/{f.path}"] = (task_id, f)
        present: dict[str, Path] = {}
        folders: list[str] = []
        if storage.exists():
            for p in sorted(storage.rglob("*")):
                rel = p.relative_to(storage).as_posix()
                if p.is_dir() and not p.is_symlink():
                    folders.append(rel)
                else:
                    present[rel] = p

        def whole_version(task_id: str, f: FilePlan, data: bytes) -> bool:
            """P1: ``data`` is one whole version the origin served for ``f``."""
            digest = hashlib.sha256(data).hexdigest()
            versions = list(self.origin.versions.get(f.origin_path, []))
            served = self.origin.served_etags.get(f.origin_path, set())
            matches = [i for i, v in enumerate(versions, start=1) if hashlib.sha256(v).hexdigest() == digest]
            if not matches:
                listing = ", ".join(
                    f"v{i} {len(v)} bytes {short(hashlib.sha256(v).hexdigest())}"
                    for i, v in enumerate(versions, start=1)
                )
                violations["P1"].append(
                    f"{label(task_id)}: {f.path!r} (origin {f.origin_path}) holds {len(data)} bytes sha256 "
                    f"{short(digest)}, no version the origin served ({listing}): {describe_bytes(data, versions)}"
                )
                return False
            if not any(etag_of(versions[i - 1]) in served for i in matches):
                violations["P1"].append(
                    f"{label(task_id)}: {f.path!r} is version {matches[0]} of {f.origin_path}, "
                    "which the origin never sent"
                )
            return True

        for rel, (task_id, f) in sorted(expected.items()):
            if rel not in present:
                violations["P1"].append(f"{label(task_id)}: storage lacks {f.path!r}")
                continue
            data = present[rel].read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if not whole_version(task_id, f, data):
                continue
            if (
                f.declares == "sha256+size"
                and digest != hashlib.sha256(version_bytes(self.seed, f.origin_path, 1, f.size)).hexdigest()
            ):
                violations["P1"].append(f"{label(task_id)}: {f.path!r} does not match the sha256 its manifest declares")
            if f.declares in ("sha256+size", "size") and len(data) != f.size:
                violations["P1"].append(
                    f"{label(task_id)}: {f.path!r} is {len(data)} bytes; its manifest declares {f.size}"
                )
        for rel in sorted(set(present) - set(expected)):
            owner = rel.split("/", 1)[0]
            what = "a temporary" if ".haul-tmp" in rel or rel.rsplit("/", 1)[-1].startswith(".") else "a file"
            whose = label(owner) if owner in tasks or owner in self.forgotten else "no task of this run"
            line = f"storage holds {rel!r}: {what} of {whose}, not a file of a done task"
            owner_plan = self.forgotten.get(owner) or (self.by_id.get(owner) if owner in rolled else None)
            stored = next((f for f in owner_plan.files if f"{owner}/{f.path}" == rel), None) if owner_plan else None
            if stored is None or owner_plan is None:
                violations["P1"].append(line)
            elif whole_version(owner, stored, present[rel].read_bytes()):
                why = (
                    "Redis forgot the task"
                    if owner in self.forgotten
                    else f"Redis forgot how it ended: {rolled[owner]}"
                )
                undone.append(f"{line} ({why}; a whole version)")
        needed = {"/".join(rel.split("/")[:n]) for rel in expected for n in range(1, rel.count("/") + 1)}
        stray_folders = [d for d in folders if d not in needed]
        if stray_folders:
            notes.append(f"storage folders of no done file (not counted as violations): {stray_folders[:10]}")

        # P2 and P3: what the receiver got
        for task_id, task in tasks.items():
            p2 = violations["P2"]
            if task_id in rolled:  # a contradiction Redis could not know of: listed under "rollback"
                violations["P2"] = []
            ds = by_task.get(task_id, [])
            mine = [d for d in ds if run_of(d) == task.run]
            acc = [d for d in mine if d.verified and 200 <= d.answered < 300]
            kinds = Counter(d.event.get("type") for d in acc)
            completed, failed, canceled = kinds["task.completed"], kinds["task.failed"], kinds["task.canceled"]
            where = f"{label(task_id)} run {task.run}: deliveries {show(ds)}"
            if task.state is State.DONE:
                if not completed:
                    violations["P2"].append(f"{where}: done without an accepted task.completed")
                if failed or canceled:
                    violations["P2"].append(f"{where}: done, yet the receiver accepted task.failed/task.canceled")
            elif task.state in (State.FAILED, State.DEAD):
                if not failed:
                    violations["P2"].append(f"{where}: {task.state.value} without an accepted task.failed")
                if completed:
                    violations["P2"].append(f"{where}: {task.state.value}, yet the receiver accepted task.completed")
            elif task.state is State.CANCELED:
                if not canceled:
                    violations["P2"].append(f"{where}: canceled without an accepted task.canceled")
                if completed:
                    violations["P2"].append(f"{where}: canceled, yet the receiver accepted task.completed")
            ids = {d.id for d in ds if d.event.get("type") == "task.completed"}
            if ids and ids != {f"{task_id}.task.completed.{task.run}"}:
                violations["P3"].append(f"{where}: task.completed came with webhook-ids {sorted(ids)}")
            for d in ds:
                wanted = f"{task_id}.{d.event.get('type')}.{task.run}"
                if d.id != wanted and d.event.get("type") != "task.completed":
                    violations["P3"].append(
                        f"{where}: a {d.event.get('type')} delivery has webhook-id {d.id!r}, not {wanted!r}"
                    )
                if not d.verified:
                    violations["P3"].append(
                        f"{where}: delivery {d.id!r} at {self.rel(d.at)} has a signature that does not verify"
                    )
            if task_id in rolled:
                undone += [f"{item} (Redis forgot how it ended: {rolled[task_id]})" for item in violations["P2"]]
                violations["P2"] = p2
        for task_id in self.forgotten:
            ds = by_task.get(task_id, [])
            ids = {d.id for d in ds if d.event.get("type") == "task.completed"}
            if ids and ids != {f"{task_id}.task.completed.0"}:
                violations["P3"].append(f"{label(task_id)}: task.completed came with webhook-ids {sorted(ids)}")
            if any(not d.verified for d in ds):
                violations["P3"].append(f"{label(task_id)}: a delivery's signature does not verify: {show(ds)}")
            if ids:
                undone.append(
                    f"{label(task_id)}: completed before Redis forgot it; its key's task "
                    f"{self.forgotten[task_id].task_id} completes too (the backend hears two task ids for one key)"
                )
        unknown = sorted({task_of(d) for d in received} - set(tasks) - set(self.forgotten))
        if unknown:
            violations["P3"].append(f"deliveries for tasks this run did not submit: {unknown[:5]}")

        # P2: cancels
        for call in self.cancels:
            p2 = violations["P2"]
            excused = call.task_id in rolled or call.task_id in self.forgotten or in_window(call.started, call.ended)
            if excused:
                violations["P2"] = []
            self.check_cancel(call, tasks, by_task, violations)
            if excused:
                undone += [f"{item} (overlapping a Redis rollback)" for item in violations["P2"]]
                violations["P2"] = p2

        # P4: dead tasks
        for task_id, task in tasks.items():
            plan = self.by_id[task_id]
            explained = hits[task_id] + plan.scripted_faults + replaced[task_id] + rollback_runs[task_id]
            if task.state is State.DEAD and explained < MAX_ATTEMPTS:
                violations["P4"].append(
                    f"{label(task_id)}: dead after {task.attempts} attempts ({task.error!r}); the test's SIGKILLs hit "
                    f"it {hits[task_id]} time(s) and it had {plan.scripted_faults} scripted origin fault(s), "
                    f"{replaced[task_id]} replacement(s) and {rollback_runs[task_id]} Redis rollback(s) while running, "
                    f"fewer than HAUL_MAX_ATTEMPTS={MAX_ATTEMPTS}: runs were lost while a live worker served it"
                )
            elif task.attempts > 1 + explained and not plan.bad:
                notes.append(
                    f"{label(task_id)}: {task.attempts} attempts, more than 1 + {hits[task_id]} SIGKILL hit(s) + "
                    f"{plan.scripted_faults} scripted fault(s) + {replaced[task_id]} replacement(s) + "
                    f"{rollback_runs[task_id]} rollback(s) explain; error {task.error!r}"
                )

        # R0, R1, R2: Redis rollbacks
        violations["R0"] += self.lost
        if self.sampler is not None:
            violations["R1"] += self.sampler.violations
        self.check_completions(tasks, rolled, received, violations, undone, label)
        if self.sampler is not None and self.sampler.samples < 10:
            violations["R1"].append(f"the token sampler read Redis only {self.sampler.samples} times")

        # P5: staging of done tasks
        staging = Path(self.stack.env["HAUL_STAGING_DIR"])
        for task_id, task in tasks.items():
            sandbox = staging / task_id
            if task.state is State.DONE and sandbox.exists():
                inside = sorted(p.relative_to(sandbox).as_posix() for p in sandbox.rglob("*"))[:6]
                killed = [s for s in self.stops if task_id in s.just_done and "SIGKILL" in s.kind]
                line = f"{label(task_id)}: staging still holds {sandbox} {inside}"
                if killed:
                    notes.append(
                        f"{line} (excused: its worker was SIGKILLed at {self.rel(killed[0].at)}, just after done)"
                    )
                else:
                    violations["P5"].append(line)

        # E0: each task's events, as a real `haul api` streams them, are its state changes in order
        violations["E0"] = self.check_events(tasks, label)

        states = Counter(t.state.value for t in tasks.values())
        kills = sum(1 for s in self.stops if s.kind == "SIGKILL")
        terms = [s for s in self.stops if s.kind.startswith("SIGTERM")]
        term_exits = [s.exit_seconds for s in terms if s.exit_seconds is not None]
        size = sum(f.size for p in self.plans for f in p.files)
        summary = (
            f"guarantees: seed {self.seed}, {len(self.plans)} tasks ({sum(len(p.files) for p in self.plans)} files, "
            f"{size / MIB:.0f} MiB), {sum(1 for p in self.plans if p.bad)} meant to fail; "
            f"ended {dict(sorted(states.items()))}; SIGKILL {kills} (hit {sum(hits.values())} task runs), "
            f"SIGTERM {len(terms)} (exit {max(term_exits) if term_exits else 0:.1f}s at most, "
            f"{sum(1 for s in terms if s.kind != 'SIGTERM')} needed SIGKILL), "
            f"replacements {len(self.replacements)}, scripted faults {sum(p.scripted_faults for p in self.plans)}, "
            f"cancels {len(self.cancels)} (exit 0: {sum(c.code == 0 for c in self.cancels)}, exit 3: "
            f"{sum(c.code == 3 for c in self.cancels)}, exit 1: {sum(c.code == 1 for c in self.cancels)}), "
            f"deliveries {len(received)} (held past the lease {self.slow_deliveries}, answered 500 "
            f"{sum(1 for d in received if d.answered == 500)}); Redis rollbacks {len(self.rollbacks)} (tasks "
            f"forgotten {len(self.forgotten)}, ends forgotten {len(rolled)}, excused {len(undone)}; token samples "
            f"{self.sampler.samples if self.sampler else 0}); run {self.phase_times.get('run', 0):.0f}s, "
            f"settle {self.phase_times.get('settle', 0):.0f}s; violations "
            + ", ".join(f"{p} {len(v)}" for p, v in violations.items())
        )
        self.undone = undone
        return violations, notes, summary

    def check_events(self, tasks: dict[str, Task], label: Callable[[str], str]) -> list[str]:
        """E0 for every task that ended: what ``haul api`` streams of it (Server-Sent Events,
        replayed and closed after the final event) is exactly what its event stream holds, and
        its state events walk the state machine from ``queued`` to the state the task ended in,
        without a repeated state, the final event last. The scripts append an event in the step
        that changes the state, so under SIGKILLs, lease expiries, cancels and rollbacks alike
        the events must never disagree with the states."""
        import requests

        from actors.events import STATE_EVENTS, EventLog
        from actors.states import TRANSITIONS
        from supervisor.api.sse import task_sse_id
        from tests.apiserver import sse, start_api

        problems: list[str] = []
        log = EventLog(self.stack.store.client, self.stack.store.prefix)
        api = start_api(self.tmp_path, self.stack.env)
        try:
            for task_id, task in tasks.items():
                if not task.state.final:
                    continue  # P0 reports it
                kept = log.of_task(task_id, count=1_000_000)
                with requests.get(f"{api.url}/v1/tasks/{task_id}/events", stream=True, timeout=30) as answer:
                    streamed = [event_id for event_id, _, _ in sse(answer)]
                if streamed != [task_sse_id(task_id, e.id) for e in kept]:
                    problems.append(f"{label(task_id)}: the API streamed {len(streamed)} events, the stream holds "
                                    f"{len(kept)}, not the same")  # fmt: skip
                moves = [State(e.data["state"]) for e in kept if e.type in STATE_EVENTS]
                if not moves or moves[0] is not State.QUEUED:
                    problems.append(f"{label(task_id)}: its first state event is {moves[:1]}, not queued")
                for before, after in zip(moves, moves[1:], strict=False):
                    if after is before or after not in TRANSITIONS[before]:
                        problems.append(f"{label(task_id)}: events move {before.value} -> {after.value}: {moves}")
                        break
                if not kept or not kept[-1].final or moves[-1:] != [task.state]:
                    last = kept[-1].type if kept else None
                    problems.append(
                        f"{label(task_id)}: ended {task.state.value}, its last event is {last} ({moves[-1:]})"
                    )
        finally:
            api.process.close()
        return problems

    def check_completions(
        self,
        tasks: dict[str, Task],
        rolled: dict[str, str],
        received: list[Delivery],
        violations: dict[str, list[str]],
        undone: list[str],
        label: Callable[[str], str],
    ) -> None:
        """R2: the task.completed deliveries of a task name the same bytes, which storage holds
        as each arrives and still holds at the end; and (P3) one body per webhook-id, except the
        timestamp of a run that announced again because Redis forgot the first announcement."""
        by_task: dict[str, list[Completion]] = defaultdict(list)
        for c in self.completions:
            by_task[c.task_id].append(c)
        newer: set[str] = set()  # tasks run again after a rollback that fetched newer versions
        for task_id, completions in sorted(by_task.items()):
            plan = self.by_id.get(task_id) or self.forgotten.get(task_id)
            if plan is None:
                continue  # deliveries for tasks this run did not submit: P3
            for c in completions:
                missing = sorted(path for path, digest in c.files.items() if not digest)
                if missing:
                    violations["R2"].append(
                        f"{label(task_id)}: {c.webhook_id} at {self.rel(c.at)} names {missing}, "
                        "which storage does not hold"
                    )
            task = tasks.get(task_id)
            finals: dict[str, str] = {}
            if task is not None and task.state is State.DONE:
                for f in plan.files:
                    try:
                        finals[f.path] = hashlib.sha256(
                            (self.stack.storage / task_id / f.path).read_bytes()
                        ).hexdigest()
                    except OSError:
                        finals[f.path] = ""  # P1 reports it
            versions: dict[str, list[str]] = {}
            for f in plan.files:
                served = [hashlib.sha256(v).hexdigest() for v in self.origin.versions.get(f.origin_path, [])]
                ordered = [c.files[f.path] for c in sorted(completions, key=lambda c: c.at) if c.files.get(f.path)]
                final = finals.get(f.path, "")
                if len(set(ordered) | ({final} - {""})) <= 1:
                    continue
                numbers = [served.index(d) + 1 if d in served else 0 for d in ordered]
                line = (
                    f"{label(task_id)}: {f.path!r} was versions {numbers} of {f.origin_path} (0: none the origin "
                    f"served) in its task.completed deliveries, in order ({', '.join(short(d) for d in ordered)}), "
                    f"and storage holds {short(final) or '-'} at the end"
                )
                if final and ordered and final != ordered[-1]:
                    violations["R2"].append(f"{line}: storage changed after the last task.completed")
                elif task_id in rolled and 0 not in numbers and numbers == sorted(numbers):
                    versions[f.path] = [f"v{n}" for n in numbers]
                else:
                    violations["R2"].append(f"{line}: done twice with different files")
            if versions:
                newer.add(task_id)
                undone.append(
                    f"{label(task_id)}: done twice with different files {versions}: Redis forgot how it ended "
                    f"({rolled[task_id]}), and the run after the restore downloaded the origin's newer version "
                    "(storage now holds it, under the same webhook-id as the first task.completed)"
                )
        for task_id in sorted(set(tasks) | set(self.forgotten)):
            ds = [d for d in received if task_of(d) == task_id and d.event.get("type") == "task.completed"]
            bodies = {d.body for d in ds}
            if len(bodies) <= 1:
                continue
            stamps = sorted({str(d.event.get("timestamp")) for d in ds})
            data = {json.dumps(d.event.get("data"), sort_keys=True) for d in ds}
            line = f"{label(task_id)}: {len(bodies)} bodies under webhook-id(s) {sorted({d.id for d in ds})}"
            if task_id in rolled and (len(data) == 1 or task_id in newer):
                undone.append(
                    f"{line}, timestamps {stamps}, {len(data)} different data: announced again after Redis forgot "
                    f"({rolled[task_id]})"
                )
            else:
                violations["P3"].append(f"{line} (timestamps {stamps}, {len(data)} different data)")

    def check_cancel(
        self,
        call: CancelCall,
        tasks: dict[str, Task],
        by_task: dict[str, list[Delivery]],
        violations: dict[str, list[str]],
    ) -> None:
        """P2 for one ``haul cancel``: its exit status agrees with how the task ended."""
        task = tasks.get(call.task_id)

        def label(task_id: str) -> str:
            plan = self.by_id.get(task_id) or self.forgotten.get(task_id)
            return f"task {task_id} (#{plan.index if plan else '?'}, {task.state.value if task else 'no record'})"

        state = task.state if task else None
        head = (
            f"{label(call.task_id)}: `haul cancel` at {self.rel(call.started)}-{self.rel(call.ended)} "
            f"(was {call.state_before}) exited {call.code} ({call.output!r})"
        )
        if call.code == 0:
            if state is not State.CANCELED:
                violations["P2"].append(f"{head}, but the task ended {state.value if state else '?'}")
        elif call.code == 3:
            if state is State.CANCELED:
                violations["P2"].append(f"{head}, but the task ended canceled")
            elif state is State.DONE and task is not None:
                arrivals = [d.at for d in by_task.get(call.task_id, []) if d.event.get("type") == "task.completed"]
                first = min(arrivals) if arrivals else None
                stopped = any(
                    call.task_id in s.held and call.started - 1 <= s.at <= (first or s.at) for s in self.stops
                )
                if first is not None and first > call.ended + ANNOUNCE_SLACK and not stopped:
                    violations["P2"].append(
                        f"{head}: refused, but the first task.completed reached the receiver only at "
                        f"{self.rel(first)}, so its announcement had not started; the cancel should have won"
                    )
            elif state in (State.FAILED, State.DEAD) and task is not None and task.updated_at > call.ended + 1:
                violations["P2"].append(
                    f"{head}: refused, but the task only ended {state.value} at {self.rel(task.updated_at)} "
                    "and never announced completion; the cancel should have won"
                )
        elif call.code != 1:  # 1: the call failed (Redis unreachable); it may or may not have landed
            violations["P2"].append(f"{head}: neither 0 (canceled), 3 (refused) nor 1 (failed)")

    def report(self, violations: dict[str, list[str]], notes: list[str], summary: str) -> str:
        lines = [summary, self.replay(), ""]
        for prop, items in violations.items():
            if items:
                lines.append(f"{prop} ({len(items)}):")
                lines += [f"  - {item}" for item in items]
        if notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in notes]
        lines.append("rollback (what Redis forgot, excused):")
        lines += [f"  - {item}" for item in self.undone]
        lines.append("rollbacks:")
        lines += [
            f"  - copy at {self.rel(r.copied_at)}, SIGKILL at {self.rel(r.killed_at)}, back at {self.rel(r.back_at)}; "
            f"restored {dict(Counter(t.state.value if t else 'forgotten' for t in r.restored.values()))}; "
            f"submitted again under new ids: {r.resubmitted}"
            for r in self.rollbacks
        ]
        lines.append("stops:")
        lines += [
            f"  - {s.kind} {s.log} at {self.rel(s.at)}, held {sorted(s.held)}, "
            f"exit {'-' if s.exit_seconds is None else f'{s.exit_seconds:.1f}s'}"
            for s in self.stops
        ]
        lines.append("cancels:")
        lines += [
            f"  - {c.task_id} (was {c.state_before}) {self.rel(c.started)}-{self.rel(c.ended)} "
            f"exit {c.code}: {c.output}"
            for c in self.cancels
        ]
        lines.append("replacements:")
        lines += [
            f"  - {r.task_id} {r.origin_path} v{r.version} at {self.rel(r.at)}: {r.how}" for r in self.replacements
        ]
        return "\n".join(lines)


def task_of(delivery: Delivery) -> str:
    try:
        return str(delivery.event["data"]["id"])
    except (ValueError, KeyError, TypeError):
        return delivery.headers.get("webhook-id", "?").split(".", 1)[0]


def run_of(delivery: Delivery) -> int | None:
    tail = delivery.headers.get("webhook-id", "").rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else None


# -- the test -------------------------------------------------------------------------------


def test_guarantees_hold_under_randomized_timing(
    guarantee_tasks: int, tmp_path: Path, origin: Origin, receiver: Receiver, request: pytest.FixtureRequest
) -> None:
    seed = request.config.getoption("--guarantee-seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "big")
    seed = int(seed)
    print(f"\nguarantees: seed {seed}, {guarantee_tasks} tasks (replay with --guarantee-seed {seed})")
    started = time.monotonic()
    stack = Stack(
        tmp_path, receiver,
        HAUL_LEASE_SECONDS=str(LEASE_SECONDS), HAUL_SWEEP_SECONDS=str(SWEEP_SECONDS),
        HAUL_READ_TIMEOUT_SECONDS=str(READ_TIMEOUT_SECONDS), HAUL_CONNECT_TIMEOUT_SECONDS="2",
        HAUL_MAX_ATTEMPTS=str(MAX_ATTEMPTS), HAUL_RETRY_MIN_SECONDS="0.2", HAUL_RETRY_MAX_SECONDS="1.5",
        HAUL_ORPHAN_SECONDS="5",
    )  # fmt: skip
    run: Run | None = None
    try:
        run = Run(stack, origin, receiver, seed, guarantee_tasks, tmp_path)
        run.execute()  # ends with every process stopped
        violations, notes, summary = run.check()
    finally:
        if run is not None:
            run.close_all()
        stack.close()
    summary += f"; {time.monotonic() - started:.0f}s in all"
    report = run.report(violations, notes, summary)
    (tmp_path / "guarantees-report.txt").write_text(report + "\n")
    print(summary)
    for note in notes[:10]:
        print(f"note: {note}")
    for item in run.undone[:10]:
        print(f"rollback: {item}")
    if any(violations.values()):
        lines = [summary, run.replay(), f"full report: {tmp_path / 'guarantees-report.txt'} (logs beside it)"]
        for prop, items in violations.items():
            if items:
                lines.append(f"{prop} ({len(items)}):")
                lines += [f"  - {item}" for item in items[:MESSAGE_LINES]]
                if len(items) > MESSAGE_LINES:
                    lines.append(f"  ... and {len(items) - MESSAGE_LINES} more in the report")
        pytest.fail("\n".join(lines), pytrace=False)
