"""A page's chosen format into one file: each of its tracks downloaded, then joined by ffmpeg.

A format yt-dlp would merge (``bv*+ba``: the best video, the best audio) is a video track and
an audio track; a stream is one track of fragments. Each track downloads into a folder of its
own in the file's stream folder, kept across attempts with what it is of
(:func:`actors.hls.claim_track`): a file through haul's fetcher (resume, If-Range, split), an
HLS or DASH track fragment by fragment (:mod:`actors.hls`). A resolution that chooses other
tracks starts those over, never a splice.

Then ffmpeg joins them without re-encoding (``-c copy``), reading only files haul wrote:
an HLS track through a playlist haul writes itself (its fragments and AES-128 keys beside it,
``-protocol_whitelist file,crypto``), a DASH track as its fragments concatenated (init section
first, as DASH defines), a file as it is; every input restricted to the media demuxers, with a
timeout. The container follows the file's name (:data:`MUXERS`; else MP4).
ffmpeg comes from the ``imageio-ffmpeg`` wheel (a static build, no apt step), part of the
``resolve`` extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from actors.errors import HaulError, JoinFailed, PageUnresolvable, ResolverMissing, StorageUnavailable
from actors.hls import (
    MAX_KEY_BYTES,
    MAX_PLAYLIST_BYTES,
    Key,
    Stream,
    StreamDownload,
    StreamTransfer,
    claim_track,
    read_small,
)
from actors.lease import DISK_STEP_SECONDS
from actors.pages import Resolved, Track, TrackKind
from actors.resume import discard_part
from actors.split import SplitPlan

#: ffmpeg's time to join: per fragment (a file track counts as one), per byte (at this rate),
#: and at least.
JOIN_SECONDS_PER_FRAGMENT = 0.2
JOIN_BYTES_PER_SECOND = 20 * 1024 * 1024
JOIN_MIN_SECONDS = 60.0
#: The joined file's container, by the file's name; any other name: MP4.
MUXERS = {".mkv": "matroska", ".webm": "webm", ".mov": "mov", ".m4a": "ipod", ".ogg": "ogg", ".opus": "ogg"}
#: The demuxers ffmpeg may read a track with: media containers only (never a playlist that
#: names other files, which a hostile site could serve as its "video").
MEDIA_DEMUXERS = "mov,matroska,mpegts,aac,mp3,ac3,eac3,ogg,flac,wav,flv"
#: How ffmpeg reads a track that is one file: from the disk, as a media container.
FILE_INPUT = ("-protocol_whitelist", "file", "-format_whitelist", MEDIA_DEMUXERS)
#: Bytes copied between lease checks while a DASH track's fragments are concatenated.
CONCAT_STEP_BYTES = 64 * 1024 * 1024
#: The end of ffmpeg's complaints kept for the message.
STDERR_TAIL_BYTES = 4096
#: What ffmpeg says when this worker failed it (its disk, its resources), not the media.
_WORKER_TROUBLE = (
    "No space left on device", "Input/output error", "Read-only file system", "Disk quota exceeded",
    "Cannot allocate memory", "Too many open files",
)  # fmt: skip
#: What ffmpeg says when the container cannot hold the codecs: no download will do better.
_CONTAINER_TROUBLE = ("Could not find tag for codec", "not currently supported in container", "are supported for")
#: What differs from run to run in ffmpeg's words: addresses, the run's tag in file names.
_PER_RUN = re.compile(r" @ 0x[0-9a-f]+|\.\d+\.[0-9a-f]{8}(?=\.)")
#: Beside a stream folder, what ffmpeg said of the bytes it could not join: said again of bytes
#: downloaded afresh, it is the media's, and final.
JOIN_COMPLAINT = "join-failed.txt"


class Connections(Protocol):
    """What a track's download asks of the file's run (:class:`actors.filerun.FileRun`)."""

    def hold(self, url: str) -> AbstractContextManager[None]:
        """A connection slot of ``url``'s host while the block runs (HAUL_DOWNLOAD_PER_HOST)."""

    def plan(self, url: str) -> SplitPlan | None:
        """How a download from ``url``'s host may open connections beside its own."""

    def fetch_file(self, track: Track, into: Path, base: int) -> int:
        """A file track into ``into`` through the fetcher (``base``: the bytes of the tracks
        before it); its size."""


@dataclass(frozen=True)
class Joined:
    """What was joined: how many tracks and fragments, and their bytes."""

    tracks: int
    fragments: int
    size: int


@dataclass(frozen=True)
class _Input:
    """A track as ffmpeg reads it."""

    path: Path
    options: tuple[str, ...]
    track: Track


def muxer_for(path: str) -> str:
    """The container a file named ``path`` is joined into."""
    return MUXERS.get(PurePosixPath(path).suffix.lower(), "mp4")


def download_tracks(
    found: Resolved,
    folder: Path,
    part: Path,
    t: StreamTransfer,
    connections: Connections,
    muxer: str,
) -> Joined:
    """``found``'s tracks into ``folder`` (the file's stream folder, this run's), what runs
    before kept not asked again, then joined by ffmpeg into ``part``; each track holding a
    connection slot of the host its bytes come from, a stream's fragments several at once as
    ``connections`` allows."""
    ffmpeg = ffmpeg_path()  # before a byte is fetched (a worker says it resolves pages only with it)
    # In the names of what this run writes to join: a run that lost the task, still joining,
    # writes only into files of its own (the folder it wrote in is renamed to its successor's).
    tag = f"{t.token}.{uuid.uuid4().hex[:8]}"
    with haul_errors_only(t.where):
        _drop_leftovers(folder)
    try:
        inputs: list[_Input] = []
        base, fragments = 0, 0
        for n, track in enumerate(found.tracks):
            where = t.where if len(found.tracks) == 1 else f"{t.where}, track {n + 1} (format {track.format_id})"
            tt = dataclasses.replace(t, headers=track.headers, playlist=track.url, where=where)
            given, size, count = _track(track, folder / f"track-{n}", tt, connections, base, tag)
            inputs.append(given)
            base, fragments = base + size, fragments + count
        timeout = max(JOIN_MIN_SECONDS, JOIN_SECONDS_PER_FRAGMENT * fragments + base / JOIN_BYTES_PER_SECOND)
        t.main.step(timeout + 10)
        joined = folder / f"joined.{tag}.{muxer}"
        with haul_errors_only(t.where):
            try:
                _join(inputs, joined, muxer, ffmpeg, timeout, folder / f"ffmpeg.{tag}.log", t)
            except (PageUnresolvable, _Unjoinable) as exc:  # a retry must not join the same bytes again
                for own in folder.glob("track-*"):
                    shutil.rmtree(own, ignore_errors=True)
                if isinstance(exc, PageUnresolvable):
                    raise
                _judge_again(folder / JOIN_COMPLAINT, exc.complaint, t.where)
            t.main.step(DISK_STEP_SECONDS)  # the fence: a run that lost the task moves nothing
            discard_part(part)  # bytes an earlier download of another kind left, and their record
            os.replace(joined, part)
        return Joined(len(found.tracks), fragments, base)
    finally:
        for leftover in folder.glob(f"**/*.{tag}.*"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _track(
    track: Track, own: Path, t: StreamTransfer, connections: Connections, base: int, tag: str
) -> tuple[_Input, int, int]:
    """``track`` into its folder ``own``, after ``base`` bytes of the tracks before it: how
    ffmpeg reads it, its bytes, its fragments."""
    where = t.where
    if track.kind is TrackKind.FILE:
        t.main.step(DISK_STEP_SECONDS)  # the fence: a run whose folder moved on touches nothing
        with haul_errors_only(where):
            claim_track(own, "file", track.format_id, where)
        with connections.hold(track.url):
            size = connections.fetch_file(track, own / "media.part", base)
        return _Input(own / "media.part", FILE_INPUT, track), size, 1
    stream, keys = _stream(track, t)
    at = stream.fragments[-1].url  # where the media fragments come from, a CDN perhaps (not an init section)
    t = dataclasses.replace(t, plan=connections.plan(at))
    t.main.step(DISK_STEP_SECONDS)
    with haul_errors_only(where):
        claim_track(own, stream.identity(keys), track.format_id, where)
    with connections.hold(at), haul_errors_only(where):
        size = StreamDownload(stream, own, t, base).fetch()
    with haul_errors_only(where):
        return _readable(stream, keys, own, track, t, tag), size, len(stream.fragments)


def _drop_leftovers(folder: Path) -> None:
    """What runs before left of their joins (a run killed while joining): the folder is this
    run's now, so none of it is in use by a run that may write here."""
    for pattern in ("joined.*", "*/whole.*", "*/local.*", "*/key-*", "ffmpeg.*"):
        for leftover in folder.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _stream(track: Track, t: StreamTransfer) -> tuple[Stream, dict[Key, bytes]]:
    """A stream track's fragments (an HLS playlist is read here) and its keys' bytes."""
    if track.kind is TrackKind.DASH:
        return Stream.of_dash(track.fragments), {}
    text, at = read_small(t.main, track.url, t, MAX_PLAYLIST_BYTES, t.where)
    stream = Stream.parse(text.decode("utf-8", errors="replace"), at, t.where)
    keys = {key: read_small(t.main, key.url, t, MAX_KEY_BYTES, f"{t.where}, its key")[0]
            for key in dict.fromkeys(f.key for f in stream.fragments if f.key is not None)}  # fmt: skip
    return stream, keys


def _readable(
    stream: Stream, keys: Mapping[Key, bytes], own: Path, track: Track, t: StreamTransfer, tag: str
) -> _Input:
    """What ffmpeg reads of a downloaded stream: an HLS track's playlist (written here, its keys
    beside it), a DASH track's fragments concatenated."""
    if stream.dash:
        whole = own / f"whole.{tag}.media"
        _concatenate([own / stream.name(i) for i in range(len(stream.fragments))], whole, t)
        return _Input(whole, FILE_INPUT, track)
    key_names: dict[Key, str] = {}
    for n, (key, data) in enumerate(keys.items()):
        key_names[key] = f"key-{n}.{tag}.bin"
        (own / key_names[key]).write_bytes(data)
    playlist = own / f"local.{tag}.m3u8"
    playlist.write_text(_local_playlist(stream, key_names))
    # The fragments are named by haul, not by what they hold (packed audio in a ".ts"): ffmpeg
    # is not to judge them by their names
    options = ("-protocol_whitelist", "file,crypto", "-format_whitelist", f"hls,{MEDIA_DEMUXERS}",
               "-extension_picky", "0")  # fmt: skip
    return _Input(playlist, options, track)


def _concatenate(pieces: list[Path], whole: Path, t: StreamTransfer) -> None:
    """``pieces`` one after another into ``whole``, the lease checked as it goes."""
    copied = 0
    with whole.open("wb") as out:
        for piece in pieces:
            if copied >= CONCAT_STEP_BYTES:
                t.main.step(DISK_STEP_SECONDS)
                copied = 0
            with piece.open("rb") as source:
                shutil.copyfileobj(source, out, 1024 * 1024)
            copied += piece.stat().st_size


class _Process:
    """ffmpeg, killed when the lane's guard fires (the worker stops, the lease is lost, the
    join overruns its step)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()


def _join(
    inputs: list[_Input], out: Path, muxer: str, ffmpeg: str, timeout: float, log_path: Path, t: StreamTransfer
) -> None:
    """ffmpeg joins ``inputs`` into ``out`` (in the run's own folder: a run that lost the task
    joins where its successor never looks) as ``muxer``."""
    command = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error"]
    for given in inputs:
        command += [*given.options, "-i", str(given.path)]
    for n, given in enumerate(inputs):  # each track's video and audio (a track may lack either)
        if given.track.has_video or len(inputs) == 1:
            command += ["-map", f"{n}:v?"]
        if given.track.has_audio or len(inputs) == 1:
            command += ["-map", f"{n}:a?"]
    command += ["-c", "copy", "-f", muxer, "-y", str(out)]
    with log_path.open("wb") as log:
        try:  # a session of its own: a signal meant for the worker's group is the worker's to handle
            popen = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
            )
        except OSError as exc:  # not there, not runnable: as a worker without the extra; else a passing want
            if exc.errno in {errno.ENOENT, errno.EACCES, errno.ENOEXEC}:
                raise ResolverMissing(f"{t.where}: this worker cannot run ffmpeg ({exc.strerror})") from exc
            raise JoinFailed(f"{t.where}: ffmpeg could not be started ({exc.strerror})") from exc
        process = _Process(popen)
        with t.main.guard(process):
            try:
                code = process.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                process.close()
                process.popen.wait()
                raise JoinFailed(f"{t.where}: ffmpeg did not join the media within {timeout:.0f}s") from None
    if code == 0:
        return
    t.main.step(DISK_STEP_SECONDS)  # killed for a stop or a lost lease: that is the run's end
    with log_path.open("rb") as tail:
        tail.seek(max(0, log_path.stat().st_size - STDERR_TAIL_BYTES))
        lines = tail.read().decode(errors="replace").strip().splitlines()[-3:]
    # Without what differs from run to run (the staging path, addresses): what ffmpeg said of the media
    complaint = _PER_RUN.sub("", " / ".join(lines).replace(str(log_path.parent), "<staging>")) or f"exit status {code}"
    if code < 0 or any(trouble in complaint for trouble in _WORKER_TROUBLE):  # killed, a disk: worth another try
        raise JoinFailed(f"{t.where}: ffmpeg could not join the media: {complaint}")
    if any(trouble in complaint for trouble in _CONTAINER_TROUBLE):
        raise PageUnresolvable(
            f"{t.where}: ffmpeg could not join the media as {muxer}: {complaint}; the codecs do not fit the "
            "container the file's name asks for: name it .mkv (Matroska holds them all) or choose a format that fits"
        )
    raise _Unjoinable(complaint)


class _Unjoinable(Exception):
    """ffmpeg refused the bytes (not the container): they may be bad, or the media may be."""

    def __init__(self, complaint: str) -> None:
        super().__init__(complaint)
        self.complaint = complaint


def _judge_again(record: Path, complaint: str, where: str) -> None:
    """Bytes ffmpeg refused, their tracks dropped: the first time, downloaded again (a fragment
    may have come whole but wrong); the same complaint of fresh bytes is the media's, final."""
    try:
        before = record.read_text()
    except OSError:
        before = None
    if before == complaint:
        raise PageUnresolvable(f"{where}: ffmpeg cannot join the media, downloaded twice: {complaint}")
    record.write_text(complaint)
    raise JoinFailed(f"{where}: ffmpeg could not join the media ({complaint}); downloading its tracks again")


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
        name = stream.name(index)
        if fragment.init:
            lines.append(f'#EXT-X-MAP:URI="{name}"')
        else:
            lines += [f"#EXTINF:{fragment.duration:.6f},", name]
    lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def ffmpeg_path() -> str:
    """The ffmpeg of the ``imageio-ffmpeg`` wheel."""
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError) as exc:
        raise ResolverMissing(
            "this worker has no ffmpeg to join a page's media: install the extra on it "
            f"(pip install 'haul[resolve]') and restart it ({exc})"
        ) from exc


@contextlib.contextmanager
def haul_errors_only(where: str) -> Iterator[None]:
    """Turn an unexpected failure in staging into a retryable one that names the file."""
    try:
        yield
    except HaulError:
        raise
    except OSError as exc:
        raise StorageUnavailable(f"{where}: {exc.strerror} in staging, while downloading or joining") from exc
