"""The supervisor's sweeps: plain functions over the store that return what they did.

Each is bounded (``limit``), costs O(what it finds) through sorted sets scored by time, and is
safe to run twice at once (every change is a guarded Lua script), so a leader hand-over that
briefly overlaps does no harm. Sending messages and reporting are callbacks, so these functions
know nothing of Dramatiq or Sentry.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from actors.registry import WorkerInfo, WorkerRegistry
from actors.sandbox import Sandbox
from actors.states import FINAL_STATES, State
from actors.store import TaskStore

log = logging.getLogger(__name__)

#: Most tasks one sweep acts on; the rest wait for the next sweep.
DEFAULT_SWEEP_LIMIT = 1000
#: A sandbox with no task record is left alone for this long (a task may be being created).
ORPHAN_SANDBOX_GRACE_SECONDS = 3600.0
#: Ended records pruned per script call (one Redis round trip, a few milliseconds).
DEFAULT_PRUNE_BATCH = 500
#: A prune sweep stops starting batches after this long (seconds): at tens of thousands of
#: records a second, far more than workers can end between two sweeps.
DEFAULT_PRUNE_BUDGET_SECONDS = 5.0

SendTask = Callable[[str], None]
#: Sends a finalize message: task id, the token it carries, since when finalize has been failing.
SendFinalize = Callable[[str, int, float], None]
#: Sends a notify message: task id, and the chain's sequence number (None: the first try).
SendNotice = Callable[[str, int | None], None]


def requeue_stuck(
    store: TaskStore,
    now: float,
    *,
    max_attempts: int,
    send_claim: SendTask,
    on_dead: SendTask,
    on_error: Callable[[str, Exception], None] | None = None,
    limit: int = DEFAULT_SWEEP_LIMIT,
) -> Counter[str]:
    """Tasks whose lease deadline passed go back to ``queued`` (new token, new claim message),
    or to ``dead`` when their attempts are used (``on_dead`` sends task.failed and reports).

    A record the script cannot read (corrupted by hand, say) is reported through ``on_error``
    and skipped, so one bad record never stops the recovery of the others. Each requeued task
    stays in an outbox until its claim message is sent: if Redis is lost, or the supervisor
    dies, in between, the next sweep sends it (``outcome["resent"]``), not the orphan rescue
    minutes later.
    """
    outcome: Counter[str] = Counter()
    unsent = store.unsent_claims(before=now, limit=limit)
    for task_id in unsent:
        log.warning("task %s: queued again by an earlier sweep that did not send its claim; sending it", task_id)
        send_claim(task_id)
    store.claims_sent(unsent)
    if unsent:
        outcome["resent"] = len(unsent)
    expired = store.expired(now, limit)
    results = store.requeue_expired(expired, now=now, max_attempts=max_attempts)
    sent: list[str] = []
    try:
        for task_id, result in zip(expired, results, strict=True):
            if isinstance(result, Exception):  # the script's own error; a Redis outage raises above
                log.error("task %s: cannot requeue, its record is unreadable (%s)", task_id, result)
                outcome["error"] += 1
                if on_error is not None:
                    on_error(task_id, result)
                continue
            outcome[result] += 1
            if result == "queued":
                log.warning("task %s: lease expired; queued again", task_id)
                send_claim(task_id)
                sent.append(task_id)
            elif result == "dead":
                log.error("task %s: lease expired and attempts are used; dead", task_id)
                on_dead(task_id)
    finally:
        store.claims_sent(sent)  # one round trip; a send that failed stays for the next sweep
    return outcome


def rescue_orphans(
    store: TaskStore,
    now: float,
    *,
    send_claim: SendTask,
    grace_seconds: float,
    limit: int = DEFAULT_SWEEP_LIMIT,
) -> int:
    """Re-send the claim of queued tasks that waited far too long: their message may be lost
    (Redis restarted without persistence). A duplicate costs one claim call."""
    found = store.rescue_candidates(now=now, grace_seconds=grace_seconds, limit=limit)
    for task_id in found:
        log.warning("task %s: queued for over %.0fs past its time; sending its claim again", task_id, grace_seconds)
        send_claim(task_id)
    return len(found)


def resend_notifications(
    store: TaskStore, now: float, *, send_notify: SendNotice, grace_seconds: float, limit: int = DEFAULT_SWEEP_LIMIT
) -> int:
    """Owed notices (task.failed, task.canceled) whose next try is overdue by more than
    ``grace_seconds``: their message is lost, so it goes out again, with the chain's sequence
    number. A chain that is alive (its next try due later, or a try in flight) is left alone,
    and if the lost message turns up after all, only one of the two makes the try."""
    lost = store.lost_notices(now=now, grace_seconds=grace_seconds, limit=limit)
    for task_id, seq in lost:
        log.warning("task %s: its notice is overdue by over %.0fs; sending its message again", task_id, grace_seconds)
        send_notify(task_id, seq)
    return len(lost)


def resend_finalizes(
    store: TaskStore, now: float, *, send_finalize: SendFinalize, grace_seconds: float, limit: int = DEFAULT_SWEEP_LIMIT
) -> int:
    """Finalizing tasks resting between runs (waiting for a finalize slot, or parked while
    storage or their receiver is down) hold no lease: their finalize message holds them. One
    overdue by more than ``grace_seconds`` is lost, so it goes out again with the token the task
    expects; if the lost one turns up after all, only the first of the two enters."""
    lost = store.lost_finalizes(now=now, grace_seconds=grace_seconds, limit=limit)
    for task_id, token, failing_since in lost:
        log.warning("task %s: its finalize message is overdue by over %.0fs; sending it again", task_id, grace_seconds)
        send_finalize(task_id, token, failing_since)
    return len(lost)


def vanished_workers(registry: WorkerRegistry, now: float, *, on_vanished: Callable[[WorkerInfo], None]) -> int:
    gone = registry.vanished(now)
    for worker in gone:
        log.error("worker %s (host %s, pid %d) stopped sending heartbeats", worker.id, worker.host, worker.pid)
        on_vanished(worker)
    return len(gone)


def prune(
    store: TaskStore,
    staging_dir: Path,
    now: float,
    *,
    retain_seconds: float,
    limit: int = DEFAULT_SWEEP_LIMIT,
    batch: int = DEFAULT_PRUNE_BATCH,
    budget_seconds: float = DEFAULT_PRUNE_BUDGET_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> Counter[str]:
    """Delete ended task records older than the retention period, the sandboxes failed tasks
    kept for inspection, and sandboxes whose task no longer exists. Never a live task's files,
    never storage.

    Records go ``batch`` per script call, a batch of each final state in turn, until every
    state's batch comes back short or ``budget_seconds`` (on ``clock``) are spent; the rest
    waits for the next sweep. Records a batch kept (a notice still owed) are passed over by
    the next batch of the same sweep, so they never hold back the ones ended after them.
    """
    outcome: Counter[str] = Counter()
    cutoff, deadline = now - retain_seconds, clock() + budget_seconds
    skips = dict.fromkeys(sorted(FINAL_STATES), 0)  # the states still to sweep, and their cursors
    while skips:
        for state, skip in list(skips.items()):
            pruned, skips[state], more = store.prune_batch(state, cutoff=cutoff, limit=batch, skip=skip)
            _remove_sandboxes(staging_dir, pruned, outcome)
            if not more:
                del skips[state]
        if clock() >= deadline:
            break
    grace = max(retain_seconds, ORPHAN_SANDBOX_GRACE_SECONDS)
    candidates = _old_sandboxes(staging_dir, now - grace)
    for start in range(0, len(candidates), limit):  # every folder, `limit` existence checks per trip
        chunk = candidates[start : start + limit]
        for task_id, known in zip(chunk, store.which_exist(chunk), strict=True):
            if not known:
                log.info("removing sandbox %s: its task no longer exists", staging_dir / task_id)
                shutil.rmtree(staging_dir / task_id, ignore_errors=True)
                outcome["orphan_sandboxes"] += 1
    return outcome


def _remove_sandboxes(staging_dir: Path, pruned: list[tuple[str, State]], outcome: Counter[str]) -> None:
    """Count the pruned records and remove the sandboxes they kept (failed tasks')."""
    for task_id, state in pruned:
        outcome[f"records_{state.value}"] += 1
        sandbox = Sandbox(staging_dir, task_id)
        if sandbox.exists():
            sandbox.remove()
            outcome["sandboxes"] += 1


def prune_temporaries(folder: Path, now: float, *, grace_seconds: float = ORPHAN_SANDBOX_GRACE_SECONDS) -> int:
    """Delete storage copies a killed finalize left in ``folder`` (``HAUL_STORAGE_DIR/.haul-tmp``):
    a copy being written is modified every few seconds, so one untouched for ``grace_seconds``
    is abandoned. Returns how many went."""
    removed = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < now - grace_seconds:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue  # renamed into place or removed meanwhile
    except FileNotFoundError:
        pass
    return removed


def _old_sandboxes(staging_dir: Path, before: float) -> list[str]:
    """Names of the sandbox folders (task ids) in staging last changed before ``before``."""
    found = []
    try:
        with os.scandir(staging_dir) as entries:
            for entry in entries:
                if len(entry.name) != 32 or not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < before:
                        found.append(entry.name)
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        pass
    return found
