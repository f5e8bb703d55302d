"""The task model: what a task is and asks for, and the validation of what a caller submits.

Pure: no I/O, no clock, no randomness that a test cannot pass in. Its states and their moves
are in :mod:`actors.states`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from actors.errors import InvalidTask
from actors.states import State

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
    """One file of a task: where it comes from, where it goes inside the task's folder.

    ``page``: ``url`` is a page (a share link, a streaming site's page) that the worker resolves
    to the media's own URL when it downloads (:mod:`actors.pages`), choosing with ``format``
    (a yt-dlp format selector; HAUL_RESOLVE_FORMAT when None)."""

    url: str
    path: str
    size: int | None = None
    sha256: str | None = None
    page: bool = False
    format: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"page" if self.page else "url": self.url, "path": self.path}
        if self.format is not None:
            data["format"] = self.format
        if self.size is not None:
            data["size"] = self.size
        if self.sha256 is not None:
            data["sha256"] = self.sha256
        return data


@dataclass(frozen=True)
class RequestOptions:
    """Headers and cookies a task's origins need (a site behind a sign-in): secrets, sent with
    its requests (pages, and files of the hosts the cookies name) and shown nowhere: not in
    status, events, webhooks or logs. Kept with the task's spec until the task is pruned."""

    headers: tuple[tuple[str, str], ...] = ()
    #: Netscape cookie file content (as browsers' export extensions and ``yt-dlp --cookies`` write it).
    cookies: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"headers": [list(h) for h in self.headers], "cookies": self.cookies}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> RequestOptions | None:
        if not data:
            return None
        return cls(tuple((str(k), str(v)) for k, v in data.get("headers", ())), str(data.get("cookies", "")))

    @property
    def digest(self) -> str:
        """What tells two requests' options apart, without holding them."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TaskSpec:
    """What a caller asks for: validated, immutable once stored."""

    files: tuple[FileSpec, ...]
    name: str = ""
    key: str | None = None
    webhook: str | None = None
    accept: tuple[str, ...] = DEFAULT_ACCEPT
    request: RequestOptions | None = None

    @property
    def known_bytes(self) -> int:
        """The sum of the sizes the caller gave (a new task's ``bytes_total`` until the origins
        tell the rest)."""
        return sum(f.size or 0 for f in self.files)


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
    #: Bytes the latest finalize put in storage (resumed parts included).
    bytes_stored: int = 0
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
    #: A done task's files as stored (:func:`storage_fields` of each task.completed entry).
    stored: tuple[Mapping[str, Any], ...] = ()
    #: The files finished (indexes, in the order they finished) as the last run reported them.
    finished: tuple[int, ...] = ()
    #: While downloading: each file in flight as (index, bytes done, bytes total or 0, connections).
    active: tuple[tuple[int, int, int, int], ...] = ()
    #: What each page file resolved to in the latest run that resolved it, by index
    #: (:meth:`actors.pages.Resolved.record`).
    resolved: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def connections(self) -> int:
        """Connections to origins the task's download holds open now."""
        return sum(entry[3] for entry in self.active) if self.state is State.DOWNLOADING else 0

    @property
    def bytes_total_known(self) -> bool:
        """False while a file without a size in the spec has not started downloading."""
        if self.state in (State.FINALIZING, State.DONE):
            return True
        # Files finish out of order side by side; a run reporting no order fetched in order
        finished = set(self.finished) if self.finished else set(range(self.files_done))
        sized = finished | {index for index, _, total, _ in self.active if total}
        return all(f.size is not None or i in sized for i, f in enumerate(self.spec.files))

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
            "bytes_stored": self.bytes_stored,
            "error": self.error or None,
            "waiting": self.waiting(),
            "worker": self.worker or None,
            "lease_until": iso_time(self.lease_until),
            "not_before": iso_time(self.not_before),
            "webhook": self.spec.webhook,
            "created_at": iso_time(self.created_at),
            "updated_at": iso_time(self.updated_at),
            "connections": self.connections,
            "files": self._files_status(),
        }

    def _files_status(self) -> list[dict[str, Any]]:
        """Each file as asked for, with how far it is (``state``: ``done``, ``downloading``
        with its ``bytes_done``, ``connections`` and, once the origin said it, ``bytes_total``;
        or ``waiting``); once stored, with where
        (and its link) as task.completed said."""
        stored = {entry.get("path"): entry for entry in self.stored}
        finished = set(self.finished) if self.finished else set(range(self.files_done))
        active = {index: (done, total, conns) for index, done, total, conns in self.active} if self.connections else {}
        entries = []
        for index, f in enumerate(self.spec.files):
            if self.state in (State.FINALIZING, State.DONE) or index in finished:
                progress: dict[str, Any] = {"state": "done"}
            elif index in active:
                done, total, conns = active[index]
                progress = {"state": "downloading", "bytes_done": done, "connections": conns}
                if total:  # the origin said its size
                    progress["bytes_total"] = total
            else:
                progress = {"state": "waiting"}
            resolved = {"resolved": dict(self.resolved[index])} if index in self.resolved else {}
            entries.append(f.to_json() | progress | resolved | dict(stored.get(f.path, {})))
        return entries


#: What status keeps of a task.completed file entry: not its URL (the spec's, shown as given).
STORED_FIELDS = ("path", "size", "sha256", "location", "verified", "link", "link_expires_at")


def storage_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a task.completed file entry that says where and how the file was stored."""
    return {name: entry[name] for name in STORED_FIELDS if name in entry}


def iso_time(seconds: float) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds (as webhooks carry them); 0 is None."""
    if not seconds:
        return None
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def request_of(spec: TaskSpec) -> dict[str, Any]:
    """What makes two submissions under one idempotency key "the same request": every file's
    url (or page and format), path, size and sha256 (in order), accept (as a set), webhook and
    name; not the key."""
    return {
        "files": [[f.url, f.path, f.size, f.sha256, *([f.format or ""] if f.page else [])] for f in spec.files],
        "accept": sorted(set(spec.accept)),
        "webhook": spec.webhook,
        "name": spec.name,
        **({"request": spec.request.digest} if spec.request is not None else {}),
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
        for name in ("url", "page", "format", "path", "size", "sha256"):
            if getattr(a, name) != getattr(b, name):
                return f"files[{index}].{name}"
    if set(first.accept) != set(again.accept):
        return "accept"
    if first.webhook != again.webhook:
        return "webhook"
    if first.name != again.name:
        return "name"
    if (first.request and first.request.digest) != (again.request and again.request.digest):
        return "headers or cookies"
    return None


def files_from_json(items: Sequence[Mapping[str, Any]]) -> tuple[FileSpec, ...]:
    return tuple(
        FileSpec(url=f.get("url") or f["page"], path=f["path"], size=f.get("size"), sha256=f.get("sha256"),
                 page="page" in f, format=f.get("format"))
        for f in items
    )  # fmt: skip
