"""The finalize stage: store a finished task's files, announce it, mark it done, clean up.

Runs in the claim's thread when a finalize slot is free, or later from a ``finalize`` message
when the task rested (a full stage, an outage of its storage or receiver).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from actors.deliveries import DeliveryRecorder
from actors.ending import end_run, timing
from actors.errors import (
    LeaseLost,
    PermanentError,
    Stopping,
    StorageUnavailable,
    TransientError,
    WebhookUndelivered,
)
from actors.interrupt import interruptible
from actors.lease import DISK_STEP_SECONDS, Lease
from actors.outcome import NOTHING, Next, Outcome
from actors.policy import outage_wait, slot_wait
from actors.progress import guard_lease
from actors.runtime import Runtime
from actors.sandbox import Sandbox
from actors.sentry import report_task
from actors.stagemeter import FINALIZE
from actors.states import State, StepReply
from actors.store_uploads import UploadLedger
from actors.task import Task
from actors.webhook import COMPLETED, make_event

log = logging.getLogger(__name__)


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
    with rt.leases.hold(task_id, token, since=since, stage=FINALIZE) as lease:
        return finish_task(rt, task, lease, failing_since)


class StoredBytes:
    """Bytes a finalize has put in storage so far, written with each lease renewal (status's
    ``bytes_stored``), and those it sent itself, counted in the stage metrics; told by the
    storage, from the finalizing thread."""

    def __init__(self, lease: Lease) -> None:
        self.bytes = 0
        self.lease = lease

    def add(self, more: int, sent: bool) -> None:
        self.bytes += more
        if sent:
            self.lease.tally.add(more)

    def value(self) -> int | None:
        return self.bytes


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
    lease.tally.enter(FINALIZE)
    in_storage = StoredBytes(lease)
    lease.stored = in_storage.value
    url = task.spec.webhook or rt.settings.webhook_url
    recorder = rt.delivery_recorder(task_id, url or "")
    try:
        stored = rt.storage.commit(
            sandbox, task.spec.files, step=lambda s: step(s, "storing"), fence=lambda: _fence(rt, lease, step),
            sha256=rt.settings.file_hash == "sha256", task_key=task.spec.key,
            ledger=UploadLedger(rt.store, task_id, token), on_stored=in_storage.add,
        )  # fmt: skip
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
                    on_try=lambda seconds: step(seconds, "delivering task.completed"), on_answer=recorder.add,
                )  # fmt: skip
        else:
            log.warning("task %s: no webhook URL (task or HAUL_WEBHOOK_URL); nobody is told it is done", task_id)
        lease.check()
        reached = rt.store.release(
            task_id, token, State.DONE, now=rt.clock(), max_attempts=rt.settings.max_attempts, stored=stored
        )
        if reached is None:
            raise LeaseLost(f"task {task_id}: lease lost before it could be marked done")
    except (StorageUnavailable, WebhookUndelivered) as exc:
        return _park(rt, task, token, exc, failing_since or rt.clock(), recorder)
    except PermanentError as exc:
        if not announced:
            return end_run(rt, task, token, exc)
        # e.g. a receiver refused at connect time after an earlier try that may have been stored
        return _park(rt, task, token, WebhookUndelivered(str(exc)), failing_since or rt.clock(), recorder)
    except Exception as exc:
        # Announced in this run: the store keeps the task queued, and the error must say so.
        return end_run(rt, dataclasses.replace(task, announced=announced), token, exc)
    finally:
        recorder.settle(gave_up=False)  # unless _park gave the event up: the next run tries again
    sandbox.remove(task.spec.files)
    log.info("task %s: done, %d file(s), %d bytes in %s, announced: %s", task_id, len(stored),
             sum(f["size"] for f in stored), rt.storage.describe(), bool(url))  # fmt: skip
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


def _park(
    rt: Runtime, task: Task, token: int, exc: TransientError, failing_since: float, recorder: DeliveryRecorder
) -> Outcome:
    """Keep a finished task ``finalizing`` and try again after a pause that grows with the outage;
    past HAUL_FINALIZE_GIVE_UP_SECONDS, end it dead, its last delivery try recorded as given up."""
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
        recorder.settle(gave_up=True)
        report_task(
            message, kind="dead", task_id=task.id, stage="finalizing", attempt=task.attempts, file=exc.file,
            storage=rt.storage.describe() if isinstance(exc, StorageUnavailable) else None, error_code=exc.code,
        )  # fmt: skip
        return Outcome(Next.NOTIFY)
    delay = outage_wait(now - failing_since, timing(rt))
    # Parked without a lease: however long the message then waits in a queue, the task is not
    # taken back (which would use up a download attempt); the supervisor re-sends a lost one.
    parked = rt.store.park(task.id, token, now=now, due=now + delay, failing_since=failing_since, error=str(exc))
    if parked is None:
        return NOTHING
    log.warning("task %s: finalize will try again in %.1fs: %s", task.id, delay, exc)
    return Outcome(Next.FINALIZE, token=parked, delay_seconds=delay, failing_since=failing_since)
