"""A page's stream, fragment by fragment: an HLS media playlist read and judged, or a DASH
track's fragments as yt-dlp read them from its manifest; its fragments downloaded and kept
one by one (:mod:`actors.tracks` joins them with the format's other tracks).

Most streaming sites serve video as an HLS playlist, or a DASH manifest, of fragments of a few
seconds. yt-dlp chooses the variant; haul reads its playlist, refuses what it must not
download (a live stream, which never ends; DRM, whose keys are not for haul; byte-range
fragments, not handled yet) and bounds the rest (MAX_FRAGMENTS, the task's byte limits).
Fragments download several at once, on the file's own connection and those its split plan
opens (each with a host slot and a lane of the lease), each written under a name of its run
and renamed once whole and synced: a retry keeps every whole fragment and asks only for the
others. The fragments of a stream are kept with what identifies it (its fragments'
durations and paths, init section and encryption, not their URLs' queries, which a new
resolution signs anew); a stream that differs starts over, never a splice.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from actors.connections import shutter_of
from actors.diskio import write_all
from actors.errors import OriginUnavailable, PageUnresolvable, StorageUnavailable, TooLarge, UnexpectedContent
from actors.httprules import FetchRules, SpeedFloor, content_type_accepted, read_chunk
from actors.lease import DISK_STEP_SECONDS
from actors.requestopts import for_host
from actors.split import Connection, SplitPlan

log = logging.getLogger(__name__)

#: Most fragments a stream may have (a 10-hour lecture in 2 s fragments is 18,000).
MAX_FRAGMENTS = 20_000
#: What a fragment is not: a page (a login, an error, "access denied") served in its place.
PAGE_TYPES = ("text/html", "application/xhtml+xml")
#: Largest playlist or key haul reads.
MAX_PLAYLIST_BYTES = 4 * 1024 * 1024
MAX_KEY_BYTES = 1024
#: Longest a failed stream waits for its other connections to stop.
JOIN_AFTER_FAILURE_SECONDS = 10.0

_ATTRIBUTE = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)')
_IV = re.compile(r"^0[xX][0-9a-fA-F]{1,32}$")


@dataclass(frozen=True)
class Key:
    """An AES-128 key for the fragments after it: where it is, and the IV if the playlist gives one."""

    url: str
    iv: str | None


@dataclass(frozen=True)
class Fragment:
    url: str
    duration: float
    key: Key | None
    #: The init section (fMP4's ``#EXT-X-MAP``), which comes before the fragments it maps.
    init: bool = False


@dataclass(frozen=True)
class Stream:
    """A media playlist, read and judged; or a DASH track's fragments."""

    fragments: tuple[Fragment, ...]
    #: The first fragment's number (``#EXT-X-MEDIA-SEQUENCE``): AES-128 without an IV uses it.
    sequence: int = 0
    #: A DASH track: its fragments (init section first) are concatenated, not listed in a playlist.
    dash: bool = False

    @classmethod
    def of_dash(cls, fragments: tuple[tuple[str, float], ...]) -> Stream:
        return cls(tuple(Fragment(url, duration, None) for url, duration in fragments), dash=True)

    def name(self, index: int) -> str:
        """Fragment ``index``'s file name."""
        if self.fragments[index].init:
            return f"{index:05}.init.mp4"
        return f"{index:05}.{'frag' if self.dash else 'm4s' if self.fmp4 else 'ts'}"

    @functools.cached_property
    def fmp4(self) -> bool:  # asked for every fragment's name: found once
        return any(f.init for f in self.fragments)

    @property
    def duration(self) -> float:
        return sum(f.duration for f in self.fragments)

    def identity(self, keys: Mapping[Key, bytes]) -> str:
        """What makes two resolutions the same stream: each fragment's duration and path (not its
        query: a new resolution signs the URLs anew), its key's bytes and IV, the sequence."""
        shape = [
            [round(f.duration, 3), f.init, urlsplit(f.url).path,
             hashlib.sha256(keys[f.key]).hexdigest() if f.key is not None else None, f.key.iv if f.key else None]
            for f in self.fragments
        ]  # fmt: skip
        return hashlib.sha256(json.dumps([self.sequence, self.dash, shape]).encode()).hexdigest()

    @classmethod
    def parse(cls, text: str, base: str, where: str) -> Stream:
        """The fragments of media playlist ``text`` (at ``base``); refuses what haul must not download."""
        if not text.lstrip("\ufeff").startswith("#EXTM3U"):
            raise PageUnresolvable(f"{where}: the stream's playlist is not an HLS playlist")
        fragments: list[Fragment] = []
        key: Key | None = None
        duration: float | None = None
        ended, sequence = False, 0
        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                continue
            tag, _, value = line.partition(":")
            if tag == "#EXT-X-STREAM-INF":
                raise PageUnresolvable(f"{where}: the stream's playlist lists variants, not fragments")
            if tag == "#EXT-X-ENDLIST":
                ended = True
            elif tag == "#EXT-X-MEDIA-SEQUENCE":
                sequence = int(_number(value, where))
            elif tag in {"#EXT-X-KEY", "#EXT-X-SESSION-KEY"}:
                key = _key(_attributes(value), base, where)
            elif tag == "#EXT-X-MAP":
                attributes = _attributes(value)
                if "BYTERANGE" in attributes or "URI" not in attributes:
                    raise PageUnresolvable(f"{where}: the stream's init section is a byte range, not handled yet")
                fragments.append(Fragment(_joined(base, attributes["URI"], where), 0.0, key, init=True))
            elif tag == "#EXT-X-BYTERANGE":
                raise PageUnresolvable(f"{where}: the stream's fragments are byte ranges, not handled yet")
            elif tag == "#EXTINF":
                duration = _number(value.split(",", 1)[0], where)
            elif not line.startswith("#"):
                fragments.append(Fragment(_joined(base, line, where), duration or 0.0, key))
                duration = None
            if len(fragments) > MAX_FRAGMENTS:
                raise PageUnresolvable(f"{where}: the stream has more than {MAX_FRAGMENTS} fragments")
        if not ended:
            raise PageUnresolvable(f"{where}: the stream is live (its playlist has no end); haul downloads recordings")
        if not any(not f.init for f in fragments):
            raise PageUnresolvable(f"{where}: the stream's playlist lists no fragments")
        return cls(tuple(fragments), sequence)


def _attributes(text: str) -> dict[str, str]:
    return {name: value.strip('"') for name, value in _ATTRIBUTE.findall(text)}


def _key(attributes: Mapping[str, str], base: str, where: str) -> Key | None:
    method = attributes.get("METHOD", "NONE")
    if method == "NONE":
        return None
    key_format = attributes.get("KEYFORMAT", "identity")
    if method != "AES-128" or key_format != "identity" or "URI" not in attributes:
        raise PageUnresolvable(
            f"{where}: the stream is protected by DRM ({method}, {key_format}); haul does not download it"
        )
    iv = attributes.get("IV")
    if iv is not None and not _IV.match(iv):
        raise PageUnresolvable(f"{where}: the stream's key has an IV that is not a hexadecimal number")
    return Key(_joined(base, attributes["URI"], where), iv)


def _joined(base: str, reference: str, where: str) -> str:
    """``reference`` in a playlist at ``base``, as a URL haul asks for (http or https only)."""
    try:
        url = urljoin(base, reference)
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if scheme not in {"http", "https"}:
        raise PageUnresolvable(f"{where}: the stream's playlist names something that is not an http(s) URL")
    return url


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PageUnresolvable(f"{where}: the stream's playlist has a fragment of duration {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise PageUnresolvable(f"{where}: the stream's playlist has a fragment of duration {text!r}")
    return value


@dataclass
class StreamTransfer:
    """What one stream's download reports to and asks of its caller (as :class:`actors.fetch.Transfer`)."""

    main: Connection
    plan: SplitPlan | None
    rules: FetchRules
    headers: Mapping[str, str]
    on_received: Callable[[int], None] | None
    where: str
    token: int
    #: How its URLs may appear in messages (signed: not at all).
    shown: Callable[[str], str]
    #: The playlist's URL: credentials in ``headers`` go to its host only.
    playlist: str
    #: The cookies the page's cookie jar has for a URL (a fragment on another host has its own).
    cookies: Callable[[str], str | None] = lambda url: None

    def headers_for(self, url: str) -> dict[str, str]:
        """What to ask for ``url`` (a fragment, a key) with: the track's headers for its host,
        only the plain ones for another, and the cookies the jar has for ``url``."""
        headers = {**for_host(self.headers, self.playlist, url), "Accept-Encoding": "identity"}
        cookie = self.cookies(url)
        if cookie:
            headers["Cookie"] = cookie
        return headers


class StreamDownload:
    """Downloads ``stream``'s fragments missing from ``folder`` (``base``: the bytes of the
    file's tracks before this one, for its progress and limits)."""

    def __init__(self, stream: Stream, folder: Path, t: StreamTransfer, base: int = 0) -> None:
        self.stream, self.folder, self.t, self.base = stream, folder, t, base
        self._lock = threading.Lock()
        self._missing = [i for i, f in enumerate(stream.fragments) if not self._path(i).exists()]
        self._missing.reverse()  # taken from the end: the first fragments first
        self._done = sum(self._path(i).stat().st_size for i in range(len(stream.fragments)) if self._path(i).exists())
        self._error: BaseException | None = None
        #: :meth:`fetch` returned: a connection that outlived it renames nothing into the folder.
        self._over = False
        self._beside: list[futures.Future[None]] = []
        #: In the names of this download's unfinished fragments: another download of the same run
        #: (the page resolved again) never writes into them.
        self._tag = uuid.uuid4().hex[:8]

    def _path(self, index: int) -> Path:
        return self.folder / self.stream.name(index)

    def fetch(self) -> int:
        """Every missing fragment, on up to the plan's width of connections; the bytes they hold."""
        t = self.t
        wanted = min(len(self._missing), t.plan.width if t.plan is not None else 1) - 1
        for _ in range(max(0, wanted)):
            assert t.plan is not None
            opened = t.plan.open_connection(self._run)
            if opened is None:  # the host is at its limit: fewer at once
                break
            self._beside.append(opened)
        try:
            self._run(t.main)
            while not all(f.done() for f in self._beside):
                t.main.step(JOIN_AFTER_FAILURE_SECONDS + 1)
                futures.wait(self._beside, 1.0)
        except BaseException as exc:
            self._fail(exc)
            futures.wait(self._beside, JOIN_AFTER_FAILURE_SECONDS)
            raise
        finally:
            with self._lock:
                self._over = True
        if self._error is not None:
            raise self._error
        return self._done

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc

    def _run(self, conn: Connection) -> None:
        """Take fragments until none is left or one failed; never raises on a connection of the plan."""
        try:
            while True:
                with self._lock:
                    if self._error is not None or not self._missing:
                        return
                    index = self._missing.pop()
                self._fragment(conn, index)
        except BaseException as exc:
            self._fail(exc)
            if conn is self.t.main:
                raise

    def _fragment(self, conn: Connection, index: int) -> None:
        """Fragment ``index`` into its file: written under this run's name, synced, then renamed."""
        t, fragment = self.t, self.stream.fragments[index]
        where = f"{t.where}, fragment {index + 1} of {len(self.stream.fragments)}"
        final = self._path(index)
        temporary = final.with_name(f"{final.name}.{t.token}.{self._tag}.tmp")
        response = conn.ranges.get(fragment.url, t.headers_for(fragment.url), where, conn.step, t.shown)
        floor, received = SpeedFloor(t.rules, where), 0
        shutter = shutter_of(response)
        try:
            content_type = response.headers.get("Content-Type")
            if content_type and content_type_accepted(content_type, PAGE_TYPES):  # fragments come under any other
                raise UnexpectedContent(
                    f"{where}: the origin answered with {content_type!r} where media was expected; that is "
                    "usually a login, error or 'access denied' page: check that the page still shows the video"
                )
            with conn.guard(shutter):
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    while chunk := read_chunk(response, False, where, received):
                        with self._lock:
                            done = self._done
                        conn.tick(self.base + done)  # the fence: a stale holder writes nothing
                        if t.rules.max_bytes and self.base + done + len(chunk) > t.rules.max_bytes:
                            raise TooLarge(f"{where}: the stream grew past the limit of {t.rules.max_bytes} bytes")
                        if not received and fragment.key is None and chunk.lstrip()[:1] in (b"<", b"{"):
                            raise UnexpectedContent(  # no media starts so; an error page or API answer does
                                f"{where}: the origin answered with a document, not media; that is usually an "
                                "error or 'access denied' page: check that the page still shows the video"
                            )
                        floor.passed(len(chunk))
                        write_all(fd, chunk, where, received)
                        received += len(chunk)
                        with self._lock:
                            self._done += len(chunk)
                        if t.on_received is not None:
                            t.on_received(len(chunk))
                    if shutter.shut:  # the end was ours (a stop, a lost lease), not the origin's
                        raise OriginUnavailable(f"{where}: interrupted after {received} bytes")
                    if not received:
                        raise OriginUnavailable(f"{where}: the origin answered with an empty fragment")
                    conn.step(DISK_STEP_SECONDS)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            with self._lock:  # a download that ended keeps nothing more (the stream may be resolved anew)
                if self._over:
                    raise OriginUnavailable(f"{where}: not kept, the stream's download had ended")
                os.replace(temporary, final)
        except OSError as exc:
            raise StorageUnavailable(f"{where}: writing it to staging failed ({exc.strerror})") from exc
        finally:
            response.close()
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()


def claim_track(folder: Path, identity: str, format_id: str, where: str) -> None:
    """Keep ``folder``'s bytes if they are of the track ``identity`` names (for a stream,
    :meth:`Stream.identity`) in format ``format_id``, else start it over; record what they are of."""
    record = folder / "track.json"
    wanted = {"identity": identity, "format_id": format_id}
    try:
        kept = json.loads(record.read_text())
    except (OSError, ValueError):
        kept = None
    if kept != wanted:
        if kept is not None:
            log.warning("%s: the track differs from the one its bytes are of; downloading it again", where)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(exist_ok=True)  # never the run's folder itself: a run whose folder moved on makes none
        temporary = record.with_suffix(".tmp")
        temporary.write_text(json.dumps(wanted))
        os.replace(temporary, record)


def read_small(conn: Connection, url: str, t: StreamTransfer, limit: int, where: str) -> tuple[bytes, str]:
    """A playlist or key, whole, at most ``limit`` bytes; and where it came from (redirects
    followed: a playlist's fragments are relative to that)."""
    response = conn.ranges.get(url, t.headers_for(url), where, conn.step, t.shown)
    shutter = shutter_of(response)
    try:
        data = b""
        with conn.guard(shutter):
            while chunk := read_chunk(response, False, where, len(data)):
                data += chunk
                if len(data) > limit:
                    raise TooLarge(f"{where}: {t.shown(url)} is larger than {limit} bytes")
        if shutter.shut:
            raise OriginUnavailable(f"{where}: interrupted after {len(data)} bytes")
        return data, str(response.url or url)
    finally:
        response.close()
