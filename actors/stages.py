"""The three stages of a task's run, as plain functions over the domain (no Dramatiq here).

Each stage checks the fencing token first, does its work, and returns an :class:`Outcome`
that tells the actor glue which message to send next. Errors end the run in one place,
:func:`_end_run`: permanent ones fail the task, transient ones queue it again with backoff
(``dead`` once attempts are used), a lost lease stops quietly.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import random
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis

from actors.errors import (
    HaulError,
    LeaseLost,
    PermanentError,
    Stopping,
    StorageUnavailable,
    TooLarge,
    TransientError,
    WebhookUndelivered,
)
from actors.fetch import FetchRules, fetch_file
from actors.runtime import Runtime
from actors.sandbox import Sandbox
from actors.sentry import report_task
from actors.store import StageLimits
from actors.task import State, Task, backoff_seconds
from actors.webhook import COMPLETED, FAILED, make_event

log = logging.getLogger(__name__)

#: Progress and lease are written at most this often (seconds) ...
PROGRESS_INTERVAL_SECONDS = 1.0
#: ... or after this many new bytes, whichever comes first.
PROGRESS_BYTES = 64 * 1024 * 1024
#: Claims pause while this many times HAUL_FINALIZE_CONCURRENCY tasks wait to be finalized.
FINALIZE_BACKLOG_FACTOR = 2
#: A task that found its stage full asks again after a random pause in this range (seconds).
SLOT_WAIT_SECONDS = (0.5, 2.0)


def slot_wait() -> float:
    return random.uniform(*SLOT_WAIT_SECONDS)


#: A holder stops writing once this share of its lease has passed since its last renewal;
#: the rest absorbs clock drift between hosts (keep them NTP-synced).
LEASE_SAFETY = 0.8


class Next(enum.Enum):
    DOWNLOAD = "download"
    FINALIZE = "finalize"
    RETRY = "retry"
    NOTIFY = "notify"
    NOTHING = "nothing"


@dataclass(frozen=True)
class Outcome:
    next: Next
    token: int = 0
    delay_seconds: float = 0.0
    #: For a finalize that is being retried: when its storage or webhook began to fail.
    failing_since: float = 0.0
    #: The task as the stage that produced this outcome read it (to spare a read in the next).
    task: Task | None = None


NOTHING = Outcome(Next.NOTHING)


def run_task(rt: Runtime, task_id: str) -> Outcome:
    """One run of a task: claim, download, finalize, chained while nothing has to wait."""
    outcome = claim_task(rt, task_id)
    if outcome.next is Next.DOWNLOAD and outcome.task is not None:
        outcome = download_task(rt, outcome.task, outcome.token)
    if outcome.next is Next.FINALIZE and not outcome.delay_seconds:
        outcome = finalize_task(rt, task_id, outcome.token, task=outcome.task, slot_held=True)
    return outcome


def claim_task(rt: Runtime, task_id: str) -> Outcome:
    """Gate every run: only a queued task (or one whose lease ran out) is taken, straight into
    ``downloading`` (the download goes on in this thread)."""
    s = rt.settings
    now = rt.clock()
    claim = rt.store.claim(
        task_id,
        worker=rt.worker_id,
        now=now,
        lease_seconds=s.lease_seconds,
        max_attempts=s.max_attempts,
        limits=StageLimits(
            downloads=s.download_concurrency,
            downloads_per_host=s.download_per_host,
            staging_max_bytes=s.staging_max_bytes,
            finalize_backlog=FINALIZE_BACKLOG_FACTOR * s.finalize_concurrency,
        ),
        start=State.DOWNLOADING,
    )
    if claim.ok and claim.task is None:
        # A record without its spec cannot be run; its lease will expire and it ends dead.
        log.error("task %s: claimed, but its spec record is missing from Redis", task_id)
        return NOTHING
    if claim.ok:
        log.debug("task %s: claimed (attempt %d, token %d)", task_id, claim.attempts, claim.token)
        return Outcome(Next.DOWNLOAD, token=claim.token, task=claim.task)
    if claim.outcome == "dead":
        message = f"task {task_id}: lease expired and all {s.max_attempts} attempts are used; the task is dead"
        log.error("%s", message)
        report_task(message, kind="dead", task_id=task_id, stage="claim", attempt=int(claim.detail))
        return Outcome(Next.NOTIFY)
    if claim.outcome == "full":
        # No slot (or backpressure): stay queued without holding a thread; ask again soon.
        log.debug("task %s: waiting, %s is full", task_id, claim.detail)
        return Outcome(Next.RETRY, delay_seconds=slot_wait())
    if claim.outcome == "wait":
        # An early duplicate (the backoff has not passed): make sure a message comes then.
        return Outcome(Next.RETRY, delay_seconds=max(0.0, float(claim.detail) - now))
    log.info("task %s: nothing to do (%s %s)", task_id, claim.outcome, claim.detail)
    return NOTHING


def download_task(rt: Runtime, task: Task, token: int) -> Outcome:
    """Bring every file of the task into its sandbox, resuming whatever earlier runs left."""
    s = rt.settings
    task_id = task.id
    try:
        sandbox = Sandbox(s.staging_dir, task_id)
        sandbox.prepare()
        progress = Progress(rt, task, token)
        known = sum(f.size or 0 for f in task.spec.files)
        if s.max_task_bytes and known > s.max_task_bytes:
            raise TooLarge(
                f"task {task_id}: its files add up to {known} bytes, above HAUL_MAX_TASK_BYTES={s.max_task_bytes}"
            )
        for index, spec in enumerate(task.spec.files):
            size = sandbox.finished_size(spec)
            if size is None:
                part = sandbox.part(index)
                progress.start_file(index)
                size = fetch_file(
                    rt.fetcher,
                    spec,
                    part,
                    task_id=task_id,
                    on_progress=progress.on_progress,
                    on_total=progress.on_total,
                    guard=rt.stopper.guard,
                    rules=_rules(rt, task, progress.bytes_done),
                )
                progress.check()
                sandbox.promote(part, spec)
                log.debug("task %s: %s complete (%d bytes)", task_id, spec.path, size)
            progress.file_done(index, size)
        entry = rt.store.finish_download(
            task_id,
            token,
            now=rt.clock(),
            lease_seconds=s.lease_seconds,
            progress=progress.figures(),
            finalize_limit=s.finalize_concurrency,
        )
        if entry == "stale":
            raise LeaseLost(f"task {task_id}: lease lost as the download finished")
        finalizing = dataclasses.replace(task, state=State.FINALIZING)
        if entry == "full":
            return Outcome(Next.FINALIZE, token=token, delay_seconds=slot_wait(), task=finalizing)
        return Outcome(Next.FINALIZE, token=token, task=finalizing)
    except Exception as exc:
        return _end_run(rt, task, token, exc)


def finalize_task(
    rt: Runtime,
    task_id: str,
    token: int,
    failing_since: float = 0.0,
    task: Task | None = None,
    slot_held: bool = False,
) -> Outcome:
    """Store, announce, mark done, clean up: in that order, so nothing is lost on a crash.

    When storage or the webhook receiver is down, the task stays ``finalizing`` with its files
    safe in staging and tries again later (``failing_since`` says since when), without using
    up its download attempts: a receiver outage of an hour must not kill a finished course.
    ``task`` and ``slot_held`` come from a download that just finished in this thread (which
    took the finalize slot as it ended): they save two round trips.
    """
    task = task or rt.store.get(task_id)
    if task is None:
        return NOTHING
    sandbox = Sandbox(rt.settings.staging_dir, task_id)
    if task.state is State.DONE:
        sandbox.remove(task.spec.files)  # a crash between done and clean-up left it behind
        return NOTHING
    if not slot_held:
        entry = rt.store.enter_finalize(
            task_id, token, now=rt.clock(), lease_seconds=rt.settings.lease_seconds,
            limit=rt.settings.finalize_concurrency,
        )  # fmt: skip
        if entry == "full":
            return Outcome(Next.FINALIZE, token=token, delay_seconds=slot_wait(), failing_since=failing_since)
        if entry != "ok":
            log.info("task %s: finalize message with stale token %d ignored (%s)", task_id, token, task.state.value)
            return NOTHING
    try:
        stored = rt.storage.commit(sandbox, task.spec.files)
        url = task.spec.webhook or rt.settings.webhook_url
        if url:
            event = make_event(task, COMPLETED, stored, None, rt.clock())
            rt.webhooks.deliver(url, event, now=rt.clock(), task_id=task_id)
        else:
            log.warning("task %s: no webhook URL (task or HAUL_WEBHOOK_URL); nobody is told it is done", task_id)
        reached = rt.store.release(task_id, token, State.DONE, now=rt.clock(), max_attempts=rt.settings.max_attempts)
        if reached is None:
            raise LeaseLost(f"task {task_id}: lease lost before it could be marked done")
    except (StorageUnavailable, WebhookUndelivered) as exc:
        return _park(rt, task, token, exc, failing_since or rt.clock())
    except Exception as exc:
        return _end_run(rt, task, token, exc)
    sandbox.remove(task.spec.files)
    log.info(
        "task %s: done, %d file(s), %d bytes in %s, announced: %s",
        task_id, len(stored), sum(f["size"] for f in stored), rt.storage.task_dir(task_id), bool(url),
    )  # fmt: skip
    return NOTHING


def _park(rt: Runtime, task: Task, token: int, exc: TransientError, failing_since: float) -> Outcome:
    """Keep a finished task ``finalizing`` and try again after a pause that grows with the outage."""
    s = rt.settings
    now = rt.clock()
    if now - failing_since > s.finalize_give_up_seconds:
        message = f"{exc}; failing for {now - failing_since:.0f}s (HAUL_FINALIZE_GIVE_UP_SECONDS), giving up"
        reached = rt.store.release(task.id, token, State.DEAD, now=now, error=message, max_attempts=s.max_attempts)
        log.error("task %s: dead: %s", task.id, message)
        if reached is None:
            return NOTHING
        report_task(message, kind="dead", task_id=task.id, stage="finalizing", attempt=task.attempts)
        return Outcome(Next.NOTIFY)
    delay = min(s.retry_max_seconds, max(s.retry_min_seconds, now - failing_since)) * random.uniform(1.0, 1.5)
    # The lease covers the pause, so the supervisor does not take the task back meanwhile.
    if not rt.store.advance(
        task.id, token, State.FINALIZING, State.FINALIZING, now=now, lease_seconds=delay + s.lease_seconds
    ):
        return NOTHING
    log.warning("task %s: finalize will try again in %.1fs: %s", task.id, delay, exc)
    return Outcome(Next.FINALIZE, token=token, delay_seconds=delay, failing_since=failing_since)


def notify_failed(rt: Runtime, task_id: str) -> None:
    """Deliver ``task.failed`` for a failed or dead task (raises WebhookUndelivered to retry)."""
    task = rt.store.get(task_id)
    if task is None or task.state not in (State.FAILED, State.DEAD):
        rt.store.notified(task_id)
        return
    url = task.spec.webhook or rt.settings.webhook_url
    if url:
        files = [f.to_json() for f in task.spec.files]
        event = make_event(task, FAILED, files, task.error, task.updated_at)
        try:
            rt.webhooks.deliver(url, event, now=rt.clock(), task_id=task_id)
        except PermanentError as exc:  # a forbidden receiver: retrying cannot help
            log.error("task %s: task.failed cannot be delivered: %s", task_id, exc)
    rt.store.notified(task_id)


class Progress:
    """Writes progress and renews the lease, at most once a second or every 64 MiB.

    Called before every chunk is written, so the common path is a few comparisons. It also
    keeps the fence on the filesystem: Redis refuses a stale token's writes, but not its
    file writes, so a thread that wakes up after its lease could have expired (a hung read, a
    long GC pause) stops before writing, judged by its own clock against the last renewal
    (with a margin, see LEASE_SAFETY). When Redis is briefly unreachable the download goes on
    until that same deadline.
    """

    def __init__(self, rt: Runtime, task: Task, token: int) -> None:
        self.rt = rt
        self.task = task
        self.token = token
        self.sizes = [f.size for f in task.spec.files]
        self.done = [0] * len(task.spec.files)
        self.finished = 0
        self.current: int | None = None
        self.last_write = time.monotonic()
        self.renewed_at = self.last_write
        self.bytes_at_write = 0

    @property
    def bytes_done(self) -> int:
        return sum(self.done)

    def figures(self) -> tuple[int, int, int]:
        """(bytes done, bytes total, files done), as the store records them."""
        return self.bytes_done, sum(size or 0 for size in self.sizes), self.finished

    def start_file(self, index: int) -> None:
        self.current = index

    def on_total(self, size: int) -> None:
        if self.current is not None:
            self.sizes[self.current] = size

    def on_progress(self, position: int) -> None:
        if self.current is not None:
            self.done[self.current] = position
        if self.rt.stopper.is_set():
            raise Stopping(f"task {self.task.id}: the worker is stopping; handing the task back")
        now = time.monotonic()
        self.check(now)
        if now - self.last_write >= PROGRESS_INTERVAL_SECONDS or position - self.bytes_at_write >= PROGRESS_BYTES:
            self.write(now)

    def check(self, now: float | None = None) -> None:
        """Raise LeaseLost when this holder can no longer be sure it still owns the task."""
        now = time.monotonic() if now is None else now
        if now > self.renewed_at + self.rt.settings.lease_seconds * LEASE_SAFETY:
            raise LeaseLost(
                f"task {self.task.id}: lease not renewed for {now - self.renewed_at:.1f}s (hung read or Redis "
                "unreachable); stopping before another byte is written"
            )

    def file_done(self, index: int, size: int) -> None:
        self.sizes[index] = size
        self.done[index] = size
        self.finished += 1
        self.current = None

    def write(self, now: float) -> None:
        """Renew the lease and write progress; raise LeaseLost when the token moved on."""
        self.last_write = now
        self.bytes_at_write = self.done[self.current] if self.current is not None else 0
        s = self.rt.settings
        try:
            bytes_done, bytes_total, files_done = self.figures()
            written = self.rt.store.heartbeat(
                self.task.id,
                self.token,
                now=self.rt.clock(),
                lease_seconds=s.lease_seconds,
                bytes_done=bytes_done,
                bytes_total=bytes_total,
                files_done=files_done,
            )
        except redis.RedisError as exc:  # check() stops the download if this lasts
            log.warning("task %s: progress not written, Redis unreachable (%s); going on", self.task.id, exc)
            return
        if not written:
            raise LeaseLost(f"task {self.task.id}: another worker or an operator took it over; stopping")
        self.renewed_at = now


def _end_run(rt: Runtime, task: Task, token: int, exc: Exception) -> Outcome:
    """Record how this run ended and say what comes next."""
    s = rt.settings
    now = rt.clock()
    if isinstance(exc, LeaseLost):
        log.warning("%s", exc)
        return NOTHING
    if rt.stopper.is_set() and not isinstance(exc, PermanentError):
        # A graceful stop (whatever error it caused in the transfer): the bytes stay in the
        # sandbox, the attempt is given back, and the task is queued at once for another
        # worker (the message goes out before we exit).
        reached = rt.store.release(
            task.id, token, State.QUEUED, now=now, error="handed back: worker stopping",
            max_attempts=s.max_attempts, refund=True,
        )  # fmt: skip
        log.info("task %s: handed back (worker stopping), %s", task.id, reached)
        return Outcome(Next.RETRY) if reached is State.QUEUED else NOTHING
    stage = task.state.value if task.state.active else "download"
    if isinstance(exc, PermanentError):
        log.error("task %s: failed: %s", task.id, exc)
        reached = rt.store.release(task.id, token, State.FAILED, now=now, error=str(exc), max_attempts=s.max_attempts)
        if reached is None:
            return NOTHING
        report_task(str(exc), kind=type(exc).__name__, task_id=task.id, stage=stage, attempt=task.attempts,
                    origin_host=_origin_host(task))  # fmt: skip
        return Outcome(Next.NOTIFY)
    if isinstance(exc, HaulError):
        message = str(exc)
        retry_after = exc.retry_after if isinstance(exc, TransientError) else None
    else:
        log.exception("task %s: unexpected error; treated as transient", task.id)
        message = f"task {task.id}: internal error {type(exc).__name__}: {exc} (see the worker log)"
        retry_after = None
    attempt = task.attempts
    delay = backoff_seconds(attempt, s.retry_min_seconds, s.retry_max_seconds)
    if retry_after is not None:
        delay = min(s.retry_max_seconds, max(delay, retry_after))
    reached = rt.store.release(
        task.id, token, State.QUEUED, now=now, error=message, not_before=now + delay, max_attempts=s.max_attempts
    )
    if reached is State.QUEUED:
        log.warning("task %s: attempt %d failed, retrying in %.1fs: %s", task.id, attempt, delay, message)
        return Outcome(Next.RETRY, delay_seconds=delay)
    if reached is State.DEAD:
        log.error("task %s: dead after %d attempts: %s", task.id, attempt, message)
        report_task(f"task {task.id} is dead after {attempt} attempts: {message}", kind="dead", task_id=task.id,
                    stage=stage, attempt=attempt, origin_host=_origin_host(task))  # fmt: skip
        return Outcome(Next.NOTIFY)
    return NOTHING


def _rules(rt: Runtime, task: Task, task_bytes_so_far: int) -> FetchRules:
    """The limits for the next file: the file limit, or what is left of the task's budget."""
    s = rt.settings
    limits = [s.max_file_bytes] if s.max_file_bytes else []
    if s.max_task_bytes:
        limits.append(max(1, s.max_task_bytes - task_bytes_so_far))
    return FetchRules(
        max_bytes=min(limits) if limits else 0,
        accept=task.spec.accept,
        lowest_speed_bytes=s.lowest_speed_bytes,
        lowest_speed_seconds=s.lowest_speed_seconds,
    )


def _origin_host(task: Task) -> str | None:
    return urlsplit(task.spec.files[0].url).hostname if task.spec.files else None
