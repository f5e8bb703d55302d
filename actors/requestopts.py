"""A task's own headers and cookies (:class:`actors.task.RequestOptions`), as its requests send
them: the headers to every request for its files, each cookie only where its domain, path and
``secure`` flag say (the standard library's cookie jar decides); past a redirect to another
host (or from https to http), only headers that tell nothing secret."""

from __future__ import annotations

import http.cookiejar
import io
import urllib.request
from collections.abc import Mapping, MutableMapping
from urllib.parse import urlsplit

from actors.errors import PermanentError
from actors.task import RequestOptions

#: What the cookie file format begins with (browsers' exports and ``yt-dlp --cookies`` write it;
#: the standard library's reader insists on it).
NETSCAPE_MAGIC = "# Netscape HTTP Cookie File\n"
#: Headers that tell nothing secret: the only ones sent on to another host (or from https to
#: http); the rest may be credentials (the task's own headers, its cookies).
PLAIN_HEADERS = frozenset({"user-agent", "accept", "accept-language", "referer", "origin", "sec-fetch-mode",
                           "accept-encoding", "range", "if-range"})  # fmt: skip


class CookiesUnreadable(PermanentError):
    """A task's cookies that the reader refuses (what submit lets through, it should not)."""

    code = "invalid_task"


def cookies_text(options: RequestOptions) -> str:
    """The task's cookies as a cookie file the readers accept."""
    text = options.cookies.lstrip()
    first = text.split("\n", 1)[0]
    return text if first.startswith("#") and "HTTP Cookie File" in first else NETSCAPE_MAGIC + text


def headers_for(options: RequestOptions | None, url: str) -> dict[str, str]:
    """The task's headers, and the Cookie header its cookies make for ``url`` (if any)."""
    if options is None:
        return {}
    headers = dict(options.headers)
    if options.cookies:
        # Read from memory (the reader's own load takes a path): the secrets never touch a disk
        jar = http.cookiejar.MozillaCookieJar()
        try:
            jar._really_load(io.StringIO(cookies_text(options)), "the task's cookies", True, True)  # type: ignore[attr-defined]
        except (OSError, AssertionError, ValueError):  # its message repeats the line: not passed on
            raise CookiesUnreadable("the task's cookies cannot be read; give them again, exported anew") from None
        for entry in jar:  # expiry 0 is how the format writes a session cookie (as yt-dlp reads it)
            if entry.expires == 0:
                entry.expires, entry.discard = None, True
        request = urllib.request.Request(url)
        jar.add_cookie_header(request)
        cookie = request.get_header("Cookie")
        if cookie:
            headers["Cookie"] = cookie
    return headers


def same_site(url: str, target: str) -> bool:
    """Whether ``target`` may get what was meant for ``url``: the same host and port, and not
    from https down to http."""
    here, there = urlsplit(url), urlsplit(target)
    return here.netloc.lower() == there.netloc.lower() and (here.scheme == there.scheme or there.scheme == "https")


def for_host(headers: Mapping[str, str], url: str, target: str) -> dict[str, str]:
    """``headers`` for ``target``, asked for on the way to ``url``: only the plain ones when
    ``target`` is another host (a redirect, a fragment on another CDN) or drops https."""
    if same_site(url, target):
        return dict(headers)
    return {k: v for k, v in headers.items() if k.lower() in PLAIN_HEADERS}


def secret_headers(options: RequestOptions | None) -> dict[str, str]:
    """The task's headers that are credentials: all but the plain ones (User-Agent, Referer...)."""
    return {k.lower(): v for k, v in options.headers if k.lower() not in PLAIN_HEADERS} if options else {}


def drop_secrets(headers: MutableMapping[str, str], secrets: Mapping[str, str], home: str, target: str) -> None:
    """Take the task's credentials ``secrets`` (from :func:`secret_headers`), given for
    ``home``'s host, out of ``headers`` going to ``target`` on another (a site's own headers of
    the same name stay)."""
    if same_site(home, target):
        return
    for name in [k for k, v in headers.items() if secrets.get(k.lower()) == v]:
        del headers[name]
