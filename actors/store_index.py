"""The task store's search indexes: tasks by name prefix and by origin host, for the operator
dashboard, found without a scan of the keyspace. Keys (built in :mod:`actors.store_base`)::

    haul:index:name         sorted set, every score 0: '<folded name>\\0<task id>' (ZRANGEBYLEX)
    haul:index:names        hash: task id -> its member of index:name, for prune
    haul:index:host:<host>  sorted set: ids of the tasks with a file on <host>, by created_at

``create.lua`` writes a task's entries with the task, ``prune.lua`` removes them with it. The
name member is kept apart from the task hash because Lua cannot casefold, and a value longer
than 64 bytes on the hash would turn it from Redis's compact encoding into a hash table (3x its
memory); the hosts are the first :data:`MAX_INDEXED_HOSTS` of the hash's ``hosts`` field.

Pure: members, hosts and bounds; the reads are ``TaskStore.tasks_by_name`` and
``TaskStore.tasks_by_host``.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from actors.task import FileSpec

#: Most characters of a casefolded name the index keeps: a longer name is found by its first 200
#: (a prefix is cut the same way), so a member stays under 1 KiB whatever the name.
MAX_INDEXED_NAME_CHARS = 200
#: Most hosts of one task the host index lists: the first in sorted order (the hash's ``hosts``
#: field), so a task of thousands of files on as many hosts costs bounded writes at create and
#: prune. It is found under those 16 only.
MAX_INDEXED_HOSTS = 16

#: Separates the folded name from the task id in a member; removed from names, so a member holds
#: exactly one (the manifest refuses control characters in names anyway).
SEPARATOR = "\x00"


def folded(text: str) -> str:
    """``text`` as the name index compares it: casefolded (``KHÓA`` finds "khóa"; ``STRASSE``
    finds "Straße"), without NUL, its first :data:`MAX_INDEXED_NAME_CHARS` characters."""
    return text.casefold().replace(SEPARATOR, "")[:MAX_INDEXED_NAME_CHARS]


def name_member(name: str, task_id: str) -> str:
    """The task's member of the name index; '' for a name that folds to nothing (not indexed)."""
    key = folded(name)
    return f"{key}{SEPARATOR}{task_id}" if key else ""


def task_id_of(member: str) -> str:
    return member.rpartition(SEPARATOR)[2]


def name_range(prefix: str, after: str | None = None) -> tuple[bytes, bytes]:
    """ZRANGEBYLEX bounds of the members whose name starts with ``prefix`` (folded), past the
    member ``after`` when it is inside them. The upper bound is the prefix's UTF-8 then 0xFF, a
    byte UTF-8 never holds: every name with that prefix sorts below it, whatever its characters."""
    start = folded(prefix).encode()
    if not start:
        raise ValueError(
            f"a name prefix must hold at least one character (got {prefix!r}); list tasks by state to see them all"
        )
    low = b"[" + start
    if after is not None and after.encode() >= start:
        low = b"(" + after.encode()
    return low, b"[" + start + b"\xff"


def task_hosts(files: Iterable[FileSpec]) -> list[str]:
    """The distinct hostnames of a task's files (a page file's page), sorted: lowercased, no port
    or userinfo, an IDN as urllib gives it. The task hash's ``hosts`` field, which per-host slots
    and the host index read."""
    return sorted({host for f in files if (host := urlsplit(f.url).hostname)})
