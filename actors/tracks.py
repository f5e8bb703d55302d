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
timeout. The container follows the file's name (``.mkv``, ``.webm``, ``.mov``; else MP4).
ffmpeg comes from the ``imageio-ffmpeg`` wheel (a static build, no apt step), part of the
``resolve`` extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from actors.errors import HaulError, OriginUnavailable, PageUnresolvable, StorageUnavailable
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

#: ffmpeg's time to join, per fragment (a file track counts as one), and at least.
JOIN_SECONDS_PER_FRAGMENT = 0.2
JOIN_MIN_SECONDS = 60.0
#: The joined file's container, by the file's name; any other name: MP4.
MUXERS = {".mkv": "matroska", ".webm": "webm", ".mov": "mov"}
#: The demuxers ffmpeg may read a track with: media containers only (never a playlist that
#: names other files, which a hostile site could serve as its "video").
MEDIA_DEMUXERS = "mov,matroska,mpegts,aac,mp3,ogg,flac,wav,flv"
#: Bytes copied between lease checks while a DASH track's fragments are concatenated.
CONCAT_STEP_BYTES = 64 * 1024 * 1024

#: Downloads a file track into a part (``base``: the bytes of the tracks before it); its size.
FetchFile = Callable[[Track, Path, int], int]


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
    demuxers: str
    protocols: str
    track: Track


def muxer_for(path: str) -> str:
    """The container a file named ``path`` is joined into."""
    return MUXERS.get(PurePosixPath(path).suffix.lower(), "mp4")


def download_tracks(
    found: Resolved, folder: Path, part: Path, t: StreamTransfer, fetch_file: FetchFile, muxer: str
) -> Joined:
    """``found``'s tracks into ``folder`` (the file's stream folder, this run's), what runs
    before kept not asked again, then joined by ffmpeg into ``part``."""
    # In the names of what this run writes to join: a run that lost the task, still joining,
    # writes only into files of its own (the folder it wrote in is renamed to its successor's).
    tag = f"{t.token}.{uuid.uuid4().hex[:8]}"
    try:
        return _download(found, folder, part, t, fetch_file, muxer, tag)
    finally:
        for leftover in folder.glob(f"**/*.{tag}.*"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _download(
    found: Resolved, folder: Path, part: Path, t: StreamTransfer, fetch_file: FetchFile, muxer: str, tag: str
) -> Joined:
    inputs: list[_Input] = []
    base, fragments = 0, 0
    for n, track in enumerate(found.tracks):
        where = t.where if len(found.tracks) == 1 else f"{t.where}, track {n + 1} (format {track.format_id})"
        tt = dataclasses.replace(t, headers=track.headers, playlist=track.url, where=where)
        own = folder / f"track-{n}"
        if track.kind is TrackKind.FILE:
            with haul_errors_only(where):
                claim_track(own, "file", track.format_id, where)
            base += fetch_file(track, own / "media.part", base)
            inputs.append(_Input(own / "media.part", MEDIA_DEMUXERS, "file", track))
            fragments += 1
            continue
        stream, keys = _stream(track, tt)
        with haul_errors_only(where):
            claim_track(own, stream.identity(keys), track.format_id, where)
            base += StreamDownload(stream, own, tt, base).fetch()
            inputs.append(_readable(stream, keys, own, track, t, tag))
        fragments += len(stream.fragments)
    timeout = max(JOIN_MIN_SECONDS, JOIN_SECONDS_PER_FRAGMENT * fragments)
    t.main.step(timeout + 10)
    with haul_errors_only(t.where):
        joined = _join(inputs, folder / f"joined.{tag}.{muxer}", muxer, ffmpeg_path(), timeout, t.where)
        t.main.step(DISK_STEP_SECONDS)  # the fence: a run that lost the task moves nothing
        discard_part(part)  # bytes an earlier download of another kind left, and their record
        os.replace(joined, part)
    return Joined(len(found.tracks), fragments, base)


def _stream(track: Track, t: StreamTransfer) -> tuple[Stream, dict[Key, bytes]]:
    """A stream track's fragments (an HLS playlist is read here) and its keys' bytes."""
    if track.kind is TrackKind.DASH:
        return Stream.of_dash(track.fragments), {}
    text = read_small(t.main, track.url, t, MAX_PLAYLIST_BYTES, t.where)
    stream = Stream.parse(text.decode("utf-8", errors="replace"), track.url, t.where)
    keys = {key: read_small(t.main, key.url, t, MAX_KEY_BYTES, f"{t.where}, its key")
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
        return _Input(whole, MEDIA_DEMUXERS, "file", track)
    key_names: dict[Key, str] = {}
    for n, (key, data) in enumerate(keys.items()):
        key_names[key] = f"key-{n}.{tag}.bin"
        (own / key_names[key]).write_bytes(data)
    playlist = own / f"local.{tag}.m3u8"
    playlist.write_text(_local_playlist(stream, key_names))
    return _Input(playlist, f"hls,{MEDIA_DEMUXERS}", "file,crypto", track)


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


def _join(inputs: list[_Input], out: Path, muxer: str, ffmpeg: str, timeout: float, where: str) -> Path:
    """ffmpeg joins ``inputs`` into ``out`` (in the run's own folder: a run that lost the task
    joins where its successor never looks) as ``muxer``; its path."""
    command = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error"]
    for given in inputs:
        command += ["-protocol_whitelist", given.protocols, "-format_whitelist", given.demuxers, "-i", str(given.path)]
    for n, given in enumerate(inputs):  # each track's video and audio (a track may lack either)
        if given.track.has_video or len(inputs) == 1:
            command += ["-map", f"{n}:v?"]
        if given.track.has_audio or len(inputs) == 1:
            command += ["-map", f"{n}:a?"]
    command += ["-c", "copy", "-f", muxer, "-y", str(out)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise OriginUnavailable(f"{where}: ffmpeg did not join the tracks within {timeout:.0f}s") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise PageUnresolvable(f"{where}: ffmpeg could not join the media as {muxer}: {' / '.join(said)}")
    return out


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
    except ImportError as exc:
        raise PageUnresolvable(
            "this worker has no ffmpeg to join a page's media: install the extra (pip install 'haul[resolve]')"
        ) from exc
    return str(imageio_ffmpeg.get_ffmpeg_exe())


@contextlib.contextmanager
def haul_errors_only(where: str) -> Iterator[None]:
    """Turn an unexpected failure in staging into a retryable one that names the file."""
    try:
        yield
    except HaulError:
        raise
    except OSError as exc:
        raise StorageUnavailable(f"{where}: {exc.strerror} in staging, while downloading or joining") from exc
