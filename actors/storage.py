"""Where finished files go: ``<HAUL_STORAGE_DIR>/<task id>/<file path>``.

The destination is a function of the task alone, so committing twice (a duplicate message, a
finalize killed half-way) ends with exactly one copy. Each file appears atomically: a hard
link when staging and storage share a filesystem (instant, and staging keeps its copy until
the task is done), else a copy to a temporary name, fsync, and rename.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actors.errors import StorageUnavailable, TransientError
from actors.paths import fsync_dir, inside
from actors.sandbox import Sandbox, check_task_id
from actors.task import FileSpec


class LocalStorage:
    """A directory tree on a local or mounted filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def task_dir(self, task_id: str) -> Path:
        return self.root / check_task_id(task_id)

    def commit(self, sandbox: Sandbox, files: Sequence[FileSpec]) -> list[dict[str, Any]]:
        """Put every finished file of the sandbox into storage; return what the webhook reports."""
        task_id = sandbox.task_id
        target_root = self.task_dir(task_id)
        try:
            target_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(
                f"task {task_id}: cannot create {target_root} ({exc.strerror}); check HAUL_STORAGE_DIR"
            ) from exc
        stored = []
        for spec in files:
            source = sandbox.file(spec)
            target = inside(self.root, spec.path, under=task_id, what=f"task {task_id}")
            try:
                size = self._place(source, target, nested="/" in spec.path)
            except FileNotFoundError as exc:
                raise TransientError(
                    f"task {task_id}: the finished file {spec.path!r} is missing from staging; "
                    "it will be downloaded again"
                ) from exc
            except OSError as exc:
                raise StorageUnavailable(
                    f"task {task_id}: storing {spec.path!r} in {target_root} failed ({exc.strerror})"
                ) from exc
            entry: dict[str, Any] = {"path": spec.path, "size": size, "url": spec.url, "location": str(target)}
            if spec.sha256:
                entry["sha256"] = spec.sha256
            stored.append(entry)
        return stored

    @staticmethod
    def _place(source: Path, target: Path, *, nested: bool) -> int:
        """Make ``target`` the finished ``source`` (unless an earlier run did); return its size.
        ``nested``: the path has folders of its own below the task's (made here)."""
        placed, staged = _stat(target), _stat(source)
        if placed is not None and (staged is None or os.path.samestat(placed, staged)):
            return placed.st_size  # committed by an earlier run (and maybe staging cleaned since)
        if staged is None:
            raise FileNotFoundError(errno.ENOENT, "missing from staging", str(source))
        if nested:
            target.parent.mkdir(parents=True, exist_ok=True)
        # A fixed name: a run killed half-way leaves at most this one, which the next run reuses.
        temporary = target.with_name(f".{target.name}.haul-tmp")
        try:
            try:
                _link_over(source, temporary)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP):  # no hard links here
                    raise
                shutil.copyfile(source, temporary)
                with temporary.open("rb+") as handle:
                    os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return staged.st_size


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _link_over(source: Path, link: Path) -> None:
    """Hard-link ``source`` as ``link``, replacing a stray left there by a killed run."""
    try:
        os.link(source, link)
    except FileExistsError:
        link.unlink()
        os.link(source, link)
