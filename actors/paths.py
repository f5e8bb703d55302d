"""Safe joining of task-given relative paths onto haul's folders."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from actors.errors import UnsafePath


def inside(root: Path, relative: str, *, what: str) -> Path:
    """``root / relative``, refused unless it resolves inside ``root`` (symlinks followed).

    Task paths were validated at submit; this is the last check before a byte is written, so a
    symlink planted in a folder, or a path that slipped past validation, still cannot escape.
    """
    if os.path.isabs(relative) or "\x00" in relative:
        raise UnsafePath(f"{what}: path {relative!r} is absolute or holds NUL")
    base = _resolved(root)
    target = Path(os.path.realpath(base / relative))
    if target == base or not target.is_relative_to(base):
        raise UnsafePath(f"{what}: path {relative!r} would land outside {root}")
    return target


@functools.lru_cache(maxsize=1024)
def _resolved(root: Path) -> Path:
    """Roots (storage, a sandbox) are resolved once: haul creates them and never relinks them."""
    return root.resolve()


def fsync_dir(path: Path) -> None:
    """Make a rename or link inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
