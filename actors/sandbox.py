"""A task's private staging folder: ``<HAUL_STAGING_DIR>/<task id>/``.

One folder per task, so workers never touch each other's files and cleaning one task up can
never delete another's. Layout::

    <task id>/files/<path>              finished, verified files (renamed in only when complete)
    <task id>/.parts/<n>.<token>.part   bytes of file number n so far, named for the run that
                                        holds them (kept across attempts, see claim_part)
    <task id>/.parts/<n>.<token>.part.json   what identifies the version those bytes belong to,
                                        and their content type (kept as <n>.type on promotion)
    <task id>/.parts/<n>.<token>.hls/   a page's tracks (track-0/, track-1/...): a stream's
                                        fragments as they complete, or a file's bytes, what
                                        each is of (track.json); ffmpeg's inputs and output
    <task id>/.parts/<n>.<token>.sha256 the sha256 of that run's part (HAUL_HASH), hashed while it
                                        downloaded; named <n>.sha256 when the file is promoted
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from actors.errors import StorageUnavailable, UnsafePath
from actors.manifest import MAX_NAME_BYTES, MAX_PATH_BYTES
from actors.paths import fsync_dir, inside
from actors.resume import discard_part
from actors.task import FileSpec

log = logging.getLogger(__name__)

_TASK_ID = re.compile(r"^[0-9a-f]{32}$")


def _meta(part: Path) -> Path:
    return part.with_suffix(part.suffix + ".json")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def check_task_id(task_id: str) -> str:
    """Task ids become folder names; only the ids haul itself makes are accepted."""
    if not _TASK_ID.match(task_id):
        raise UnsafePath(f"{task_id!r} is not a haul task id (32 lowercase hex characters)")
    return task_id


class Sandbox:
    """The staging folder of one task."""

    def __init__(self, staging_dir: Path, task_id: str) -> None:
        self.staging_dir = staging_dir
        self.task_id = check_task_id(task_id)
        self.root = staging_dir / task_id
        self.files_dir = self.root / "files"
        self.parts_dir = self.root / ".parts"

    def prepare(self) -> None:
        """Create the folder and its ``.parts`` (``files`` comes with the first finished file)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.parts_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(
                f"task {self.task_id}: cannot create its staging folder {self.root} ({exc.strerror}); "
                "check HAUL_STAGING_DIR exists and is writable"
            ) from exc

    def file(self, spec: FileSpec) -> Path:
        return inside(self.staging_dir, spec.path, under=f"{self.task_id}/files", what=f"task {self.task_id}")

    def claim_part(self, index: int, token: int) -> Path:
        """The ``.part`` of file ``index`` for the run holding ``token``: an earlier run's bytes
        are renamed to this run's name (the largest, when killed runs left several).

        A run works on names of its own, so a holder that lost the task without noticing yet
        (paused between its fence check and its next file operation) finds its names gone and
        can neither replace, truncate nor delete its successor's file by path.
        """
        mine = self.parts_dir / f"{index}.{token}.part"
        if mine.exists():
            return mine
        earlier = sorted(self.parts_dir.glob(f"{index}.*.part"), key=_size, reverse=True)
        for candidate in earlier:
            try:
                os.rename(candidate, mine)
            except FileNotFoundError:
                continue  # taken by another run meanwhile
            try:
                os.rename(_meta(candidate), _meta(mine))
            except FileNotFoundError:
                pass  # no validator: the bytes cannot be resumed, the file restarts
            break
        return mine

    def claim_fragments(self, index: int, token: int) -> Path:
        """The folder of file ``index``'s tracks (a page's format) for the run holding ``token``
        (an earlier run's renamed to it, as :meth:`claim_part` does with bytes)."""
        mine = self.parts_dir / f"{index}.{token}.hls"
        if mine.exists():
            return mine
        for candidate in sorted(self.parts_dir.glob(f"{index}.*.hls"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                os.rename(candidate, mine)
                return mine
            except FileNotFoundError:
                continue  # taken by another run meanwhile
        mine.mkdir()
        return mine

    def keep_format(self, index: int, part: Path, format_id: str) -> None:
        """Keep ``part``'s bytes only if they are of page format ``format_id`` (a page resolved
        again may choose another format, whose bytes must not be appended to these)."""
        record = self.parts_dir / f"{index}.format"
        try:
            kept = record.read_text()
        except FileNotFoundError:
            kept = None
        except OSError as exc:
            raise StorageUnavailable(
                f"task {self.task_id}: cannot read {record.name} in staging ({exc.strerror})"
            ) from exc
        if kept == format_id:
            return
        if kept is not None:
            log.warning("task %s: file %d resolved to format %s, not %s: downloading it from zero", self.task_id,
                        index, format_id, kept)  # fmt: skip
        discard_part(part)
        self._record(record, format_id, record.name)

    def drop_fragments(self, index: int) -> None:
        """The tracks of file ``index``, once the file is whole (none: nothing)."""
        for folder in self.parts_dir.glob(f"{index}.*.hls"):
            shutil.rmtree(folder, ignore_errors=True)

    def finished_size(self, spec: FileSpec) -> int | None:
        """Size of the finished copy of ``spec``, or None when it still needs downloading.

        A file only gets its final name after its size and sha256 were verified and it was
        fsync'd, so a file under that name with the expected size is complete.
        """
        try:
            size = self.file(spec).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise self._too_long(spec, exc) from exc
            raise
        if spec.size is not None and size != spec.size:
            return None
        return size

    def _sha256_path(self, index: int) -> Path:
        return self.parts_dir / f"{index}.sha256"

    def record_sha256(self, part: Path, digest: str) -> None:
        """Keep the sha256 of the bytes in ``part`` beside it, under the run's own name: only
        :meth:`promote` gives it the file's name, with the file, so a run that lost the task
        while it hashed cannot replace its successor's digest."""
        self._record(part.with_suffix(".sha256"), digest, f"the sha256 of {part.name}")

    def _record(self, path: Path, text: str, what: str) -> None:
        """Write ``text`` to ``path`` whole or not at all (a temporary file renamed)."""
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_text(text)
            os.replace(temporary, path)
        except OSError as exc:
            raise StorageUnavailable(f"task {self.task_id}: cannot record {what} in staging ({exc.strerror})") from exc

    def content_type(self, index: int) -> str | None:
        """The Content-Type the origin gave file ``index``, kept when it was promoted, or None."""
        try:
            found = (self.parts_dir / f"{index}.type").read_text().strip()
        except OSError:
            return None
        return found if found and len(found) <= 255 and found.isprintable() else None

    def sha256(self, index: int) -> str | None:
        """The recorded sha256 of file ``index``, or None (not recorded, or HAUL_HASH=none then)."""
        try:
            digest = self._sha256_path(index).read_text().strip()
        except OSError:
            return None
        return digest if len(digest) == 64 else None

    def promote(self, part: Path, spec: FileSpec) -> None:
        """Give a complete ``.part`` its final name, durably."""
        final = self.file(spec)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)  # a run whose part was taken over stops here: its name is gone
            index = int(part.name.split(".", 1)[0])
            digest = part.with_suffix(".sha256")
            if digest.exists():
                os.replace(digest, self._sha256_path(index))
            kept = _content_type_of(_meta(part))
            if kept:
                temporary = self.parts_dir / f"{index}.type.tmp"
                temporary.write_text(kept)
                os.replace(temporary, self.parts_dir / f"{index}.type")
            fsync_dir(final.parent)
            _meta(part).unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise self._too_long(spec, exc) from exc
            raise StorageUnavailable(
                f"task {self.task_id}: cannot move {spec.path!r} into place in staging ({exc.strerror})"
            ) from exc

    def _too_long(self, spec: FileSpec, exc: OSError) -> UnsafePath:
        """A name the filesystem refuses stays refused: permanent, not a storage outage to wait out."""
        return UnsafePath(
            f"task {self.task_id}: path {spec.path!r} is too long for the filesystem of HAUL_STAGING_DIR "
            f"({exc.strerror}); give names of at most {MAX_NAME_BYTES} bytes and paths of at most "
            f"{MAX_PATH_BYTES} bytes (UTF-8)"
        )

    def exists(self) -> bool:
        return self.root.exists()

    def remove(self, files: Sequence[FileSpec] = ()) -> None:
        """Delete the folder; only ever called once storage and webhook both succeeded.

        With the task's ``files`` known, the usual layout goes in a few calls (rmtree costs
        some 40 system calls for the smallest sandbox); whatever else is there, rmtree takes.
        """
        try:
            for index, spec in enumerate(files):
                self.file(spec).unlink()
                self._sha256_path(index).unlink(missing_ok=True)
            for folder in (self.files_dir, self.parts_dir, self.root):
                folder.rmdir()
        except (OSError, UnsafePath):
            shutil.rmtree(self.root, ignore_errors=True)


def _content_type_of(meta: Path) -> str | None:
    """The content type a ``.part``'s record names, if it names one."""
    try:
        found = json.loads(meta.read_text()).get("content_type")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None
