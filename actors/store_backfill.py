"""Bringing the search indexes (:mod:`actors.store_index`) up to date with the records: tasks
created before the indexes existed (an upgrade from an older haul) are in neither, and a prune
older than the indexes deleted records without their entries. Three bounded walks, each resumable
from a Redis cursor::

    tasks  SCAN haul:task:*          each record's entries, as create.lua writes them
    names  ZSCAN haul:index:name     members whose record is gone are dropped
    hosts  SCAN haul:index:host:*    and ZSCAN of each: ids whose record is gone are dropped

and where the walk stands, so a restart or a new leader resumes it::

    haul:index:backfill  hash: phase (tasks, names, hosts, done); cursor, that phase's SCAN or
                         ZSCAN cursor; pending (hosts only), JSON [[key, ZSCAN cursor], ...] of
                         the host sets of the last SCAN page not walked through yet; indexed and
                         dropped, the counts so far; started_at and done_at (seconds since the
                         epoch); server, the run id of the Redis the cursors are of (another
                         one's start the phase over)

Pipelined plain commands, not a script: the name member is casefolded in Python (Lua cannot),
and every write is idempotent (ZADD and HSET of what create.lua writes, ZREM of an entry whose
record is gone). The one race that matters, a record pruned between the read and the write, is
closed by checking the record after writing (:meth:`BackfillStore.reindex_batch`). Driven by
:mod:`supervisor.backfill`.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from actors.store_base import StoreBase, text_of
from actors.store_index import MAX_INDEXED_HOSTS, name_member, task_id_of

log = logging.getLogger(__name__)

#: Host sets whose members one pipelined step of the hosts walk reads (one ZSCAN each).
HOST_SETS_PER_STEP = 64


class Phase(enum.StrEnum):
    """The walks in the order they run."""

    #: Every task record gets its index entries (SCAN of the task hashes).
    TASKS = "tasks"
    #: Name entries whose record is gone are dropped (ZSCAN of index:name).
    NAMES = "names"
    #: Host entries whose record is gone are dropped (SCAN of index:host:*, ZSCAN of each).
    HOSTS = "hosts"
    #: The indexes are up to date: the supervisor's job costs one HGET a run.
    DONE = "done"


#: A host set not walked through yet, and its ZSCAN cursor (0: from its start).
Pending = tuple[str, int]


@dataclass(frozen=True)
class Backfill:
    """Where the backfill stands (``haul:index:backfill``); the default is its start."""

    phase: Phase = Phase.TASKS
    #: The phase's SCAN (tasks, hosts) or ZSCAN (names) cursor; 0 at the phase's start.
    cursor: int = 0
    #: Hosts phase: the sets of the last SCAN page not walked through yet.
    pending: tuple[Pending, ...] = ()
    #: Tasks whose entries were written, and entries of gone records dropped, so far.
    indexed: int = 0
    dropped: int = 0
    started_at: float | None = None
    done_at: float | None = None
    #: The Redis server the cursors are of (its run id): SCAN cursors mean nothing to another
    #: (a restart reseeds the hash table; a promoted replica has its own).
    server: str = ""

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE


@dataclass(frozen=True)
class _Entries:
    """One record's index entries, as create.lua wrote (or would have written) them."""

    task_id: str
    member: str
    #: Its member in index:names before (None: none), dropped when it differs from ``member``.
    old: str | None
    hosts: list[str]
    created_at: float


#: A spec this long (bytes) is read on its own rather than in its batch's round trip.
LARGE_SPEC_BYTES = 256 * 1024


def _int(reply: Any) -> int:
    """A pipelined integer reply, 0 for an error (a key of another type)."""
    return 0 if isinstance(reply, Exception) else int(reply or 0)


class BackfillStore(StoreBase):
    """The bounded walks that bring the search indexes up to date, and their saved position."""

    @property
    def backfill_key(self) -> str:
        return f"{self.prefix}index:backfill"

    def backfill_done_at(self) -> float | None:
        """When the backfill finished (None: not yet, or never started): one HGET."""
        done_at = self.client.hget(self.backfill_key, "done_at")
        return float(text_of(done_at)) if done_at else None

    def backfill(self) -> Backfill:
        """Where the backfill stands (its start when it never ran, or was reset)."""
        raw: dict[Any, Any] = self.client.hgetall(self.backfill_key)
        fields = {text_of(k): text_of(v) for k, v in raw.items()}
        if not fields:
            return Backfill()
        pending = json.loads(fields.get("pending") or "[]")
        return Backfill(
            phase=Phase(fields.get("phase", Phase.TASKS)),
            cursor=int(fields.get("cursor") or 0),
            pending=tuple((str(key), int(at)) for key, at in pending),
            indexed=int(fields.get("indexed") or 0),
            dropped=int(fields.get("dropped") or 0),
            started_at=float(fields["started_at"]) if fields.get("started_at") else None,
            done_at=float(fields["done_at"]) if fields.get("done_at") else None,
            server=fields.get("server", ""),
        )

    def save_backfill(self, state: Backfill) -> None:
        """Keep ``state`` for the next batch, whichever process or replica runs it."""
        self.client.hset(
            self.backfill_key,
            mapping={
                "phase": state.phase.value,
                "cursor": state.cursor,
                "pending": json.dumps([list(p) for p in state.pending]) if state.pending else "",
                "indexed": state.indexed,
                "dropped": state.dropped,
                "started_at": "" if state.started_at is None else f"{state.started_at:.3f}",
                "done_at": "" if state.done_at is None else f"{state.done_at:.3f}",
                "server": state.server,
            },
        )

    def server_run_id(self) -> str:
        """The Redis server's run id: it changes with every start of the server."""
        info: dict[str, Any] = self.client.info("server")
        return str(info.get("run_id", ""))

    def reset_backfill(self) -> None:
        """Forget the backfill's position and that it finished: the next batch starts over."""
        self.client.delete(self.backfill_key)

    def reindex_batch(self, cursor: int, count: int) -> tuple[int, int]:
        """Write the index entries of the task records one SCAN step (COUNT ``count``) from
        ``cursor`` finds, as create.lua does: the name member and its index:names entry, the id
        in the sets of the record's first MAX_INDEXED_HOSTS hosts scored by created_at. Returns
        the next cursor (0: the scan is over) and how many tasks were indexed.

        A record half gone (no spec, or no state: a prune or a delete under way) is left out.
        Round trips: the SCAN, the records' fields, their specs (one more per spec over
        LARGE_SPEC_BYTES), the writes, and, for a record deleted between the reads and the
        writes (pruned meanwhile), taking its entries back out. Each write is followed in the same
        pipeline by a check that the record is still there, so a prune after that check sees
        the entries and removes them, and a prune before it is caught by it."""
        start = self.task_key("")
        found: Any
        cursor, found = self.client.scan(cursor, match=_literal(start) + "*", count=count)
        ids = [text_of(key)[len(start) :] for key in found]
        entries = self._entries(ids)
        if not entries:
            return int(cursor), 0
        pipe = self.client.pipeline(transaction=False)
        for e in entries:
            if e.member:
                pipe.zadd(self.name_index_key, {e.member: 0})
                if e.old != e.member:
                    pipe.hset(self.name_members_key, e.task_id, e.member)
            if e.old and e.old != e.member:  # a member folded otherwise once: the map named it
                pipe.zrem(self.name_index_key, e.old)
                if not e.member:
                    pipe.hdel(self.name_members_key, e.task_id)
            for host in e.hosts:
                pipe.zadd(self.host_index_key(host), {e.task_id: e.created_at})
        for e in entries:
            pipe.exists(self.task_key(e.task_id))
        present = pipe.execute()[-len(entries) :]
        gone = [e for e, there in zip(entries, present, strict=True) if not there]
        if gone:
            self._unindex(gone)
        return int(cursor), len(entries) - len(gone)

    def drop_dangling_names(self, cursor: int, count: int) -> tuple[int, int]:
        """Drop the members of index:name (and their index:names entries) whose task record is
        gone, one ZSCAN step (COUNT ``count``) from ``cursor``. Returns the next cursor (0: the
        walk is over) and how many members were dropped. Two round trips, three with drops."""
        found: Any
        cursor, found = self.client.zscan(self.name_index_key, cursor, count=count)
        members = [text_of(member) for member, _ in found]
        present = self._present([task_id_of(m) for m in members])
        gone = [m for m, there in zip(members, present, strict=True) if not there]
        if not gone:
            return int(cursor), 0
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self.name_index_key, *gone)
        pipe.hdel(self.name_members_key, *{task_id_of(m) for m in gone})
        return int(cursor), int(pipe.execute()[0])

    def drop_dangling_hosts(
        self, cursor: int, pending: Sequence[Pending], count: int
    ) -> tuple[int, list[Pending], int]:
        """Drop the ids of the host sets whose task record is gone. With nothing ``pending``,
        one SCAN step (COUNT ``count``) from ``cursor`` lists the next host sets; then their
        members are read in pipelined ZSCAN steps (HOST_SETS_PER_STEP sets at a time, a huge set
        a part at a time) until about ``count`` were looked at. Returns the SCAN cursor, the
        sets not walked through yet with their ZSCAN cursors (pass both back; (0, []): the walk
        is over) and how many ids were dropped."""
        walk = list(pending)
        if not walk:
            found: Any
            cursor, found = self.client.scan(cursor, match=_literal(self.host_index_key("")) + "*", count=count)
            walk = [(text_of(key), 0) for key in found]
        looked = dropped = 0
        while walk and looked < count:
            step, walk = walk[:HOST_SETS_PER_STEP], walk[HOST_SETS_PER_STEP:]
            pipe = self.client.pipeline(transaction=False)
            for key, at in step:
                pipe.zscan(key, at, count=max(16, count // len(step)))
            pages: list[Any] = pipe.execute()
            ids = [[text_of(m) for m, _ in members] for _, members in pages]
            present = iter(self._present([i for members in ids for i in members]))
            pipe = self.client.pipeline(transaction=False)
            for (key, _), members in zip(step, ids, strict=True):
                gone = [i for i in members if not next(present)]
                if gone:
                    pipe.zrem(key, *gone)
            dropped += sum(int(n) for n in pipe.execute())
            looked += sum(len(members) for members in ids)
            unfinished = [(key, int(page[0])) for (key, _), page in zip(step, pages, strict=True) if int(page[0])]
            walk = unfinished + walk
        return int(cursor), walk, dropped

    def _entries(self, ids: list[str]) -> list[_Entries]:
        """The index entries of the records ``ids`` that are whole, read in one round trip; a
        spec over LARGE_SPEC_BYTES (a course of thousands of files) in one of its own, so a
        batch holds at most one of them at a time."""
        pipe = self.client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(self.task_key(task_id), "state", "hosts", "created_at")
            pipe.strlen(self.spec_key(task_id))
            pipe.hget(self.name_members_key, task_id)
        replies = pipe.execute(raise_on_error=False) if ids else []
        small = [task_id for at, task_id in enumerate(ids) if 0 < _int(replies[3 * at + 1]) <= LARGE_SPEC_BYTES]
        specs = dict(zip(small, self.client.mget([self.spec_key(i) for i in small]), strict=True)) if small else {}
        entries = []
        for at, task_id in enumerate(ids):
            fields, size, old = replies[3 * at : 3 * at + 3]
            if isinstance(fields, Exception) or fields[0] is None or not _int(size):
                continue  # not a task's hash, or a record half gone
            described = specs[task_id] if task_id in specs else self.client.get(self.spec_key(task_id))
            if described is None:
                continue  # deleted since
            try:
                member = name_member(str(json.loads(described).get("name") or ""), task_id)
            except (ValueError, AttributeError):
                log.warning("task %s: its spec is not readable JSON; left out of the search indexes", task_id)
                continue
            hosts = text_of(fields[1] or "").split()[:MAX_INDEXED_HOSTS]
            created_at = float(text_of(fields[2] or 0))
            entries.append(_Entries(task_id, member, _text(old), hosts, created_at))
        return entries

    def _unindex(self, gone: list[_Entries]) -> None:
        """Take back the entries just written for records deleted meanwhile."""
        pipe = self.client.pipeline(transaction=False)
        for e in gone:
            if e.member:
                pipe.zrem(self.name_index_key, e.member)
            pipe.hdel(self.name_members_key, e.task_id)
            for host in e.hosts:
                pipe.zrem(self.host_index_key(host), e.task_id)
        pipe.execute()

    def _present(self, task_ids: list[str]) -> list[bool]:
        """For each id, whether its task record exists (one pipelined round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.exists(self.task_key(task_id))
        return [bool(n) for n in pipe.execute()] if task_ids else []


def _literal(text: str) -> str:
    """``text`` as a SCAN pattern that matches it literally (a prefix holding ``*`` or ``[``)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _text(value: Any) -> str | None:
    return None if value is None else text_of(value)
