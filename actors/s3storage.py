"""Finished files into an S3-compatible bucket: ``s3://BUCKET/PREFIX/<key template>``.

Each file is streamed from staging in parts (bounded memory: at most ``concurrency`` parts of a
file in flight, each read when it is sent), every part with its Content-MD5, and verified once
complete: the multipart ETag the service answers must equal the one computed here from the
parts' MD5s (``verified: "etag"``); a service whose ETags are not MD5s (SSE-KMS, SSE-C) is
checked by size (``verified: "size"``). The object carries the origin's content type (else
the extension's), ``Content-Disposition: attachment`` with the file's name (a link downloads
the file under its name and never renders HTML from the bucket's origin) and the task id as
metadata.

An upload interrupted by a crash is resumed: its upload id and part size are kept with the task
(:mod:`actors.store_uploads`), and the next run asks the service which parts it has
(ListParts), reuses those whose ETag is the MD5 of the staged bytes of that part, and sends the
rest. An upload the service no longer knows (``NoSuchUpload``) starts over. The object appears
only with CompleteMultipartUpload, right after the lease fence, so a holder that lost the task
never replaces what its successor stored. (Past 300 lines: the resume, which lists, checks and
sends the rest, reads best beside the upload it continues.)
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.errors import StorageUnavailable
from actors.lease import DISK_STEP_SECONDS, Step, no_step
from actors.s3client import NotFound, UploadGone, call, s3_client
from actors.s3parts import DEFAULT_PART_BYTES, content_disposition, content_type, multipart_etag, part_size_for
from actors.sandbox import Sandbox
from actors.storage import OnStored, file_entry, missing_from_staging, not_followed
from actors.storagetarget import S3Access, StorageTarget
from actors.store_uploads import NoLedger, UploadRecord, Uploads
from actors.task import FileSpec, iso_time

log = logging.getLogger(__name__)

#: Files below this size go in one PUT (with its Content-MD5) instead of a multipart upload.
SINGLE_PUT_BYTES = DEFAULT_PART_BYTES
#: Parts of one file in flight at once.
DEFAULT_PART_CONCURRENCY = 4
#: Longest one request to the service may take before the lease stops being renewed, beyond
#: the client's own timeouts (seconds).
REQUEST_STEP_SECONDS = 120.0
#: Metadata key (``x-amz-meta-haul-task-id``) naming the task that stored an object.
TASK_METADATA = "haul-task-id"


@dataclass(frozen=True)
class Part:
    """A part on the service: the MD5 of its staged bytes and the ETag the service gave it."""

    md5: bytes
    etag: str
    size: int


@dataclass(frozen=True)
class Upload:
    """One file's multipart upload: where, with which headers and part size, and whom to tell."""

    key: str
    headers: dict[str, Any]
    part_size: int
    index: int
    ledger: Uploads
    on_stored: OnStored


@dataclass(frozen=True)
class Stored:
    """One file in the bucket: its key, size and how it was verified."""

    key: str
    size: int
    verified: str


class S3Storage:
    """A bucket (and key prefix) of an S3-compatible service."""

    def __init__(
        self,
        target: StorageTarget,
        access: S3Access,
        *,
        key_template: str,
        part_bytes: int = DEFAULT_PART_BYTES,
        concurrency: int = DEFAULT_PART_CONCURRENCY,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        pool_size: int = 10,
        link_seconds: float = 0.0,
        client: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target, self.access, self.key_template = target, access, key_template
        #: HAUL_STORAGE_LINK_SECONDS: each stored file gets a presigned GET this long (0: none).
        self.link_seconds, self.clock = link_seconds, clock
        self.part_bytes, self.concurrency = part_bytes, concurrency
        self.client = client or s3_client(access, connect_timeout, read_timeout, pool_size)

    def location(self, key: str) -> str:
        return self.target.location(key)

    def describe(self) -> str:
        return self.target.describe()

    def close(self) -> None:
        self.client.close()

    def probe(self, who: str) -> tuple[list[str], list[str]]:
        """Write and delete a small object under ``PREFIX/.haul-probe/``: (problems, warnings).

        A wrong key or secret, a missing bucket or no write permission is a problem (no task
        could be stored); a missing delete permission only a warning (probes stay behind)."""
        key = self.target.object_key(f".haul-probe/{who}")
        where = f"storage probe at {self.location(key)}"
        try:
            call(self.client, "put_object", where, Bucket=self.target.bucket, Key=key, Body=b"haul")
        except StorageUnavailable as exc:
            return [f"HAUL_STORAGE_URL={self.describe()}: {exc}; no task can be stored until this is fixed"], []
        try:
            call(self.client, "delete_object", where, Bucket=self.target.bucket, Key=key)
        except StorageUnavailable as exc:
            return [], [f"{exc}; haul stores files but cannot delete its probe objects"]
        return [], []

    def link(self, key: str) -> dict[str, str | None]:
        """A presigned GET of the object (SigV4, signed here: no request to the service) and
        when it stops working; anyone holding it may download the file until then. Temporary
        credentials (a role's) would put their session token in the link and end it early:
        then no link, and a warning."""
        url = str(call(
            self.client, "generate_presigned_url", f"a link to {self.location(key)}", ClientMethod="get_object",
            Params={"Bucket": self.target.bucket, "Key": key}, ExpiresIn=int(self.link_seconds),
        ))  # fmt: skip
        if "X-Amz-Security-Token=" in url:
            log.warning("no link for %s: the credentials are temporary (a session token)", self.location(key))
            return {"link": None, "link_expires_at": None}
        return {"link": url, "link_expires_at": iso_time(self.clock() + int(self.link_seconds))}

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
        """Upload every finished file of the sandbox; return what the webhook reports."""
        task_id = sandbox.task_id
        ledger = ledger or NoLedger()
        stored = []
        for index, spec in enumerate(files):
            key = self.target.key_for(self.key_template, task_id, task_key, spec.path)
            source = sandbox.file(spec)
            try:
                kind = sandbox.content_type(index) or content_type(spec)
                done = self.store_file(task_id, index, spec, source, key, step, fence, ledger, on_stored, kind)
            except StorageUnavailable as exc:
                exc.file = exc.file or spec.path  # task.failed and Sentry name the file
                raise
            except FileNotFoundError as exc:
                raise missing_from_staging(task_id, spec) from exc
            digest = spec.sha256 or (sandbox.sha256(index) if sha256 else None)
            entry = file_entry(spec, done.size, self.location(done.key), digest, done.verified)
            if self.link_seconds:
                entry.update(self.link(done.key))
            stored.append(entry)
        return stored

    def store_file(
        self,
        task_id: str,
        index: int,
        spec: FileSpec,
        source: Path,
        key: str,
        step: Step,
        fence: Callable[[], None],
        ledger: Uploads,
        on_stored: OnStored = not_followed,
        kind: str | None = None,
    ) -> Stored:
        """Put one staged file at ``key`` (or find it there from an earlier run of this task)."""
        size = source.stat().st_size
        where = f"task {task_id}, file {spec.path!r} to {self.location(key)}"
        step(REQUEST_STEP_SECONDS)
        already = self._head(key, where)
        # Metadata names are case-insensitive headers; some services answer them capitalized.
        metadata = {str(k).lower(): v for k, v in (already or {}).get("Metadata", {}).items()}
        if already is not None and metadata.get(TASK_METADATA) == task_id and int(already["ContentLength"]) == size:
            step(DISK_STEP_SECONDS)
            if str(already.get("ETag", "")).strip('"') in self._etags_of(source, size):
                ledger.forget(index)
                on_stored(size, False)
                return Stored(key, size, "etag")  # stored by an earlier run, killed before it said so
        headers = {
            "ContentType": kind or content_type(spec),
            "ContentDisposition": content_disposition(spec.path),
            "Metadata": {TASK_METADATA: task_id},
        }
        if size < SINGLE_PUT_BYTES:
            stored = self._put(source, size, key, headers, step, fence, where)
            on_stored(size, True)
            return stored
        part = part_size_for(size, self.part_bytes)
        record = ledger.get(index)
        if record is not None and (record.key != key or record.part_size != part):
            fence()  # only the holder may abort the upload it recorded
            self.abort(record, where)
            record = None
        upload = Upload(key, headers, part, index, ledger, on_stored)
        try:
            return self._multipart(source, size, upload, record, step, fence, where)
        except UploadGone as exc:
            log.warning("%s: starting its upload over (%s)", where, exc)
            ledger.forget(index)
            return self._multipart(source, size, upload, None, step, fence, where)

    # -- the two ways up ------------------------------------------------------------------

    def _put(
        self, source: Path, size: int, key: str, headers: dict[str, Any], step: Step, fence: Callable[[], None],
        where: str,
    ) -> Stored:  # fmt: skip
        data = source.read_bytes()
        md5 = hashlib.md5(data).digest()
        fence()
        step(REQUEST_STEP_SECONDS)
        answer = call(
            self.client, "put_object", where, Bucket=self.target.bucket, Key=key, Body=data,
            ContentMD5=base64.b64encode(md5).decode(), **headers,
        )  # fmt: skip
        verified = "etag" if answer.get("ETag", "").strip('"') == md5.hex() else "size"
        if verified == "size":
            self._check_size(key, size, where)
        return Stored(key, size, verified)

    def _multipart(
        self,
        source: Path,
        size: int,
        upload: Upload,
        record: UploadRecord | None,
        step: Step,
        fence: Callable[[], None],
        where: str,
    ) -> Stored:
        key, part, ledger, index = upload.key, upload.part_size, upload.ledger, upload.index
        count = -(-size // part)
        parts: dict[int, Part] = {}
        with source.open("rb", buffering=0) as reader:
            fd = reader.fileno()
            if record is None:
                step(REQUEST_STEP_SECONDS)
                created = call(
                    self.client, "create_multipart_upload", where, Bucket=self.target.bucket, Key=key, **upload.headers
                )
                record = UploadRecord(key, str(created["UploadId"]), part)
                if not ledger.keep(index, record):
                    self.abort(record, where)
                    fence()  # raises: this run no longer holds the task
            else:
                parts = self._reusable_parts(record, fd, size, part, count, step, where)
                log.info("%s: continuing its upload, %d of %d parts already there", where, len(parts), count)
                upload.on_stored(sum(p.size for p in parts.values()), False)
            missing = [n for n in range(1, count + 1) if n not in parts]
            parts.update(self._send_parts(record, fd, size, part, missing, step, upload.on_stored, where))
        ordered = [parts[n] for n in range(1, count + 1)]
        fence()  # a stale or canceled holder stops before the object appears
        step(REQUEST_STEP_SECONDS)
        listing = [{"PartNumber": n, "ETag": f'"{p.etag}"'} for n, p in enumerate(ordered, 1)]
        try:
            completed = call(
                self.client, "complete_multipart_upload", where, Bucket=self.target.bucket, Key=key,
                UploadId=record.upload_id, MultipartUpload={"Parts": listing},
            )  # fmt: skip
        except UploadGone:
            # A retried complete whose first try went through: the object is there, ours
            found = self._head(key, where) or {}
            if str(found.get("ETag", "")).strip('"') != multipart_etag([p.md5 for p in ordered]):
                raise
            completed = found
        ledger.forget(index)
        return self._verified(key, size, ordered, str(completed.get("ETag", "")).strip('"'), fence, where)

    def _verified(
        self, key: str, size: int, parts: list[Part], etag: str, fence: Callable[[], None], where: str
    ) -> Stored:
        """How the completed object was checked: its multipart ETag against the parts' MD5s
        ("etag"), else (a service whose ETags are not MD5s: SSE-KMS, SSE-C) its size. An
        object whose ETag is the standard kind but not these parts' is deleted: never announced."""
        md5_etags = all(p.etag == p.md5.hex() for p in parts)
        if md5_etags and etag == multipart_etag([p.md5 for p in parts]):
            return Stored(key, size, "etag")
        if md5_etags and "-" in etag:
            fence()
            call(self.client, "delete_object", where, Bucket=self.target.bucket, Key=key)
            raise StorageUnavailable(f"{where}: the service's ETag {etag} is not that of the parts sent; deleted")
        self._check_size(key, size, where)
        return Stored(key, size, "size")

    def _send_parts(
        self,
        record: UploadRecord,
        fd: int,
        size: int,
        part: int,
        numbers: list[int],
        step: Step,
        on_stored: OnStored,
        where: str,
    ) -> dict[int, Part]:
        """Upload parts ``numbers``, ``concurrency`` at a time; what each became, by number."""
        done: dict[int, Part] = {}
        pending: set[Future[tuple[int, Part]]] = set()
        queue = list(reversed(numbers))
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="haul-s3-part") as pool:
            try:
                while queue or pending:
                    while queue and len(pending) < self.concurrency:
                        pending.add(pool.submit(self._send_part, record, fd, size, part, queue.pop(), where))
                    step(REQUEST_STEP_SECONDS)
                    finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in finished:
                        number, sent = future.result()
                        done[number] = sent
                        on_stored(sent.size, True)
            finally:
                queue.clear()
                for future in pending:
                    future.cancel()
        return done

    def _send_part(
        self, record: UploadRecord, fd: int, size: int, part: int, number: int, where: str
    ) -> tuple[int, Part]:
        offset = (number - 1) * part
        data = os.pread(fd, min(part, size - offset), offset)
        md5 = hashlib.md5(data).digest()
        answer = call(
            self.client, "upload_part", where, Bucket=self.target.bucket, Key=record.key, UploadId=record.upload_id,
            PartNumber=number, Body=data, ContentMD5=base64.b64encode(md5).decode(),
        )  # fmt: skip
        # The service checked Content-MD5; its ETag is that MD5, or (SSE-KMS, SSE-C) opaque
        return number, Part(md5, str(answer.get("ETag", "")).strip('"') or md5.hex(), len(data))

    def _reusable_parts(
        self, record: UploadRecord, fd: int, size: int, part: int, count: int, step: Step, where: str
    ) -> dict[int, Part]:
        """The parts the service has, by number, each the MD5 of the staged bytes it stands for.

        Raises :class:`UploadGone` (the upload starts over) when a part is not what staging
        holds now (the file was downloaded again since): a new upload, never a splice of old
        and new bytes, and no part replaced (some services refuse that)."""
        found: dict[int, Part] = {}
        marker = 0
        while True:
            step(REQUEST_STEP_SECONDS)
            listed = call(
                self.client, "list_parts", where, Bucket=self.target.bucket, Key=record.key,
                UploadId=record.upload_id, PartNumberMarker=marker,
            )  # fmt: skip
            for item in listed.get("Parts", []):
                number, etag = int(item["PartNumber"]), str(item["ETag"]).strip('"')
                offset = (number - 1) * part
                length = min(part, size - offset)
                md5 = hashlib.md5(os.pread(fd, length, offset)).digest() if 0 < number <= count else b""
                if int(item["Size"]) != length or md5.hex() != etag:
                    self.abort(record, where)
                    raise UploadGone(f"part {number} is not what staging holds")
                found[number] = Part(md5, etag, length)
            if not listed.get("IsTruncated"):
                return found
            marker = int(listed["NextPartNumberMarker"])

    # -- helpers --------------------------------------------------------------------------

    def _etags_of(self, source: Path, size: int) -> set[str]:
        """The ETags an object holding exactly ``source`` may have: its MD5 (one PUT, or a
        service that reports it), and the multipart ETag of the parts this storage sends."""
        whole, parts = hashlib.md5(), []
        part = part_size_for(size, self.part_bytes)
        with source.open("rb", buffering=0) as reader:
            while chunk := reader.read(part):
                whole.update(chunk)
                parts.append(hashlib.md5(chunk).digest())
        return {whole.hexdigest(), multipart_etag(parts)}

    def _head(self, key: str, where: str) -> dict[str, Any] | None:
        try:
            return dict(call(self.client, "head_object", where, Bucket=self.target.bucket, Key=key))
        except NotFound:
            return None

    def _check_size(self, key: str, size: int, where: str) -> None:
        found = self._head(key, where)
        if found is None or int(found["ContentLength"]) != size:
            raise StorageUnavailable(f"{where}: the stored object is not {size} bytes after the upload")

    def abort(self, record: UploadRecord, where: str) -> bool:
        """Abort a multipart upload (its parts are deleted); True when it is gone (one already
        gone included), False when the service refused or did not answer."""
        try:
            call(self.client, "abort_multipart_upload", where, Bucket=self.target.bucket, Key=record.key,
                 UploadId=record.upload_id)  # fmt: skip
        except UploadGone:
            return True
        except StorageUnavailable as exc:
            log.warning("could not abort the upload %s (%s); the bucket's lifecycle rule removes it", record.upload_id,
                        exc)  # fmt: skip
            return False
        return True
