"""haul's one state machine: a task's states, the moves between them, and what the store answers.

The Lua scripts in ``actors/lua/`` are what moves a task, atomically; this module names what
they do. ``tests/test_states.py`` drives every script from every state and checks that the
moves it makes are exactly :data:`TRANSITIONS`, and that the state sets ``_lib.lua`` spells
out are the ones here. Every reply a script gives is one of the enums below: code compares
members, never strings.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class State(enum.StrEnum):
    """Where a task is in its life."""

    #: Waiting for a worker (new, retried, or handed back).
    QUEUED = "queued"
    #: A worker holds the lease; the download has not started yet.
    CLAIMED = "claimed"
    #: Files are streaming into the task's sandbox.
    DOWNLOADING = "downloading"
    #: Files are complete; storage and the webhook are next.
    FINALIZING = "finalizing"
    #: Stored and announced; final.
    DONE = "done"
    #: Failed for a reason retrying cannot fix; final.
    FAILED = "failed"
    #: Transient failures used every attempt; final (the dead-letter).
    DEAD = "dead"
    #: Stopped by an operator; final.
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def active(self) -> bool:
        """A worker holds a lease in this state (or, finalizing, its message holds the task)."""
        return self in ACTIVE_STATES


FINAL_STATES = frozenset({State.DONE, State.FAILED, State.DEAD, State.CANCELED})
ACTIVE_STATES = frozenset({State.CLAIMED, State.DOWNLOADING, State.FINALIZING})
#: The ends other than done: the task owes task.failed or task.canceled, an operator may retry
#: it (``haul retry``), and a new request may replace it under its key.
RETRYABLE_STATES = frozenset({State.FAILED, State.DEAD, State.CANCELED})

_ENDINGS = frozenset({State.QUEUED, State.FAILED, State.DEAD, State.CANCELED})
#: A claim whose run starts (``claimed``, or ``downloading`` for a worker that goes straight on).
_RUNS = frozenset({State.CLAIMED, State.DOWNLOADING})

#: Every move a script makes, a state to itself included where a script makes a new run or a
#: new rest in the same state. An active task whose lease ran out is claimed again (a new run,
#: ``claimed`` or ``downloading``) or ends ``dead`` once its attempts are used; any active task
#: goes back to ``queued`` (transient error, lease expiry, graceful stop), fails, or is canceled.
TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.QUEUED: _RUNS | {State.CANCELED},
    State.CLAIMED: _RUNS | _ENDINGS,
    State.DOWNLOADING: _RUNS | _ENDINGS | {State.FINALIZING},
    # Finalizing rests in place (a finalize slot, an outage) and ends done; its announced
    # completion survives a lost lease by a new run that delivers it again.
    State.FINALIZING: _RUNS | _ENDINGS | {State.FINALIZING, State.DONE},
    State.DONE: frozenset(),
    State.FAILED: frozenset({State.QUEUED}),  # operator retry
    State.DEAD: frozenset({State.QUEUED}),
    State.CANCELED: frozenset({State.QUEUED}),
}


def can_move(source: State, target: State) -> bool:
    return target in TRANSITIONS[source]


class ClaimReply(enum.StrEnum):
    """What ``claim.lua`` found."""

    #: Taken: a new run with its token, lease and slots.
    OK = "ok"
    MISSING = "missing"
    #: The task has ended.
    FINAL = "final"
    #: Another run holds its lease, or its finalize message holds it (a stray duplicate).
    BUSY = "busy"
    #: Queued, but its backoff has not passed.
    WAIT = "wait"
    #: Its lease ran out and every attempt is used: now dead.
    DEAD = "dead"
    #: A stage limit is reached: it stays queued, waiting.
    FULL = "full"


class StepReply(enum.StrEnum):
    """What a step of a run found (advance, finish_download, enter_finalize, park, announce,
    release): done under the run's token, the task now rests until a slot is free, or the token
    is stale (another run or an operator owns the task)."""

    OK = "ok"
    FULL = "full"
    STALE = "stale"


class CreateReply(enum.StrEnum):
    """What ``create.lua`` did with a request and its idempotency key."""

    CREATED = "created"
    #: The key names a task with the same request: that task is the answer.
    SAME = "same"
    #: The key names a task with a different request: refused.
    DIFFERENT = "different"
    #: Replace was asked for a task that is not failed, dead or canceled: refused.
    NOT_REPLACEABLE = "not_replaceable"


class CancelReply(enum.StrEnum):
    """What a cancel found."""

    #: Canceled: the token moved on, and task.canceled is owed.
    OK = "ok"
    MISSING = "missing"
    #: The task had already ended (done, failed, dead or canceled).
    FINAL = "final"
    #: Refused: the first delivery of task.completed has started, so the task will end done.
    ANNOUNCING = "announcing"


class RetryReply(enum.StrEnum):
    """What an operator's retry found."""

    OK = "ok"
    MISSING = "missing"
    #: Only failed, dead or canceled tasks are retried.
    NOT_ENDED = "not_ended"
    #: Its idempotency key names a newer task now (a replace): retry that one.
    REPLACED = "replaced"


class RequeueReply(enum.StrEnum):
    """What the supervisor's requeue of an expired lease did."""

    QUEUED = "queued"
    DEAD = "dead"
    #: Renewed or ended meanwhile: nothing to do.
    SKIP = "skip"
