"""Safe joining of task-given relative paths onto haul's folders."""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

from actors.errors import UnsafePath


def inside(root: Path, relative: str, *, what: str, under: str = "") -> Path:
    """``root / under / relative``, refused unless it resolves inside ``root / under``
    (symlinks followed). ``under`` is a folder haul made (a task's), never task input.

    Task paths were validated at submit; this is the last check before a byte is written, so a
    symlink planted in a folder, or a path that slipped past validation, still cannot escape.
    """
    if os.path.isabs(relative) or "\x00" in relative:
        raise UnsafePath(f"{what}: path {relative!r} is absolute or holds NUL")
    top = _resolved(root)
    base = top / under if under else top
    target = base / relative
    if not _plain(top, target):
        target = Path(os.path.realpath(target))
    if target == base or not target.is_relative_to(base):
        raise UnsafePath(f"{what}: path {relative!r} would land outside {root / under}")
    return target


def _plain(top: Path, joined: Path) -> bool:
    """True when nothing below ``top`` on the way to ``joined`` is ``..`` or a symlink.

    Then ``joined`` is already its own real path (``top`` is resolved), and the full
    ``realpath`` (one lstat per component from ``/``) is spared; it runs in every other case.
    """
    path = top
    for part in joined.parts[len(top.parts) :]:
        if part == "..":
            return False
        path = path / part
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return False
        except FileNotFoundError:
            return True  # the rest does not exist yet: nothing there to follow
    return True


@functools.lru_cache(maxsize=64)
def _resolved(root: Path) -> Path:
    """Roots (staging, storage) are resolved once: haul creates them and never relinks them."""
    return root.resolve()


def fsync_dir(path: Path) -> None:
    """Make a rename or link inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
