"""How a run ends after an error: the policy's decision (:mod:`actors.policy`) applied to the
store, logged, and reported to Sentry when it is final, with what comes next.
"""

from __future__ import annotations

import logging
import random
from urllib.parse import urlsplit

from actors.outcome import NOTHING, Next, Outcome
from actors.policy import RetryTiming, end_of_run
from actors.runtime import Runtime
from actors.sentry import report_task
from actors.states import State
from actors.task import Task

log = logging.getLogger(__name__)


def end_run(rt: Runtime, task: Task, token: int, exc: Exception) -> Outcome:
    """Record how this run ended (:func:`actors.policy.end_of_run` decides) and say what comes next."""
    end = end_of_run(exc, task, timing(rt), stopping=rt.stopper.is_set(), rng=random.Random())
    if end.target is None:
        log.warning("%s", exc)
        return NOTHING
    if end.unexpected:
        log.error("task %s: unexpected error; treated as transient", task.id, exc_info=exc)
    now = rt.clock()
    reached = rt.store.release(
        task.id, token, end.target, now=now, error=end.error, not_before=now + end.delay_seconds,
        max_attempts=rt.settings.max_attempts, refund=end.refund, code=end.code, file=end.file,
        notes=(end.retry_note, end.dead_note),
    )  # fmt: skip
    stage = task.state.value if task.state.active else "download"
    if end.refund:
        log.info("task %s: handed back, %s: %s", task.id, reached, end.error)
        return Outcome(Next.RETRY, delay_seconds=end.delay_seconds) if reached is State.QUEUED else NOTHING
    if reached is State.QUEUED:
        log.warning("task %s: attempt %d failed, retrying in %.1fs: %s%s", task.id, task.attempts,
                    end.delay_seconds, end.error, end.retry_note)  # fmt: skip
        return Outcome(Next.RETRY, delay_seconds=end.delay_seconds)
    if reached is State.FAILED:
        log.error("task %s: failed: %s", task.id, end.error)
        report_task(end.error, kind=type(exc).__name__, task_id=task.id, stage=stage, attempt=task.attempts,
                    origin_host=origin_host(task), file=end.file, error_code=end.code)  # fmt: skip
        return Outcome(Next.NOTIFY)
    if reached is State.DEAD:
        log.error("task %s: dead after %d attempts: %s%s", task.id, task.attempts, end.error, end.dead_note)
        report_task(f"task {task.id} is dead after {task.attempts} attempts: {end.error}{end.dead_note}", kind="dead",
                    task_id=task.id, stage=stage, attempt=task.attempts, origin_host=origin_host(task), file=end.file,
                    error_code=end.code)  # fmt: skip
        return Outcome(Next.NOTIFY)
    return NOTHING


def timing(rt: Runtime) -> RetryTiming:
    s = rt.settings
    return RetryTiming(s.max_attempts, s.retry_min_seconds, s.retry_max_seconds)


def origin_host(task: Task) -> str | None:
    return urlsplit(task.spec.files[0].url).hostname if task.spec.files else None
