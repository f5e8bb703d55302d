"""yt-dlp behind haul's destination policy: imported only where a page is resolved (the
``resolve`` extra is optional; see :mod:`actors.pages`).

yt-dlp's own networking would reach any address a page names (a link-local metadata service,
the worker's own Redis). Its requests go through :class:`PolicyRH` instead, the only request
handler the resolver's YoutubeDL has: yt-dlp's requests handler on haul's guarded adapters
(each connection's address judged and pinned as it is made, :mod:`actors.connections`), with
every URL and every redirect's target checked by the policy before it is asked for.

yt-dlp's failures become haul's errors: a page that answers 404 or 410 fails the task
(:class:`OriginRejected`), as does a page without media or with media removed or private
(:class:`PageUnresolvable`, with the extractor's reason); a 429, a 5xx or a network failure is
retried (:class:`OriginUnavailable`); a destination the policy refuses stays that refusal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from yt_dlp import YoutubeDL
from yt_dlp.cookies import YoutubeDLCookieJar
from yt_dlp.networking._requests import RequestsRH
from yt_dlp.networking.common import RequestDirector
from yt_dlp.networking.exceptions import HTTPError, TransportError
from yt_dlp.utils import DownloadError, ExtractorError, UnsupportedError, YoutubeDLError

from actors.connections import shutter_of
from actors.errors import HaulError, OriginRejected, OriginUnavailable, PageUnresolvable
from actors.hls import MAX_FRAGMENTS
from actors.interrupt import Guard, interruptible
from actors.netguard import DestinationPolicy
from actors.pages import MAX_TRACKS, Resolved, Track, TrackKind, plain_title
from actors.redact import display_url, redact_text
from actors.requestopts import CookiesUnreadable, cookies_text, drop_secrets, secret_headers
from actors.task import RequestOptions

log = logging.getLogger(__name__)

#: yt-dlp's protocols haul downloads itself, and how.
PROTOCOLS = {
    "http": TrackKind.FILE, "https": TrackKind.FILE, "m3u8": TrackKind.HLS, "m3u8_native": TrackKind.HLS,
    "http_dash_segments": TrackKind.DASH,
}  # fmt: skip
#: Statuses of a page that no retry can change.
GONE = frozenset({401, 403, 404, 410, 451})


class PolicyRH(RequestsRH):  # type: ignore[misc]
    """yt-dlp's requests handler on haul's guarded session, every URL and redirect checked."""

    RH_NAME = "haul"

    def __init__(
        self,
        *,
        policy: DestinationPolicy,
        where: str,
        before: Callable[[], None] | None,
        sockets: _Sockets,
        page: str,
        secrets: dict[str, str],
        **kwargs: Any,
    ) -> None:
        self.policy, self.where, self.sockets = policy, where, sockets
        #: The task's credential headers, for the page's host only (:func:`secret_headers`).
        self.page, self.secrets = page, secrets
        #: Called once, just before the first request goes out (the host's turn).
        self.before = before
        super().__init__(**kwargs)

    def _create_instance(self, cookiejar: Any, legacy_ssl_support: Any = None) -> requests.Session:
        session: requests.Session = super()._create_instance(cookiejar, legacy_ssl_support)
        guarded = self.policy.session()
        session.adapters.clear()
        for prefix, adapter in guarded.adapters.items():
            session.mount(prefix, adapter)
        session.hooks["response"].append(self._redirect_checked)
        rebuild_auth = session.rebuild_auth

        def rebuild_auth_and_secrets(prepared: requests.PreparedRequest, response: requests.Response) -> None:
            """Before a redirect is followed: the task's credentials stay behind on another host."""
            rebuild_auth(prepared, response)  # type: ignore[no-untyped-call]
            drop_secrets(prepared.headers, self.secrets, self.page, str(prepared.url))

        session.rebuild_auth = rebuild_auth_and_secrets  # type: ignore[method-assign]
        return session

    def _prepare_headers(self, request: Any, headers: Any) -> None:
        """The task's credentials go to the page's host only (an extractor may ask an API, or
        follow an embed, on another)."""
        super()._prepare_headers(request, headers)
        drop_secrets(headers, self.secrets, self.page, request.url)

    def _redirect_checked(self, response: requests.Response, **kwargs: Any) -> None:
        """Before requests follows a redirect: its target passes the policy (by name too)."""
        if response.is_redirect:
            try:
                self.policy.check(urljoin(response.url, response.headers["Location"]), purpose=self.where)
            except HaulError:
                response.close()  # requests would leave its connection open
                raise

    def _send(self, request: Any) -> Any:
        self.policy.check(request.url, purpose=self.where)
        if self.before is not None:
            before, self.before = self.before, None
            before()
        response = super()._send(request)
        self.sockets.add(response._requests_response)  # its body is read by yt-dlp, unguarded
        return response


class _Sockets:
    """The answers a resolution reads: their sockets all shut when its guard fires (a graceful
    stop, a lost lease, the step's deadline), and any opened after; all closed when it ends
    (yt-dlp leaves one it gave up on to the garbage collector)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[Any] = []
        self._answers: list[requests.Response] = []
        self._closed = False

    def add(self, response: requests.Response) -> None:
        shutter = shutter_of(response)
        with self._lock:
            self._answers.append(response)
            self._open.append(shutter)
            closed = self._closed
        if closed:
            shutter.close()

    def release(self) -> None:
        """Close every answer (the resolution ended)."""
        with self._lock:
            answers, self._answers = self._answers, []
        for response in answers:
            response.close()

    def __enter__(self) -> _Sockets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def shut(self) -> bool:
        """Whether the guard fired (the resolution's failure is the cut, whatever yt-dlp says)."""
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed, shut = True, list(self._open)
        for shutter in shut:
            shutter.close()


class _PolicyYoutubeDL(YoutubeDL):  # type: ignore[misc]
    """A YoutubeDL whose only way out is :class:`PolicyRH`."""

    def __init__(
        self,
        params: dict[str, Any],
        policy: DestinationPolicy,
        where: str,
        before: Callable[[], None],
        sockets: _Sockets,
        page: str,
        secrets: dict[str, str],
    ) -> None:
        self._haul_handler = functools.partial(
            PolicyRH, policy=policy, where=where, before=before, sockets=sockets, page=page, secrets=secrets
        )
        super().__init__(params)

    @functools.cached_property
    def _request_director(self) -> RequestDirector:
        return self.build_request_director([self._haul_handler])


class _Log:
    """yt-dlp's messages into haul's log (it would print them); errors are raised anyway."""

    def __init__(self, where: str) -> None:
        self.where = where

    def debug(self, message: str) -> None:
        log.debug("%s: yt-dlp: %s", self.where, message)

    def info(self, message: str) -> None:
        log.debug("%s: yt-dlp: %s", self.where, message)

    def warning(self, message: str) -> None:
        log.info("%s: yt-dlp: %s", self.where, message)

    def error(self, message: str) -> None:
        log.debug("%s: yt-dlp: %s", self.where, message)


def resolve(
    page: str,
    selector: str,
    policy: DestinationPolicy,
    *,
    where: str,
    timeout: float,
    limit: float,
    before: Callable[[], None],
    guard: Guard | None,
    proxy: str | None,
    request: RequestOptions | None,
) -> Resolved:
    """The media ``page`` shows, in the format ``selector`` chooses (the rest: see
    :func:`actors.pages.resolve`)."""
    secrets = secret_headers(request)
    params = {
        "format": selector, "noplaylist": True, "extract_flat": "in_playlist", "quiet": True, "no_warnings": True,
        "noprogress": True, "logger": _Log(where), "socket_timeout": timeout, "cachedir": False,
        "extractor_retries": 0, "dynamic_mpd": False,  # a live DASH manifest: no formats (haul downloads recordings)
        "proxy": proxy or "",  # "": no proxy from the environment either
        "http_headers": {k: v for k, v in request.headers if not k.lower().startswith("ytdl-")} if request else {},
    }  # fmt: skip
    sockets = _Sockets()
    try:
        ydl = _PolicyYoutubeDL(params, policy, where, before, sockets, page, secrets)
    except (SyntaxError, ValueError) as exc:  # yt-dlp parses the selector here
        raise PageUnresolvable(f"{where}: {selector!r} is not a format selector yt-dlp understands ({exc})") from exc
    if request is not None and request.cookies:  # the task's, read from memory (never a file on disk)
        jar = YoutubeDLCookieJar()
        try:
            jar.load(io.StringIO(cookies_text(request)))
        except Exception:  # its message repeats the line: not passed on
            raise CookiesUnreadable(f"{where}: the task's cookies cannot be read; give them again") from None
        ydl.cookiejar = jar
    cut = threading.Timer(limit, sockets.close)  # its own clock: a page may drip for ever
    cut.daemon = True
    cut.start()
    with (
        _cancelled(cut),
        ydl,
        interruptible(guard),
        guard(sockets) if guard is not None else contextlib.nullcontext(),
        sockets,
    ):
        try:
            info = ydl.extract_info(page, download=False)
        except YoutubeDLError as exc:  # reported (DownloadError), or raised through it (a handler's)
            if sockets.shut:
                raise OriginUnavailable(
                    f"{where}: resolving {display_url(page)} was cut: it took longer than "
                    "HAUL_RESOLVE_TIMEOUT_SECONDS, or the worker is stopping", code="timeout",
                ) from exc  # fmt: skip
            cause = exc.exc_info[1] if isinstance(exc, DownloadError) and exc.exc_info else exc
            raise _haul_error(cause, page, where) from exc
        found = _chosen(info, where)
        # The task's cookies, and those the site set while resolving, for each track's host.
        cookies = [ydl.cookiejar.get_cookie_header(track.url) for track in found.tracks]
    return dataclasses.replace(found, cookies=ydl.cookiejar.get_cookie_header, tracks=tuple(
        dataclasses.replace(track, headers=_scoped(track, page, secrets, cookie))
        for track, cookie in zip(found.tracks, cookies, strict=True)
    ))  # fmt: skip


def _scoped(track: Track, page: str, secrets: dict[str, str], cookie: str | None) -> dict[str, str]:
    """What to ask for ``track`` with: the site's headers (yt-dlp's, with the task's in them),
    the task's credentials only on the page's host, and the cookies the jar has for its URL."""
    headers = dict(track.headers)
    drop_secrets(headers, secrets, page, track.url)
    return {**headers, "Cookie": cookie} if cookie else headers


@contextlib.contextmanager
def _cancelled(timer: threading.Timer) -> Iterator[None]:
    try:
        yield
    finally:
        timer.cancel()


def _haul_error(cause: BaseException | None, page: str, where: str) -> HaulError:
    """The haul error a failed extraction of ``page`` is (see the module docstring)."""
    refused = _haul_error_in(cause)
    if refused is not None:
        return refused
    shown = display_url(page)
    if isinstance(cause, UnsupportedError):
        return PageUnresolvable(
            f"{where}: found no video on {shown} (no site extractor knows it, and it carries no <video> or "
            "Open Graph video but perhaps a live stream, which haul does not download); check that the page shows "
            "the video without signing in, or give the file's own url"
        )
    inner = cause.cause if isinstance(cause, ExtractorError) else cause
    if isinstance(inner, HTTPError):
        inner.close()  # its response holds a connection, which would otherwise be left open
        if inner.status in GONE:
            return OriginRejected(
                f"{where}: the page {shown} answered {inner.status}; check the link (removed, or not public)",
                inner.status,
            )
        return OriginUnavailable(f"{where}: the page {shown} answered {inner.status}; will retry",
                                 code="resolve_unavailable")  # fmt: skip
    if isinstance(inner, TransportError):
        failure = type(inner.cause or inner).__name__
        return OriginUnavailable(
            f"{where}: could not reach {shown} ({failure}); will retry", code="resolve_unavailable"
        )
    if isinstance(cause, ExtractorError) and cause.expected:  # the extractor's verdict: removed, private...
        return PageUnresolvable(f"{where}: {shown}: {redact_text(cause.orig_msg)}")
    said = redact_text(cause.orig_msg) if isinstance(cause, ExtractorError) else type(cause).__name__
    return OriginUnavailable(f"{where}: resolving {shown} failed ({said}); will retry", code="resolve_failed")


def _haul_error_in(error: BaseException | None) -> HaulError | None:
    """A haul error (the policy's refusal) raised inside yt-dlp: its director reports one that
    a handler raised as an "unexpected error", and extractors wrap what they catch."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, HaulError):
            return current
        pending += [getattr(current, "cause", None), current.__cause__, current.__context__]
        pending += list(getattr(current, "unexpected_errors", None) or [])
    return None


def _chosen(info: dict[str, Any], where: str) -> Resolved:
    """What haul downloads from what yt-dlp found: the chosen format's tracks."""
    if info.get("_type") in {"playlist", "multi_video"}:
        count = len(list(info.get("entries") or []))
        raise PageUnresolvable(f"{where}: the page holds {count} videos; give each as a file of its own")
    if info.get("is_live") or info.get("live_status") in {"is_live", "is_upcoming"}:
        raise PageUnresolvable(f"{where}: the page's video is live (it never ends); haul downloads recordings")
    format_id = str(info.get("format_id") or "")
    formats = list(info.get("requested_formats") or [info])
    if len(formats) > MAX_TRACKS:
        raise PageUnresolvable(f"{where}: format {format_id} joins more than {MAX_TRACKS} tracks; choose fewer")
    tracks = tuple(_track(f, where) for f in formats)
    duration = info.get("duration")
    if not isinstance(duration, int | float) or not math.isfinite(duration) or duration < 0:
        duration = None
    return Resolved(
        tracks=tracks, extractor=str(info.get("extractor_key") or info.get("extractor") or ""), format_id=format_id,
        title=plain_title(info.get("title")), duration=None if duration is None else float(duration),
    )  # fmt: skip


def _track(fmt: dict[str, Any], where: str) -> Track:
    """One format of the chosen ones as a track haul downloads, or why it cannot."""
    format_id = str(fmt.get("format_id") or "")
    if fmt.get("has_drm"):
        raise PageUnresolvable(f"{where}: format {format_id} is protected by DRM; haul does not download it")
    protocol = str(fmt.get("protocol") or "")
    kind = PROTOCOLS.get(protocol)
    if kind is None:
        raise PageUnresolvable(
            f"{where}: format {format_id} is streamed over {protocol}, which haul does not download; choose one over "
            "HTTP, HLS or DASH with the task's format, e.g. 'b[protocol^=http]/b[protocol^=m3u8]'"
        )
    fragments: tuple[tuple[str, float], ...] = ()
    if kind is TrackKind.DASH:
        fragments = _dash_fragments(fmt, format_id, where)
    return Track(
        url=str(fmt["url"]), headers={str(k): str(v) for k, v in (fmt.get("http_headers") or {}).items()},
        format_id=format_id, kind=kind, has_video=fmt.get("vcodec") != "none", has_audio=fmt.get("acodec") != "none",
        fragments=fragments,
    )  # fmt: skip


def _dash_fragments(fmt: dict[str, Any], format_id: str, where: str) -> tuple[tuple[str, float], ...]:
    """A DASH format's fragments as yt-dlp read them from the manifest: each URL, whole."""
    if callable(fmt.get("fragments")):  # yt-dlp makes them as a live stream goes on
        raise PageUnresolvable(f"{where}: format {format_id} is live (it never ends); haul downloads recordings")
    listed = list(fmt.get("fragments") or [])
    if not listed:
        raise PageUnresolvable(f"{where}: format {format_id} is DASH without fragments")
    if len(listed) > MAX_FRAGMENTS:
        raise PageUnresolvable(f"{where}: format {format_id} has more than {MAX_FRAGMENTS} fragments")
    fragments = []
    base = str(fmt.get("fragment_base_url") or fmt.get("url") or "")
    for fragment in listed:
        if fragment.get("byte_range"):
            raise PageUnresolvable(f"{where}: format {format_id}'s fragments are byte ranges, not handled yet")
        url = str(fragment.get("url") or urljoin(base, str(fragment.get("path") or "")))
        try:
            scheme = urlsplit(url).scheme
        except ValueError:
            scheme = ""
        if scheme not in {"http", "https"}:
            raise PageUnresolvable(f"{where}: format {format_id} has a fragment that is not an http(s) URL")
        duration = fragment.get("duration")
        ok = isinstance(duration, int | float) and math.isfinite(duration) and duration >= 0
        fragments.append((url, float(duration) if ok else 0.0))
    return tuple(fragments)
