"""What a caller submits, checked: URLs, paths, names, content types and the manifest's shape.

Every refusal is an :class:`actors.errors.InvalidTask` naming the field (``files[2].path``) and
why, raised before anything is stored, so bad input loses nothing else. Paths are checked for
every way they could leave the task's folder or break a filesystem: absolute, ``..``, control
and format characters, reserved names, over-long names.
"""

from __future__ import annotations

import posixpath
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from pathvalidate import sanitize_filename

from actors.errors import InvalidTask
from actors.task import DEFAULT_ACCEPT, FileSpec, RequestOptions, TaskSpec

#: Longest single path component (a file or folder name), in bytes of UTF-8: the NAME_MAX of
#: Linux filesystems (ext4, xfs, btrfs, tmpfs). haul adds no suffix to final names.
MAX_NAME_BYTES = 255
#: Longest relative path a task may name, in bytes of UTF-8: leaves 1,024 of Linux's 4,096-byte
#: PATH_MAX for haul's roots (HAUL_STAGING_DIR or HAUL_STORAGE_DIR, the task id, ``files/``).
MAX_PATH_BYTES = 3072
#: Unicode categories refused in paths: controls (C0, DEL, C1 such as U+0085), format characters
#: (bidi overrides such as U+202E, zero-width characters), surrogates (not encodable), and the
#: line and paragraph separators U+2028 and U+2029.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
#: Longest extension (in bytes, after the dot) kept when a derived name is shortened or suffixed.
MAX_EXTENSION_BYTES = 16
#: Longest task name and idempotency key.
MAX_LABEL_CHARS = 500
#: A task's headers: how many, how long each value, and the ones haul sets itself.
MAX_HEADERS = 32
MAX_HEADER_CHARS = 4096
HAUL_HEADERS = frozenset({"host", "range", "if-range", "accept-encoding", "content-length", "transfer-encoding",
                          "connection", "te", "upgrade", "trailer", "proxy-authorization", "cookie"})  # fmt: skip
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
#: Longest cookie file content a task may give.
MAX_COOKIES_CHARS = 256 * 1024
#: Longest format selector a page file may give.
MAX_FORMAT_CHARS = 200
#: Most files one task may hold.
MAX_FILES = 10_000
_CONTENT_PATTERN = re.compile(r"^(\*/\*|[a-z0-9][a-z0-9!#$&^_.+-]*/(\*|[a-z0-9][a-z0-9!#$&^_.+-]*))$")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)


def check_relative_path(path: object, where: str) -> str:
    """Refuse a caller-given path that could escape the task's folder, or that the filesystem
    would refuse later (names are limited in bytes, not characters); return it normalised.

    The caller made the mistake, so this raises :class:`InvalidTask` naming the path rather
    than silently rewriting it into something the backend does not expect.
    """
    if not isinstance(path, str) or path == "":
        raise InvalidTask(f"{where}: path must be a non-empty string")
    hidden = _refused_character(path)
    if hidden is not None:
        raise InvalidTask(
            f"{where}: path {path!r} holds NUL, control or invisible formatting characters (U+{ord(hidden):04X}); "
            "remove them"
        )
    size = len(path.encode())
    if size > MAX_PATH_BYTES:
        raise InvalidTask(f"{where}: path is {size} bytes long in UTF-8; at most {MAX_PATH_BYTES} bytes are allowed")
    if "\\" in path:
        raise InvalidTask(f"{where}: path {path!r} uses a backslash; separate folders with '/'")
    if path.startswith("/"):
        raise InvalidTask(f"{where}: path {path!r} is absolute; give a path relative to the task's folder")
    parts = path.split("/")
    for part in parts:
        if part in {"", ".", ".."}:
            raise InvalidTask(
                f"{where}: path {path!r} has an empty, '.' or '..' component; "
                "give a plain relative path such as 'lesson-01/video.mp4'"
            )
        size = len(part.encode())
        if size > MAX_NAME_BYTES:
            raise InvalidTask(
                f"{where}: path {path!r} has a component of {size} bytes in UTF-8, longer than the "
                f"{MAX_NAME_BYTES} bytes a file or folder name may take; shorten it"
            )
        if _WINDOWS_RESERVED.match(part):
            raise InvalidTask(f"{where}: path {path!r} uses the reserved name {part!r}")
    return posixpath.normpath(path)


def _refused_character(text: str) -> str | None:
    """The first character of ``text`` in :data:`REFUSED_CATEGORIES`, if any (ASCII fast path)."""
    if text.isascii():
        return next((ch for ch in text if ord(ch) < 32 or ord(ch) == 127), None)
    return next((ch for ch in text if unicodedata.category(ch) in REFUSED_CATEGORIES), None)


def check_url(url: object, where: str) -> str:
    if not isinstance(url, str) or not url:
        raise InvalidTask(f"{where}: url must be a non-empty string")
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"}:
        raise InvalidTask(f"{where}: {url!r} is not an http:// or https:// URL")
    if not parts.hostname:
        raise InvalidTask(f"{where}: {url!r} has no host")
    if any(ord(ch) < 33 for ch in url):
        raise InvalidTask(f"{where}: {url!r} holds spaces or control characters; percent-encode them")
    return url


def name_from_url(url: str) -> str:
    """A safe file name for a URL given without a path: its last segment, sanitized, at most
    :data:`MAX_NAME_BYTES` bytes (UTF-8), its extension kept when there is room."""
    segment = unquote(posixpath.basename(urlsplit(url).path))
    segment = "".join("_" if unicodedata.category(ch) in REFUSED_CATEGORIES else ch for ch in segment)
    # Fitted before sanitizing too: pathvalidate cuts a long name from its end, extension first.
    name = sanitize_filename(_fit(segment, ""), replacement_text="_", max_len=MAX_NAME_BYTES).strip(" .")
    return _fit(name, "") or "download"


def _fit(name: str, suffix: str) -> str:
    """``name`` + ``suffix`` (put before the extension) within :data:`MAX_NAME_BYTES` bytes of
    UTF-8: the stem is cut on a character boundary, never inside a UTF-8 sequence."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode()) > MAX_EXTENSION_BYTES:  # no extension worth keeping
        stem, ext = name, ""
    tail = f"{suffix}.{ext}" if ext else suffix
    room = MAX_NAME_BYTES - len(tail.encode())
    cut = stem.encode()[:room].decode(errors="ignore").rstrip(" .")
    return f"{cut}{tail}" if cut or not tail else ""


def _unique(names: Iterable[str]) -> list[str]:
    """Make derived names unique: ``a.mp4``, ``a-2.mp4``, ... (only for names haul chose).

    Compared case-insensitively (casefold), the rule the manifest check applies, so
    ``A.mp4`` and ``a.mp4`` never clash at submit; suffixed names stay within the byte limit.
    """
    seen: set[str] = set()
    result: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate.casefold() in seen:
            n += 1
            candidate = _fit(name, f"-{n}") or f"download-{n}"
        seen.add(candidate.casefold())
        result.append(candidate)
    return result


def spec_from_urls(
    urls: Sequence[str],
    *,
    name: str = "",
    key: str | None = None,
    webhook: str | None = None,
    accept: Sequence[str] | None = None,
    pages: Sequence[str] = (),
    format: str | None = None,
) -> TaskSpec:
    """A task for plain URLs and ``pages`` (resolved by the worker, with ``format``): each file
    is named after its URL's last segment."""
    checked = [check_url(url, f"url #{i}") for i, url in enumerate(urls, start=1)]
    shown = [check_url(page, f"page #{i}") for i, page in enumerate(pages, start=1)]
    if not checked and not shown:
        raise InvalidTask("a task needs at least one URL or page")
    chosen = check_format(format, "format") if shown else None
    if format is not None and not shown:
        raise InvalidTask("format: only pages have formats to choose from; give a page, or no format")
    names = _unique(name_from_url(u) for u in [*checked, *shown])
    files = [FileSpec(url=u, path=p) for u, p in zip(checked, names, strict=False)]
    files += [
        FileSpec(url=u, path=p, page=True, format=chosen) for u, p in zip(shown, names[len(checked) :], strict=True)
    ]
    manifest: dict[str, Any] = {"name": name, "key": key, "webhook": webhook, "files": [f.to_json() for f in files]}
    if accept is not None:
        manifest["accept"] = list(accept)
    return spec_from_manifest(manifest)


def spec_from_manifest(data: object) -> TaskSpec:
    """Validate a manifest (``{"name", "key", "webhook", "files": [{"url" or "page", "path",
    "size"?, "sha256"?, "format"?}]}``; ``format`` only with ``page``)."""
    if not isinstance(data, dict):
        raise InvalidTask("manifest: must be a JSON object with a 'files' list")
    unknown = set(data) - {"name", "key", "webhook", "files", "accept", "headers", "cookies"}
    if unknown:
        raise InvalidTask(
            f"manifest: unknown field(s) {sorted(unknown)}; allowed are name, key, webhook, files, accept, headers, "
            "cookies"
        )
    request = check_request(data.get("headers"), data.get("cookies"))
    accept = check_accept(data.get("accept"))
    name = _optional_str(data.get("name"), "manifest.name") or ""
    key = _optional_str(data.get("key"), "manifest.key")
    webhook = _optional_str(data.get("webhook"), "manifest.webhook")
    if webhook is not None:
        check_url(webhook, "manifest.webhook")
    raw_files = data.get("files")
    if not isinstance(raw_files, list) or not raw_files:
        raise InvalidTask("manifest.files: must be a non-empty list of {url or page, path, size?, sha256?}")
    if len(raw_files) > MAX_FILES:
        raise InvalidTask(f"manifest.files: {len(raw_files)} files; one task holds at most {MAX_FILES}")
    files: list[FileSpec] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(raw_files):
        where = f"manifest.files[{index}]"
        if not isinstance(item, dict):
            raise InvalidTask(f"{where}: must be an object with url and path")
        extra = set(item) - {"url", "page", "path", "size", "sha256", "format"}
        if extra:
            raise InvalidTask(f"{where}: unknown field(s) {sorted(extra)}")
        page = "page" in item
        if page == ("url" in item):
            raise InvalidTask(
                f"{where}: give either url (the file itself) or page (a page showing it, resolved by the worker), "
                "not both or neither"
            )
        url = check_url(item.get("page" if page else "url"), f"{where}.{'page' if page else 'url'}")
        chosen = check_format(item.get("format"), f"{where}.format") if page else None
        if not page and "format" in item:
            raise InvalidTask(f"{where}.format: only a page has formats to choose from; remove it or give page")
        path = check_relative_path(item.get("path"), f"{where}.path")
        folded = path.casefold()
        if folded in seen:
            raise InvalidTask(f"{where}.path: {path!r} is also the path of files[{seen[folded]}]; paths must be unique")
        seen[folded] = index
        size = item.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise InvalidTask(f"{where}.size: must be a whole number of bytes >= 0 (got {size!r})")
        sha = item.get("sha256")
        if sha is not None:
            if not isinstance(sha, str) or not _SHA256.match(sha.lower()):
                raise InvalidTask(f"{where}.sha256: must be 64 hexadecimal characters (got {sha!r})")
            sha = sha.lower()
        files.append(FileSpec(url=url, path=path, size=size, sha256=sha, page=page, format=chosen))
    _check_no_prefix_clash(files)
    return TaskSpec(files=tuple(files), name=name, key=key, webhook=webhook, accept=accept, request=request)


def check_request(headers: object, cookies: object) -> RequestOptions | None:
    """A task's headers (``{"Name": "value"}``) and cookies (Netscape cookie file content), or
    None; the messages never repeat a value (they are secrets)."""
    if headers is None and cookies is None:
        return None
    pairs: list[tuple[str, str]] = []
    if headers is not None:
        if not isinstance(headers, dict) or len(headers) > MAX_HEADERS:
            raise InvalidTask(f"manifest.headers: must be an object of at most {MAX_HEADERS} header names to values")
        for name, value in headers.items():
            if not _HEADER_NAME.match(name) or name.lower() in HAUL_HEADERS or name.lower().startswith("ytdl-"):
                raise InvalidTask(
                    f"manifest.headers: {name[:60]!r} is not a header a task may set (haul sets "
                    f"{', '.join(sorted(HAUL_HEADERS))} itself, and Ytdl-* are yt-dlp's own)"
                )
            if not isinstance(value, str) or not _header_value_ok(value):
                raise InvalidTask(
                    f"manifest.headers.{name}: its value must be Latin-1 text of at most {MAX_HEADER_CHARS} "
                    "characters, without control characters or spaces at either end"
                )
            pairs.append((name, value))
    text = ""
    if cookies is not None:
        if not isinstance(cookies, str) or len(cookies) > MAX_COOKIES_CHARS:
            raise InvalidTask(f"manifest.cookies: must be Netscape cookie file content, at most {MAX_COOKIES_CHARS} "
                              "characters")  # fmt: skip
        lines = cookies.replace("\r\n", "\n").split("\n")
        for number, line in enumerate(lines, start=1):
            if not _cookie_line_ok(line):
                raise InvalidTask(
                    f"manifest.cookies: line {number} is not a cookie of a Netscape cookie file (7 fields separated "
                    "by tabs: domain, TRUE when it starts with a dot, a path from /, TRUE or FALSE, the expiry in "
                    "seconds, name, value); export the cookies again"
                )
        text = "\n".join(lines)
    return RequestOptions(tuple(pairs), text)


def _header_value_ok(value: str) -> bool:
    if len(value) > MAX_HEADER_CHARS or value != value.strip() or _refused_character(value) is not None:
        return False
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _cookie_line_ok(line: str) -> bool:
    """A blank line, a comment, or a cookie as the standard library's reader takes it."""
    if line.startswith("#HttpOnly_"):
        line = line.removeprefix("#HttpOnly_")
    elif not line.strip() or line.startswith("#"):
        return True
    fields = line.split("\t")
    if len(fields) != 7 or any(_refused_character(f) is not None for f in fields):
        return False
    domain, subdomains, path, secure, expiry, name, _ = fields
    return (
        bool(domain) and subdomains in {"TRUE", "FALSE"} and (subdomains == "TRUE") == domain.startswith(".")
        and path.startswith("/") and secure in {"TRUE", "FALSE"} and (expiry == "" or expiry.isdigit())
        and bool(name)
    )  # fmt: skip


def check_format(value: object, where: str) -> str | None:
    """A page's format selector (yt-dlp's syntax, e.g. ``b[height<=720]``), or None."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_FORMAT_CHARS:
        raise InvalidTask(f"{where}: must be a yt-dlp format selector of 1 to {MAX_FORMAT_CHARS} characters")
    if _refused_character(value) is not None:
        raise InvalidTask(f"{where}: {value!r} holds control or invisible formatting characters")
    return value.strip()


def check_accept(value: object, where: str = "manifest.accept") -> tuple[str, ...]:
    """A caller's accept list, lowercased; None means :data:`DEFAULT_ACCEPT`."""
    if value is None:
        return DEFAULT_ACCEPT
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidTask(f'{where}: must be a non-empty list of content types, e.g. ["video/*", "application/pdf"]')
    for pattern in value:
        if not _CONTENT_PATTERN.match(pattern.lower()):
            raise InvalidTask(f"{where}: {pattern!r} is not a content type pattern (type/subtype, type/* or */*)")
    return tuple(v.lower() for v in value)


def _check_no_prefix_clash(files: Sequence[FileSpec]) -> None:
    """``a`` and ``a/b`` cannot both be files: one would have to be a folder."""
    paths = {f.path.casefold() for f in files}
    for f in files:
        parent = posixpath.dirname(f.path)
        while parent:
            if parent.casefold() in paths:
                raise InvalidTask(f"manifest.files: {parent!r} is a file but {f.path!r} needs it to be a folder")
            parent = posixpath.dirname(parent)


def _optional_str(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidTask(f"{where}: must be a string (got {type(value).__name__})")
    if len(value) > MAX_LABEL_CHARS:
        raise InvalidTask(f"{where}: {len(value)} characters; at most {MAX_LABEL_CHARS}")
    if any(ord(ch) < 32 for ch in value):
        raise InvalidTask(f"{where}: holds control characters")
    return value
