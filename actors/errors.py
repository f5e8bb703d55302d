"""What can go wrong with a task, and what haul does about it.

::

    HaulError
      TransientError            retried with backoff; every byte already downloaded is kept
        OriginUnavailable       5xx, 429/503 (retry_after), timeouts, resets, short body
        StorageUnavailable      the storage root is missing, full or not writable
        WebhookUndelivered      the receiver did not answer 2xx
      PermanentError            fails the task at once, task.failed goes out
        OriginRejected          the origin answered 404/410/403... (status)
        ForbiddenDestination    the URL points somewhere haul must not go
        UnsafePath              a file path would land outside the task's folder
        TooLarge                a file is larger than the task or the limits allow
        UnexpectedContent       the bytes are not what the task asked for
        ChecksumMismatch        size or sha256 differ from the task's (after a retry from zero)
        InvalidTask             the submitted task itself is malformed
      LeaseLost                 another worker owns the task now: stop quietly
      Stopping                  the worker is shutting down: hand the task back at once

Library exceptions are converted at the boundary (``raise OriginUnavailable(...) from exc``)
so callers only ever see these. Every message says what happened, to which task and URL, and
what a user can do about it.
"""

from __future__ import annotations


class HaulError(Exception):
    """Root of haul's own errors."""


class TransientError(HaulError):
    """Worth retrying later: the same request may well succeed."""

    #: Seconds the peer asked us to wait (``Retry-After``), if it said.
    retry_after: float | None = None

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OriginUnavailable(TransientError):
    """The origin could not serve the file right now."""


class StorageUnavailable(TransientError):
    """Finished files could not be written to storage."""


class WebhookUndelivered(TransientError):
    """The webhook receiver did not accept the event."""


class PermanentError(HaulError):
    """Retrying cannot help: the task fails and the backend is told why."""


class OriginRejected(PermanentError):
    """The origin refused the file for good (404, 410, 403, ...)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ForbiddenDestination(PermanentError):
    """The URL's scheme or address is not allowed by the destination policy."""


class UnsafePath(PermanentError):
    """A file path is absolute, climbs out of its folder or holds forbidden characters."""


class TooLarge(PermanentError):
    """A file is larger than allowed."""


class UnexpectedContent(PermanentError):
    """The origin answered with something that is not the expected file."""


class ChecksumMismatch(PermanentError):
    """The downloaded bytes do not match the size or sha256 the task gave."""


class InvalidTask(PermanentError):
    """A submitted task is malformed; nothing was enqueued."""


class LeaseLost(HaulError):
    """The task's fencing token moved on: another worker (or an operator) owns it now."""


class Stopping(HaulError):
    """The worker process is stopping; the task goes back to the queue, bytes kept."""
