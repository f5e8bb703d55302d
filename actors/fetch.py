"""The HTTP download engine: one file from an origin into a ``.part`` file, resumably.

Bytes stream to disk in chunks of at most 1 MiB (a sha256 is computed on a thread beside,
the kernel is asked to write back as the file grows), so memory stays flat whatever the file
size and the final fsync has little left to do. A ``.part`` survives every failure; the next
attempt continues it only when the origin proves the file unchanged (:mod:`actors.resume`),
so old and new bytes are never spliced together. What an answer means is in
:mod:`actors.httprules`, the disk side in :mod:`actors.diskio`. The caller decides when a
finished ``.part`` becomes the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

from actors.connections import refused_at_connect, shutter_of
from actors.diskio import Hasher, Writeback, hash_file, open_part, write_all
from actors.errors import (
    ChecksumMismatch,
    ForbiddenDestination,
    OriginUnavailable,
    PartUnusable,
    RangeUnsatisfiable,
    StorageUnavailable,
    TooLarge,
    TooManyRedirects,
    UnexpectedContent,
)
from actors.httprules import (
    MAX_REDIRECTS,
    NO_RULES,
    REDIRECT_STATUSES,
    FetchRules,
    SpeedFloor,
    check_status,
    content_coded,
    content_type_accepted,
    read_chunk,
    request_failure,
    timeout_code,
)
from actors.interrupt import Guard, interruptible
from actors.lease import DISK_STEP_SECONDS, Step, no_step
from actors.netguard import DestinationPolicy
from actors.redact import display_url
from actors.requestopts import for_host
from actors.resume import Validator, discard_part, request_headers, resume_point, start_point, write_meta
from actors.split import (
    ONE_CONNECTION,
    WORTH_SPLITTING_SECONDS,
    Connection,
    SpanMap,
    SplitPlan,
    Splitter,
    no_guard,
    qualifies,
    ramp_window,
)
from actors.task import FileSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transfer:
    """What one download reports to, and asks of, its caller (see :meth:`Fetcher.fetch`)."""

    task_id: str
    on_progress: Callable[[int], None]
    on_total: Callable[[int], None] | None
    guard: Guard | None
    rules: FetchRules
    step: Step
    on_sha256: Callable[[str], None] | None
    on_received: Callable[[int], None] | None = None
    #: Whether and how the file may be split over several connections (:mod:`actors.split`).
    split: SplitPlan | None = None
    #: Sent with every request for the file (a resolved page's: its Referer, User-Agent).
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: How the file's URLs may appear in messages (a resolved page's are signed: not at all).
    shown: Callable[[str], str] = display_url


@dataclass(frozen=True)
class Answer:
    """What the origin's answer says about the transfer ahead."""

    #: Where writing starts: the bytes kept (a resume), or 0 (a restart).
    offset: int
    #: The file's full size, when known.
    total: int | None
    #: The version of the bytes that will follow (recorded with the ``.part``).
    validator: Validator
    #: The body is content-coded: decoded on the way, never resumed.
    coded: bool
    #: The origin's Content-Type, if it gave one.
    content_type: str | None = None


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
        rules: FetchRules = NO_RULES,
        step: Step = no_step,
        on_sha256: Callable[[str], None] | None = None,
        on_received: Callable[[int], None] | None = None,
        split: SplitPlan | None = None,
        headers: Mapping[str, str] | None = None,
        shown: Callable[[str], str] = display_url,
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
        which is checked whether or not it is given); ``on_received(n)`` the size of each chunk
        once it is written (what this run brought over the network, resumed bytes apart);
        ``split`` lets a large file go over several connections (:mod:`actors.split`; a
        ``.part`` a split download left is always continued as one, on one connection without
        it); ``headers`` go with every request for the file (haul's own replace any of the same name);
        ``shown`` says how its URLs may appear in messages. Raises haul errors only.

        A ``.part`` that cannot be kept is started over once from zero: a file that changed on
        the origin, a refused range, a size or sha256 mismatch (a corrupt ``.part`` must not
        fail a task); the same mismatch from zero is final.
        """
        transfer = Transfer(task_id, on_progress, on_total, guard, rules, step, on_sha256, on_received, split,
                            dict(headers or {}), shown)  # fmt: skip
        try:
            return self._attempt(spec, part, transfer)
        except (PartUnusable, ChecksumMismatch) as exc:
            log.warning("%s; downloading the file again from zero", exc)
            step(DISK_STEP_SECONDS)  # the fence: a stale holder deletes nothing
            discard_part(part)
            return self._attempt(spec, part, transfer)

    def _attempt(self, spec: FileSpec, part: Path, t: Transfer) -> int:
        """One try at :meth:`fetch`."""
        where = f"task {t.task_id}, file {spec.path!r} from {t.shown(spec.url)}"
        spans = SpanMap.load(part)  # a .part a split download left: only what it lacks is asked for
        asked, validator = (spans.first_missing, spans.validator) if spans else resume_point(part)
        # Hash what the .part holds before asking for the rest: hashing many GiB after the
        # request would leave the origin waiting past its own send timeout.
        hashing = bool(spec.sha256) or t.on_sha256 is not None
        kept = hash_file(part, asked, lambda: t.step(DISK_STEP_SECONDS)) if hashing and asked else None
        if spans is not None and not spans.spans:  # whole already: a run ended before renaming it
            t.on_progress(spans.size)
            return _verified(spec, spans.size, spans.size, kept.hexdigest() if kept else None, t.on_sha256, where)
        asked_at = time.monotonic()
        try:
            with interruptible(t.guard):
                response = self._get(
                    spec.url, {**t.headers, **request_headers(asked, validator)}, where, t.step, t.shown
                )
        except RangeUnsatisfiable as exc:  # asked from its end, under If-Range: the .part is whole
            version = Validator(etag=exc.etag, last_modified=exc.last_modified).if_range
            whole = spans is None and asked and exc.size == asked  # asked: the .part's size (resume_point)
            if not whole or version not in (None, validator.if_range):
                raise
            if t.on_total is not None:
                t.on_total(asked)
            t.on_progress(asked)
            return _verified(spec, asked, asked, kept.hexdigest() if kept else None, t.on_sha256, where)
        latency = time.monotonic() - asked_at  # the window a split measures rates over grows with it
        hasher: Hasher | None = None
        try:
            answer = self._judge(response, spec, asked, validator, t.rules, where)
            if answer.total is not None and t.on_total is not None:
                t.on_total(answer.total)
            t.on_progress(answer.offset)
            if spans is not None and answer.offset and answer.total is not None and not answer.coded:
                if answer.total != spans.size or answer.validator.if_range != spans.if_range:
                    raise PartUnusable(f"{where}: the file changed on the origin (or its answer names no version)")
                kept_hash = (kept, answer.offset) if kept is not None else None
                return self._split(spec, part, response, answer, spans, kept_hash, (None, latency), t, where)
            # Worth splitting only if one connection turns out slow: its first ramp window tells
            splittable = (
                t.split is not None and t.split.width > 1 and answer.total is not None and not answer.coded
                and qualifies(response, answer.total, t.split.min_bytes)
            )  # fmt: skip
            if hashing:
                hasher = Hasher(kept if kept is not None and answer.offset == asked else hashlib.sha256())
            shutter = shutter_of(response)
            with t.guard(shutter) if t.guard is not None else nullcontext():
                served, rate = self._stream(response, part, answer, hasher, t, where, splittable, latency)
            if shutter.shut:  # the end of the body was ours, not the origin's
                raise OriginUnavailable(f"{where}: the transfer was interrupted after {answer.offset + served} bytes")
            if rate is not None:  # handed over: the rest goes over several connections
                position = answer.offset + served
                hashed = (hasher.finish(), position) if hasher is not None else None
                hasher = None
                moved = dataclasses.replace(answer, offset=position)
                return self._split(spec, part, response, moved, None, hashed, (rate, latency), t, where)
        finally:
            response.close()
            if hasher is not None:
                hasher.close()
        digest = hasher.hexdigest() if hasher is not None else None
        return _verified(spec, answer.offset + served, answer.total, digest, t.on_sha256, where)

    # -- steps ------------------------------------------------------------------------------

    @staticmethod
    def _judge(
        response: requests.Response, spec: FileSpec, offset: int, validator: Validator, rules: FetchRules, where: str
    ) -> Answer:
        """Read the answer's headers against the ``.part``, the task and the rules."""
        offset, total = start_point(response, offset, validator, where)
        coded = content_coded(response)
        if coded and offset:
            raise PartUnusable(f"{where}: the origin sent the rest content-coded; it cannot be appended")
        # Content-Length of a coded body counts the coded bytes, not the file's, and its ranges
        # cannot be trusted: no size to check against and no resume (a next attempt starts over).
        total, validator = (None, Validator()) if coded else (total, Validator.of(response))
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
        if total is not None and spec.size is not None and total != spec.size:
            raise ChecksumMismatch(
                f"{where}: the origin serves {total} bytes but the task says size {spec.size}; "
                "check the task's size or the URL"
            )
        return Answer(offset, total, validator, coded, content_type)

    @staticmethod
    def _stream(
        response: requests.Response,
        part: Path,
        answer: Answer,
        hasher: Hasher | None,
        t: Transfer,
        where: str,
        splittable: bool = False,
        latency: float = 0.0,
    ) -> tuple[int, float | None]:
        """Copy the body into ``part`` from ``answer.offset``; return the bytes received, and
        the rate the body came at when it stopped to go on over several connections (None when
        it went to its end).

        ``splittable``: after a ramp window (:func:`actors.split.ramp_window` of ``latency``,
        how long the answer took to start), if the rest would take more than
        :data:`actors.split.WORTH_SPLITTING_SECONDS` at the rate so far, it stops there
        (the bytes written synced) for :meth:`_split` to go on with the same answer.

        The ``.part`` holds exactly ``offset`` bytes before the answer's validator is recorded
        for it: the record must never name a version the bytes on disk are not of, or an
        interrupted restart (the fence, a graceful stop) would let the next attempt append the
        new version to the old. ``read1`` returns as soon as some bytes arrived (at most a
        chunk), so a slow origin still reports progress, and renews the lease, often enough.
        Bodies are read as sent unless the origin applied a content coding (urllib3's decoding
        path costs a third of the speed on a fast link).
        """
        offset, received = answer.offset, 0
        fd = open_part(part, offset, where)
        on_progress, rules = t.on_progress, t.rules
        writeback, floor = Writeback(fd, offset), SpeedFloor(rules, where)
        started, rate, window = time.monotonic(), None, ramp_window(latency)
        try:
            write_meta(part, answer.validator, where, answer.content_type)
            while chunk := read_chunk(response, answer.coded, where, offset + received):
                on_progress(offset + received)  # may raise: a stale holder must not write
                if rules.max_bytes and offset + received + len(chunk) > rules.max_bytes:
                    raise TooLarge(
                        f"{where}: the body grew past the limit of {rules.max_bytes} bytes; cut there "
                        "(HAUL_MAX_FILE_BYTES / HAUL_MAX_TASK_BYTES)"
                    )
                floor.passed(len(chunk))
                write_all(fd, chunk, where, offset + received)
                if hasher is not None:
                    hasher.update(chunk)
                received += len(chunk)
                writeback.advance(offset + received)
                if t.on_received is not None:
                    t.on_received(len(chunk))
                if splittable and (elapsed := time.monotonic() - started) >= window:
                    splittable, speed = False, received / elapsed
                    assert answer.total is not None
                    if (answer.total - offset - received) > speed * WORTH_SPLITTING_SECONDS:
                        rate = speed
                        break
            on_progress(offset + received)
            t.step(DISK_STEP_SECONDS)
            os.fdatasync(fd)  # the bytes and the size; timestamps need not be durable
        except OSError as exc:
            raise StorageUnavailable(f"{where}: syncing {part} failed ({exc.strerror})") from exc
        finally:
            os.close(fd)
        return received, rate

    def _split(
        self,
        spec: FileSpec,
        part: Path,
        response: requests.Response,
        answer: Answer,
        spans: SpanMap | None,
        hashed: tuple[Any, int] | None,
        measured: tuple[float | None, float],
        t: Transfer,
        where: str,
    ) -> int:
        """The rest of the file over up to ``t.split.width`` connections, ``response`` the first
        one's (:mod:`actors.split`; ``measured``: the rate it came at alone, if measured, and
        how long it took to start); returns the file's size once whole and verified."""
        assert answer.total is not None
        plan = t.split or ONE_CONNECTION
        fd = open_part(part, answer.offset, where, exact=False)
        try:
            if spans is None:  # the record names this version before a byte of it is written
                meta = {"etag": answer.validator.etag, "last_modified": answer.validator.last_modified,
                        "content_type": answer.content_type}  # fmt: skip
                spans = SpanMap.after(part, answer.total, meta, answer.offset)
                spans.record(fd, spans.snapshot(), where)
            [first] = [s for s in spans.spans if s.pos == answer.offset]
            read_fd = os.open(part, os.O_RDONLY)
            try:
                splitter = Splitter(
                    url=spec.url, fd=fd, spans=spans, plan=plan, on_received=t.on_received, hashed=hashed,
                    read_fd=read_fd, rules=t.rules, where=where, first_rate=measured[0], latency=measured[1],
                    headers=t.headers, shown=t.shown,
                )  # fmt: skip
                main = Connection(ranges=self, tick=t.on_progress, step=t.step, wake=plan.wake,
                                  guard=t.guard or no_guard)  # fmt: skip
                digest = splitter.run(response, first, main)
            finally:
                os.close(read_fd)
        finally:
            os.close(fd)
        return _verified(spec, answer.total, answer.total, digest, t.on_sha256, where)

    def get_range(
        self,
        url: str,
        start: int,
        end: int,
        if_range: str,
        where: str,
        step: Step,
        extra: Mapping[str, str],
        shown: Callable[[str], str] = display_url,
    ) -> requests.Response:
        """GET bytes ``[start, end)`` of the version ``if_range`` names (the whole file, 200,
        when the origin has another), with the file's ``extra`` headers."""
        headers = {**extra, "Accept-Encoding": "identity", "Range": f"bytes={start}-{end - 1}"}
        if if_range:
            headers["If-Range"] = if_range
        return self._get(url, headers, where, step, shown)

    def get(
        self, url: str, headers: Mapping[str, str], where: str, step: Step, shown: Callable[[str], str] = display_url
    ) -> requests.Response:
        """GET with redirects followed by hand, so that every hop passes the policy; raises
        what a status other than 200 or 206 means."""
        return self._get(url, dict(headers), where, step, shown)

    def _get(
        self, url: str, headers: dict[str, str], where: str, step: Step, shown: Callable[[str], str] = display_url
    ) -> requests.Response:
        """GET with redirects followed by hand, so that every hop passes the policy (``shown``:
        how a URL may appear in a message)."""
        seen: set[str] = set()
        for _ in range(MAX_REDIRECTS + 1):
            if url in seen:
                raise TooManyRedirects(f"{where}: redirect loop back to {shown(url)}; fix the URL")
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
                        f"{where}: {shown(url)} resolved to a non-public address at connect time; refused"
                    ) from exc
                raise OriginUnavailable(
                    f"{where}: request to {shown(url)} failed ({request_failure(exc)})", code=timeout_code(exc)
                ) from exc
            if response.status_code in REDIRECT_STATUSES and "Location" in response.headers:
                response.close()
                target = urljoin(url, response.headers["Location"])
                headers, url = for_host(headers, url, target), target  # no credential to another host
                continue
            check_status(response, url, where, shown)
            return response
        raise TooManyRedirects(f"{where}: more than {MAX_REDIRECTS} redirects; fix the URL")


def _verified(
    spec: FileSpec,
    size: int,
    total: int | None,
    digest: str | None,
    on_sha256: Callable[[str], None] | None,
    where: str,
) -> int:
    """``size``, once the file is whole and what the task says it is (``digest``: its sha256,
    if hashed; given to ``on_sha256``)."""
    if total is not None and size != total:
        raise OriginUnavailable(f"{where}: the connection ended after {size} of {total} bytes")
    if spec.size is not None and size != spec.size:
        raise ChecksumMismatch(f"{where}: got {size} bytes but the task says size {spec.size}")
    if spec.sha256 and digest != spec.sha256:
        raise ChecksumMismatch(
            f"{where}: sha256 is {digest} but the task says {spec.sha256}; "
            "the origin serves other bytes than the task expects"
        )
    if on_sha256 is not None and digest is not None:
        on_sha256(digest)
    return size
