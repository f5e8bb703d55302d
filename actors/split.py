"""One large file over several connections (HAUL_SPLIT), when one connection gets less than
the origin delivers: a CDN that caps each connection at a few MB/s serves a 1 GiB lecture in
minutes to one connection and in seconds to sixteen.

Only a file the origin can serve in ranges qualifies: its size known, ``Accept-Ranges: bytes``,
a strong validator (a strong ETag or a Last-Modified) and at least HAUL_MIN_SPLIT_BYTES. It
starts on one connection. The total rate is measured over windows of RAMP_ROUND_TRIPS of the
origin's round trips (:func:`ramp_window`); while it grows by GROWTH when the connections
double, they double again (up to HAUL_SPLIT; all the rest at once when the doubling nearly
doubled the rate, CAPPED: the origin caps each connection);
the ones a step added that brought no growth are retired, so an origin that does not cap
connections keeps one. Each connection beside the first takes a per-host slot, bound to the
task's lease, and gives it back when it ends.

Connections take the file in pieces, in order: each asks for the next piece no one has, as
long as ROUND_TRIPS_PER_PIECE round trips at what one connection gets (so asking again costs
under 2%), between MIN_PIECE_BYTES and MAX_PIECE_BYTES. The bytes then arrive nearly in order,
which lets the sha256 follow the transfer, and the connections end together: one that finds
nothing left takes the second half of the largest piece still being filled, while that half is
worth a request. (A round trip here is how long an answer on a connection already open takes
to start, smoothed over the connections.)

Bytes are written in place (``pwrite``) into the one ``.part``. What it still lacks is kept in
the record of its version beside it (``<part>.json``, :class:`SpanMap`), rewritten only after
the bytes it stops listing are synced, each time CHECKPOINT_BYTES more were written and as
each connection ends: a resume asks only for what is missing. The record moves with the ``.part`` when a later run
takes it over; a ``.part`` without its record is never resumed. Every range is asked with
``If-Range``; an origin that answers with the whole file instead says the file changed, and
the ``.part`` restarts whole (never a splice). A ``.part`` a one-connection download left is a
file whose first bytes are written: it goes on from there, split or not.

The sha256 follows the bytes in order: a thread reads the file from the page cache up to the
first byte still missing and hashes it, so hashing overlaps the transfer and the end waits
only for the tail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import requests

from actors.connections import shutter_of
from actors.errors import OriginUnavailable, PartUnusable, StorageUnavailable
from actors.httprules import FetchRules, SpeedFloor, read_chunk
from actors.interrupt import Guard
from actors.lease import DISK_STEP_SECONDS, Step
from actors.redact import display_url
from actors.resume import Validator, meta_path_of

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: How often the total rate is measured to decide on more connections: RAMP_ROUND_TRIPS of the
#: origin's round trips (a rate measured over fewer is mostly TCP's slow start), from
#: RAMP_SECONDS to RAMP_MAX_SECONDS.
RAMP_SECONDS = 0.1
RAMP_MAX_SECONDS = 1.0
RAMP_ROUND_TRIPS = 10
#: Connections added stay only if the total rate grows by this factor with them.
GROWTH = 1.3
#: A doubling that raised the total this much shows an origin capping each connection: the
#: rest are opened at once rather than doubling again.
CAPPED = 1.8
#: A download goes on over several connections only if, at the rate its one connection had
#: over its first ramp window, the rest would take longer than this: a fast origin keeps one.
WORTH_SPLITTING_SECONDS = 2.0
#: The smallest piece a connection asks for; a piece lasts ROUND_TRIPS_PER_PIECE of a
#: connection's round trips (the wait for an answer's first bytes) at its rate, up to MAX_PIECE_BYTES.
MIN_PIECE_BYTES = 4 * MIB
MAX_PIECE_BYTES = 64 * MIB
ROUND_TRIPS_PER_PIECE = 50
#: A piece being filled is halved for an idle connection only if the half left to it is at least
#: this big, and at least STEAL_ROUND_TRIPS round trips long at a connection's rate (but never
#: more than MAX_STEAL_BYTES: a piece can always be halved).
MIN_SPAN_BYTES = MIB
STEAL_ROUND_TRIPS = 8
MAX_STEAL_BYTES = MAX_PIECE_BYTES // 4
#: What is written is synced and recorded each time this much more was (by a thread of its
#: own, no connection waits for it), and as each connection ends: a worker killed loses about
#: this much, whatever the connections.
CHECKPOINT_BYTES = 4 * MIB
#: Longest a failed split waits for its other connections to stop (each is fenced if it lingers).
JOIN_AFTER_FAILURE_SECONDS = 10.0
#: How often the downloading thread steps its lane while it waits for the others.
JOIN_POLL_SECONDS = 0.25
#: Bytes the sha256 follower reads per step.
FOLLOW_BYTES = MIB


def ramp_window(latency: float) -> float:
    """Seconds the rate is measured over, for an origin whose answers start ``latency`` seconds
    after they are asked for."""
    return min(RAMP_MAX_SECONDS, max(RAMP_SECONDS, RAMP_ROUND_TRIPS * latency))


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass
class Span:
    """Bytes ``[pos, end)`` of the file, not written yet; ``busy`` while a connection fills it,
    ``writing`` the bytes from ``pos`` its connection is writing now (a halving leaves them to it)."""

    pos: int
    end: int
    busy: bool = False
    writing: int = 0

    @property
    def left(self) -> int:
        return self.end - self.pos


class SpanMap:
    """What a split ``.part`` still lacks, and the size and version of the file it is of."""

    def __init__(self, part: Path, size: int, meta: dict[str, Any], spans: list[Span]) -> None:
        self.part = part
        self.size = size
        #: The rest of the record: the validator and content type (:mod:`actors.resume`).
        self.meta = meta
        self.spans = spans
        self._recording = threading.Lock()
        #: Set once its download ended: a connection that outlived it records nothing (a later
        #: attempt may have started the file over, with a record of its own).
        self.closed = False

    @property
    def validator(self) -> Validator:
        return Validator(self.meta.get("etag"), self.meta.get("last_modified"))

    @property
    def if_range(self) -> str:
        return self.validator.if_range or ""

    @classmethod
    def load(cls, part: Path) -> SpanMap | None:
        """The map in ``part``'s record, or None: the record lists no missing bytes (a
        one-connection ``.part``, or none)."""
        try:
            meta = json.loads(meta_path_of(part).read_text())
            if "missing" not in meta:
                return None
            spans = [Span(int(a), int(b)) for a, b in meta.pop("missing")]
            return cls(part, int(meta.pop("size")), meta, [s for s in spans if s.left > 0])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @classmethod
    def after(cls, part: Path, size: int, meta: dict[str, Any], offset: int) -> SpanMap:
        """A map of a file whose first ``offset`` bytes are written (a one-connection ``.part``)."""
        return cls(part, size, meta, [Span(offset, size)] if offset < size else [])

    @property
    def missing(self) -> int:
        return sum(s.left for s in self.spans)

    @property
    def first_missing(self) -> int:
        """The first byte not written (the size once whole): every byte before it is."""
        return min((s.pos for s in self.spans if s.left > 0), default=self.size)

    def record(self, fd: int, missing: list[list[int]], where: str) -> None:
        """Sync what was written, then record ``missing`` (a snapshot taken after the writes it
        leaves out): the record never lists as written a byte that is not on disk."""
        data = json.dumps({**self.meta, "size": self.size, "missing": missing})
        with self._recording:
            if self.closed:
                return
            temporary = meta_path_of(self.part).with_suffix(".tmp")
            try:
                os.fdatasync(fd)
                temporary.write_text(data)
                os.replace(temporary, meta_path_of(self.part))
            except OSError as exc:
                raise StorageUnavailable(f"{where}: cannot record its progress in staging ({exc.strerror})") from exc

    def close(self) -> None:
        """Record nothing more (waits for a record being written)."""
        with self._recording:
            self.closed = True

    def snapshot(self) -> list[list[int]]:
        """What is missing now (call with the splitter's lock held)."""
        return [[s.pos, s.end] for s in sorted(self.spans, key=lambda s: s.pos) if s.left > 0]


class Ranges(Protocol):
    """How a connection asks the origin for a range (or a whole file: a stream's fragment): a
    GET through the destination policy, on the calling thread's own session."""

    def get_range(
        self,
        url: str,
        start: int,
        end: int,
        if_range: str,
        where: str,
        step: Step,
        extra: Mapping[str, str],
        shown: Callable[[str], str] = ...,
    ) -> requests.Response: ...

    def get(
        self, url: str, headers: Mapping[str, str], where: str, step: Step, shown: Callable[[str], str] = ...
    ) -> requests.Response: ...


@contextlib.contextmanager
def no_guard(closeable: Any) -> Iterator[None]:
    """For a connection nothing needs to wake (tests, tools)."""
    yield


@dataclass
class Connection:
    """One connection's hold: its lease lane's checks, its session, and its retirement."""

    ranges: Ranges
    #: Before each chunk, with the file's bytes written so far: the fence, the stop, a sibling's failure.
    tick: Callable[[int], None]
    step: Step
    #: Shuts the socket its current step waits on (another connection failed).
    wake: Callable[[], None]
    retire: bool = False
    #: Registers the socket its body is read from, so that a lost lease, an overrun step or a
    #: failed sibling shuts it.
    guard: Guard = no_guard
    #: Its first bytes arrived.
    delivered: bool = False
    #: The doubling that opened it (0: the first connection).
    generation: int = 0


#: Runs ``work`` on a connection beside this one (its own thread, lane, session and host
#: slot); None when the host has no slot free.
OpenConnection = Callable[[Callable[[Connection], None]], "futures.Future[None] | None"]


@dataclass(frozen=True)
class SplitPlan:
    """What a download may split into (HAUL_SPLIT, HAUL_MIN_SPLIT_BYTES) and how it opens and
    reports connections beside its own."""

    width: int
    min_bytes: int
    open_connection: OpenConnection
    #: Connections the file uses now (status and events).
    on_connections: Callable[[int], None]
    #: Shuts the socket the downloading thread's own connection waits on.
    wake: Callable[[], None]


def no_connection(work: Callable[[Connection], None]) -> None:
    """For a download that may not open connections beside its own."""
    return None


#: A ``.part`` a split download left, continued where splitting is off: on its one connection.
ONE_CONNECTION = SplitPlan(1, 0, no_connection, lambda count: None, lambda: None)


class Splitter:
    """Downloads one file over up to ``width`` connections; see the module docstring."""

    def __init__(
        self,
        *,
        url: str,
        fd: int,
        spans: SpanMap,
        plan: SplitPlan,
        on_received: Callable[[int], None] | None,
        hashed: tuple[Any, int] | None,
        read_fd: int,
        rules: FetchRules,
        where: str,
        first_rate: float | None = None,
        latency: float = 0.0,
        headers: Mapping[str, str] | None = None,
        shown: Callable[[str], str] = display_url,
    ) -> None:
        """``hashed``: to hash the file, a sha256 of its first bytes and how many it covers
        (a fresh one and 0, or what a resumed ``.part`` was hashed to); ``read_fd`` reads the
        ``.part`` for it; ``first_rate``: what the first connection got alone, when measured
        (a second one is opened at once to see whether two get more); ``latency``: how long
        the first answer took to start; ``headers``: sent with every range (a resolved page's);
        ``shown``: how its URL may appear in messages."""
        self.url, self.fd, self.spans, self.where = url, fd, spans, where
        self.width, self.open_connection, self.on_connections = plan.width, plan.open_connection, plan.on_connections
        self.rules = rules
        self.headers, self.shown = dict(headers or {}), shown
        self.on_received = on_received
        self._lock = threading.Condition()
        self._connections: list[Connection] = []
        self._beside: list[futures.Future[None]] = []
        self._error: BaseException | None = None
        self._done = spans.size - spans.missing
        self._ramping = plan.width > 1
        #: Connections the last doubling added that have not delivered a byte yet.
        self._arriving = 0
        self._recorded = self._done
        self._recording_stopped = False
        self._recorder = threading.Thread(target=self._record_as_it_goes, name="haul-split-record", daemon=True)
        self._window_at, self._window_bytes = time.monotonic(), self._done
        self._rate_before: float | None = None
        #: Measured already: the first window opens a second connection.
        self._first_rate = first_rate
        #: Doublings so far: the connections of the last one are retired if they brought nothing.
        self._generation = 0
        #: The last window showed no growth; the next one decides.
        self._doubted = False
        #: What one connection gets (bytes/s), and how long an answer on a connection already
        #: open takes to start (seconds; 0 until one did): they size the pieces.
        self._conn_rate = first_rate or 0.0
        self._latency = 0.0
        #: The first answer's wait (connecting included): the origin's distance until answers
        #: on open connections tell it better.
        self._first_latency = latency
        self._follower = _Follower(read_fd, spans, self._lock, *hashed) if hashed is not None else None

    def run(self, first: requests.Response, span: Span, main: Connection) -> str | None:
        """Fill every span, ``first`` (an answer for ``span``) on this thread; return the file's
        sha256 when hashing. Raises the first connection's error once all have stopped."""
        with self._lock:
            span.busy = True
            if self._ramping:  # the first answer runs to the end of the file: it stops after a piece
                self._cut(span)
        if self._follower is not None:
            self._follower.start()
        self._recorder.start()
        try:
            response: requests.Response | None = first
            given: Span | None = span
            while True:  # a span a retired connection let go of is this thread's to finish
                before = self._done
                self._run_connection(main, response, given)
                response, given = None, None
                self._join(main)
                if self._error is not None:
                    raise self._error
                if not self.spans.missing:
                    break
                if self._done == before:
                    raise OriginUnavailable(f"{self.where}: {self.spans.missing} bytes still missing; none came")
            self._stop_recording()
            main.step(DISK_STEP_SECONDS)
            self.spans.record(self.fd, [], self.where)
            return self._follower.finish(main.step) if self._follower is not None else None
        except BaseException as exc:  # the lease lost while waiting, say: the others stop too
            self._fail(exc, main)
            futures.wait(self._beside, JOIN_AFTER_FAILURE_SECONDS)  # each writes through an fd of its own
            raise
        finally:
            self._stop_recording()
            self.spans.close()
            if self._follower is not None:  # stopped before its file descriptor is closed
                self._follower.stop(abort=True)
                self._follower.thread.join()

    def _stop_recording(self) -> None:
        with self._lock:
            self._recording_stopped = True
            self._lock.notify_all()
        self._recorder.join()

    # -- connections ----------------------------------------------------------------------

    def _beside_connection(self, conn: Connection) -> None:
        self._run_connection(conn, None, None)

    def _run_connection(self, conn: Connection, response: requests.Response | None, span: Span | None) -> None:
        """Fill spans on ``conn`` until none is left, it is retired, or a connection failed;
        never raises (the error is kept for :meth:`run`)."""
        with self._lock:
            conn.generation = self._generation
            self._connections.append(conn)
            self.on_connections(len(self._connections))
        fd, kept_open = -1, False
        floor = SpeedFloor(self.rules, self.where)  # across its pieces: a slow connection is cut
        try:
            fd = os.open(self.spans.part, os.O_WRONLY)  # its own: closing another's never touches it
            while not conn.retire:
                until = self.spans.size
                if response is None or span is None:
                    span = self._next_span()
                    if span is None:
                        return
                    asked = time.monotonic()
                    response = conn.ranges.get_range(self.url, span.pos, span.end, self.spans.if_range, self.where,
                                                     conn.step, self.headers, self.shown)  # fmt: skip
                    if kept_open:  # a new connection's wait includes connecting
                        self._answered_after(time.monotonic() - asked)
                    try:
                        until = self._check_range(response, span.pos)
                    except BaseException:
                        response.close()
                        raise
                try:  # (the first connection's answer was judged already, and continues its body)
                    with conn.guard(shutter_of(response)):
                        self._fill(conn, response, span, fd, until, floor)
                    kept_open = span.pos == until  # read to its end; one given up mid-body drops its connection
                finally:
                    response.close()
                    with self._lock:  # done, or let go of (retired): another may take the rest
                        span.busy = False
                response, span = None, None
        except BaseException as exc:
            self._fail(exc, conn)
        finally:
            if not conn.delivered:
                self._delivered(conn)
            with self._lock:
                if span is not None:
                    span.busy = False
                self._connections.remove(conn)
                self.on_connections(len(self._connections))
                self._lock.notify_all()
                missing = self.spans.snapshot()
            if fd >= 0:
                with contextlib.suppress(StorageUnavailable):  # what it wrote is kept for the next attempt
                    self.spans.record(fd, missing, self.where)
                os.close(fd)

    def _fail(self, exc: BaseException, failed: Connection | None) -> None:
        with self._lock:
            if self._error is not None:
                return
            self._error, self._ramping = exc, False
            others = [c for c in self._connections if c is not failed]
            self._lock.notify_all()
        for other in others:  # a connection blocked on a read stops now, not at its timeout
            other.wake()

    def _check_range(self, response: requests.Response, start: int) -> int:
        """A range answer continues this file: 206 from ``start``, of the same size, naming the
        same version (an answer that does not name one cannot be trusted to be of it). Returns
        where its bytes end (an origin may send less than asked)."""
        if response.status_code == 200:
            raise PartUnusable(f"{self.where}: the file changed on the origin (a range was answered whole)")
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if response.status_code != 206 or not match or int(match.group(1)) != start:
            raise OriginUnavailable(
                f"{self.where}: the origin answered {response.status_code} with Content-Range "
                f"{response.headers.get('Content-Range')!r} to a request from byte {start}"
            )
        if match.group(3) != str(self.spans.size):
            raise PartUnusable(f"{self.where}: the file changed on the origin (size {match.group(3)})")
        if Validator.of(response).if_range != self.spans.if_range:
            raise PartUnusable(f"{self.where}: a range came without the version asked for (or with another)")
        return int(match.group(2)) + 1

    def _next_span(self) -> Span | None:
        """The next piece no connection fills (a whole span for a connection left alone), else
        the second half of the largest one being filled."""
        with self._lock:
            if self._error is not None:
                return None
            idle = min((s for s in self.spans.spans if not s.busy and s.left > 0), key=lambda s: s.pos, default=None)
            if idle is None:
                return self._halve()
            idle.busy = True
            if self._ramping or len(self._connections) > 1:
                self._cut(idle)
            return idle

    def _cut(self, span: Span) -> None:
        """End ``span`` after a piece, the rest of it left for the next connection (lock held)."""
        piece = int(min(MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, self._conn_rate * self._latency * ROUND_TRIPS_PER_PIECE)))
        if span.left >= piece + MIN_PIECE_BYTES:  # never a sliver left behind
            self.spans.spans.append(Span(span.pos + piece, span.end))
            span.end = span.pos + piece

    def _answered_after(self, seconds: float) -> None:
        """A range's answer began ``seconds`` after it was asked for (smoothed over the last few)."""
        with self._lock:
            self._latency = seconds if not self._latency else 0.8 * self._latency + 0.2 * seconds

    def _halve(self) -> Span | None:
        """Split the largest busy span (lock held); None when none is worth splitting."""
        least = max(MIN_SPAN_BYTES, min(MAX_STEAL_BYTES, self._conn_rate * self._latency * STEAL_ROUND_TRIPS))
        busy = [s for s in self.spans.spans if s.busy and s.left - s.writing >= 2 * least]
        if not busy:
            return None
        largest = max(busy, key=lambda s: s.left - s.writing)
        start = largest.pos + largest.writing  # the bytes its connection is writing stay its own
        middle = start + (largest.end - start) // 2
        taken = Span(middle, largest.end, busy=True)
        largest.end = middle
        self.spans.spans.append(taken)
        return taken

    def _fill(
        self, conn: Connection, response: requests.Response, span: Span, fd: int, until: int, floor: SpeedFloor
    ) -> None:
        """Write ``response``'s body (bytes up to ``until``) into ``span`` through ``fd``."""
        while True:
            with self._lock:
                if self._error is not None or conn.retire or span.left <= 0:
                    return
            chunk = read_chunk(response, False, self.where, span.pos)
            if not chunk:
                if span.pos >= until:
                    return  # the origin sent a shorter range than asked: the rest is asked again
                raise OriginUnavailable(f"{self.where}: a range ended at byte {span.pos} before byte {until}")
            floor.passed(len(chunk))
            with self._lock:  # the span may have been halved meanwhile: never past its end
                data = chunk[: span.left]
                span.writing, done = len(data), self._done
            conn.tick(done)  # the fence, between the read and the write: a stale holder writes nothing
            self._write(fd, data, span.pos)
            with self._lock:
                span.pos, span.writing = span.pos + len(data), 0
                before, self._done = self._done, self._done + len(data)
                if self._done // FOLLOW_BYTES != before // FOLLOW_BYTES or span.left <= 0:
                    self._lock.notify_all()  # the follower and the recorder: each MiB, not each chunk
            if self.on_received is not None:
                self.on_received(len(data))
            if not conn.delivered:
                self._delivered(conn)
            self._ramp()

    def _delivered(self, conn: Connection) -> None:
        """``conn``'s first bytes arrived (or it ended without any): once every connection the
        last doubling added is there, the next window measures them all."""
        conn.delivered = True
        with self._lock:
            if self._arriving > 0:
                self._arriving -= 1
                if not self._arriving:
                    self._window_at, self._window_bytes = time.monotonic(), self._done

    def _record_as_it_goes(self) -> None:
        """The recorder thread: syncs and records what is missing each time CHECKPOINT_BYTES
        more were written (no connection waits for a sync)."""
        try:
            while True:
                with self._lock:
                    while not self._recording_stopped and self._done - self._recorded < CHECKPOINT_BYTES:
                        self._lock.wait(1.0)
                    if self._recording_stopped:
                        return
                    missing, self._recorded = self.spans.snapshot(), self._done
                self.spans.record(self.fd, missing, self.where)
        except BaseException as exc:
            self._fail(exc, None)

    def _write(self, fd: int, data: bytes, position: int) -> None:
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, position)
                view, position = view[written:], position + written
        except OSError as exc:
            raise StorageUnavailable(
                f"{self.where}: writing to staging failed ({exc.strerror}); free space in HAUL_STAGING_DIR, "
                "the bytes so far are kept"
            ) from exc

    # -- how many ---------------------------------------------------------------------------

    def _ramp(self) -> None:
        """Each ramp window: double the connections while the total rate grows by GROWTH
        with them, or open the rest at once when it grew by CAPPED (an origin that caps each
        connection); once it does not grow, retire the ones the last step added and stop."""
        if not self._ramping:  # read without the lock: most chunks come after the ramp ended
            return
        now = time.monotonic()
        with self._lock:
            if not self._ramping or self._arriving:
                return
            window = ramp_window(self._latency or self._first_latency)
            if self._first_rate is None and now - self._window_at < window:
                return
            rate = (self._done - self._window_bytes) / (now - self._window_at)
            self._window_at, self._window_bytes = now, self._done
            if self._first_rate is not None:
                rate, self._first_rate = self._first_rate, None
            self._conn_rate = rate / max(1, len(self._connections))
            if self._rate_before is not None and rate < self._rate_before * GROWTH:
                if not self._doubted:  # one window can mislead (a stall, a pause): measure once more
                    self._doubted = True
                    return
                self._ramping = False
                for conn in self._connections:  # the ones the last doubling opened, never the first
                    if conn.generation == self._generation and conn.generation > 0:
                        conn.retire = True
                log.debug("%s: more connections brought %.0f B/s against %.0f", self.where, rate, self._rate_before)
                return
            if self.spans.missing < 2 * MIN_PIECE_BYTES:
                self._ramping = False
                return
            self._doubted = False
            room = self.width - len(self._connections)
            capped = self._rate_before is not None and rate >= self._rate_before * CAPPED
            wanted = room if capped else min(len(self._connections), room)  # each one got its own share
            if wanted <= 0:
                self._ramping = False
                return
            # The next window measures the connections with the ones added now, once they all
            # delivered (counted now: the first may deliver before the last is opened)
            self._rate_before, self._window_at = rate, now
            self._generation += 1
            self._arriving += wanted
        for opening in range(wanted):
            opened = self.open_connection(self._beside_connection) if self._error is None else None
            with self._lock:
                if opened is None:  # the host is at its limit (or the split failed): go on with what there is
                    self._arriving -= wanted - opening
                    self._ramping = False
                    return
                self._beside.append(opened)

    def _join(self, main: Connection) -> None:
        """Wait for the connections beside this one, stepping this thread's lane meanwhile."""
        with self._lock:
            self._ramping = False
        while True:
            with self._lock:
                pending = [f for f in self._beside if not f.done()]
            if not pending:
                return
            main.step(JOIN_POLL_SECONDS + 1)
            futures.wait(pending, JOIN_POLL_SECONDS)


class _Follower:
    """Hashes the file in order as its first missing byte moves on (see the module docstring)."""

    def __init__(self, fd: int, spans: SpanMap, changed: threading.Condition, digest: Any, hashed: int) -> None:
        self.fd, self.spans, self.changed = fd, spans, changed
        self.digest, self.hashed = digest, hashed
        self.stopped = self.aborted = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="haul-sha256-follow", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self.changed:
                    while not self.stopped and self.spans.first_missing <= self.hashed:
                        self.changed.wait(1.0)
                    if self.aborted or (self.stopped and self.spans.first_missing <= self.hashed):
                        return
                    frontier = self.spans.first_missing
                while self.hashed < frontier and not self.aborted:
                    data = os.pread(self.fd, min(FOLLOW_BYTES, frontier - self.hashed), self.hashed)
                    if not data:
                        raise StorageUnavailable("the partial file is shorter than what was written")
                    self.digest.update(data)
                    self.hashed += len(data)
        except BaseException as exc:
            self.error = exc

    def stop(self, abort: bool = False) -> None:
        """Hash to the end and stop (or, ``abort``, stop now: the transfer failed)."""
        with self.changed:
            self.stopped = True
            self.aborted = self.aborted or abort
            self.changed.notify_all()

    def finish(self, step: Step) -> str:
        """The whole file's sha256, once the follower has read to its end."""
        self.stop()
        while self.thread.is_alive():
            step(DISK_STEP_SECONDS)
            self.thread.join(1.0)
        if self.error is not None:
            raise self.error
        if self.hashed != self.spans.size:
            raise StorageUnavailable(f"hashed {self.hashed} of {self.spans.size} bytes")
        return str(self.digest.hexdigest())


def qualifies(response: requests.Response, total: int | None, min_bytes: int) -> bool:
    """Whether the answer lets the file be split: ranges, a known size, a strong validator."""
    if total is None or total < min_bytes:
        return False
    ranges = response.status_code == 206 or response.headers.get("Accept-Ranges", "").lower() == "bytes"
    return ranges and Validator.of(response).if_range is not None
