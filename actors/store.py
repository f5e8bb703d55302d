"""TaskStore: haul's tasks in Redis, with every state change atomic and fenced.

Each operation that reads then writes is one Lua script in ``actors/lua/`` (its header lists
KEYS and ARGV, :mod:`actors.store_base` the keys). This class holds a task's life from its
creation through its runs to its notices, and the reads of a task; the supervisor's side is
:class:`actors.store_sweeps.SweepStore`, which it extends, with each task's webhook tries
(:class:`actors.store_deliveries.DeliveryStore`), and the walks that bring the search indexes up
to date (:class:`actors.store_backfill.BackfillStore`). The module runs past 300 lines
because each of the twenty-odd operations is a typed wrapper over one script, and a task's
run reads best in one place.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actors.stagemeter import Tallies
from actors.states import CancelReply, ClaimReply, CreateReply, RetryReply, State, StepReply
from actors.store_backfill import BackfillStore
from actors.store_base import text_of
from actors.store_deliveries import DeliveryStore
from actors.store_index import MAX_INDEXED_HOSTS, name_member, name_range, task_hosts, task_id_of
from actors.store_sweeps import SweepStore
from actors.task import (
    DEFAULT_ACCEPT,
    KeyConflict,
    RequestOptions,
    Task,
    TaskSpec,
    files_from_json,
    first_difference,
    request_hash,
    storage_fields,
)

if TYPE_CHECKING:
    from actors.messages import QueuedMessage


@dataclass(frozen=True)
class StageLimits:
    """What a claim must respect; 0 means no limit. See HAUL_DOWNLOAD_CONCURRENCY and friends."""

    downloads: int = 0
    downloads_per_host: int = 0
    staging_max_bytes: int = 0
    finalize_backlog: int = 0


NO_LIMITS = StageLimits()


@dataclass(frozen=True)
class Cursor:
    """Where a page of a state's tasks ended: the last task's time in the state, and its id."""

    at: float
    task_id: str


@dataclass(frozen=True)
class Renewal:
    """One lease to renew: the task, the holder's token, and progress to write with it
    (bytes done, bytes total, files done) or None."""

    task_id: str
    token: int
    figures: tuple[int, int, int] | None = None
    #: Bytes a finalize has put in storage so far, or None.
    stored: int | None = None
    #: A download's files: which finished, and how far the ones downloading are.
    files: FilesProgress | None = None


@dataclass(frozen=True)
class FilesProgress:
    """A download's files beyond its totals, for status and events: the indexes of the files
    finished, in the order they finished (files of a task finish out of order side by side),
    and for each file downloading its index, bytes done, bytes total (0: unknown yet) and
    connections."""

    finished: tuple[int, ...] = ()
    active: tuple[tuple[int, int, int, int], ...] = ()

    def finished_text(self) -> str:
        return " ".join(map(str, self.finished))

    def active_json(self) -> str:
        return json.dumps([list(entry) for entry in self.active], separators=(",", ":"))

    @property
    def connections(self) -> int:
        return sum(entry[3] for entry in self.active)


@dataclass(frozen=True)
class NoticeTry:
    """A try at delivering an owed notice that this message may make (``skipped`` empty), or
    why it may not: the notice is not owed any more, or another message holds its chain."""

    seq: int = 0
    tries: int = 0
    run: int = 0
    skipped: str = ""

    @property
    def go(self) -> bool:
        return not self.skipped


@dataclass(frozen=True)
class Claim:
    """What a claim attempt found: ``ok`` (token, attempts and the task as claimed) or why it
    did nothing (``detail``)."""

    outcome: ClaimReply
    token: int = 0
    attempts: int = 0
    detail: str = ""
    task: Task | None = None
    #: For ``full``: why (``download``, ``download_per_host``, ``staging_bytes``,
    #: ``finalize_backlog``) and since when the task has been waiting.
    reason: str = ""
    waiting_since: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome is ClaimReply.OK


class TaskStore(SweepStore, DeliveryStore, BackfillStore):
    """Typed operations on tasks, each one round trip."""

    def create(
        self,
        spec: TaskSpec,
        now: float,
        task_id: str | None = None,
        *,
        replace: bool = False,
        claim: QueuedMessage | None = None,
    ) -> tuple[str, bool]:
        """Store a new ``queued`` task; with ``spec.key`` seen before for the same request,
        return that task instead. Returns ``(task id, created)``. A new task's ``claim``
        message is queued in the same step (none is queued for a task found by its key).

        Raises :class:`KeyConflict` naming the first differing field when the key was seen
        with a different request. With ``replace``, a key whose task ended failed, dead or
        canceled names a new task (the old record stays); any other state raises KeyConflict.
        """
        keys, argv = self.create_call(spec, now, task_id or uuid.uuid4().hex, replace=replace, claim=claim)
        reply = self._scripts["create"](keys=keys, args=argv)
        found, outcome = text_of(reply[0]), CreateReply(text_of(reply[1]))
        first = self.get(found) if outcome is CreateReply.DIFFERENT else None
        if outcome is CreateReply.DIFFERENT and first is None:  # pruned since: its key is free now
            reply = self._scripts["create"](keys=keys, args=argv)
            found, outcome = text_of(reply[0]), CreateReply(text_of(reply[1]))
            first = self.get(found) if outcome is CreateReply.DIFFERENT else None
        if outcome is CreateReply.NOT_REPLACEABLE:
            state = text_of(reply[2])
            why = "is done" if state == State.DONE else "has not ended"
            raise KeyConflict(
                f"key {spec.key!r}: task {found} {why} (state {state}); only a failed, dead or canceled "
                "task is replaced"
            )
        if outcome is CreateReply.DIFFERENT:
            field = first_difference(first.spec, spec) if first is not None else "the request"
            if field is not None:  # None: a record stored before request hashes, same request
                raise KeyConflict(
                    f"key {spec.key!r} was used for task {found} with a different request: {field} differs; "
                    "use a new key, or --replace (replace=True) if that task failed, died or was canceled"
                )
        return found, outcome is CreateReply.CREATED

    def create_call(
        self, spec: TaskSpec, now: float, task_id: str, *, replace: bool = False, claim: QueuedMessage | None = None
    ) -> tuple[list[str], list[Any]]:
        """create.lua's KEYS and ARGV for ``spec`` as task ``task_id``, also for a caller that
        runs the script on a connection of its own (:meth:`script_text`; the API does, from its
        event loop) and goes on with :meth:`create` for any answer other than ``created``. The
        task's search index entries (:mod:`actors.store_index`) are written in the same step."""
        described: dict[str, Any] = {"files": [f.to_json() for f in spec.files]}
        if spec.name:
            described["name"] = spec.name
        if spec.webhook:
            described["webhook"] = spec.webhook
        if spec.accept != DEFAULT_ACCEPT:
            described["accept"] = list(spec.accept)
        if spec.request is not None:  # secrets: read back by workers only, never shown
            described["request"] = spec.request.to_json()
        asked = request_hash(spec)
        hosts = task_hosts(spec.files)
        fields: dict[str, Any] = {
            "key": spec.key or "",
            "hosts": " ".join(hosts),
            "bytes_total": spec.known_bytes,
            "bytes_done": 0,
            "files_done": 0,
            "attempts": 0,
            "token": 0,
            "run": 0,
            "created_at": now,
            "request_hash": asked,
        }
        indexed = [self.host_index_key(host) for host in hosts[:MAX_INDEXED_HOSTS]]
        keys = [self.task_key(task_id), self.spec_key(task_id), self.name_index_key, self.name_members_key, *indexed]
        keys += [claim.queue_key, claim.bodies_key] if claim else []
        keys += [f"{self.prefix}key:{spec.key}"] if spec.key else []
        message = [claim.redis_id, claim.body] if claim else ["", ""]
        index = [name_member(spec.name, task_id), len(indexed)]
        flat = [item for pair in fields.items() for item in pair]
        spec_json = json.dumps(described, separators=(",", ":"))
        return keys, self._argv((task_id, now, spec_json, asked, "1" if replace else "0", *message, *index, *flat))

    def claim(
        self,
        task_id: str,
        *,
        worker: str,
        now: float,
        lease_seconds: float,
        max_attempts: int,
        limits: StageLimits = NO_LIMITS,
        start: State = State.CLAIMED,
        poll_seconds: float = 0.0,
    ) -> Claim:
        """Take the task for one run (attempt + 1, new token, lease, download slots) if it is
        free to take and the limits allow; ``full`` leaves it queued, untouched.

        ``start=DOWNLOADING`` enters the download at once, for a caller that goes on with it in
        the same thread; the claim returns the task either way (one round trip for all three).
        ``poll_seconds`` is the longest a chain told ``full`` waits before it asks again.
        """
        reply = self._call(
            "claim",
            [self.task_key(task_id), self.leases_key, self.spec_key(task_id)],
            task_id,
            now,
            lease_seconds,
            worker,
            max_attempts,
            limits.downloads,
            limits.downloads_per_host,
            limits.staging_max_bytes,
            limits.finalize_backlog,
            start.value,
            poll_seconds,
        )
        outcome = ClaimReply(text_of(reply[0]))
        if outcome is ClaimReply.OK:
            fields = dict(zip(reply[4][::2], reply[4][1::2], strict=True))
            task = _task_from(task_id, fields, reply[3]) if reply[3] else None  # None: spec lost
            return Claim(outcome, token=int(reply[1]), attempts=int(reply[2]), task=task)
        if outcome is ClaimReply.FULL:
            return Claim(outcome, detail=text_of(reply[2]), reason=text_of(reply[1]), waiting_since=float(reply[3]))
        return Claim(outcome, detail=text_of(reply[1]) if len(reply) > 1 else "")

    def advance(
        self,
        task_id: str,
        token: int,
        source: State,
        target: State,
        *,
        now: float,
        lease_seconds: float,
        progress: tuple[int, int, int] | None = None,
    ) -> bool:
        """Move from ``source`` to ``target`` (both active) and renew the lease; False if stale.

        ``progress`` (bytes done, bytes total, files done) is written in the same step.
        """
        return self._advance(task_id, token, source, target, now, lease_seconds, 0, progress)[0] is StepReply.OK

    def finish_download(
        self,
        task_id: str,
        token: int,
        *,
        now: float,
        lease_seconds: float,
        progress: tuple[int, int, int],
        finalize_limit: int,
        finished: Sequence[int] | None = None,
    ) -> tuple[StepReply, int]:
        """``downloading`` -> ``finalizing`` with the final progress (and ``finished``, the files
        in the order they finished), taking a finalize slot in the same step: ``ok`` (slot
        held, ``token`` kept), ``full`` (finalizing, resting until a slot is free; the new token
        is for the finalize message) or ``stale``."""
        return self._advance(
            task_id, token, State.DOWNLOADING, State.FINALIZING, now, lease_seconds, finalize_limit, progress,
            finished,
        )  # fmt: skip

    def _advance(
        self,
        task_id: str,
        token: int,
        source: State,
        target: State,
        now: float,
        lease_seconds: float,
        finalize_limit: int,
        progress: tuple[int, int, int] | None,
        finished: Sequence[int] | None = None,
    ) -> tuple[StepReply, int]:
        order = [" ".join(map(str, finished))] if progress and finished is not None else []
        reply = self._call(
            "advance",
            [self.task_key(task_id), self.leases_key],
            task_id,
            token,
            source.value,
            target.value,
            now,
            lease_seconds,
            finalize_limit,
            *(progress or ()),
            *order,
        )
        outcome = StepReply(text_of(reply[0]))
        return outcome, int(reply[1]) if outcome is StepReply.FULL else token

    def heartbeat(
        self,
        task_id: str,
        token: int,
        *,
        now: float,
        lease_seconds: float,
        bytes_done: int,
        bytes_total: int,
        files_done: int,
    ) -> bool:
        """Renew the lease and record progress; False when the token is stale (stop working)."""
        renewal = Renewal(task_id, token, (bytes_done, bytes_total, files_done))
        return self.renew_many([renewal], now=now, lease_seconds=lease_seconds)[0]

    def connection(
        self, task_id: str, token: int, host: str, number: int, *, limit: int, now: float, take: bool
    ) -> StepReply:
        """Take (``take``) or give back connection ``number`` of the run holding ``token`` to
        ``host``: a slot of the host's set beside the one the claim took, bound to the run's
        lease (HAUL_DOWNLOAD_PER_HOST counts connections, not tasks). FULL: the host is at
        ``limit``; STALE: the token moved on or the task left ``downloading``."""
        keys = [self.task_key(task_id), f"{self.prefix}slots:host:{host}"]
        reply = int(self._call("connection", keys, task_id, str(token), now, f"{task_id}#{number}", limit,
                               "take" if take else "give"))  # fmt: skip
        return StepReply.OK if reply == 1 else StepReply.FULL if reply == 0 else StepReply.STALE

    def record_resolved(self, task_id: str, token: int, index: int, record: Mapping[str, Any], *, now: float) -> bool:
        """Keep what page file ``index`` resolved to (:meth:`actors.pages.Resolved.record`) and
        tell it (``file.resolved``); False when the token is stale."""
        reply = self._call("resolved", [self.task_key(task_id)], task_id, str(token), now, str(index),
                           json.dumps(record))  # fmt: skip
        return int(reply) == 1

    def page_turn(self, host: str, interval: float, *, now: float) -> float:
        """Reserve the next turn to ask ``host`` for a page, ``interval`` seconds after the
        last one reserved by any worker; the seconds to wait for it."""
        return float(self._call("pace", [f"{self.prefix}pace:{host}"], now, float(interval)))

    def holds(self, task_id: str, token: int) -> bool:
        """Whether ``token`` is still the task's and the task still active (a read only)."""
        state, current = self.client.hmget(self.task_key(task_id), "state", "token")
        return current is not None and text_of(current) == str(token) and State(text_of(state)).active

    def renew_many(
        self, renewals: Sequence[Renewal], *, now: float, lease_seconds: float, tallies: Tallies | None = None
    ) -> list[bool]:
        """Renew several leases (writing progress where given) in one pipelined round trip,
        adding ``tallies`` (:mod:`actors.stagemeter`) to the stage totals and their bytes to the
        current minute's figures (:mod:`actors.store_figures`) in the same trip; for each lease,
        False when its token is stale or the task is no longer active."""
        pipe = self.client.pipeline(transaction=False)
        for r in renewals:
            keys = [self.task_key(r.task_id), self.leases_key]
            progress = [*(r.figures or ("", "", "")), "" if r.stored is None else r.stored]
            files = [r.files.finished_text(), r.files.active_json(), r.files.connections] if r.files else []
            self._call("heartbeat", keys, r.task_id, r.token, now, lease_seconds, *progress, *files, client=pipe)
        for stage, (moved, seconds) in (tallies or {}).items():
            if moved:
                pipe.hincrby(self.stage_totals_key, f"{stage}:bytes", moved)
            if seconds:
                pipe.hincrbyfloat(self.stage_totals_key, f"{stage}:seconds", round(seconds, 6))
        self.add_minute_bytes(pipe, now, tallies or {})
        return [bool(written) for written in pipe.execute()[: len(renewals)]]

    def release(
        self,
        task_id: str,
        token: int,
        target: State,
        *,
        now: float,
        error: str = "",
        not_before: float = 0.0,
        max_attempts: int,
        refund: bool = False,
        code: str = "",
        file: str = "",
        notes: tuple[str, str] = ("", ""),
        stored: Sequence[Mapping[str, Any]] = (),
    ) -> State | None:
        """End the current run in ``target``; ``queued`` turns ``dead`` once attempts are used.

        ``notes`` (for ``queued``): what to append to ``error`` when the task stays queued, and
        when it turns dead instead; the store decides which, so the text follows the outcome.

        ``refund`` gives the attempt back (a graceful stop handed the task over); ``code`` is the
        error's machine-readable code (actors/errors.py), kept as ``error_code``, and ``file``
        the path of the file it is about, as ``error_file``. ``stored`` (for ``done``): where
        each file went (:func:`actors.task.storage_fields`), which status shows. Returns the
        state reached, or None when the token is stale (someone else owns the task).
        """
        reply = self._call(
            "release",
            [self.task_key(task_id), self.leases_key],
            task_id,
            token,
            target.value,
            now,
            error,
            not_before,
            max_attempts,
            "1" if refund else "0",
            code,
            file,
            *notes,
            json.dumps([storage_fields(f) for f in stored], separators=(",", ":")) if stored else "",
        )
        return State(text_of(reply[1])) if StepReply(text_of(reply[0])) is StepReply.OK else None

    def enter_finalize(
        self,
        task_id: str,
        token: int,
        *,
        now: float,
        lease_seconds: float,
        limit: int,
        due: float,
        failing_since: float = 0.0,
    ) -> tuple[StepReply, int]:
        """Take a finalize slot (``ok``: the run's new token, lease held), or rest until the
        next message at ``due`` (``full``: the token that message carries), or learn that
        ``token`` is ``stale``."""
        keys = [self.task_key(task_id), self.leases_key]
        reply = self._call("enter_finalize", keys, task_id, token, now, lease_seconds, limit, due, failing_since)
        outcome = StepReply(text_of(reply[0]))
        return outcome, int(reply[1]) if outcome is not StepReply.STALE else token

    def park(self, task_id: str, token: int, *, now: float, due: float, failing_since: float, error: str) -> int | None:
        """Park a finalizing task while its storage or receiver is down, until ``due``, without
        a lease; return the token for its next finalize message, or None when ``token`` is stale."""
        reply = self._call("park", [self.task_key(task_id)], task_id, token, now, due, failing_since, error)
        return int(reply[1]) if StepReply(text_of(reply[0])) is StepReply.OK else None

    def cancel(self, task_id: str, now: float, by: str = "") -> CancelReply:
        """Cancel a task that has not ended, unless its completion is being announced (then the
        backend may already hold task.completed, so the task must end done); ``by``: who (on
        its task.canceled event)."""
        keys = [self.task_key(task_id), self.leases_key]
        return CancelReply(text_of(self._call("cancel", keys, task_id, now, by)[0]))

    def announce(self, task_id: str, token: int, *, now: float, lease_seconds: float) -> float | None:
        """Record that task.completed is about to be delivered (its lease renewed); return the
        time of the run's first announcement, which the event carries on every delivery (one
        body per webhook-id), or None when the token is stale or the task was canceled: send
        nothing then.

        From here on a cancel is refused and an expired lease queues the task again instead of
        ending it dead, so the same event is delivered again and never followed by task.failed.
        """
        reply = self._call("announce", [self.task_key(task_id), self.leases_key], task_id, token, now, lease_seconds)
        return float(reply[1]) if StepReply(text_of(reply[0])) is StepReply.OK else None

    def retry(self, task_id: str, now: float, by: str = "") -> RetryReply:
        """Give an ended (failed/dead/canceled) task fresh attempts; ``by``: who (on its
        task.retried event)."""
        return RetryReply(text_of(self._call("retry", [self.task_key(task_id)], task_id, now, by)[0]))

    def begin_notice(self, task_id: str, seq: int | None, *, busy_until: float) -> NoticeTry:
        """Take one try at the notice the task owes, if ``seq`` is what its chain waits for
        (None: the notice's first try). Until ``busy_until`` the notice counts as in flight."""
        reply = self._call(
            "notify_begin", [self.task_key(task_id), self.notify_key], task_id, "" if seq is None else seq, busy_until
        )
        if text_of(reply[0]) != "go":
            return NoticeTry(skipped=text_of(reply[1]))
        return NoticeTry(seq=int(reply[1]), tries=int(reply[2]), run=int(text_of(reply[3])))

    def notice_later(self, task_id: str, seq: int, *, due: float) -> bool:
        """Try ``seq`` failed: the next one is due at ``due``. False when the chain moved on or
        the notice ended meanwhile (then no further message must be sent)."""
        return bool(self._call("notify_later", [self.task_key(task_id), self.notify_key], task_id, seq, due))

    def end_notice(self, task_id: str, run: int, seq: int | None = None) -> bool:
        """The notice for ``run`` is delivered (``seq`` None: by any try) or given up (only by
        the chain's latest try ``seq``); True when it was owed until now."""
        keys = [self.task_key(task_id), self.notify_key]
        return bool(self._call("notify_end", keys, task_id, run, "" if seq is None else seq))

    def get(self, task_id: str) -> Task | None:
        return self.get_many([task_id])[0]

    def get_many(self, task_ids: Sequence[str]) -> list[Task | None]:
        """Tasks by id, read in one pipelined round trip; None for an id whose record is gone (a
        page or an index may list a task pruned since)."""
        pipe = self.client.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(self.task_key(task_id))
            pipe.get(self.spec_key(task_id))
            pipe.zscore(f"{self.prefix}resting", task_id)
            pipe.get(f"{self.prefix}stored:{task_id}")
        replies = pipe.execute() if task_ids else []
        tasks: list[Task | None] = []
        for at, task_id in enumerate(task_ids):
            raw, described_json, resting_until, stored_json = replies[4 * at : 4 * at + 4]
            if not raw or described_json is None:
                tasks.append(None)
            else:
                tasks.append(_task_from(task_id, raw, described_json, float(resting_until or 0), stored_json))
        return tasks

    def id_by_key(self, key: str) -> str | None:
        """The id of the task an idempotency key names now (the newest, after a replace)."""
        found = self.client.get(f"{self.prefix}key:{key}")
        return text_of(found) if found is not None else None

    def counts(self) -> dict[State, int]:
        """Tasks per state, from the per-state sets (one pipelined round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for state in State:
            pipe.zcard(self.state_key(state))
        return dict(zip(State, (int(n) for n in pipe.execute()), strict=True))

    def holders(self, limit: int) -> dict[str, list[str]]:
        """Which worker holds which task: the tasks under a lease (at most ``limit``), each
        task's worker read in one round trip."""
        leased = [text_of(i) for i in self.client.zrange(self.leases_key, 0, limit - 1)]
        pipe = self.client.pipeline(transaction=False)
        for task_id in leased:
            pipe.hget(self.task_key(task_id), "worker")
        held: dict[str, list[str]] = {}
        for task_id, worker in zip(leased, pipe.execute(), strict=True):
            if worker:
                held.setdefault(text_of(worker), []).append(task_id)
        return held

    def ids(self, state: State, limit: int = 100) -> list[str]:
        """The most recent task ids in ``state``, newest first."""
        return [text_of(v) for v in self.client.zrevrange(self.state_key(state), 0, limit - 1)]

    def page(self, state: State, limit: int, after: Cursor | None = None) -> list[tuple[str, float]]:
        """Up to ``limit`` (id, time entered) of tasks in ``state``, newest first, after the
        cursor ``after``. Tasks that entered in the same millisecond share a score and are
        listed by id, descending: the cursor's id places it among them, so none is skipped."""
        return self._newest(self.state_key(state), limit, after)

    def tasks_by_name(self, prefix: str, limit: int, after: str | None = None) -> tuple[list[str], str | None]:
        """Ids of up to ``limit`` tasks whose name starts with ``prefix``, casefolded (``khóa``
        finds "Khóa học"), in name order, from the name index in one command; and the cursor of
        the next page (pass it as ``after``; None at the end). An empty prefix raises ValueError.
        A task pruned since may be listed: reading it finds nothing."""
        _check_limit(limit)
        low, high = name_range(prefix, after)
        found = self.client.zrangebylex(self.name_index_key, low, high, start=0, num=limit + 1)
        members = [text_of(m) for m in found]
        return [task_id_of(m) for m in members[:limit]], (members[limit - 1] if len(members) > limit else None)

    def tasks_by_host(self, host: str, limit: int, before: Cursor | None = None) -> tuple[list[str], Cursor | None]:
        """Ids of up to ``limit`` tasks with a file on ``host`` (a hostname, any case: no port),
        newest first, older than the cursor ``before`` (as :meth:`page`); and the cursor of the
        next page (None at the end). A host no task names has none. A task pruned since may be
        listed: reading it finds nothing."""
        _check_limit(limit)
        entries = self._newest(self.host_index_key(host.lower()), limit + 1, before)
        last = entries[limit - 1] if len(entries) > limit else None
        return [task_id for task_id, _ in entries[:limit]], (Cursor(last[1], last[0]) if last else None)

    def _newest(self, key: str, limit: int, after: Cursor | None) -> list[tuple[str, float]]:
        """Up to ``limit`` (member, score) of the sorted set ``key``, highest score first, past
        ``after`` (equal scores: by member, descending)."""
        found: Any
        if after is None:
            found = self.client.zrevrange(key, 0, limit - 1, withscores=True)
            return [(text_of(m), float(s)) for m, s in found]
        ties = int(self.client.zcount(key, after.at, after.at))
        found = self.client.zrevrangebyscore(key, after.at, "-inf", start=0, num=limit + ties, withscores=True)
        entries = [(text_of(m), float(s)) for m, s in found]
        return [(i, s) for i, s in entries if s < after.at or (s == after.at and i < after.task_id)][:limit]


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"a page holds at least one task (limit {limit})")


def _task_from(
    task_id: str,
    raw: dict[Any, Any],
    described_json: bytes | str,
    resting_until: float = 0.0,
    stored_json: bytes | str | None = None,
) -> Task:
    """A Task from its hash fields, its spec JSON and (done) where its files were stored."""
    data = {text_of(k): text_of(v) for k, v in raw.items()}
    described = json.loads(described_json)
    spec = TaskSpec(
        files=files_from_json(described["files"]),
        name=described.get("name", ""),
        key=data.get("key") or None,
        webhook=described.get("webhook"),
        accept=tuple(described.get("accept", DEFAULT_ACCEPT)),
        request=RequestOptions.from_json(described.get("request")),
    )
    return Task(
        id=task_id,
        spec=spec,
        state=State(data["state"]),
        attempts=int(data.get("attempts", 0)),
        token=int(data.get("token", 0)),
        run=int(data.get("run", 0)),
        lease_until=float(data.get("lease_until", 0)),
        not_before=float(data.get("not_before", 0)),
        worker=data.get("worker", ""),
        error=data.get("error", ""),
        error_code=data.get("error_code", ""),
        error_file=data.get("error_file", ""),
        bytes_done=int(data.get("bytes_done", 0)),
        bytes_stored=int(data.get("bytes_stored", 0)),
        bytes_total=int(data.get("bytes_total", 0)),
        files_done=int(data.get("files_done", 0)),
        created_at=float(data.get("created_at", 0)),
        updated_at=float(data.get("updated_at", 0)),
        announced=data.get("announcing") == data.get("run", "0"),
        resting=data.get("resting", ""),
        resting_until=resting_until if data.get("resting") else 0.0,
        waiting_since=float(data.get("waiting_since", 0)),
        waiting_on=data.get("waiting_on", ""),
        waiting_host=data.get("waiting_host", ""),
        stored=tuple(json.loads(stored_json or data.get("stored") or "[]")),
        finished=tuple(int(index) for index in data.get("finished", "").split()),
        active=tuple(tuple(entry) for entry in json.loads(data.get("active") or "[]")),
        resolved={int(index): entry for index, entry in json.loads(data.get("resolved") or "{}").items()},
    )
