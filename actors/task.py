"""The task model: what a task is and asks for, and the validation of what a caller submits.

Pure: no I/O, no clock, no randomness that a test cannot pass in. Its states and their moves
are in :mod:`actors.states`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import random
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from pathvalidate import sanitize_filename

from actors.errors import InvalidTask
from actors.states import State

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
#: Most files one task may hold.
MAX_FILES = 10_000
#: Content types a task accepts unless it says otherwise: what course and video businesses ship
#: (media, PDFs, subtitles, archives, HLS and DASH playlists) and "just bytes"; never text/html,
#: which is usually a login or error page served in place of the file.
DEFAULT_ACCEPT = (
    "video/*", "audio/*", "image/*", "application/pdf",
    "text/vtt", "application/x-subrip", "text/srt",
    "application/zip", "application/x-7z-compressed", "application/x-rar-compressed", "application/gzip",
    "application/x-tar",
    "application/octet-stream", "binary/octet-stream", "application/mp4",
    "application/vnd.apple.mpegurl", "application/x-mpegurl", "application/dash+xml",
)  # fmt: skip
_CONTENT_PATTERN = re.compile(r"^(\*/\*|[a-z0-9][a-z0-9!#$&^_.+-]*/(\*|[a-z0-9][a-z0-9!#$&^_.+-]*))$")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)


class KeyConflict(InvalidTask):
    """An idempotency key was given again with a different request (the message names the
    first differing field), or ``replace`` was asked for a task that cannot be replaced."""


def backoff_seconds(attempt: int, minimum: float, maximum: float, rng: random.Random | None = None) -> float:
    """Delay before run ``attempt + 1``: exponential from ``minimum``, capped, with full jitter.

    Full jitter (a uniform draw below the exponential bound, never under ``minimum``) spreads
    the retries of many tasks that failed together, e.g. when one origin had an outage.
    """
    bound = min(maximum, minimum * (2 ** max(0, attempt - 1)))
    draw = (rng or random).uniform(minimum, max(minimum, bound))
    return float(draw)


@dataclass(frozen=True)
class FileSpec:
    """One file of a task: where it comes from, where it goes inside the task's folder."""

    url: str
    path: str
    size: int | None = None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"url": self.url, "path": self.path}
        if self.size is not None:
            data["size"] = self.size
        if self.sha256 is not None:
            data["sha256"] = self.sha256
        return data


@dataclass(frozen=True)
class TaskSpec:
    """What a caller asks for: validated, immutable once stored."""

    files: tuple[FileSpec, ...]
    name: str = ""
    key: str | None = None
    webhook: str | None = None
    accept: tuple[str, ...] = DEFAULT_ACCEPT


@dataclass(frozen=True)
class Task:
    """A stored task as read back from the store."""

    id: str
    spec: TaskSpec
    state: State
    attempts: int = 0
    token: int = 0
    run: int = 0
    lease_until: float = 0.0
    not_before: float = 0.0
    worker: str = ""
    error: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    #: This run's task.completed is being delivered: the task can only end done now.
    announced: bool = False
    #: The last error's machine-readable code (actors/errors.py) and the file it is about.
    error_code: str = ""
    error_file: str = ""
    #: A finalizing task between runs: ``slot`` (waiting for a finalize slot) or ``outage``
    #: (parked while its storage or receiver is down); its next try is at ``resting_until``.
    resting: str = ""
    resting_until: float = 0.0
    #: A queued task refused a stage slot: since when it has been waiting for one.
    waiting_since: float = 0.0
    #: ... behind which limit (a ``haul_claims_refused_total`` reason), and which host for a
    #: per-host slot.
    waiting_on: str = ""
    waiting_host: str = ""

    @property
    def bytes_total_known(self) -> bool:
        """False while a file without a size in the spec has not started downloading (files
        are fetched in order: the one at ``files_done`` is the current one when downloading)."""
        if self.state in (State.FINALIZING, State.DONE):
            return True
        first_unstarted = self.files_done + (1 if self.state is State.DOWNLOADING else 0)
        return all(f.size is not None for f in self.spec.files[first_unstarted:])

    def waiting(self) -> dict[str, Any] | None:
        """What the task waits for, and until (or since) when; None when it waits for nothing
        haul records (a claim message on its way, say)."""
        if self.state is State.FINALIZING and self.resting:
            what = "outage" if self.resting == "outage" else "finalize_slot"
            return {"for": what, "until": iso_time(self.resting_until)}
        if self.state is State.QUEUED and self.waiting_since:
            behind = {"limit": self.waiting_on} | ({"host": self.waiting_host} if self.waiting_host else {})
            return {"for": "stage_slot", **behind, "since": iso_time(self.waiting_since)}
        if self.state is State.QUEUED and self.not_before:
            return {"for": "backoff", "until": iso_time(self.not_before)}
        return None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def files_total(self) -> int:
        return len(self.spec.files)

    def as_status(self) -> dict[str, Any]:
        """The public shape of ``haul status ID --json``."""
        return {
            "id": self.id,
            "name": self.spec.name,
            "key": self.spec.key,
            "state": self.state.value,
            "attempts": self.attempts,
            "files_total": self.files_total,
            "files_done": self.files_done,
            "bytes_total": self.bytes_total,
            "bytes_total_known": self.bytes_total_known,
            "bytes_done": self.bytes_done,
            "error": self.error or None,
            "waiting": self.waiting(),
            "worker": self.worker or None,
            "lease_until": iso_time(self.lease_until),
            "not_before": iso_time(self.not_before),
            "webhook": self.spec.webhook,
            "created_at": iso_time(self.created_at),
            "updated_at": iso_time(self.updated_at),
            "files": [f.to_json() for f in self.spec.files],
        }


def iso_time(seconds: float) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds (as webhooks carry them); 0 is None."""
    if not seconds:
        return None
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def request_of(spec: TaskSpec) -> dict[str, Any]:
    """What makes two submissions under one idempotency key "the same request": every file's
    url, path, size and sha256 (in order), accept (as a set), webhook and name; not the key."""
    return {
        "files": [[f.url, f.path, f.size, f.sha256] for f in spec.files],
        "accept": sorted(set(spec.accept)),
        "webhook": spec.webhook,
        "name": spec.name,
    }


def request_hash(spec: TaskSpec) -> str:
    """sha256 of :func:`request_of` as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(request_of(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def first_difference(first: TaskSpec, again: TaskSpec) -> str | None:
    """The first field in which ``again`` differs from ``first`` (``files[2].size``), or None."""
    if len(first.files) != len(again.files):
        return f"files (the first request has {len(first.files)} file(s), this one {len(again.files)})"
    for index, (a, b) in enumerate(zip(first.files, again.files, strict=True)):
        for field in ("url", "path", "size", "sha256"):
            if getattr(a, field) != getattr(b, field):
                return f"files[{index}].{field}"
    if set(first.accept) != set(again.accept):
        return "accept"
    if first.webhook != again.webhook:
        return "webhook"
    if first.name != again.name:
        return "name"
    return None


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
) -> TaskSpec:
    """A task for plain URLs: each file is named after its URL's last segment."""
    checked = [check_url(url, f"url #{i}") for i, url in enumerate(urls, start=1)]
    if not checked:
        raise InvalidTask("a task needs at least one URL")
    files = tuple(
        FileSpec(url=u, path=p) for u, p in zip(checked, _unique(name_from_url(u) for u in checked), strict=True)
    )
    manifest: dict[str, Any] = {"name": name, "key": key, "webhook": webhook, "files": [f.to_json() for f in files]}
    if accept is not None:
        manifest["accept"] = list(accept)
    return spec_from_manifest(manifest)


def spec_from_manifest(data: object) -> TaskSpec:
    """Validate a manifest (``{"name", "key", "webhook", "files": [{"url", "path", "size"?, "sha256"?}]}``)."""
    if not isinstance(data, dict):
        raise InvalidTask("manifest: must be a JSON object with a 'files' list")
    unknown = set(data) - {"name", "key", "webhook", "files", "accept"}
    if unknown:
        raise InvalidTask(
            f"manifest: unknown field(s) {sorted(unknown)}; allowed are name, key, webhook, files, accept"
        )
    accept = check_accept(data.get("accept"))
    name = _optional_str(data.get("name"), "manifest.name") or ""
    key = _optional_str(data.get("key"), "manifest.key")
    webhook = _optional_str(data.get("webhook"), "manifest.webhook")
    if webhook is not None:
        check_url(webhook, "manifest.webhook")
    raw_files = data.get("files")
    if not isinstance(raw_files, list) or not raw_files:
        raise InvalidTask("manifest.files: must be a non-empty list of {url, path, size?, sha256?}")
    if len(raw_files) > MAX_FILES:
        raise InvalidTask(f"manifest.files: {len(raw_files)} files; one task holds at most {MAX_FILES}")
    files: list[FileSpec] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(raw_files):
        where = f"manifest.files[{index}]"
        if not isinstance(item, dict):
            raise InvalidTask(f"{where}: must be an object with url and path")
        extra = set(item) - {"url", "path", "size", "sha256"}
        if extra:
            raise InvalidTask(f"{where}: unknown field(s) {sorted(extra)}")
        url = check_url(item.get("url"), f"{where}.url")
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
        files.append(FileSpec(url=url, path=path, size=size, sha256=sha))
    _check_no_prefix_clash(files)
    return TaskSpec(files=tuple(files), name=name, key=key, webhook=webhook, accept=accept)


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


def files_from_json(items: Sequence[Mapping[str, Any]]) -> tuple[FileSpec, ...]:
    return tuple(FileSpec(url=f["url"], path=f["path"], size=f.get("size"), sha256=f.get("sha256")) for f in items)
