"""A task's run: claim and download, then finalize (:mod:`actors.finalize`) while nothing has
to wait, as plain functions over the domain (no Dramatiq here).

Each stage checks the fencing token first, does its work, and returns an :class:`Outcome`
that tells the actor glue which message to send next. Errors end the run in one place,
:func:`actors.ending.end_run`: permanent ones fail the task, transient ones queue it again with
backoff (``dead`` once attempts are used), a lost lease stops quietly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from actors.ending import end_run
from actors.errors import HaulError, LeaseLost, NoWebhookSecret, TooLarge
from actors.filerun import FileRun
from actors.finalize import finish_task
from actors.lanes import FileLanes
from actors.lease import DISK_STEP_SECONDS, Lane, Lease, no_figures, no_files
from actors.outcome import NOTHING, Next, Outcome
from actors.pagefile import fetch_page_file, require_resolver
from actors.policy import FINALIZE_BACKLOG_FACTOR, SLOT_WAIT_MAX_SECONDS, slot_wait
from actors.progress import Progress
from actors.redact import display_url
from actors.requestopts import headers_for
from actors.runtime import Runtime
from actors.sandbox import Sandbox
from actors.sentry import report_task
from actors.states import ClaimReply, State, StepReply
from actors.store import StageLimits
from actors.task import FileSpec, Task

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
            lease.figures, lease.files = no_figures, no_files  # the download's are written already
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
            figures, finished = (task.bytes_done, task.bytes_total, task.files_done), None
        else:
            progress = _fetch_all(rt, task, lease)
            figures, finished = progress.figures(), progress.files().finished
        entry, token = rt.store.finish_download(
            task_id,
            token,
            now=rt.clock(),
            lease_seconds=s.lease_seconds,
            progress=figures,
            finalize_limit=s.finalize_concurrency,
            finished=finished,
        )
        if entry is StepReply.STALE:
            raise LeaseLost(f"task {task_id}: lease lost as the download finished")
        if entry is StepReply.FULL:  # resting until a finalize slot is free; the message holds the task
            return Outcome(Next.FINALIZE, token=token, delay_seconds=slot_wait())
        return Outcome(Next.FINALIZE, token=token)
    except Exception as exc:
        return end_run(rt, task, token, exc)


def _fetch_all(rt: Runtime, task: Task, lease: Lease) -> Progress:
    """Every file into the sandbox (skipping finished ones); return the download's progress."""
    s = rt.settings
    task_id = task.id
    progress = Progress(rt, task, lease)
    lease.figures, lease.files = progress.figures, progress.files
    if task.spec.webhook:  # a receiver the task may not reach fails it before any byte is fetched
        rt.webhook_policy.check(task.spec.webhook, purpose=f"task {task_id}: webhook {display_url(task.spec.webhook)}")
    if (task.spec.webhook or s.webhook_url) and not s.webhook_secrets:  # nor one it cannot sign for
        raise NoWebhookSecret(
            f"task {task_id}: its completion cannot be announced, this worker has no webhook signing secret; "
            "set HAUL_WEBHOOK_SECRET or HAUL_WEBHOOK_SECRET_FILE on the workers, then `haul retry` the task"
        )
    sandbox = Sandbox(s.staging_dir, task_id)
    sandbox.prepare()
    known = task.spec.known_bytes
    if s.max_task_bytes and known > s.max_task_bytes:
        raise TooLarge(
            f"task {task_id}: its files add up to {known} bytes, above HAUL_MAX_TASK_BYTES={s.max_task_bytes}"
        )
    pending = []
    # Files an earlier run finished go first, in the order it reported them: their
    # file.completed events follow that order (files finish out of order side by side).
    reported = [i for i in dict.fromkeys(task.finished) if i < len(task.spec.files)]
    others = sorted(set(range(len(task.spec.files))) - set(reported))
    for index in [*reported, *others]:
        spec = task.spec.files[index]
        with _naming(spec):
            size = sandbox.finished_size(spec)
        if size is None:
            pending.append(index)
        else:
            progress.file_done(index, size)
    pending.sort()

    if any(task.spec.files[index].page for index in pending):
        require_resolver(rt, task)  # before any file is fetched: another worker may take the task
    lanes = FileLanes(rt, task, lease, progress, s.task_parallel_files)

    def fetch(index: int, lane: Lane) -> None:
        spec = task.spec.files[index]
        lane.step(DISK_STEP_SECONDS, f"preparing {spec.path!r}")  # a resumed .part's validator, DNS
        with _naming(spec), progress.file(index, lane) as file:
            part = sandbox.claim_part(index, lease.token)
            run = FileRun(rt, task, lease.token, index, part, file, lane, lanes, sandbox, progress)
            if spec.page:
                size = fetch_page_file(run)
            else:
                size = run.fetch(spec, headers_for(task.spec.request, spec.url), display_url)
            lane.step(DISK_STEP_SECONDS, f"placing {spec.path!r} in staging")
            sandbox.promote(part, spec)
            sandbox.drop_fragments(index)
        log.debug("task %s: %s complete (%d bytes)", task_id, spec.path, size)
        progress.file_done(index, size)

    lanes.run(pending, fetch)
    return progress


@contextmanager
def _naming(spec: FileSpec) -> Iterator[None]:
    """A haul error raised in the block names the file (the backend is told which failed)."""
    try:
        yield
    except HaulError as exc:
        exc.file = exc.file or spec.path
        raise
