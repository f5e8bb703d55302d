"""Owed notices: ``task.failed`` (failed or dead) and ``task.canceled``, one chain of tries each.

A task that ends failed, dead or canceled owes its backend one event; the store records it in
``haul:notify``, scored by when the next try is due. One message makes one try (one POST, no
quick retries, no Dramatiq retries) and, when it fails, records the next due time (exponential
backoff with jitter between HAUL_RETRY_MIN_SECONDS and HAUL_RETRY_MAX_SECONDS) and sends the
next message of the chain itself, delayed. Each message carries the chain's sequence number and
the store lets only the message the chain waits for make a try, so a duplicate (Dramatiq
delivers at least once, the supervisor re-sends a message it takes for lost) does nothing: a
receiver that is down gets one try per backoff step per notice, and holds at most one worker
thread per notice. A notice is given up HAUL_FINALIZE_GIVE_UP_SECONDS after its task ended.

Domain only: the actor that sends the next message is in ``actors/handlers.py``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from actors.deliveries import DeliveryRecorder
from actors.errors import PermanentError, WebhookUndelivered
from actors.interrupt import within
from actors.redact import display_url
from actors.runtime import Runtime
from actors.sentry import report_task
from actors.settings import Settings
from actors.states import State
from actors.store import NoticeTry
from actors.task import Task, backoff_seconds
from actors.webhook import CANCELED, FAILED, ended_fields, make_event

log = logging.getLogger(__name__)

#: Added to the receiver's connect and read timeouts for how long one try may hold its notice
#: (seconds): meanwhile the notice is not due, so the supervisor does not re-send its message.
TRY_MARGIN_SECONDS = 5.0
#: Shortest pause between two tries of one notice (seconds), even with HAUL_RETRY_MIN_SECONDS=0:
#: a receiver that fails at once must not be hammered in a loop.
MIN_PAUSE_SECONDS = 0.1


@dataclass(frozen=True)
class NextTry:
    """The chain goes on: send the message with ``seq`` after ``delay_seconds``."""

    seq: int
    delay_seconds: float


def event_type(state: State) -> str:
    """The event a task in an ended ``state`` owes its backend."""
    return CANCELED if state is State.CANCELED else FAILED


def try_seconds(settings: Settings) -> float:
    """The longest one try may take: connect, wait for the answer, and a margin."""
    return settings.connect_timeout_seconds + settings.read_timeout_seconds + TRY_MARGIN_SECONDS


def pause_seconds(tries: int, settings: Settings, rng: random.Random | None = None) -> float:
    """The pause after the ``tries``-th failed try: exponential from HAUL_RETRY_MIN_SECONDS up to
    HAUL_RETRY_MAX_SECONDS, with full jitter (receivers back from an outage are not stormed)."""
    low = max(settings.retry_min_seconds, MIN_PAUSE_SECONDS)
    return backoff_seconds(tries, low, max(low, settings.retry_max_seconds), rng)


def try_notice(rt: Runtime, task_id: str, seq: int | None) -> NextTry | None:
    """Make the one try at the task's owed notice that the message ``seq`` stands for (None:
    the first try); return the next try to schedule, or None when the chain ends here."""
    s = rt.settings
    begun = rt.store.begin_notice(task_id, seq, busy_until=rt.clock() + try_seconds(s))
    if not begun.go:
        log.debug("task %s: notify message %s does nothing (%s)", task_id, seq, begun.skipped)
        return None
    task = rt.store.get(task_id)
    if task is None:  # the spec record is lost: no event can be built, and no try will do better
        log.error("task %s: its notice cannot be sent, the task's spec record is missing from Redis", task_id)
        rt.store.end_notice(task_id, begun.run, begun.seq)
        return None
    if task.run != begun.run or not task.state.final or task.state is State.DONE:
        return None  # retried by an operator since the try began: nothing is owed
    kind = event_type(task.state)
    url = task.spec.webhook or s.webhook_url
    if not url:
        log.warning("task %s: no webhook URL (task or HAUL_WEBHOOK_URL); nobody is told it is %s", task_id, task.state)
        rt.store.end_notice(task_id, begun.run)
        return None
    # error_code / error_file: the record's fields, which release, claim, requeue and cancel write.
    ended = ended_fields(task, task.error_code, task.error_file)
    event = make_event(task, kind, [f.to_json() for f in task.spec.files], task.error, task.updated_at, ended)
    with rt.delivery_recorder(task_id, url, first_try=begun.tries) as recorder:
        try:
            with within(try_seconds(s)):
                rt.webhooks.deliver(url, event, now=rt.clock(), task_id=task_id, tries=1, on_answer=recorder.add)
        except PermanentError as exc:  # a forbidden receiver: retrying cannot help
            _give_up(rt, task, begun, url, kind, f"{exc}; retrying cannot help", recorder)
            return None
        except WebhookUndelivered as exc:  # the receiver's answer, a timeout, a reset
            return _later(rt, task, begun, url, kind, exc, recorder)
        except Exception as exc:  # a bug: keep the chain going, with a traceback in the log
            log.exception("task %s: unexpected error while delivering %s; will try again", task_id, kind)
            return _later(rt, task, begun, url, kind, exc, recorder)
    if rt.store.end_notice(task_id, begun.run):
        log.info("task %s: %s delivered to %s (try %d)", task_id, kind, display_url(url), begun.tries)
    return None


def _later(
    rt: Runtime, task: Task, begun: NoticeTry, url: str, kind: str, exc: Exception, recorder: DeliveryRecorder
) -> NextTry | None:
    """Record when the next try is due, or give the notice up once its time is over."""
    s = rt.settings
    now = rt.clock()
    deadline = task.updated_at + s.finalize_give_up_seconds  # updated_at: when the task ended
    if now >= deadline:
        reason = (
            f"{now - task.updated_at:.0f}s since the task ended, past "
            f"HAUL_FINALIZE_GIVE_UP_SECONDS={s.finalize_give_up_seconds:g}; last error: {exc}"
        )
        _give_up(rt, task, begun, url, kind, reason, recorder)
        return None
    # The last try falls on the deadline (or one shortest pause after it); it is not skipped.
    due = max(now + MIN_PAUSE_SECONDS, min(now + pause_seconds(begun.tries, s), deadline))
    if not rt.store.notice_later(task.id, begun.seq, due=due):
        return None  # delivered by a re-sent message's try, or the task was retried meanwhile
    log.warning("task %s: %s not delivered (try %d), next try in %.1fs: %s", task.id, kind, begun.tries, due - now, exc)
    return NextTry(begun.seq, due - now)


def _give_up(
    rt: Runtime, task: Task, begun: NoticeTry, url: str, kind: str, reason: str, recorder: DeliveryRecorder
) -> None:
    """Stop trying: the backend was never told, so say so loudly (log, Sentry, the try's record)."""
    if not rt.store.end_notice(task.id, begun.run, begun.seq):
        return  # delivered or retried meanwhile
    recorder.settle(gave_up=True)
    message = (
        f"task {task.id}: {kind} to {display_url(url)} given up after {begun.tries} tries ({reason}). "
        f"The backend was never told the task is {task.state}; fix the receiver and tell the backend "
        f"by hand (`haul status {task.id} --json` has the details)"
    )
    log.error("%s", message)
    report_task(message, kind="notice_given_up", task_id=task.id, stage="notify", attempt=begun.tries)
