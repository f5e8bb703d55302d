"""What an origin's answer means: status codes, headers, content types and limits.

Pure rules over a ``requests.Response`` (or its headers); the fetcher applies them. Every
refusal is one of haul's errors with a message that says what the origin did and what to do.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests
import urllib3

from actors.errors import OriginRejected, OriginUnavailable, RangeUnsatisfiable, TooLarge
from actors.redact import display_url

#: Most bytes read from the socket (and written to disk) per step.
CHUNK_BYTES = 1024 * 1024
#: Redirect hops followed before giving up.
MAX_REDIRECTS = 10
#: Statuses that mean "try again later"; every other 4xx is the origin's final word.
RETRYABLE_4XX = frozenset({408, 425, 429})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class FetchRules:
    """What a download must respect (from the task and the settings)."""

    #: Refuse or cut a file larger than this (0: no limit).
    max_bytes: int = 0
    #: Content types accepted (``video/*`` style patterns); a missing Content-Type passes.
    accept: tuple[str, ...] = ("*/*",)
    #: Cut a transfer slower than this many bytes a second over ``lowest_speed_seconds``.
    lowest_speed_bytes: int = 0
    lowest_speed_seconds: float = 60.0


#: No limits at all, and any content type.
NO_RULES = FetchRules()


def content_type_accepted(content_type: str | None, accept: tuple[str, ...]) -> bool:
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    for pattern in accept:
        pattern = pattern.lower()
        if pattern == "*/*" or pattern == kind or (pattern.endswith("/*") and kind.startswith(pattern[:-1])):
            return True
    return False


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def check_status(response: requests.Response, url: str, where: str, shown: Callable[[str], str] = display_url) -> None:
    """Pass a 200 or 206; otherwise close the response and raise what the status means (``shown``
    says how ``url`` may appear in the message)."""
    status = response.status_code
    if status in (200, 206):
        return
    response.close()
    if status == 416:
        whole = re.fullmatch(r"bytes \*/(\d+)", (response.headers.get("Content-Range") or "").strip())
        raise RangeUnsatisfiable(
            f"{where}: the origin refused the resume range (416)", int(whole[1]) if whole else None,
            response.headers.get("ETag"), response.headers.get("Last-Modified"),
        )  # fmt: skip
    if status in RETRYABLE_4XX or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise OriginUnavailable(f"{where}: the origin answered {status} {response.reason}", retry_after=retry_after)
    if status == 413:
        raise TooLarge(f"{where}: the origin answered 413 {response.reason}")
    raise OriginRejected(
        f"{where}: the origin answered {status} {response.reason} at {shown(url)}; "
        "check that the URL is right and still valid (signed URLs expire)",
        status=status,
    )


def int_header(response: requests.Response, name: str) -> int | None:
    value = response.headers.get(name)
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def content_coded(response: requests.Response) -> bool:
    """Whether the origin applied a content coding (gzip...) although haul asked for none."""
    return response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")


def timeout_code(exc: BaseException) -> str | None:
    """``timeout`` for a request or read that ran out of time; None keeps ``origin_unavailable``."""
    timeouts = (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
    return "timeout" if isinstance(exc, timeouts) or isinstance(exc.__context__, timeouts) else None


def request_failure(exc: BaseException) -> str:
    """A short reason for a requests error, without the URL's query string repeated."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed or was reset"
    return type(exc).__name__


class SpeedFloor:
    """Cuts a transfer whose rate stays below HAUL_LOWEST_SPEED_BYTES for a whole window."""

    def __init__(self, rules: FetchRules, where: str) -> None:
        self.rules, self.where = rules, where
        self.start, self.bytes = time.monotonic(), 0

    def passed(self, n: int) -> None:
        if not self.rules.lowest_speed_bytes:  # off: nothing to count on the hot path
            return
        self.bytes += n
        elapsed = time.monotonic() - self.start
        if elapsed < self.rules.lowest_speed_seconds:
            return
        speed = self.bytes / elapsed
        if speed < self.rules.lowest_speed_bytes:
            raise OriginUnavailable(
                f"{self.where}: the origin sent {speed:.0f} bytes/s over {self.rules.lowest_speed_seconds:g}s, "
                f"below HAUL_LOWEST_SPEED_BYTES={self.rules.lowest_speed_bytes}; cut, the bytes so far kept",
                code="timeout",
            )
        self.start, self.bytes = time.monotonic(), 0


def read_chunk(response: requests.Response, coded: bool, where: str, position: int) -> bytes:
    """The next bytes of the body as soon as some arrived (at most :data:`CHUNK_BYTES`), so a
    slow origin still reports progress often; decoded only when the origin applied a coding."""
    try:
        chunk: bytes = response.raw.read1(CHUNK_BYTES, decode_content=coded)
    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
        raise OriginUnavailable(
            f"{where}: the transfer broke after {position} bytes ({exc})", code=timeout_code(exc)
        ) from exc
    return chunk
