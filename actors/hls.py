"""A page's stream over HLS: fragments downloaded and kept one by one, joined into one file by
ffmpeg.

Most streaming sites serve video as an HLS playlist of fragments of a few seconds. yt-dlp
chooses the variant; haul reads its playlist, refuses what it must not download (a live
stream, which never ends; DRM, whose keys are not for haul; byte-range fragments, not handled
yet) and bounds the rest (MAX_FRAGMENTS, the task's byte limits). Fragments download several
at once, on the file's own connection and those its split plan opens (each with a host slot
and a lane of the lease), each written under a name of its run and renamed once whole and
synced: a retry keeps every whole fragment and asks only for the others. The fragments of a
stream are kept with what identifies it (its fragments' durations, init section and
encryption, not their URLs, which a new resolution signs anew); a stream that differs starts
over, never a splice.

Then ffmpeg joins them without re-encoding (``-c copy``) into an MP4, reading only files haul
wrote: a playlist haul writes itself, the fragments and AES-128 keys beside it, with
``-protocol_whitelist file,crypto`` and a timeout. ffmpeg comes from the ``imageio-ffmpeg``
wheel (a static build, no apt step), part of the ``resolve`` extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from actors.connections import shutter_of
from actors.diskio import write_all
from actors.errors import HaulError, OriginUnavailable, PageUnresolvable, StorageUnavailable, TooLarge
from actors.httprules import FetchRules, SpeedFloor, read_chunk
from actors.lease import DISK_STEP_SECONDS
from actors.requestopts import for_host
from actors.resume import discard_part
from actors.split import Connection, SplitPlan

log = logging.getLogger(__name__)

#: Most fragments a stream may have (a 10-hour lecture in 2 s fragments is 18,000).
MAX_FRAGMENTS = 20_000
#: Largest playlist or key haul reads.
MAX_PLAYLIST_BYTES = 4 * 1024 * 1024
MAX_KEY_BYTES = 1024
#: ffmpeg's time to join, per fragment, and at least.
JOIN_SECONDS_PER_FRAGMENT = 0.2
JOIN_MIN_SECONDS = 60.0
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

    def name(self, index: int, fmp4: bool) -> str:
        if self.init:
            return f"{index:05}.init.mp4"
        return f"{index:05}.{'m4s' if fmp4 else 'ts'}"


@dataclass(frozen=True)
class Stream:
    """A media playlist, read and judged."""

    fragments: tuple[Fragment, ...]
    #: The first fragment's number (``#EXT-X-MEDIA-SEQUENCE``): AES-128 without an IV uses it.
    sequence: int = 0

    @property
    def fmp4(self) -> bool:
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
        return hashlib.sha256(json.dumps([self.sequence, shape]).encode()).hexdigest()

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
                fragments.append(Fragment(urljoin(base, attributes["URI"]), 0.0, key, init=True))
            elif tag == "#EXT-X-BYTERANGE":
                raise PageUnresolvable(f"{where}: the stream's fragments are byte ranges, not handled yet")
            elif tag == "#EXTINF":
                duration = _number(value.split(",", 1)[0], where)
            elif not line.startswith("#"):
                fragments.append(Fragment(urljoin(base, line), duration or 0.0, key))
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
    return Key(urljoin(base, attributes["URI"]), iv)


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


class StreamDownload:
    """Downloads ``stream``'s fragments missing from ``folder``, then joins them into ``part``."""

    def __init__(self, stream: Stream, folder: Path, t: StreamTransfer) -> None:
        self.stream, self.folder, self.t = stream, folder, t
        self._lock = threading.Lock()
        self._missing = [i for i, f in enumerate(stream.fragments) if not self._path(i).exists()]
        self._missing.reverse()  # taken from the end: the first fragments first
        self._done = sum(self._path(i).stat().st_size for i in range(len(stream.fragments)) if self._path(i).exists())
        self._error: BaseException | None = None
        self._beside: list[futures.Future[None]] = []
        #: In the names of this download's unfinished fragments: another download of the same run
        #: (the page resolved again) never writes into them.
        self._tag = uuid.uuid4().hex[:8]

    def _path(self, index: int) -> Path:
        return self.folder / self.stream.fragments[index].name(index, self.stream.fmp4)

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
        headers = {**for_host(t.headers, t.playlist, fragment.url), "Accept-Encoding": "identity"}
        response = conn.ranges.get(fragment.url, headers, where, conn.step, t.shown)
        floor, received = SpeedFloor(t.rules, where), 0
        shutter = shutter_of(response)
        try:
            with conn.guard(shutter):
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    while chunk := read_chunk(response, False, where, received):
                        with self._lock:
                            done = self._done
                        conn.tick(done)  # the fence: a stale holder writes nothing
                        if t.rules.max_bytes and done + len(chunk) > t.rules.max_bytes:
                            raise TooLarge(f"{where}: the stream grew past the limit of {t.rules.max_bytes} bytes")
                        floor.passed(len(chunk))
                        write_all(fd, chunk, where, received)
                        received += len(chunk)
                        with self._lock:
                            self._done += len(chunk)
                        if t.on_received is not None:
                            t.on_received(len(chunk))
                    if shutter.shut:  # the end was ours (a stop, a lost lease), not the origin's
                        raise OriginUnavailable(f"{where}: interrupted after {received} bytes")
                    conn.step(DISK_STEP_SECONDS)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            os.replace(temporary, final)
        except OSError as exc:
            raise StorageUnavailable(f"{where}: writing it to staging failed ({exc.strerror})") from exc
        finally:
            response.close()
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()


def claim_stream(folder: Path, stream: Stream, keys: Mapping[Key, bytes], format_id: str, where: str) -> None:
    """Keep ``folder``'s fragments if they are of ``stream`` (:meth:`Stream.identity`, the same
    format), else start it over; record what they are of."""
    record = folder / "stream.json"
    wanted = {"identity": stream.identity(keys), "format_id": format_id}
    try:
        kept = json.loads(record.read_text())
    except (OSError, ValueError):
        kept = None
    if kept != wanted:
        if kept is not None:
            log.warning("%s: the stream differs from the one its fragments are of; downloading it again", where)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = record.with_suffix(".tmp")
        temporary.write_text(json.dumps(wanted))
        os.replace(temporary, record)


def join(stream: Stream, folder: Path, keys: Mapping[Key, bytes], ffmpeg: str, where: str) -> Path:
    """ffmpeg joins the fragments into an MP4 in ``folder`` (the run's own: a run that lost the
    task joins where its successor never looks), reading only files haul wrote; its path."""
    local, joined = folder / "local.m3u8", folder / "joined.mp4"
    key_names: dict[Key, str] = {}
    for n, (key, data) in enumerate(keys.items()):
        key_names[key] = f"key-{n}.bin"
        (folder / key_names[key]).write_bytes(data)
    local.write_text(_local_playlist(stream, key_names))
    timeout = max(JOIN_MIN_SECONDS, JOIN_SECONDS_PER_FRAGMENT * len(stream.fragments))
    command = [
        ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-protocol_whitelist", "file,crypto",
        "-i", str(local), "-map", "0:v?", "-map", "0:a?", "-c", "copy", "-f", "mp4", "-y", str(joined),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise OriginUnavailable(f"{where}: ffmpeg did not join the fragments within {timeout:.0f}s") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise PageUnresolvable(f"{where}: ffmpeg could not join the stream's fragments: {' / '.join(said)}")
    return joined


def _local_playlist(stream: Stream, key_names: Mapping[Key, str]) -> str:
    target = math.ceil(max(f.duration for f in stream.fragments))
    lines = ["#EXTM3U", "#EXT-X-VERSION:7", f"#EXT-X-TARGETDURATION:{target}",
             f"#EXT-X-MEDIA-SEQUENCE:{stream.sequence}", "#EXT-X-PLAYLIST-TYPE:VOD"]  # fmt: skip
    current: Key | None = None
    for index, fragment in enumerate(stream.fragments):
        if fragment.key != current:
            current = fragment.key
            if current is None:
                lines.append("#EXT-X-KEY:METHOD=NONE")
            else:
                iv = f",IV={current.iv}" if current.iv else ""
                lines.append(f'#EXT-X-KEY:METHOD=AES-128,URI="{key_names[current]}"{iv}')
        name = fragment.name(index, stream.fmp4)
        if fragment.init:
            lines.append(f'#EXT-X-MAP:URI="{name}"')
        else:
            lines += [f"#EXTINF:{fragment.duration:.6f},", name]
    lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def read_small(conn: Connection, url: str, t: StreamTransfer, limit: int, where: str) -> bytes:
    """A playlist or key, whole, at most ``limit`` bytes."""
    headers = {**for_host(t.headers, t.playlist, url), "Accept-Encoding": "identity"}
    response = conn.ranges.get(url, headers, where, conn.step, t.shown)
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
        return data
    finally:
        response.close()


def ffmpeg_path() -> str:
    """The ffmpeg of the ``imageio-ffmpeg`` wheel."""
    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise PageUnresolvable(
            "this worker has no ffmpeg to join a stream's fragments: install the extra (pip install 'haul[resolve]')"
        ) from exc
    return str(imageio_ffmpeg.get_ffmpeg_exe())


@contextlib.contextmanager
def haul_errors_only(where: str) -> Iterator[None]:
    """Turn an unexpected failure while joining into a retryable one that names the file."""
    try:
        yield
    except HaulError:
        raise
    except OSError as exc:
        raise StorageUnavailable(f"{where}: {exc.strerror} while joining the stream") from exc


def download_stream(format_id: str, folder: Path, part: Path, t: StreamTransfer) -> dict[str, Any]:
    """The stream at ``t.playlist`` into ``part``: its playlist read, its fragments into
    ``folder`` (those a run before kept are not asked again), joined by ffmpeg. Returns what
    was joined (fragments, their bytes, the playlist's duration)."""
    where = t.where
    text = read_small(t.main, t.playlist, t, MAX_PLAYLIST_BYTES, where)
    stream = Stream.parse(text.decode("utf-8", errors="replace"), t.playlist, where)
    keys = {key: read_small(t.main, key.url, t, MAX_KEY_BYTES, f"{where}, its key")
            for key in dict.fromkeys(f.key for f in stream.fragments if f.key is not None)}  # fmt: skip
    with haul_errors_only(where):
        claim_stream(folder, stream, keys, format_id, where)
        fetched = StreamDownload(stream, folder, t).fetch()
    t.main.step(max(JOIN_MIN_SECONDS, JOIN_SECONDS_PER_FRAGMENT * len(stream.fragments)) + 10)
    with haul_errors_only(where):
        joined = join(stream, folder, keys, ffmpeg_path(), where)
        t.main.step(DISK_STEP_SECONDS)  # the fence: a run that lost the task moves nothing
        discard_part(part)  # bytes an earlier download of another kind left, and their record
        os.replace(joined, part)
    return {"fragments": len(stream.fragments), "bytes": fetched, "duration": stream.duration}
