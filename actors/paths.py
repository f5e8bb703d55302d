"""Safe joining of task-given relative paths onto haul's folders."""

from __future__ import annotations

import errno
import functools
import os
import stat
from pathlib import Path

from actors.errors import UnsafePath


def inside(root: Path, relative: str, *, what: str, under: str = "") -> Path:
    """``root / under / relative``, refused unless it resolves inside ``root / under``
    (symlinks followed). ``under`` is a folder haul made (a task's), never task input.

    Task paths were validated at submit; this is the last check before a byte is written, so a
    symlink planted in a folder, or a path that slipped past validation (a spec written to the
    store directly), still cannot escape. ``..`` is refused outright wherever it stands: below a
    folder that does not exist yet it cannot be resolved, and ``mkdir(parents=True)`` would
    then create the climb. Plain strings rather than pathlib: this runs several times per task.
    """
    if os.path.isabs(relative) or "\x00" in relative:
        raise UnsafePath(
            f"{what}: path {relative!r} is absolute or holds NUL; give a path relative to the task's folder"
        )
    parts = [part for part in f"{under}/{relative}".split("/") if part and part != "."]
    if ".." in parts:
        raise UnsafePath(
            f"{what}: path {relative!r} has a '..' component and could land outside {root / under}; "
            "give a plain relative path such as 'lesson-01/video.mp4'"
        )
    top = _resolved(root)
    target = os.path.join(top, *parts)
    try:
        plain = _plain(top, parts)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise UnsafePath(
                f"{what}: path {relative!r} is too long for the filesystem under {root} ({exc.strerror}); "
                "use names of at most 255 bytes"
            ) from exc
        raise
    if not plain:
        target = os.path.realpath(target)
    base = os.path.join(top, under) if under else top
    if not target.startswith(base.rstrip(os.sep) + os.sep):
        raise UnsafePath(f"{what}: path {relative!r} would land outside {root / under}")
    return Path(target)


def _plain(top: str, parts: list[str]) -> bool:
    """True when nothing below ``top`` along ``parts`` is a symlink (``parts`` holds no ``..``).

    Then the joined path is already its own real path (``top`` is resolved), and the full
    ``realpath`` (one lstat per component from ``/``) is spared; it runs in every other case.
    Below the first folder that does not exist nothing can be a symlink.
    """
    path = top
    for part in parts:
        path = os.path.join(path, part)
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return False
        except FileNotFoundError:
            return True  # the rest does not exist yet: nothing there to follow
    return True


@functools.lru_cache(maxsize=64)
def _resolved(root: Path) -> str:
    """Roots (staging, storage) are resolved once: haul creates them and never relinks them."""
    return os.path.realpath(root)


def fsync_dir(path: Path) -> None:
    """Make a rename or link inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
