"""Where finished files go: ``<HAUL_STORAGE_DIR>/<task id>/<file path>``.

The destination is a function of the task alone, so committing twice (a duplicate message, a
finalize killed half-way) ends with exactly one copy. Each file appears atomically: a hard
link when staging and storage share a filesystem (instant, and staging keeps its copy until
the task is done), else a copy to a temporary file, fsync, and rename.

Temporaries live in ``<HAUL_STORAGE_DIR>/.haul-tmp/`` (no task id starts with a dot), each
with a name of its own: two runs of one task (a stale holder waking up beside its successor)
never write into each other's copy, and no file a task names can be taken for one. A killed
run's temporary is left there; the supervisor's prune removes old ones.
"""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from actors.diskio import Writeback
from actors.errors import StorageUnavailable, TransientError, UnsafePath
from actors.lease import DISK_STEP_SECONDS, Step, no_step
from actors.paths import fsync_dir, inside
from actors.sandbox import Sandbox, check_task_id
from actors.store_uploads import Uploads
from actors.task import FileSpec

#: Folder of in-progress copies, inside the storage root (so a rename into place is atomic).
TEMPORARY_DIR = ".haul-tmp"
#: Bytes copied per step when storage is on another filesystem than staging.
COPY_CHUNK_BYTES = 8 * 1024 * 1024

#: Called right before a file is renamed into place; raises to stop (the lease fence, checked
#: against Redis: a cancel that won must stop storing at once, not at the next renewal).
Fence = Callable[[], None]


def _no_fence() -> None:
    """For callers that hold no lease (tests, tools)."""


#: Told as a file (or a part of one) is in storage: its bytes, and whether this run sent them
#: (False: an earlier run did). Status's ``bytes_stored`` counts both; the stage metrics count
#: only what was sent.
OnStored = Callable[[int, bool], None]


def not_followed(stored: int, sent: bool) -> None:
    """For callers that do not follow how much is stored."""


def missing_from_staging(task_id: str, spec: FileSpec) -> TransientError:
    """A finished file gone from staging (cleaned up by hand, a lost disk): downloaded again."""
    return TransientError(
        f"task {task_id}: the finished file {spec.path!r} is missing from staging; it will be downloaded again"
    )


def file_entry(
    spec: FileSpec, size: int, location: str, digest: str | None, verified: str | None = None
) -> dict[str, Any]:
    """A stored file as task.completed lists it (every storage alike)."""
    entry: dict[str, Any] = {"path": spec.path, "size": size, "url": spec.url, "location": location}
    if verified is not None:
        entry["verified"] = verified
    if digest:
        entry["sha256"] = digest
    return entry


class Storage(Protocol):
    """Where a finalize puts a task's finished files: :class:`LocalStorage` or
    :class:`actors.s3storage.S3Storage`."""

    def commit(
        self,
        sandbox: Sandbox,
        files: Sequence[FileSpec],
        step: Step = no_step,
        fence: Fence = _no_fence,
        *,
        sha256: bool = False,
        task_key: str | None = None,
        ledger: Uploads | None = None,
        on_stored: OnStored = not_followed,
    ) -> list[dict[str, Any]]:
        """Store every finished file of ``sandbox`` (idempotent: committing twice leaves one
        copy); return the entries task.completed lists. ``fence`` is called right before each
        file becomes visible; ``task_key`` is the task's idempotency key (for key templates);
        ``ledger`` keeps how far an interrupted upload got."""
        ...

    def describe(self) -> str:
        """Where files go, for log lines and messages."""
        ...

    def close(self) -> None:
        """Release connections (a worker's at its exit)."""
        ...

    def probe(self, who: str) -> tuple[list[str], list[str]]:
        """Whether files can be stored now (a write and a delete): (problems, warnings)."""
        ...


class LocalStorage:
    """A directory tree on a local or mounted filesystem (it needs no key or upload ledger)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def task_dir(self, task_id: str) -> Path:
        return self.root / check_task_id(task_id)

    @property
    def temporary_dir(self) -> Path:
        return self.root / TEMPORARY_DIR

    def describe(self) -> str:
        return str(self.root)

    def close(self) -> None:
        """Nothing to release."""

    def probe(self, who: str) -> tuple[list[str], list[str]]:
        """A local folder is checked where files are placed (its errors name it)."""
        return [], []

    def commit(
        self,
        sandbox: Sandbox,
        files: Sequence[FileSpec],
        step: Step = no_step,
        fence: Fence = _no_fence,
        *,
        sha256: bool = False,
        task_key: str | None = None,
        ledger: Uploads | None = None,
        on_stored: OnStored = not_followed,
    ) -> list[dict[str, Any]]:
        """Put every finished file of the sandbox into storage; return what the webhook reports.

        Each file's ``sha256`` is the task's, else (with ``sha256``, HAUL_HASH) the one recorded
        while it downloaded, else (recorded by no run: HAUL_HASH was off then) hashed from the
        stored copy, so that task.completed carries one for every file.
        """
        task_id = sandbox.task_id
        target_root = self.task_dir(task_id)
        try:
            target_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(
                f"task {task_id}: cannot create {target_root} ({exc.strerror}); check HAUL_STORAGE_DIR"
            ) from exc
        stored = []
        for index, spec in enumerate(files):
            source = sandbox.file(spec)
            target = inside(self.root, spec.path, under=task_id, what=f"task {task_id}")
            try:
                temporary = self.temporary_dir / f"{task_id}-{uuid.uuid4().hex}"
                size, placed = self._place(source, target, temporary, nested="/" in spec.path, step=step, fence=fence)
            except FileNotFoundError as exc:
                raise missing_from_staging(task_id, spec) from exc
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:
                    raise UnsafePath(
                        f"task {task_id}: the path {spec.path!r} is too long for the filesystem of "
                        f"{self.root}; give the file a shorter path"
                    ) from exc
                raise StorageUnavailable(
                    f"task {task_id}: storing {spec.path!r} in {target_root} failed ({exc.strerror})"
                ) from exc
            on_stored(size, placed)
            digest = spec.sha256 or (sandbox.sha256(index) or _hash_file(target, step) if sha256 else None)
            stored.append(file_entry(spec, size, str(target), digest))
        return stored

    def _place(
        self, source: Path, target: Path, temporary: Path, *, nested: bool, step: Step, fence: Fence
    ) -> tuple[int, bool]:
        """Make ``target`` the finished ``source`` (unless an earlier run did), through
        ``temporary``; return its size and whether this run placed it. ``nested``: the path
        has folders of its own below the task's (made here)."""
        placed, staged = _stat(target), _stat(source)
        if placed is not None and (staged is None or os.path.samestat(placed, staged)):
            return placed.st_size, False  # committed by an earlier run (and maybe staging cleaned since)
        if staged is None:
            raise FileNotFoundError(errno.ENOENT, "missing from staging", str(source))
        if nested:
            target.parent.mkdir(parents=True, exist_ok=True)
        temporary.parent.mkdir(exist_ok=True)
        try:
            try:
                os.link(source, temporary)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP):  # no hard links here
                    raise
                _copy(source, temporary, step)
            fence()  # a stale or canceled holder stops before the rename
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return staged.st_size, True


def _copy(source: Path, temporary: Path, step: Step) -> None:
    """Copy in chunks, each a step of its own (a large file across filesystems takes long), and
    make the copy durable before it is renamed into place."""
    with source.open("rb", buffering=0) as reader, temporary.open("xb", buffering=0) as writer:
        writeback = Writeback(writer.fileno(), 0)
        copied = 0
        while True:
            step(DISK_STEP_SECONDS)
            chunk = reader.read(COPY_CHUNK_BYTES)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[writer.write(view) :]
            copied += len(chunk)
            writeback.advance(copied)
        step(DISK_STEP_SECONDS)
        os.fsync(writer.fileno())


def _hash_file(path: Path, step: Step) -> str:
    """sha256 of a stored file, a step per chunk."""
    digest = hashlib.sha256()
    try:
        with path.open("rb", buffering=0) as reader:
            while True:
                step(DISK_STEP_SECONDS)
                chunk = reader.read(COPY_CHUNK_BYTES)
                if not chunk:
                    return digest.hexdigest()
                digest.update(chunk)
    except OSError as exc:
        raise StorageUnavailable(f"reading {path} to hash it failed ({exc.strerror})") from exc


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
