"""The three stages of a task's run, as plain functions over the domain (no Dramatiq here).

Each stage checks the fencing token first, does its work, and returns an :class:`Outcome`
that tells the actor glue which message to send next. Errors end the run in one place,
:func:`_end_run`: permanent ones fail the task, transient ones queue it again with backoff
(``dead`` once attempts are used), a lost lease stops quietly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from actors.errors import (
    HaulError,
    LeaseLost,
    NoWebhookSecret,
    PermanentError,
    Stopping,
    StorageUnavailable,
    TooLarge,
    TransientError,
    WebhookUndelivered,
)
from actors.fetch import fetch_file
from actors.httprules import FetchRules
from actors.interrupt import interruptible
from actors.lease import DISK_STEP_SECONDS, Lease, no_figures
from actors.outcome import NOTHING, Next, Outcome
from actors.policy import (
    FINALIZE_BACKLOG_FACTOR,
    SLOT_WAIT_MAX_SECONDS,
    RetryTiming,
    end_of_run,
    outage_wait,
    slot_wait,
)
from actors.progress import Progress, guard_lease
from actors.redact import display_url
from actors.runtime import Runtime
from actors.sandbox import Sandbox
from actors.sentry import report_task
from actors.states import ClaimReply, State, StepReply
from actors.store import StageLimits
from actors.task import Task
from actors.webhook import COMPLETED, make_event

log = logging.getLogger(__name__)


def run_task(rt: Runtime, task_id: str) -> Outcome:
    """One run of a task: claim, download, finalize, chained while nothing has to wait; the
    lease is held (renewed while each step is alive) from the claim to the end of the run."""
    if rt.stopper.is_set():
        # A stopping worker takes nothing new (not even the task it just handed back): the
        # message goes back to the queue for another worker.
        return Outcome(Next.RETRY)
    since = time.monotonic()
    outcome = claim_task(rt, task_id)
    if outcome.next is not Next.DOWNLOAD or outcome.task is None:
        return outcome
    task = outcome.task
    with rt.leases.hold(task_id, outcome.token, since=since) as lease:
        outcome = download_task(rt, task, lease)
        if outcome.next is Next.FINALIZE and not outcome.delay_seconds:
            lease.figures = no_figures  # the download's final figures are written already
            outcome = finish_task(rt, dataclasses.replace(task, state=State.FINALIZING), lease)
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
        poll_seconds=SLOT_WAIT_MAX_SECONDS * 1.25,
    )
    if claim.ok and claim.task is None:
        # A record without its spec cannot be run; its lease will expire and it ends dead.
        log.error("task %s: claimed, but its spec record is missing from Redis", task_id)
        return NOTHING
    if claim.ok:
        log.debug("task %s: claimed (attempt %d, token %d)", task_id, claim.attempts, claim.token)
        return Outcome(Next.DOWNLOAD, token=claim.token, task=claim.task)
    if claim.outcome is ClaimReply.DEAD:
        message = f"task {task_id}: lease expired and all {s.max_attempts} attempts are used; the task is dead"
        log.error("%s", message)
        report_task(message, kind="dead", task_id=task_id, stage="claim", attempt=int(claim.detail))
        return Outcome(Next.NOTIFY)
    if claim.outcome is ClaimReply.FULL:
        # No slot (or backpressure): stay queued without holding a thread; this message's chain
        # asks again (the store knows it is alive, so the supervisor sends no second one).
        log.debug("task %s: waiting, %s is full", task_id, claim.detail)
        return Outcome(Next.RETRY, delay_seconds=slot_wait(now - claim.waiting_since))
    if claim.outcome is ClaimReply.WAIT:
        # An early duplicate (the backoff has not passed): make sure a message comes then.
        return Outcome(Next.RETRY, delay_seconds=max(0.0, float(claim.detail) - now))
    log.info("task %s: nothing to do (%s %s)", task_id, claim.outcome, claim.detail)
    return NOTHING


def download_task(rt: Runtime, task: Task, lease: Lease) -> Outcome:
    """Bring every file of the task into its sandbox, resuming whatever earlier runs left."""
    s = rt.settings
    task_id, token = task.id, lease.token
    try:
        if task.announced:
            # Its files were all in storage before its completion was announced: only the
            # delivery is left, and nothing may fail it now (the receiver may hold it already).
            figures = (task.bytes_done, task.bytes_total, task.files_done)
        else:
            figures = _fetch_all(rt, task, lease)
        entry, token = rt.store.finish_download(
            task_id,
            token,
            now=rt.clock(),
            lease_seconds=s.lease_seconds,
            progress=figures,
            finalize_limit=s.finalize_concurrency,
        )
        if entry is StepReply.STALE:
            raise LeaseLost(f"task {task_id}: lease lost as the download finished")
        if entry is StepReply.FULL:  # resting until a finalize slot is free; the message holds the task
            return Outcome(Next.FINALIZE, token=token, delay_seconds=slot_wait())
        return Outcome(Next.FINALIZE, token=token)
    except Exception as exc:
        return _end_run(rt, task, token, exc)


def _fetch_all(rt: Runtime, task: Task, lease: Lease) -> tuple[int, int, int]:
    """Every file into the sandbox (skipping finished ones); return the final figures."""
    s = rt.settings
    task_id = task.id
    progress = Progress(rt, task, lease)
    lease.figures = progress.figures
    if task.spec.webhook:  # a receiver the task may not reach fails it before any byte is fetched
        rt.webhook_policy.check(task.spec.webhook, purpose=f"task {task_id}: webhook {display_url(task.spec.webhook)}")
    if (task.spec.webhook or s.webhook_url) and not s.webhook_secrets:  # nor one it cannot sign for
        raise NoWebhookSecret(
            f"task {task_id}: its completion cannot be announced, this worker has no webhook signing secret; "
            "set HAUL_WEBHOOK_SECRET or HAUL_WEBHOOK_SECRET_FILE on the workers, then `haul retry` the task"
        )
    sandbox = Sandbox(s.staging_dir, task_id)
    sandbox.prepare()
    known = sum(f.size or 0 for f in task.spec.files)
    if s.max_task_bytes and known > s.max_task_bytes:
        raise TooLarge(
            f"task {task_id}: its files add up to {known} bytes, above HAUL_MAX_TASK_BYTES={s.max_task_bytes}"
        )
    hashing = s.file_hash == "sha256"
    for index, spec in enumerate(task.spec.files):
        try:
            size = sandbox.finished_size(spec)
            if size is None:
                part = sandbox.claim_part(index, lease.token)
                progress.start_file(index)
                size = fetch_file(
                    rt.fetcher,
                    spec,
                    part,
                    task_id=task_id,
                    on_progress=progress.on_progress,
                    on_total=progress.on_total,
                    guard=progress.guard,
                    rules=_rules(rt, task, progress.bytes_done),
                    step=progress.step,
                    on_sha256=functools.partial(sandbox.record_sha256, part) if hashing else None,
                )
                lease.step(DISK_STEP_SECONDS, f"placing {spec.path!r} in staging")
                sandbox.promote(part, spec)
                log.debug("task %s: %s complete (%d bytes)", task_id, spec.path, size)
        except HaulError as exc:
            exc.file = exc.file or spec.path  # the backend is told which file failed
            raise
        progress.file_done(index, size)
    return progress.figures()


def finalize_task(rt: Runtime, task_id: str, token: int, failing_since: float = 0.0) -> Outcome:
    """A finalize message: a finished task that waited (for a slot, an outage) goes on, under
    a lease held like a download's."""
    task = rt.store.get(task_id)
    if task is None:
        return NOTHING
    if task.state is State.DONE:
        Sandbox(rt.settings.staging_dir, task_id).remove(task.spec.files)  # a crash between done and clean-up
        return NOTHING
    since = time.monotonic()
    now, delay = rt.clock(), slot_wait()
    entry, token = rt.store.enter_finalize(
        task_id, token, now=now, lease_seconds=rt.settings.lease_seconds, limit=rt.settings.finalize_concurrency,
        due=now + delay, failing_since=failing_since,
    )  # fmt: skip
    if entry is StepReply.FULL:
        return Outcome(Next.FINALIZE, token=token, delay_seconds=delay, failing_since=failing_since)
    if entry is not StepReply.OK:
        log.info("task %s: finalize message with stale token %d ignored (%s)", task_id, token, task.state.value)
        return NOTHING
    with rt.leases.hold(task_id, token, since=since) as lease:
        return finish_task(rt, task, lease, failing_since)


def finish_task(rt: Runtime, task: Task, lease: Lease, failing_since: float = 0.0) -> Outcome:
    """Store, announce, mark done, clean up: in that order, so nothing is lost on a crash.

    When storage or the webhook receiver is down, the task stays ``finalizing`` with its files
    safe in staging and tries again later (``failing_since`` says since when), without using
    up its download attempts: a receiver outage of an hour must not kill a finished course.
    A cancel wins until the first delivery of ``task.completed`` starts: the store records
    that start (``announce``) atomically with the token check, and refuses a cancel after it;
    before it, every rename into storage first confirms the token with Redis. From the
    announcement on, the task can only end done (or dead once its receiver has refused every
    delivery for HAUL_FINALIZE_GIVE_UP_SECONDS): no error fails it any more.
    """
    task_id, token = task.id, lease.token
    sandbox = Sandbox(rt.settings.staging_dir, task_id)
    announced = task.announced
    step = _finalize_step(rt, lease, task_id)
    try:
        stored = rt.storage.commit(
            sandbox, task.spec.files, step=lambda s: step(s, "storing"), fence=lambda: _fence(rt, lease, step),
            sha256=rt.settings.file_hash == "sha256",
        )  # fmt: skip
        url = task.spec.webhook or rt.settings.webhook_url
        if url:
            lease.check()
            announced_at = rt.store.announce(task_id, token, now=rt.clock(), lease_seconds=rt.settings.lease_seconds)
            if announced_at is None:
                raise LeaseLost(f"task {task_id}: canceled or taken over before its completion was announced")
            announced = True
            event = make_event(task, COMPLETED, stored, None, announced_at)
            with interruptible(lambda closeable: guard_lease(rt, lease, closeable)):
                rt.webhooks.deliver(
                    url, event, now=rt.clock(), task_id=task_id,
                    on_try=lambda seconds: step(seconds, "delivering task.completed"),
                )  # fmt: skip
        else:
            log.warning("task %s: no webhook URL (task or HAUL_WEBHOOK_URL); nobody is told it is done", task_id)
        lease.check()
        reached = rt.store.release(task_id, token, State.DONE, now=rt.clock(), max_attempts=rt.settings.max_attempts)
        if reached is None:
            raise LeaseLost(f"task {task_id}: lease lost before it could be marked done")
    except (StorageUnavailable, WebhookUndelivered) as exc:
        return _park(rt, task, token, exc, failing_since or rt.clock())
    except PermanentError as exc:
        if not announced:
            return _end_run(rt, task, token, exc)
        # e.g. a receiver refused at connect time after an earlier try that may have been stored
        return _park(rt, task, token, WebhookUndelivered(str(exc)), failing_since or rt.clock())
    except Exception as exc:
        # Announced in this run: the store keeps the task queued, and the error must say so.
        return _end_run(rt, dataclasses.replace(task, announced=announced), token, exc)
    sandbox.remove(task.spec.files)
    log.info("task %s: done, %d file(s), %d bytes in %s, announced: %s", task_id, len(stored),
             sum(f["size"] for f in stored), rt.storage.task_dir(task_id), bool(url))  # fmt: skip
    return NOTHING


def _finalize_step(rt: Runtime, lease: Lease, task_id: str) -> Callable[[float, str], None]:
    """Before each step of a finalize: a graceful stop hands it back too; the lease covers it."""

    def step(seconds: float, doing: str) -> None:
        if rt.stopper.is_set():
            raise Stopping(f"task {task_id}: the worker is stopping; handing the task back")
        lease.step(seconds, doing)

    return step


def _fence(rt: Runtime, lease: Lease, step: Callable[[float, str], None]) -> None:
    """Before a rename into storage: the token is confirmed with Redis, so a cancel wins."""
    step(DISK_STEP_SECONDS, "storing")
    rt.leases.confirm(lease)


def _park(rt: Runtime, task: Task, token: int, exc: TransientError, failing_since: float) -> Outcome:
    """Keep a finished task ``finalizing`` and try again after a pause that grows with the outage."""
    s = rt.settings
    now = rt.clock()
    if now - failing_since > s.finalize_give_up_seconds:
        message = f"{exc}; failing for {now - failing_since:.0f}s (HAUL_FINALIZE_GIVE_UP_SECONDS), giving up"
        reached = rt.store.release(
            task.id, token, State.DEAD, now=now, error=message, max_attempts=s.max_attempts, code=exc.code,
            file=exc.file,
        )  # fmt: skip
        log.error("task %s: dead: %s", task.id, message)
        if reached is None:
            return NOTHING
        report_task(message, kind="dead", task_id=task.id, stage="finalizing", attempt=task.attempts)
        return Outcome(Next.NOTIFY)
    delay = outage_wait(now - failing_since, _timing(rt))
    # Parked without a lease: however long the message then waits in a queue, the task is not
    # taken back (which would use up a download attempt); the supervisor re-sends a lost one.
    parked = rt.store.park(task.id, token, now=now, due=now + delay, failing_since=failing_since, error=str(exc))
    if parked is None:
        return NOTHING
    log.warning("task %s: finalize will try again in %.1fs: %s", task.id, delay, exc)
    return Outcome(Next.FINALIZE, token=parked, delay_seconds=delay, failing_since=failing_since)


def _end_run(rt: Runtime, task: Task, token: int, exc: Exception) -> Outcome:
    """Record how this run ended (:func:`actors.policy.end_of_run` decides) and say what comes next."""
    end = end_of_run(exc, task, _timing(rt), stopping=rt.stopper.is_set(), rng=random.Random())
    if end.target is None:
        log.warning("%s", exc)
        return NOTHING
    if end.unexpected:
        log.error("task %s: unexpected error; treated as transient", task.id, exc_info=exc)
    now = rt.clock()
    reached = rt.store.release(
        task.id, token, end.target, now=now, error=end.error, not_before=now + end.delay_seconds,
        max_attempts=rt.settings.max_attempts, refund=end.refund, code=end.code, file=end.file,
    )  # fmt: skip
    stage = task.state.value if task.state.active else "download"
    if end.refund:
        log.info("task %s: handed back (worker stopping), %s", task.id, reached)
        return Outcome(Next.RETRY) if reached is State.QUEUED else NOTHING
    if reached is State.QUEUED:
        log.warning("task %s: attempt %d failed, retrying in %.1fs: %s", task.id, task.attempts, end.delay_seconds,
                    end.error)  # fmt: skip
        return Outcome(Next.RETRY, delay_seconds=end.delay_seconds)
    if reached is State.FAILED:
        log.error("task %s: failed: %s", task.id, end.error)
        report_task(end.error, kind=type(exc).__name__, task_id=task.id, stage=stage, attempt=task.attempts,
                    origin_host=_origin_host(task))  # fmt: skip
        return Outcome(Next.NOTIFY)
    if reached is State.DEAD:
        log.error("task %s: dead after %d attempts: %s", task.id, task.attempts, end.error)
        report_task(f"task {task.id} is dead after {task.attempts} attempts: {end.error}", kind="dead",
                    task_id=task.id, stage=stage, attempt=task.attempts, origin_host=_origin_host(task))  # fmt: skip
        return Outcome(Next.NOTIFY)
    return NOTHING


def _timing(rt: Runtime) -> RetryTiming:
    s = rt.settings
    return RetryTiming(s.max_attempts, s.retry_min_seconds, s.retry_max_seconds)


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
