"""The HTTP download engine: one file from an origin into a ``.part`` file, resumably.

Bytes stream to disk in chunks of at most 1 MiB (a sha256 is computed on a thread beside,
the kernel is asked to write back as the file grows), so memory stays flat whatever the file
size and the final fsync has little left to do. A ``.part`` survives every failure; the next
attempt asks for the rest with ``Range`` + ``If-Range`` (strong ETag, else Last-Modified),
and keeps the bytes only when the origin proves the file is unchanged by answering 206 for
exactly the offset asked. Anything else (200, another ETag, no validator) restarts the file
from zero, so old and new bytes are never spliced together. The caller decides when a
finished ``.part`` becomes the file.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests
import urllib3

from actors.diskio import Writeback
from actors.errors import (
    ChecksumMismatch,
    ForbiddenDestination,
    OriginRejected,
    OriginUnavailable,
    StorageUnavailable,
    TooLarge,
    UnexpectedContent,
)
from actors.interrupt import Guard, interruptible
from actors.lease import DISK_STEP_SECONDS, Step, no_step
from actors.netguard import DestinationPolicy, refused_at_connect, shutter_of
from actors.redact import display_url
from actors.task import FileSpec

log = logging.getLogger(__name__)

#: Most bytes read from the socket and written to disk per step.
CHUNK_BYTES = 1024 * 1024
#: Bytes of a resumed ``.part`` hashed per step (the lease is renewed between two).
HASH_CHUNK_BYTES = 16 * 1024 * 1024
#: Redirect hops followed before giving up.
MAX_REDIRECTS = 10
#: Statuses that mean "try again later"; every other 4xx is the origin's final word.
RETRYABLE_4XX = frozenset({408, 425, 429})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class Validator:
    """What identifies the version of a file a ``.part`` holds bytes of."""

    etag: str | None = None
    last_modified: str | None = None

    @property
    def if_range(self) -> str | None:
        """The ``If-Range`` value, or None when nothing reliable identifies the version."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    @classmethod
    def of(cls, response: requests.Response) -> Validator:
        return cls(etag=response.headers.get("ETag"), last_modified=response.headers.get("Last-Modified"))


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


class Fetcher:
    """Downloads files over one pooled ``requests.Session`` (per worker thread or process)."""

    def __init__(
        self,
        policy: DestinationPolicy,
        *,
        connect_timeout: float,
        read_timeout: float,
        session: requests.Session | None = None,
    ) -> None:
        self.policy = policy
        self.timeout = (connect_timeout, read_timeout)
        self.session = session or policy.session()

    def fetch(
        self,
        spec: FileSpec,
        part: Path,
        *,
        task_id: str,
        on_progress: Callable[[int], None],
        on_total: Callable[[int], None] | None = None,
        guard: Guard | None = None,
        rules: FetchRules = FetchRules(),
        step: Step = no_step,
        on_sha256: Callable[[str], None] | None = None,
    ) -> int:
        """Bring ``part`` to the complete file (returning its size), resuming what it already holds.

        ``on_progress(position)`` is called before every chunk is written, with the bytes the
        ``.part`` holds so far (0 when the file restarts), and once at the end; raising there
        stops the transfer before another byte is written; ``on_total(size)`` the file's size once known;
        ``guard(response)`` wraps the transfer (a graceful stop closes the response to wake a
        blocked read); ``rules`` the size, type and speed limits; ``step(seconds)`` is called
        before each blocking step that is not a body read (a request, hashing or syncing the
        ``.part``) with the longest it may take, and may raise to stop; ``on_sha256(hex)``, when
        given, gets the complete file's sha256 (hashed as it arrives, like a task's own sha256,
        which is checked whether or not it is given). Raises haul errors only.
        """
        where = f"task {task_id}, file {spec.path!r} from {display_url(spec.url)}"
        meta_path = part.with_suffix(part.suffix + ".json")
        offset, validator = self._resume_point(part, meta_path)
        headers = {"Accept-Encoding": "identity"}
        if offset and validator.if_range:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = validator.if_range
        # Hash what the .part holds before asking for the rest: hashing many GiB after the
        # request would leave the origin waiting past its own send timeout.
        hashing = bool(spec.sha256) or on_sha256 is not None
        kept = _hash_file(part, offset, step) if hashing and offset else None
        with interruptible(guard):
            response = self._get(spec.url, headers, where, step)
        hasher: _Hasher | None = None
        try:
            asked = offset
            offset, total = self._start_point(response, offset, validator, where)
            coded = _content_coded(response)
            if coded and offset:
                raise _Restart(f"{where}: the origin sent the rest content-coded; it cannot be appended")
            if coded:
                # Content-Length counts the coded bytes, not the file's, and ranges cannot be
                # trusted: no size to check against and no resume (a next attempt starts over).
                total, validator = None, Validator()
            else:
                validator = Validator.of(response)
            content_type = response.headers.get("Content-Type")
            if not content_type_accepted(content_type, rules.accept):
                raise UnexpectedContent(
                    f"{where}: the origin answered {response.status_code} with {content_type!r} where "
                    f"{', '.join(rules.accept)} was expected; that is usually a login, error or 'access "
                    "denied' page: check that the URL is still valid (or widen the task's accept list)"
                )
            if total is not None and rules.max_bytes and total > rules.max_bytes:
                raise TooLarge(
                    f"{where}: the file is {total} bytes, above the limit of {rules.max_bytes} "
                    "(HAUL_MAX_FILE_BYTES / HAUL_MAX_TASK_BYTES); nothing was downloaded"
                )
            if total is not None:
                if spec.size is not None and total != spec.size:
                    raise ChecksumMismatch(
                        f"{where}: the origin serves {total} bytes but the task says size {spec.size}; "
                        "check the task's size or the URL"
                    )
                if on_total is not None:
                    on_total(total)
            on_progress(offset)
            if hashing:
                hasher = _Hasher(kept if kept is not None and offset == asked else hashlib.sha256())
            shutter = shutter_of(response)
            with guard(shutter) if guard is not None else nullcontext():
                served = self._stream(
                    response, part, offset, validator, meta_path, coded, hasher, on_progress, step, rules, where
                )
            if shutter.shut:  # the end of the body was ours, not the origin's
                raise OriginUnavailable(f"{where}: the transfer was interrupted after {offset + served} bytes")
        finally:
            response.close()
            if hasher is not None:
                hasher.close()
        size = offset + served
        if total is not None and size != total:
            raise OriginUnavailable(f"{where}: the connection ended after {size} of {total} bytes")
        if spec.size is not None and size != spec.size:
            raise ChecksumMismatch(f"{where}: got {size} bytes but the task says size {spec.size}")
        digest = hasher.hexdigest() if hasher else None
        if spec.sha256 and digest != spec.sha256:
            raise ChecksumMismatch(
                f"{where}: sha256 is {digest} but the task says {spec.sha256}; "
                "the origin serves other bytes than the task expects"
            )
        if on_sha256 is not None and digest is not None:
            on_sha256(digest)
        return size

    # -- steps ------------------------------------------------------------------------------

    @staticmethod
    def _resume_point(part: Path, meta_path: Path) -> tuple[int, Validator]:
        """How many bytes of ``part`` can be kept, given what is known of their version."""
        try:
            size = part.stat().st_size
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return 0, Validator()
        validator = Validator(etag=meta.get("etag"), last_modified=meta.get("last_modified"))
        return (size, validator) if validator.if_range else (0, validator)

    @staticmethod
    def _start_point(
        response: requests.Response, offset: int, validator: Validator, where: str
    ) -> tuple[int, int | None]:
        """Where writing starts (``offset`` to resume, 0 to restart) and the full size if known."""
        length = _int_header(response, "Content-Length")
        if response.status_code == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not offset or not match or int(match.group(1)) != offset:
                raise OriginUnavailable(
                    f"{where}: the origin answered 206 with Content-Range "
                    f"{response.headers.get('Content-Range')!r} to a request from byte {offset}"
                )
            same_version = Validator.of(response).if_range in (None, validator.if_range)
            if not same_version:
                raise _Restart(f"{where}: the file changed on the origin (new validator)")
            total = None if match.group(3) == "*" else int(match.group(3))
            return offset, total
        if offset:
            log.info("%s: the origin sent the whole file instead of the rest; restarting it", where)
        return 0, length

    @staticmethod
    def _write_meta(meta_path: Path, validator: Validator, where: str) -> None:
        data = json.dumps({"etag": validator.etag, "last_modified": validator.last_modified}).encode()
        try:
            fd = os.open(meta_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageUnavailable(f"{where}: cannot write to staging ({exc.strerror})") from exc

    def _stream(
        self,
        response: requests.Response,
        part: Path,
        offset: int,
        validator: Validator,
        meta_path: Path,
        coded: bool,
        hasher: _Hasher | None,
        on_progress: Callable[[int], None],
        step: Step,
        rules: FetchRules,
        where: str,
    ) -> int:
        """Copy the body into ``part`` from ``offset``; return the bytes received.

        The ``.part`` holds exactly ``offset`` bytes before ``validator`` is recorded for it: the
        record must never name a version the bytes on disk are not of, or an interrupted restart
        (the fence, a graceful stop) would let the next attempt append the new version to the
        old. A restart writes a new file rather than truncating the old one, and a resume never
        cuts what it finds: a holder that lost the task without noticing yet keeps writing into
        its own inode, never into its successor's.

        ``read1`` returns as soon as some bytes arrived (at most a chunk), so a slow origin
        still reports progress, and renews the lease, often enough. Bodies are read as sent
        unless the origin applied a content coding (urllib3's decoding path costs a third of
        the speed on a fast link).
        """
        raw = response.raw
        received = 0
        window_start, window_bytes = time.monotonic(), 0
        try:
            if offset:
                fd = os.open(part, os.O_WRONLY)
            else:
                part.unlink(missing_ok=True)
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError as exc:
            raise _Restart(f"{where}: the partial file vanished from staging") from exc
        except OSError as exc:
            raise StorageUnavailable(f"{where}: cannot open {part} in staging ({exc.strerror})") from exc
        writeback = Writeback(fd, offset)
        try:
            if os.fstat(fd).st_size != offset:  # changed since it was measured: never cut it
                raise _Restart(f"{where}: the partial file changed size in staging")
            os.lseek(fd, offset, os.SEEK_SET)
            self._write_meta(meta_path, validator, where)
            while True:
                try:
                    chunk = raw.read1(CHUNK_BYTES, decode_content=coded)
                except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                    raise OriginUnavailable(
                        f"{where}: the transfer broke after {offset + received} bytes ({exc})", code=_code(exc)
                    ) from exc
                n = len(chunk)
                if not n:
                    break
                on_progress(offset + received)  # may raise: a stale holder must not write
                if rules.max_bytes and offset + received + n > rules.max_bytes:
                    raise TooLarge(
                        f"{where}: the body grew past the limit of {rules.max_bytes} bytes; cut there "
                        "(HAUL_MAX_FILE_BYTES / HAUL_MAX_TASK_BYTES)"
                    )
                window_bytes += n
                if rules.lowest_speed_bytes and time.monotonic() - window_start >= rules.lowest_speed_seconds:
                    speed = window_bytes / (time.monotonic() - window_start)
                    if speed < rules.lowest_speed_bytes:
                        raise OriginUnavailable(
                            f"{where}: the origin sent {speed:.0f} bytes/s over {rules.lowest_speed_seconds:g}s, "
                            f"below HAUL_LOWEST_SPEED_BYTES={rules.lowest_speed_bytes}; cut, the bytes so far kept",
                            code="timeout",
                        )
                    window_start, window_bytes = time.monotonic(), 0
                try:
                    written = 0
                    while written < n:
                        written += os.write(fd, chunk[written:] if written else chunk)
                except OSError as exc:
                    raise StorageUnavailable(
                        f"{where}: writing to staging failed after {offset + received} bytes ({exc.strerror}); "
                        "free space in HAUL_STAGING_DIR, the bytes so far are kept"
                    ) from exc
                if hasher is not None:
                    hasher.update(chunk)
                received += n
                writeback.advance(offset + received)
            on_progress(offset + received)
            step(DISK_STEP_SECONDS)
            os.fdatasync(fd)  # the bytes and the size; timestamps need not be durable
        except OSError as exc:
            raise StorageUnavailable(f"{where}: syncing {part} failed ({exc.strerror})") from exc
        finally:
            os.close(fd)
        return received

    def _get(self, url: str, headers: dict[str, str], where: str, step: Step) -> requests.Response:
        """GET with redirects followed by hand, so that every hop passes the policy."""
        seen: set[str] = set()
        for _ in range(MAX_REDIRECTS + 1):
            if url in seen:
                raise OriginRejected(f"{where}: redirect loop back to {display_url(url)}; fix the URL", status=310)
            seen.add(url)
            self.policy.check(url, purpose=where)
            step(sum(self.timeout))
            try:
                response = self.session.get(
                    url, headers=headers, stream=True, timeout=self.timeout, allow_redirects=False
                )
            except requests.RequestException as exc:
                if refused_at_connect(exc):
                    raise ForbiddenDestination(
                        f"{where}: {display_url(url)} resolved to a non-public address at connect time; refused"
                    ) from exc
                raise OriginUnavailable(
                    f"{where}: request to {display_url(url)} failed ({_reason(exc)})", code=_code(exc)
                ) from exc
            if response.status_code in REDIRECT_STATUSES and "Location" in response.headers:
                response.close()
                url = urljoin(url, response.headers["Location"])
                continue
            _check_status(response, url, where)
            return response
        raise OriginRejected(f"{where}: more than {MAX_REDIRECTS} redirects; fix the URL", status=310)


class _Restart(OriginUnavailable):
    """The ``.part`` cannot be continued (other version, range refused): start from zero."""


def fetch_file(fetcher: Fetcher, spec: FileSpec, part: Path, **kwargs: Any) -> int:
    """:meth:`Fetcher.fetch`, starting over once from zero when the ``.part`` cannot be kept.

    That covers a file that changed on the origin, a refused range, and a size or sha256
    mismatch (a corrupt ``.part`` must not fail a task); the same mismatch from zero is final.
    """
    try:
        return fetcher.fetch(spec, part, **kwargs)
    except (_Restart, ChecksumMismatch) as exc:
        log.warning("%s; downloading the file again from zero", exc)
        kwargs.get("step", no_step)(DISK_STEP_SECONDS)  # the fence: a stale holder deletes nothing
        discard_part(part)
        return fetcher.fetch(spec, part, **kwargs)


def discard_part(part: Path) -> None:
    """Forget a ``.part`` and what identified its version."""
    for path in (part, part.with_suffix(part.suffix + ".json")):
        path.unlink(missing_ok=True)


def _check_status(response: requests.Response, url: str, where: str) -> None:
    status = response.status_code
    if status in (200, 206):
        return
    response.close()
    if status == 416:
        raise _Restart(f"{where}: the origin refused the resume range (416)")
    if status in RETRYABLE_4XX or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise OriginUnavailable(f"{where}: the origin answered {status} {response.reason}", retry_after=retry_after)
    if status == 413:
        raise TooLarge(f"{where}: the origin answered 413 {response.reason}")
    raise OriginRejected(
        f"{where}: the origin answered {status} {response.reason} at {display_url(url)}; "
        "check that the URL is right and still valid (signed URLs expire)",
        status=status,
    )


def _int_header(response: requests.Response, name: str) -> int | None:
    value = response.headers.get(name)
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _hash_file(path: Path, size: int, step: Step) -> Any:
    """sha256 over the ``size`` bytes a resumed ``.part`` holds (all of it: its size was the offset),
    a step per chunk: hashing a large ``.part`` takes long, and keeps the lease while it progresses."""
    digest = hashlib.sha256()
    if not size:
        return digest
    with path.open("rb", buffering=0) as handle:
        buffer = bytearray(HASH_CHUNK_BYTES)
        view = memoryview(buffer)
        while True:
            step(DISK_STEP_SECONDS)
            n = handle.readinto(buffer)
            if not n:
                return digest
            digest.update(view[:n])


def _content_coded(response: requests.Response) -> bool:
    """Whether the origin applied a content coding (gzip...) although haul asked for none."""
    return response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")


class _Hasher:
    """Hashes chunks on a thread of its own, so that hashing overlaps receiving and writing.

    hashlib releases the GIL on large updates; at most ``QUEUE_CHUNKS`` chunks wait, so memory
    stays bounded when hashing is the slower side.
    """

    QUEUE_CHUNKS = 8

    def __init__(self, digest: Any) -> None:
        self.digest = digest
        self.error: BaseException | None = None
        self.chunks: queue.Queue[bytes | None] = queue.Queue(self.QUEUE_CHUNKS)
        self.thread = threading.Thread(target=self._run, name="haul-sha256", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (chunk := self.chunks.get()) is not None:  # drained to the end, so put() never blocks
            if self.error is None:
                try:
                    self.digest.update(chunk)
                except BaseException as exc:  # handed to the downloading thread, raised there
                    self.error = exc

    def update(self, chunk: bytes) -> None:
        self.chunks.put(chunk)

    def close(self) -> None:
        if self.thread.is_alive():
            self.chunks.put(None)
            self.thread.join()

    def hexdigest(self) -> str:
        self.close()
        if self.error is not None:
            raise self.error
        return str(self.digest.hexdigest())


def _code(exc: BaseException) -> str | None:
    """``timeout`` for a request or read that ran out of time; None keeps ``origin_unavailable``."""
    timeouts = (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
    return "timeout" if isinstance(exc, timeouts) or isinstance(exc.__context__, timeouts) else None


def _reason(exc: BaseException) -> str:
    """A short reason for a requests error, without the URL's query string repeated."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed or was reset"
    return type(exc).__name__
