"""What a stage's run leads to: the message to send next, and when.

A stage returns an :class:`Outcome`; the actor glue turns it into a message
(:meth:`actors.messages.Messages.follow`). Kept apart from the stages so that sending a
message needs neither the stages nor what they import (HTTP, disk, Sentry).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.task import Task


class Next(enum.Enum):
    DOWNLOAD = "download"
    FINALIZE = "finalize"
    RETRY = "retry"
    NOTIFY = "notify"
    NOTHING = "nothing"


@dataclass(frozen=True)
class Outcome:
    next: Next
    token: int = 0
    delay_seconds: float = 0.0
    #: For a finalize that is being retried: when its storage or webhook began to fail.
    failing_since: float = 0.0
    #: The task as the stage that produced this outcome read it (to spare a read in the next).
    task: Task | None = None


NOTHING = Outcome(Next.NOTHING)
