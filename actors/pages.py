"""Page files: a share link or a streaming site's page, resolved to the media's own URL.

The systems haul replaces rarely start from a file's URL: a share page, a course page, a
resolver API. yt-dlp knows those sites (and pages that carry a ``<video>`` or Open Graph
tags), so a file may be given as ``{"page": URL, "format"?}`` and the worker resolves it when
it downloads the file, under the task's lease. Never at submit: signed media URLs expire in
minutes to hours, so each attempt resolves afresh, and a retry after an expired URL simply
gets a new one.

yt-dlp is the optional extra ``haul[resolve]``: this module only tells whether it is there;
:mod:`actors.ytdlp` (imported here only when a page is resolved) holds what needs it.
Workers say in the registry whether they have it, and a page file is refused at submit when
none does.
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from actors.errors import ResolverMissing

if TYPE_CHECKING:
    from actors.interrupt import Guard
    from actors.netguard import DestinationPolicy
    from actors.task import FileSpec, RequestOptions

log = logging.getLogger(__name__)

#: The extra a worker needs to resolve pages (``pip install 'haul[resolve]'``), as the
#: registry lists it.
RESOLVE_EXTRA = "resolve"
#: Longest title kept from a page (it is shown in status and events).
MAX_TITLE_CHARS = 300
#: Why a worker without the extra hands a page file on, and what to do.
NO_RESOLVER = (
    "this worker cannot resolve pages; install the extra on it (pip install 'haul[resolve]') and restart it "
    "(the task goes to a worker that can, if one is registered)"
)
#: Most tracks a format may have (a video and an audio; a few audio languages).
MAX_TRACKS = 8


def resolver_installed() -> bool:
    """Whether yt-dlp is installed (found, not imported: see :func:`resolver_works`)."""
    return importlib.util.find_spec("yt_dlp") is not None


def resolver_works() -> bool:
    """Whether this process can resolve pages: yt-dlp and its requests handler import, and
    ffmpeg is there to join tracks (a worker says so in the registry only then). Imports them."""
    if not resolver_installed():
        return False
    try:
        import imageio_ffmpeg

        import actors.ytdlp  # noqa: F401

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        log.warning("the resolve extra is installed but cannot be used (%s); this worker does not resolve pages", exc)
        return False
    return True


class TrackKind(enum.Enum):
    """How a track's bytes come (what haul downloads itself)."""

    #: One file over HTTP, through the fetcher (resume, If-Range, split).
    FILE = "file"
    #: An HLS media playlist's fragments (:mod:`actors.hls`).
    HLS = "hls"
    #: A DASH representation's fragments, as yt-dlp read them from the manifest: their
    #: concatenation is the track.
    DASH = "dash"


@dataclass(frozen=True)
class Track:
    """One of the files a format is made of: a format yt-dlp merges (``bv*+ba``) has a video
    track and an audio track, joined by ffmpeg; any other has one."""

    #: The media's URL; an HLS track's playlist; a DASH track's manifest.
    url: str
    #: What to ask for it with (the site's, the task's, its cookies).
    headers: dict[str, str]
    format_id: str
    kind: TrackKind
    has_video: bool = True
    has_audio: bool = True
    #: A DASH track's fragments in order (the init section first), each its URL and duration.
    fragments: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Resolved:
    """What a page resolved to: the media's tracks (their URLs are secret: a signed URL is a
    credential while it lasts), and what was chosen (recorded on the task)."""

    tracks: tuple[Track, ...]
    extractor: str
    format_id: str
    title: str
    duration: float | None
    #: The Cookie header the page's cookie jar (the task's cookies, and those the site set while
    #: resolving) makes for a URL: a stream's fragments may be on hosts of their own.
    cookies: Callable[[str], str | None] = field(default=lambda url: None, compare=False, repr=False)

    @property
    def single_file(self) -> Track | None:
        """The one file haul downloads as it is, if that is what the format is (else its
        tracks are downloaded and joined, :mod:`actors.tracks`)."""
        return self.tracks[0] if len(self.tracks) == 1 and self.tracks[0].kind is TrackKind.FILE else None

    def record(self) -> dict[str, Any]:
        """What the task keeps of it: never the media URL, only its host."""
        return {
            "extractor": self.extractor,
            "format_id": self.format_id,
            "title": self.title,
            "duration": self.duration,
            "host": urlsplit(self.tracks[0].url).hostname or "",
        }


def plain_title(value: object) -> str:
    """A page's title as text that is safe to show: controls and invisible formatting removed, bounded."""
    text = value if isinstance(value, str) else ""
    kept = "".join(ch for ch in text if unicodedata.category(ch) not in {"Cc", "Cf", "Cs", "Zl", "Zp"})
    return kept.strip()[:MAX_TITLE_CHARS]


def resolve(
    spec: FileSpec,
    default_format: str,
    policy: DestinationPolicy,
    *,
    where: str,
    timeout: float,
    limit: float,
    before: Callable[[], None] = lambda: None,
    guard: Guard | None = None,
    proxy: str | None = None,
    request: RequestOptions | None = None,
) -> Resolved:
    """Resolve page file ``spec`` with its format (``default_format`` when it gives none),
    every request through ``policy`` (and ``proxy``, if any), each socket waiting at most
    ``timeout`` seconds, all of it cut after ``limit`` seconds; ``before`` is called just before
    the first request goes out (to wait for the host's turn); ``guard`` may shut every socket
    the resolution uses (a graceful stop, a lost lease, the step's deadline); ``request``: the
    task's headers and cookies, for the page and the media. Raises haul errors only."""
    if not resolver_works():
        raise ResolverMissing(f"{where}: {NO_RESOLVER}")
    from actors import ytdlp

    return ytdlp.resolve(spec.url, spec.format or default_format, policy, where=where, timeout=timeout, limit=limit,
                         before=before,
                         guard=guard, proxy=proxy, request=request)  # fmt: skip
