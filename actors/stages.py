"""A task's run: claim and download, then finalize (:mod:`actors.finalize`) while nothing has
to wait, as plain functions over the domain (no Dramatiq here).

Each stage checks the fencing token first, does its work, and returns an :class:`Outcome`
that tells the actor glue which message to send next. Errors end the run in one place,
:func:`actors.ending.end_run`: permanent ones fail the task, transient ones queue it again with
backoff (``dead`` once attempts are used), a lost lease stops quietly.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import redis

from actors.diskio import hash_file, sync_file
from actors.ending import end_run
from actors.errors import (
    ChecksumMismatch,
    HaulError,
    LeaseLost,
    NoWebhookSecret,
    OriginRejected,
    ResolverMissing,
    Stopping,
    TooLarge,
)
from actors.finalize import finish_task
from actors.hls import StreamTransfer
from actors.httprules import FetchRules
from actors.lanes import FileLanes
from actors.lease import DISK_STEP_SECONDS, Lane, Lease, no_figures, no_files
from actors.messages import CLAIM_QUEUE
from actors.outcome import NOTHING, Next, Outcome
from actors.pages import RESOLVE_EXTRA, Resolved, Track, resolve
from actors.policy import FINALIZE_BACKLOG_FACTOR, SLOT_WAIT_MAX_SECONDS, slot_wait
from actors.progress import FileProgress, Progress, guard_lease
from actors.redact import display_url
from actors.registry import WorkerRegistry
from actors.requestopts import headers_for
from actors.runtime import Runtime
from actors.sandbox import Sandbox
from actors.sentry import report_task
from actors.split import Connection, SplitPlan
from actors.states import ClaimReply, State, StepReply
from actors.store import StageLimits
from actors.task import FileSpec, Task
from actors.tracks import download_tracks, haul_errors_only, muxer_for

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
    hashing = s.file_hash == "sha256"
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

    lanes = FileLanes(rt, task, lease, progress, s.task_parallel_files)

    def fetch(index: int, lane: Lane) -> None:
        spec = task.spec.files[index]
        lane.step(DISK_STEP_SECONDS, f"preparing {spec.path!r}")  # a resumed .part's validator, DNS
        with _naming(spec), progress.file(index, lane) as file:
            part = sandbox.claim_part(index, lease.token)
            for resolutions in itertools.count(1):
                found = _resolve_page(rt, task, lease.token, index, lane) if spec.page else None
                rules, plan = _rules(rt, task, progress.bytes_done), lanes.split_plan(index, file, lane)
                try:
                    if found is not None:  # bytes kept of another format are not of this file
                        sandbox.keep_format(index, part, found.format_id)
                    single = found.single_file if found is not None else None
                    if found is not None and single is None:
                        size = _fetch_tracks(rt, task, lease.token, index, found, part, file, plan, rules, sandbox)
                        break
                    media = dataclasses.replace(spec, url=single.url, page=False, format=None) if single else spec
                    size = rt.fetcher.fetch(
                        media,
                        part,
                        task_id=task_id,
                        on_progress=file.on_progress,
                        on_total=file.on_total,
                        guard=file.guard,
                        rules=rules,
                        step=file.step,
                        on_sha256=functools.partial(sandbox.record_sha256, part) if hashing else None,
                        on_received=file.on_received,
                        split=plan,
                        headers=single.headers if single else headers_for(task.spec.request, spec.url),
                        shown=_hidden(spec) if found else display_url,
                    )
                    break
                except OriginRejected as exc:  # a signed media URL that expired: the page gives a new one
                    if not (spec.page and exc.status in EXPIRED_STATUSES and resolutions <= s.resolve_retries):
                        raise
                    log.info("task %s: %s: %s; resolving its page again", task_id, spec.path, exc)
            lane.step(DISK_STEP_SECONDS, f"placing {spec.path!r} in staging")
            sandbox.promote(part, spec)
            sandbox.drop_fragments(index)
        log.debug("task %s: %s complete (%d bytes)", task_id, spec.path, size)
        progress.file_done(index, size)

    lanes.run(pending, fetch)
    return progress


#: Beyond HAUL_RESOLVE_TIMEOUT_SECONDS, how long the lane waits for a resolution to end on its own.
RESOLVE_MARGIN_SECONDS = 10.0
#: What a resolved media URL answers once its signature expired.
EXPIRED_STATUSES = frozenset({401, 403, 410})


def _resolve_page(rt: Runtime, task: Task, token: int, index: int, lane: Lane) -> Resolved:
    """What page file ``index`` resolves to now (recorded on the task; see :mod:`actors.pages`)."""
    spec = task.spec.files[index]
    s = rt.settings
    where = f"task {task.id}, file {spec.path!r} from the page {display_url(spec.url)}"
    # The resolution cuts itself at HAUL_RESOLVE_TIMEOUT_SECONDS; the lane's deadline is the backstop
    lane.step(s.resolve_timeout_seconds + RESOLVE_MARGIN_SECONDS, f"resolving the page of {spec.path!r}")

    def turn() -> None:
        _wait_turn(rt, task, spec, lane)
        lane.step(s.resolve_timeout_seconds + RESOLVE_MARGIN_SECONDS, f"resolving the page of {spec.path!r}")

    try:
        found = resolve(
            spec, s.resolve_format, rt.policy, where=where, timeout=s.read_timeout_seconds,
            limit=s.resolve_timeout_seconds, before=turn,
            guard=functools.partial(guard_lease, rt, lane), proxy=s.proxy, request=task.spec.request,
        )  # fmt: skip
    except ResolverMissing as exc:
        exc.elsewhere = _resolvers_elsewhere(rt)
        raise
    if not rt.store.record_resolved(task.id, token, index, found.record(), now=rt.clock()):
        raise LeaseLost(f"task {task.id}: lease lost while resolving the page of {spec.path!r}")
    log.info("task %s: %s resolved by %s to format %s on %s", task.id, spec.path, found.extractor, found.format_id,
             found.record()["host"])  # fmt: skip
    return found


def _resolvers_elsewhere(rt: Runtime) -> bool:
    """Whether a registered worker can resolve pages (one that cannot hands a page file over)."""
    try:
        return WorkerRegistry(rt.store.client, rt.store.prefix).have(RESOLVE_EXTRA, CLAIM_QUEUE)
    except redis.RedisError:
        return False  # the attempt counts, as any failure's


def _fetch_tracks(
    rt: Runtime,
    task: Task,
    token: int,
    index: int,
    found: Resolved,
    part: Path,
    file: FileProgress,
    plan: SplitPlan | None,
    rules: FetchRules,
    sandbox: Sandbox,
) -> int:
    """A page's stream, or its format's tracks, into ``part``, joined (:mod:`actors.tracks`);
    its size, once hashed and synced."""
    spec = task.spec.files[index]
    where = f"task {task.id}, file {spec.path!r}, the media of its page"
    main = Connection(ranges=rt.fetcher, tick=file.on_progress, step=file.step,
                      wake=plan.wake if plan is not None else _nothing, guard=file.guard)  # fmt: skip
    first = found.tracks[0]  # each track's own URL and headers replace these
    transfer = StreamTransfer(
        main, plan, rules, first.headers, file.on_received, where, token, _hidden(spec), first.url
    )

    def fetch_file(track: Track, track_part: Path, base: int) -> int:
        """A file track, through the fetcher as any file (resumed, split), counted after ``base`` bytes."""
        media = FileSpec(url=track.url, path=spec.path)
        limited = dataclasses.replace(rules, max_bytes=max(1, rules.max_bytes - base)) if rules.max_bytes else rules
        return rt.fetcher.fetch(
            media, track_part, task_id=task.id, on_progress=lambda position: file.on_progress(base + position),
            guard=file.guard, rules=limited, step=file.step, on_received=file.on_received, split=plan,
            headers=track.headers, shown=_hidden(spec),
        )  # fmt: skip

    with haul_errors_only(where):
        folder = sandbox.claim_fragments(index, token)
    joined = download_tracks(found, folder, part, transfer, fetch_file, muxer_for(spec.path))
    size = part.stat().st_size
    digest = hash_file(part, size, lambda: file.step(DISK_STEP_SECONDS)).hexdigest()
    if spec.sha256 and digest != spec.sha256:
        raise ChecksumMismatch(f"{where}: the joined file's sha256 is {digest}, the task says {spec.sha256}")
    if rt.settings.file_hash == "sha256":
        sandbox.record_sha256(part, digest)
    file.step(DISK_STEP_SECONDS)
    sync_file(part, where)
    log.info("task %s: %s joined from %d track(s), %d fragment(s), %d bytes downloaded, into %d bytes", task.id,
             spec.path, joined.tracks, joined.fragments, joined.size, size)  # fmt: skip
    return size


def _hidden(spec: FileSpec) -> Callable[[str], str]:
    """How the URLs a page resolved to appear in messages: not at all (they are signed, a
    credential while they last), only the page they came from."""
    page = display_url(spec.url)
    return lambda url: f"the media of the page {page}"


def _nothing() -> None:
    """A connection with nothing to wake."""


def _wait_turn(rt: Runtime, task: Task, spec: FileSpec, lane: Lane) -> None:
    """Wait for this page's turn at its host (HAUL_HOST_MIN_INTERVAL_SECONDS, across workers)."""
    interval = rt.settings.host_min_interval_seconds
    if not interval:
        return
    host = urlsplit(spec.url).hostname or ""
    lane.step(rt.settings.connect_timeout_seconds, f"taking a turn to ask {host} for a page")
    wait = rt.store.page_turn(host, interval, now=rt.clock())
    if wait > 0:
        lane.step(wait + 1, f"waiting its turn to ask {host} for a page (HAUL_HOST_MIN_INTERVAL_SECONDS)")
        if rt.stopper.wait(wait):
            raise Stopping(f"task {task.id}: the worker is stopping; handing the task back")


@contextmanager
def _naming(spec: FileSpec) -> Iterator[None]:
    """A haul error raised in the block names the file (the backend is told which failed)."""
    try:
        yield
    except HaulError as exc:
        exc.file = exc.file or spec.path
        raise


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
