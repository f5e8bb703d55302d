"""What happens next, decided without I/O: how a run that raised ends, when a task that found
its stage full asks again, how long a finalize waits out an outage.

Pure functions of their arguments (randomness comes from an ``rng`` a test can seed), so every
rule is unit-tested without Redis, HTTP or a clock; :mod:`actors.stages` applies them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from actors.errors import HaulError, LeaseLost, PermanentError, TransientError
from actors.states import State
from actors.task import Task, backoff_seconds

#: Claims pause while this many times HAUL_FINALIZE_CONCURRENCY tasks wait to be finalized.
FINALIZE_BACKLOG_FACTOR = 2
#: A task that found its stage full asks again after about a quarter of the time it has waited
#: so far, at least this and at most SLOT_WAIT_MAX_SECONDS (seconds), give or take a quarter:
#: a slot freed soon is taken soon, and 10,000 tasks waiting behind a long backlog make about
#: 1,000 claims a second, not 20,000.
SLOT_WAIT_MIN_SECONDS = 0.5
SLOT_WAIT_MAX_SECONDS = 10.0
#: The text a run handed back by a stopping worker records.
HANDED_BACK = "handed back: worker stopping"


@dataclass(frozen=True)
class RetryTiming:
    """The operator's retry settings (HAUL_MAX_ATTEMPTS, HAUL_RETRY_MIN/MAX_SECONDS)."""

    max_attempts: int
    min_seconds: float
    max_seconds: float


@dataclass(frozen=True)
class RunEnd:
    """How a run that raised ends: the state to release the task into (None: the run lost the
    task and records nothing) and what is recorded with it."""

    target: State | None
    error: str = ""
    code: str = ""
    file: str = ""
    #: Seconds before the next attempt may start (for ``queued``).
    delay_seconds: float = 0.0
    #: The attempt is given back: a graceful stop is not the task's fault.
    refund: bool = False
    #: The exception was not one of haul's: a bug, logged with its traceback.
    unexpected: bool = False
    #: Appended to ``error`` by the store when the task stays queued, or when it turns dead.
    retry_note: str = ""
    dead_note: str = ""


def end_of_run(exc: Exception, task: Task, timing: RetryTiming, *, stopping: bool, rng: random.Random) -> RunEnd:
    """Decide how the run of ``task`` (at its ``attempts``) ends after ``exc``.

    Permanent errors fail the task; everything else queues it again with backoff (at least an
    origin's Retry-After). The store turns that ``queued`` into ``dead`` once the attempts are
    used, unless the run's completion is being announced (which a lost reply can hide from this
    run), so the store, not this function, appends the note that says which happened: a dead
    task's error never promises a retry, and a queued one never says its attempts are used.
    """
    if isinstance(exc, LeaseLost):
        return RunEnd(None)
    if stopping and not isinstance(exc, PermanentError):
        # Whatever error the stop caused in the transfer: the bytes stay, another worker resumes.
        return RunEnd(State.QUEUED, HANDED_BACK, refund=True)
    if isinstance(exc, PermanentError):
        return RunEnd(State.FAILED, str(exc), exc.code, exc.file)
    attempt = task.attempts
    delay = backoff_seconds(attempt, timing.min_seconds, timing.max_seconds, rng)
    if isinstance(exc, HaulError):
        message, code, file = str(exc), exc.code, exc.file
        if isinstance(exc, TransientError):
            if exc.retry_after is not None:
                delay = min(timing.max_seconds, max(delay, exc.retry_after))
            if exc.handback:
                # Not the task's failure (a worker without the resolve extra while another has
                # it, a media host full for long): it waits queued, and the attempt is given back.
                return RunEnd(State.QUEUED, message, code, file, delay, refund=True)
    else:
        message = f"task {task.id}: internal error {type(exc).__name__}: {exc} (see the worker log)"
        code, file = TransientError.code, ""
    return RunEnd(
        State.QUEUED, message, code, file, delay, unexpected=not isinstance(exc, HaulError),
        retry_note=f"; will retry (attempt {attempt} of {timing.max_attempts})",
        dead_note=f"; all {timing.max_attempts} attempts are used",
    )  # fmt: skip


def slot_wait(waited: float = 0.0, rng: random.Random | None = None) -> float:
    """Seconds before a task told its stage is full asks again, having waited ``waited``."""
    pause = min(SLOT_WAIT_MAX_SECONDS, max(SLOT_WAIT_MIN_SECONDS, waited / 4))
    return pause * (rng or random).uniform(0.75, 1.25)


def outage_wait(failing_for: float, timing: RetryTiming, rng: random.Random | None = None) -> float:
    """Seconds a finished task waits before it tries its storage or receiver again, growing
    with the outage (``failing_for`` seconds so far) between the retry bounds."""
    return min(timing.max_seconds, max(timing.min_seconds, failing_for)) * (rng or random).uniform(1.0, 1.5)
