"""The arithmetic and headers of an S3 upload: part sizes within S3's limits, the ETag a
multipart object gets, and the headers that make a stored file download under its name."""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Sequence
from urllib.parse import quote

from actors.task import FileSpec

MIB = 1024 * 1024
#: S3's smallest part (but the last), and the most parts one upload may have.
MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PARTS = 10_000
#: The part size haul starts from; grown (in whole MiB) so a file stays under MAX_PARTS.
DEFAULT_PART_BYTES = 8 * 1024 * 1024


def part_size_for(size: int, wanted: int = DEFAULT_PART_BYTES) -> int:
    """``wanted``, grown to whole MiB just large enough for ``size`` in :data:`MAX_PARTS` parts."""
    part = max(wanted, MIN_PART_BYTES)
    if size > part * MAX_PARTS:
        least = -(-size // MAX_PARTS)  # ceiling division
        part = -(-least // MIB) * MIB
    return part


def multipart_etag(md5s: Sequence[bytes]) -> str:
    """The ETag S3 gives a multipart object: MD5 of the parts' MD5s, a dash, the part count."""
    return f"{hashlib.md5(b''.join(md5s)).hexdigest()}-{len(md5s)}"


def content_disposition(path: str) -> str:
    """``attachment`` with the file's name (RFC 6266: an ASCII fallback and the UTF-8 name)."""
    name = path.rsplit("/", 1)[-1]
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def content_type(spec: FileSpec) -> str:
    """The file's type by its extension (the origin's own is not kept with the staged file)."""
    return mimetypes.guess_type(spec.path)[0] or "application/octet-stream"
