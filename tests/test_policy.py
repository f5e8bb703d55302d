"""The outcome policy (actors/policy.py) on its own: how a run that raised ends, and how long a
task waits for a slot or out an outage. Pure functions: no Redis, no HTTP, seeded randomness."""

from __future__ import annotations

import random

import pytest

from actors.errors import LeaseLost, OriginRejected, OriginUnavailable, Stopping, TransientError
from actors.manifest import spec_from_urls
from actors.policy import (
    HANDED_BACK,
    SLOT_WAIT_MAX_SECONDS,
    SLOT_WAIT_MIN_SECONDS,
    RetryTiming,
    RunEnd,
    end_of_run,
    outage_wait,
    slot_wait,
)
from actors.states import State
from actors.task import Task

pytestmark = pytest.mark.fast

TIMING = RetryTiming(max_attempts=5, min_seconds=2.0, max_seconds=60.0)
SPEC = spec_from_urls(["https://cdn.example.com/a.mp4"])


def task(attempts: int, announced: bool = False) -> Task:
    return Task(id="t1", spec=SPEC, state=State.DOWNLOADING, attempts=attempts, announced=announced)


def ends(exc: Exception, attempts: int = 2, *, stopping: bool = False, announced: bool = False) -> RunEnd:
    return end_of_run(exc, task(attempts, announced), TIMING, stopping=stopping, rng=random.Random(attempts))


def test_a_lost_lease_records_nothing() -> None:
    assert ends(LeaseLost("taken over")).target is None


def test_a_graceful_stop_hands_the_task_back_with_its_attempt_unless_the_error_is_permanent() -> None:
    end = ends(OriginUnavailable("reset"), 2, stopping=True)
    assert (end.target, end.error, end.refund, end.delay_seconds) == (State.QUEUED, HANDED_BACK, True, 0.0)
    assert ends(Stopping("stop"), 2, stopping=True).refund
    rejected = OriginRejected("404", status=404)
    assert ends(rejected, 2, stopping=True).target is State.FAILED


def test_a_permanent_error_fails_with_its_code_and_file() -> None:
    error = OriginRejected("the origin answered 404 Not Found", status=404)
    error.file = "lesson-01.mp4"
    end = ends(error, 1)
    assert (end.target, end.code, end.file) == (State.FAILED, "origin_404", "lesson-01.mp4")
    assert end.error == "the origin answered 404 Not Found" and not end.refund


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
def test_a_transient_error_before_the_last_attempt_promises_a_retry_after_backoff(attempt: int) -> None:
    end = ends(OriginUnavailable("503"), attempt)
    assert end.target is State.QUEUED and end.error == "503"
    assert (end.retry_note, end.dead_note) == (f"; will retry (attempt {attempt} of 5)", "; all 5 attempts are used")
    assert TIMING.min_seconds <= end.delay_seconds <= TIMING.max_seconds and end.code == "origin_unavailable"


def test_the_policy_leaves_the_last_word_to_the_store() -> None:
    # Whether the last attempt ends dead depends on an announce this run may not know of (a lost
    # reply): both notes go to the store, which appends the one that matches what it did
    last = ends(OriginUnavailable("503"), 5)
    assert last.target is State.QUEUED and last.error == "503" and last.dead_note == "; all 5 attempts are used"


def test_retry_after_is_honoured_up_to_the_longest_backoff() -> None:
    assert ends(OriginUnavailable("429", retry_after=30), 1).delay_seconds == 30
    capped = ends(OriginUnavailable("429", retry_after=900), 1)
    assert capped.delay_seconds == TIMING.max_seconds


def test_an_unexpected_exception_is_transient_and_says_where_to_look() -> None:
    end = ends(KeyError("x"), 1)
    assert end.target is State.QUEUED and end.unexpected and end.code == TransientError.code
    assert end.error.startswith("task t1: internal error KeyError") and "see the worker log" in end.error


def test_slot_waits_grow_with_the_wait_within_bounds() -> None:
    rng = random.Random(5)
    assert SLOT_WAIT_MIN_SECONDS * 0.75 <= slot_wait(0, rng) <= SLOT_WAIT_MIN_SECONDS * 1.25
    assert 5 * 0.75 <= slot_wait(20, rng) <= 5 * 1.25
    assert slot_wait(10_000, rng) <= SLOT_WAIT_MAX_SECONDS * 1.25


def test_outage_waits_grow_with_the_outage_within_the_retry_bounds() -> None:
    rng = random.Random(5)
    assert TIMING.min_seconds <= outage_wait(0, TIMING, rng) <= TIMING.min_seconds * 1.5
    assert 30 <= outage_wait(30, TIMING, rng) <= 45
    assert outage_wait(10_000, TIMING, rng) <= TIMING.max_seconds * 1.5
