"""What can go wrong with a task, and what haul does about it.

::

    HaulError
      TransientError            retried with backoff; every byte already downloaded is kept
        OriginUnavailable       5xx, 429/503 (retry_after), timeouts, resets, short body
          PartUnusable          the .part cannot be continued: start over from zero at once
        ResolverMissing         a page file reached a worker without haul[resolve]
        StorageUnavailable      the storage root is missing, full or not writable
        WebhookUndelivered      the receiver did not answer 2xx
      PermanentError            fails the task at once, task.failed goes out
        OriginRejected          the origin answered 404/410/403... (status)
        PageUnresolvable        a page shows no media haul can download (removed, private, none)
        TooManyRedirects        the origin's redirects loop or go on past 10 hops
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

Every class has a ``code``: the machine-readable reason a task ended, kept in its record
(``error_code``) and sent in task.failed (``origin_404``, ``timeout``, ``checksum``...). A
backend decides on the code, never on the message. ``file`` is the path of the file the error
is about, when it is about one (set where the file is known, see stages._fetch_all).
"""

from __future__ import annotations


class HaulError(Exception):
    """Root of haul's own errors."""

    #: Machine-readable reason (``[a-z0-9_]+``); subclasses refine it.
    code: str = "error"
    #: The path of the task's file this error is about ('' when about none, or not known yet).
    file: str = ""


class TransientError(HaulError):
    """Worth retrying later: the same request may well succeed."""

    #: A transient error of no more precise kind: the task ends dead with this code once its
    #: attempts are used.
    code = "attempts_exhausted"
    #: Seconds the peer asked us to wait (``Retry-After``), if it said.
    retry_after: float | None = None
    #: Not the task's failure (this worker cannot do it now, another can): the task is handed
    #: back with its attempt given back.
    handback = False

    def __init__(self, message: str, retry_after: float | None = None, *, code: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        if code is not None:
            self.code = code


class OriginUnavailable(TransientError):
    """The origin could not serve the file right now (code ``timeout`` when it did not answer in time)."""

    code = "origin_unavailable"


class PartUnusable(OriginUnavailable):
    """The ``.part`` cannot be continued (the file changed on the origin, the range was refused,
    the partial file changed in staging): the download starts over from zero, at once."""


class RangeUnsatisfiable(PartUnusable):
    """The origin refused the resume range (416); ``size``: the file's size its answer gave
    (``Content-Range: bytes */N``), if any; ``etag`` and ``last_modified``: its version, as
    far as it says. A ``.part`` of exactly that size, of that version, is whole."""

    def __init__(self, message: str, size: int | None, etag: str | None, last_modified: str | None) -> None:
        super().__init__(message)
        self.size, self.etag, self.last_modified = size, etag, last_modified


class ResolverMissing(TransientError):
    """A page file reached a worker that cannot resolve pages: another worker may."""

    code = "resolver_missing"


class HostBusy(TransientError):
    """A page's media host had no connection slot free for long: the task waits queued, its
    attempt given back (two tasks each holding the other's host would otherwise wait for ever)."""

    code = "host_busy"
    handback = True


class JoinFailed(TransientError):
    """ffmpeg could not finish joining a page's tracks for a reason of this worker's (it ran
    past its time, it was killed): the fragments are kept, the next attempt joins again."""

    code = "join_failed"


class StorageUnavailable(TransientError):
    """Finished files could not be written to storage (or staging)."""

    code = "storage"


class WebhookUndelivered(TransientError):
    """The webhook receiver did not accept the event (code ``no_webhook_secret``: none to sign with)."""

    code = "webhook_undelivered"


class PermanentError(HaulError):
    """Retrying cannot help: the task fails and the backend is told why."""

    code = "failed"


class NoWebhookSecret(PermanentError):
    """The task has a receiver to tell but this worker holds no secret to sign the event with."""

    code = "no_webhook_secret"


class OriginRejected(PermanentError):
    """The origin refused the file for good (404, 410, 403, ...)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        #: ``origin_<status>`` (``origin_404``).
        self.code = f"origin_{status}"


class PageUnresolvable(PermanentError):
    """A page that shows no media haul can download: removed, private, none at all, a playlist,
    or only formats haul does not download; the message carries the extractor's reason."""

    code = "page_unresolvable"


class TooManyRedirects(PermanentError):
    """The origin's redirects loop, or go on for more hops than haul follows."""

    code = "too_many_redirects"


class ForbiddenDestination(PermanentError):
    """The URL's scheme or address is not allowed by the destination policy."""

    code = "forbidden_destination"


class UnsafePath(PermanentError):
    """A file path is absolute, climbs out of its folder or holds forbidden characters."""

    code = "invalid_path"


class TooLarge(PermanentError):
    """A file is larger than allowed."""

    code = "too_large"


class UnexpectedContent(PermanentError):
    """The origin answered with something that is not the expected file."""

    code = "unexpected_content"


class ChecksumMismatch(PermanentError):
    """The downloaded bytes do not match the size or sha256 the task gave."""

    code = "checksum"


class InvalidTask(PermanentError):
    """A submitted task is malformed; nothing was enqueued."""

    code = "invalid_task"


class LeaseLost(HaulError):
    """The task's fencing token moved on: another worker (or an operator) owns it now."""

    code = "lease_lost"


class Stopping(HaulError):
    """The worker process is stopping; the task goes back to the queue, bytes kept."""

    code = "stopping"
