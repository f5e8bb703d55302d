"""What a task's unfinished multipart uploads got to, kept in Redis with the task.

A finalize killed half-way through a large upload leaves its parts on the service; the run
that takes the task over finds the upload here and continues it (the service lists the parts
it has, each checked against the staged bytes) instead of sending the file again. Only the run
holding the task writes here (``upload.lua`` checks its token); the record goes when the file
is stored, and with the task record when prune removes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from actors.states import FINAL_STATES, State
from actors.store_base import StoreBase, text_of


@dataclass(frozen=True)
class UploadRecord:
    """One file's multipart upload in progress."""

    key: str
    upload_id: str
    part_size: int


class Uploads(Protocol):
    """Where a storage keeps how far each file's upload got (by the file's index)."""

    def get(self, index: int) -> UploadRecord | None: ...

    def keep(self, index: int, record: UploadRecord) -> bool:
        """Record ``record``; False when the caller no longer holds the task."""
        ...

    def forget(self, index: int) -> bool: ...


class UploadLedger:
    """The upload records of one task in Redis, for the run holding ``token``."""

    def __init__(self, store: StoreBase, task_id: str, token: int) -> None:
        self.store, self.task_id, self.token = store, task_id, token
        self._keys = [store.task_key(task_id), uploads_key(store, task_id), f"{store.prefix}uploading"]

    def get(self, index: int) -> UploadRecord | None:
        return _record(self.store.client.hget(self._keys[1], str(index)))

    def keep(self, index: int, record: UploadRecord) -> bool:
        """Record ``record`` for file ``index``; False when this run no longer holds the task."""
        value = json.dumps({"key": record.key, "upload_id": record.upload_id, "part_size": record.part_size})
        return self._write(index, value)

    def forget(self, index: int) -> bool:
        return self._write(index, "")

    def _write(self, index: int, value: str) -> bool:
        return bool(self.store._call("upload", self._keys, str(self.token), str(index), value))


class NoLedger:
    """For callers that hold no task (tests, tools): uploads are not resumed."""

    def get(self, index: int) -> UploadRecord | None:
        return None

    def keep(self, index: int, record: UploadRecord) -> bool:
        return True

    def forget(self, index: int) -> bool:
        return True


def uploads_key(store: StoreBase, task_id: str) -> str:
    return f"{store.prefix}uploads:{task_id}"


@dataclass(frozen=True)
class Abandoned:
    """A record of an ended task's unfinished upload, as stored (to forget exactly that)."""

    field: str
    value: str
    record: UploadRecord


def abandoned_uploads(store: StoreBase, limit: int = 100) -> dict[str, list[Abandoned]]:
    """The upload records of tasks that ended (failed, dead, canceled) or are gone: their
    uploads will never be finished, and their parts cost storage until aborted."""
    ids = [text_of(i) for i in store.client.srandmember(f"{store.prefix}uploading", limit) or []]
    if not ids:
        return {}
    pipe = store.client.pipeline(transaction=False)
    for task_id in ids:
        pipe.hget(store.task_key(task_id), "state")
        pipe.hgetall(uploads_key(store, task_id))
    replies = pipe.execute()
    found: dict[str, list[Abandoned]] = {}
    for task_id, state, fields in zip(ids, replies[::2], replies[1::2], strict=True):
        if state is None or State(text_of(state)) in FINAL_STATES:
            found[task_id] = [
                Abandoned(text_of(f), text_of(v), r) for f, v in fields.items() if (r := _record(v)) is not None
            ]
    return found


def drop_uploads(store: StoreBase, task_id: str, aborted: list[Abandoned]) -> bool:
    """Forget the records of uploads that were aborted, unless the task is live again (an
    operator's retry since): False then, and nothing is forgotten."""
    keys = [store.task_key(task_id), uploads_key(store, task_id), f"{store.prefix}uploading"]
    pairs = [item for a in aborted for item in (a.field, a.value)]
    return bool(store._call("upload_drop", keys, task_id, *pairs))


def _record(raw: bytes | str | None) -> UploadRecord | None:
    if raw is None:
        return None
    try:
        found = json.loads(text_of(raw))
        return UploadRecord(str(found["key"]), str(found["upload_id"]), int(found["part_size"]))
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: the upload starts over
