"""Recordings made by the ffmpeg haul joins with, for the tests of page files and the bench
(``ops/bench/pages.py``): an HLS stream, a DASH presentation of separate video and audio, and
what ffmpeg reads back of a joined file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from actors.tracks import ffmpeg_path
from tests.servers import Origin

#: A test card and a tone, in H.264 and AAC, with a key frame every second.
SOURCES = ["-f", "lavfi", "-i", "testsrc=duration={seconds}:size={size}:rate=25", "-f", "lavfi", "-i",
           "sine=duration={seconds}", "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-c:a", "aac"]  # fmt: skip


def _ffmpeg(seconds: int, size: str, *output: str) -> None:
    sources = [part.format(seconds=seconds, size=size) for part in SOURCES]
    subprocess.run([ffmpeg_path(), "-hide_banner", "-loglevel", "error", *sources, *output], check=True, timeout=600)


def make_hls(folder: Path, seconds: int = 10, size: str = "160x120") -> None:
    """``index.m3u8`` and 1 s MPEG-TS fragments ``seg-000.ts``... in ``folder``."""
    _ffmpeg(seconds, size, "-f", "hls", "-hls_time", "1", "-hls_playlist_type", "vod", "-hls_segment_filename",
            str(folder / "seg-%03d.ts"), str(folder / "index.m3u8"))  # fmt: skip


def make_dash(folder: Path, seconds: int = 8, size: str = "160x120", video_file: bool = True) -> None:
    """``manifest.mpd`` in ``folder``: a video and an audio adaptation set (fMP4, 1 s fragments,
    ``init-stream0.m4s``, ``chunk-stream0-00001.m4s``... for the video, stream1 the audio); and
    (``video_file``) ``video.mp4``, the same picture as one file."""
    _ffmpeg(seconds, size, "-f", "dash", "-seg_duration", "1", "-use_template", "1", "-use_timeline", "0",
            "-adaptation_sets", "id=0,streams=v id=1,streams=a", str(folder / "manifest.mpd"))  # fmt: skip
    if video_file:
        _ffmpeg(seconds, size, "-map", "0:v", "-f", "mp4", str(folder / "video.mp4"))


def dash_with_video_file(manifest: str, url: str) -> str:
    """``manifest`` with its video as one file at ``url`` (a representation with only a
    BaseURL, which yt-dlp downloads as a file) instead of fragments."""
    start = manifest.index('<AdaptationSet id="0"')
    end = manifest.index("</AdaptationSet>", start) + len("</AdaptationSet>")
    replaced = (
        '<AdaptationSet id="0" contentType="video" mimeType="video/mp4">'
        f'<Representation id="v" codecs="avc1.f4000b" bandwidth="69000"><BaseURL>{url}</BaseURL></Representation>'
        "</AdaptationSet>"
    )
    return manifest[:start] + replaced + manifest[end:]


def dash_on(manifest: str, base: str) -> str:
    """``manifest`` with its fragments at ``base`` (another host, a CDN's)."""
    return manifest.replace("<Period ", f"<BaseURL>{base}</BaseURL><Period ", 1)


def serve(origin: Origin, folder: Path, prefix: str) -> None:
    """Every file of ``folder`` on ``origin`` under ``prefix`` (``/hls``: ``/hls/index.m3u8``...)."""
    for item in folder.iterdir():
        origin.put(f"{prefix}/{item.name}", item.read_bytes())


def probe(path: Path) -> str:
    """What ffmpeg says of ``path``: its container, duration and streams."""
    return subprocess.run([ffmpeg_path(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr


def duration_of(path: Path) -> float:
    """The duration ffmpeg reads in ``path``'s header, in seconds."""
    said = probe(path)
    found = re.search(r"Duration: (\d+):(\d+):(\d+\.\d+)", said)
    assert found, said
    hours, minutes, seconds = found.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def kinds_of_streams(path: Path) -> list[str]:
    """The kinds of ``path``'s streams in order ("Video", "Audio")."""
    return re.findall(r"Stream #0:\d+.*?: (Video|Audio)", probe(path))
