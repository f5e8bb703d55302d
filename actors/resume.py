"""The HTTP resume protocol of a ``.part``: what version its bytes are of, what to ask the
origin for, and whether the answer continues them.

A ``.part`` keeps, beside it, the validator (strong ETag, else Last-Modified) of the version its
bytes belong to. The next attempt asks for the rest with ``Range`` + ``If-Range`` and keeps the
bytes only when the origin answers 206 for exactly the offset asked with the same validator;
a 200 restarts the file, another validator raises :class:`PartUnusable`, so old and new bytes
are never spliced together.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import requests

from actors.errors import OriginUnavailable, PartUnusable, StorageUnavailable
from actors.httprules import int_header

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class Validator:
    """What identifies the version of a file a ``.part`` holds bytes of."""

    etag: str | None = None
    last_modified: str | None = None

    @property
    def if_range(self) -> str | None:
        """The ``If-Range`` value, or None when nothing reliable identifies the version."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    @classmethod
    def of(cls, response: requests.Response) -> Validator:
        return cls(etag=response.headers.get("ETag"), last_modified=response.headers.get("Last-Modified"))


def meta_path_of(part: Path) -> Path:
    """Where the validator of ``part``'s bytes is kept."""
    return part.with_suffix(part.suffix + ".json")


def resume_point(part: Path) -> tuple[int, Validator]:
    """How many bytes of ``part`` can be kept, given what is known of their version."""
    try:
        size = part.stat().st_size
        meta = json.loads(meta_path_of(part).read_text())
    except (OSError, ValueError):
        return 0, Validator()
    validator = Validator(etag=meta.get("etag"), last_modified=meta.get("last_modified"))
    return (size, validator) if validator.if_range else (0, validator)


def request_headers(offset: int, validator: Validator) -> dict[str, str]:
    """The GET's headers: the bytes as stored (no content coding), from ``offset`` if it can
    be continued."""
    headers = {"Accept-Encoding": "identity"}
    if offset and validator.if_range:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = validator.if_range
    return headers


def start_point(response: requests.Response, offset: int, validator: Validator, where: str) -> tuple[int, int | None]:
    """Where writing starts (``offset`` to resume, 0 to restart) and the full size if known."""
    length = int_header(response, "Content-Length")
    if response.status_code == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if not offset or not match or int(match.group(1)) != offset:
            raise OriginUnavailable(
                f"{where}: the origin answered 206 with Content-Range "
                f"{response.headers.get('Content-Range')!r} to a request from byte {offset}"
            )
        if Validator.of(response).if_range not in (None, validator.if_range):
            raise PartUnusable(f"{where}: the file changed on the origin (new validator)")
        total = None if match.group(3) == "*" else int(match.group(3))
        return offset, total
    if offset:
        log.info("%s: the origin sent the whole file instead of the rest; restarting it", where)
    return 0, length


def write_meta(part: Path, validator: Validator, where: str, content_type: str | None = None) -> None:
    """Record the version of ``part``'s bytes (only once it holds exactly the bytes kept), and
    the content type the origin gave them (the stored file gets it)."""
    meta = {"etag": validator.etag, "last_modified": validator.last_modified, "content_type": content_type}
    data = json.dumps(meta).encode()
    try:
        fd = os.open(meta_path_of(part), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageUnavailable(f"{where}: cannot write to staging ({exc.strerror})") from exc


def discard_part(part: Path) -> None:
    """Forget a ``.part`` and what identified its version."""
    for path in (part, meta_path_of(part)):
        path.unlink(missing_ok=True)
