"""TaskStore: haul's tasks in Redis, with every state change atomic and fenced.

Each operation that reads then writes is one Lua script in ``actors/lua/`` (its header lists
KEYS and ARGV); ``_lib.lua`` is prepended to each. Keys, all under one prefix::

    haul:task:<id>       hash: the task's state, attempts, token, lease, progress, ...
    haul:spec:<id>       string: what it asks for (JSON: files, name, webhook, accept)
    haul:key:<key>       string: idempotency key -> task id
    haul:state:<state>   sorted set: task ids in that state, by time of entry
    haul:leases          sorted set: task ids holding a lease, by deadline
    haul:notify          sorted set: failed/dead/canceled tasks whose task.failed or task.canceled is
                         owed, by when its next try is due (see actors/notify.py)
    haul:supervisor:leader  string with TTL: the supervisor replica that runs the sweeps
    haul:slots:<stage>   sorted sets: stage slots, by the lease deadline of their holder
    haul:staged          hash: bytes each sandbox holds (and haul:staged:total, their sum)
    haul:stats:dead      counter: tasks that ever went dead (haul_dead_tasks_total)

Every call that depends on time takes ``now`` (seconds since the epoch) as a parameter.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import redis

from actors.states import (
    FINAL_STATES,
    CancelReply,
    ClaimReply,
    CreateReply,
    RequeueReply,
    RetryReply,
    State,
    StepReply,
)
from actors.task import DEFAULT_ACCEPT, KeyConflict, Task, TaskSpec, files_from_json, first_difference, request_hash

DEFAULT_PREFIX = "haul:"

#: Every Redis call gives up after this long (seconds): a half-open connection (a dead peer, a
#: dropped NAT entry) must not block a sweep or a lease renewal for the minutes TCP takes to
#: notice. Every script haul runs is bounded, so a healthy Redis answers in milliseconds.
REDIS_SOCKET_TIMEOUT_SECONDS = 10.0
REDIS_CONNECT_TIMEOUT_SECONDS = 5.0


def redis_options() -> dict[str, Any]:
    """Connection options for every Redis client haul makes (the store and the broker)."""
    return {
        "socket_timeout": REDIS_SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_SECONDS,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }


@dataclass(frozen=True)
class StageLimits:
    """What a claim must respect; 0 means no limit. See HAUL_DOWNLOAD_CONCURRENCY and friends."""

    downloads: int = 0
    downloads_per_host: int = 0
    staging_max_bytes: int = 0
    finalize_backlog: int = 0


NO_LIMITS = StageLimits()


@dataclass(frozen=True)
class Renewal:
    """One lease to renew: the task, the holder's token, and progress to write with it
    (bytes done, bytes total, files done) or None."""

    task_id: str
    token: int
    figures: tuple[int, int, int] | None = None


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


def _load_script(name: str) -> str:
    folder = resources.files("actors") / "lua"
    return (folder / "_lib.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TaskStore:
    """Typed operations on tasks; the only code that knows haul's Redis keys."""

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._scripts = {
            name: client.register_script(_load_script(name))
            for name in (
                "create",
                "claim",
                "advance",
                "heartbeat",
                "release",
                "cancel",
                "retry",
                "requeue",
                "rescue",
                "prune",
                "leader",
                "resign",
                "enter_finalize",
                "announce",
                "notify_begin",
                "notify_later",
                "notify_end",
                "notify_resend",
                "park",
                "finalize_resend",
            )  # fmt: skip
        }

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX) -> TaskStore:
        return cls(redis.Redis.from_url(url, **redis_options()), prefix)

    # -- keys -------------------------------------------------------------------------------

    def task_key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def spec_key(self, task_id: str) -> str:
        """What the task asks for (files, name, webhook), apart from the hash: a long value would
        turn the whole hash from Redis's compact encoding into a hash table (3x the memory)."""
        return f"{self.prefix}spec:{task_id}"

    def state_key(self, state: State) -> str:
        return f"{self.prefix}state:{state.value}"

    @property
    def leases_key(self) -> str:
        return f"{self.prefix}leases"

    @property
    def notify_key(self) -> str:
        return f"{self.prefix}notify"

    @property
    def leader_key(self) -> str:
        return f"{self.prefix}supervisor:leader"

    def _call(self, name: str, keys: list[str], *args: Any, client: Any = None) -> Any:
        """Run a script (or queue it on a pipeline ``client``); times (floats) go as
        milliseconds-precise text, which is all we need."""
        texts = [f"{a:.3f}" if isinstance(a, float) else a for a in args]
        return self._scripts[name](keys=keys, args=[self.prefix, *texts], client=client)

    # -- writes -----------------------------------------------------------------------------

    def create(
        self, spec: TaskSpec, now: float, task_id: str | None = None, *, replace: bool = False
    ) -> tuple[str, bool]:
        """Store a new ``queued`` task; with ``spec.key`` seen before for the same request,
        return that task instead. Returns ``(task id, created)``.

        Raises :class:`KeyConflict` naming the first differing field when the key was seen
        with a different request. With ``replace``, a key whose task ended failed, dead or
        canceled names a new task (the old record stays); any other state raises KeyConflict.
        """
        task_id = task_id or uuid.uuid4().hex
        described: dict[str, Any] = {"files": [f.to_json() for f in spec.files]}
        if spec.name:
            described["name"] = spec.name
        if spec.webhook:
            described["webhook"] = spec.webhook
        if spec.accept != DEFAULT_ACCEPT:
            described["accept"] = list(spec.accept)
        fields: dict[str, Any] = {
            "key": spec.key or "",
            "hosts": " ".join(sorted({urlsplit(f.url).hostname or "" for f in spec.files})),
            "bytes_total": sum(f.size or 0 for f in spec.files),
            "bytes_done": 0,
            "files_done": 0,
            "attempts": 0,
            "token": 0,
            "run": 0,
            "created_at": now,
            "request_hash": request_hash(spec),
        }
        keys = [self.task_key(task_id), self.spec_key(task_id)]
        if spec.key:
            keys.append(f"{self.prefix}key:{spec.key}")
        flat = [item for pair in fields.items() for item in pair]
        spec_json = json.dumps(described, separators=(",", ":"))
        reply = self._call("create", keys, task_id, now, spec_json, request_hash(spec), "1" if replace else "0", *flat)
        found, outcome = _text(reply[0]), CreateReply(_text(reply[1]))
        if outcome is CreateReply.NOT_REPLACEABLE:
            state = _text(reply[2])
            why = "is done" if state == State.DONE else "has not ended"
            raise KeyConflict(
                f"key {spec.key!r}: task {found} {why} (state {state}); only a failed, dead or canceled "
                "task is replaced"
            )
        if outcome is CreateReply.DIFFERENT:
            first = self.get(found)
            field = first_difference(first.spec, spec) if first is not None else None
            if field is not None:  # None: a record stored before request hashes, same request
                raise KeyConflict(
                    f"key {spec.key!r} was used for task {found} with a different request: {field} differs; "
                    "use a new key, or --replace (replace=True) if that task failed, died or was canceled"
                )
        return found, outcome is CreateReply.CREATED

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
        outcome = ClaimReply(_text(reply[0]))
        if outcome is ClaimReply.OK:
            fields = dict(zip(reply[4][::2], reply[4][1::2], strict=True))
            task = _task_from(task_id, fields, reply[3]) if reply[3] else None  # None: spec lost
            return Claim(outcome, token=int(reply[1]), attempts=int(reply[2]), task=task)
        if outcome is ClaimReply.FULL:
            return Claim(outcome, detail=_text(reply[2]), reason=_text(reply[1]), waiting_since=float(reply[3]))
        return Claim(outcome, detail=_text(reply[1]) if len(reply) > 1 else "")

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
    ) -> tuple[StepReply, int]:
        """``downloading`` -> ``finalizing`` with the final progress, taking a finalize slot in
        the same step: ``ok`` (slot held, ``token`` kept), ``full`` (finalizing, resting until a
        slot is free; the new token is for the finalize message) or ``stale``."""
        return self._advance(
            task_id, token, State.DOWNLOADING, State.FINALIZING, now, lease_seconds, finalize_limit, progress
        )

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
    ) -> tuple[StepReply, int]:
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
        )
        outcome = StepReply(_text(reply[0]))
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

    def holds(self, task_id: str, token: int) -> bool:
        """Whether ``token`` is still the task's and the task still active (a read only)."""
        state, current = self.client.hmget(self.task_key(task_id), "state", "token")
        return current is not None and _text(current) == str(token) and State(_text(state)).active

    def renew_many(self, renewals: Sequence[Renewal], *, now: float, lease_seconds: float) -> list[bool]:
        """Renew several leases (writing progress where given) in one pipelined round trip;
        for each, False when its token is stale or the task is no longer active."""
        pipe = self.client.pipeline(transaction=False)
        for r in renewals:
            keys = [self.task_key(r.task_id), self.leases_key]
            self._call("heartbeat", keys, r.task_id, r.token, now, lease_seconds, *(r.figures or ()), client=pipe)
        return [bool(written) for written in pipe.execute()]

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
    ) -> State | None:
        """End the current run in ``target``; ``queued`` turns ``dead`` once attempts are used.

        ``refund`` gives the attempt back (a graceful stop handed the task over); ``code`` is the
        error's machine-readable code (actors/errors.py), kept as ``error_code``, and ``file``
        the path of the file it is about, as ``error_file``. Returns the
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
        )
        return State(_text(reply[1])) if StepReply(_text(reply[0])) is StepReply.OK else None

    def requeue_expired(self, task_ids: list[str], *, now: float, max_attempts: int) -> list[RequeueReply | Exception]:
        """Take back tasks whose lease ran out, in one pipelined round trip; for each: ``queued``,
        ``dead``, ``skip`` (renewed or ended meanwhile), or the error its script raised (an
        unreadable record). A Redis outage raises, as for any call."""
        pipe = self.client.pipeline(transaction=False)
        for task_id in task_ids:
            self._call("requeue", [self.task_key(task_id), self.leases_key], task_id, now, max_attempts, client=pipe)
        replies = pipe.execute(raise_on_error=False)
        return [r if isinstance(r, Exception) else RequeueReply(_text(r[0])) for r in replies]

    def rescue_candidates(self, *, now: float, grace_seconds: float, limit: int = 1000) -> list[str]:
        """Queued tasks past their not-before time by ``grace_seconds``: maybe their message is lost.

        Each is returned at most once per grace period, so a long backlog is not flooded.
        """
        reply = self._call("rescue", [self.state_key(State.QUEUED)], now, grace_seconds, limit)
        return [_text(v) for v in reply]

    def prune_ended(self, *, cutoff: float, limit: int = 500) -> list[tuple[str, State]]:
        """Delete records of tasks that ended before ``cutoff``, one batch of up to ``limit`` per
        final state (see ``prune_batch``); return (id, state) of each."""
        pruned: list[tuple[str, State]] = []
        for state in sorted(FINAL_STATES):
            pruned += self.prune_batch(state, cutoff=cutoff, limit=limit)[0]
        return pruned

    def which_exist(self, task_ids: list[str]) -> list[bool]:
        """For each id, whether its task record exists (one pipelined round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.exists(self.task_key(task_id))
        return [bool(n) for n in pipe.execute()]

    def hold_leadership(self, candidate: str, ttl_seconds: float) -> bool:
        """Renew or take the supervisor leader lock; True while ``candidate`` holds it."""
        return bool(self._call("leader", [self.leader_key], candidate, int(ttl_seconds * 1000)))

    def resign(self, candidate: str) -> None:
        self._call("resign", [self.leader_key], candidate)

    def leader_lock(self) -> tuple[str | None, float | None]:
        """Who holds the supervisor leader lock and how long it has left in seconds (None: no
        expiry), in one round trip; (None, None) when nobody holds it."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.leader_key)
        pipe.pttl(self.leader_key)
        holder, pttl = pipe.execute()
        if holder is None:
            return None, None
        return _text(holder), (pttl / 1000 if pttl >= 0 else None)

    def leader(self) -> str | None:
        value = self.client.get(self.leader_key)
        return _text(value) if value is not None else None

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
        outcome = StepReply(_text(reply[0]))
        return outcome, int(reply[1]) if outcome is not StepReply.STALE else token

    def park(self, task_id: str, token: int, *, now: float, due: float, failing_since: float, error: str) -> int | None:
        """Park a finalizing task while its storage or receiver is down, until ``due``, without
        a lease; return the token for its next finalize message, or None when ``token`` is stale."""
        reply = self._call("park", [self.task_key(task_id)], task_id, token, now, due, failing_since, error)
        return int(reply[1]) if StepReply(_text(reply[0])) is StepReply.OK else None

    def lost_finalizes(self, *, now: float, grace_seconds: float, limit: int = 1000) -> list[tuple[str, int, float]]:
        """Resting finalizing tasks whose message is overdue by ``grace_seconds`` (it is lost):
        (id, token, failing since) for each, to send the message again; each once per grace."""
        reply = self._call("finalize_resend", [f"{self.prefix}resting"], now, grace_seconds, limit)
        triples = zip(reply[::3], reply[1::3], reply[2::3], strict=True)
        return [(_text(task_id), int(token), float(since)) for task_id, token, since in triples]

    def claims_sent(self, task_ids: Sequence[str]) -> None:
        """The claim messages of these requeued tasks went out (see ``unsent_claims``)."""
        if task_ids:
            self.client.zrem(f"{self.prefix}outbox:claim", *task_ids)

    def unsent_claims(self, *, before: float, limit: int = 1000) -> list[str]:
        """Tasks requeued before ``before`` whose claim message was never confirmed sent (the
        supervisor lost Redis or died between the requeue and the send)."""
        found = self.client.zrangebyscore(f"{self.prefix}outbox:claim", "-inf", before, start=0, num=limit)
        return [_text(v) for v in found]

    def slots_in_use(self, now: float) -> dict[str, int]:
        """Live slots per slot set (download, finalize, each host): the sets ``slotkeys`` lists
        that exist (an emptied set's key is gone), in two round trips whatever the keyspace
        holds, never a scan."""
        keys = sorted(_text(k) for k in self.client.smembers(f"{self.prefix}slotkeys"))
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.zcount(key, now, "+inf")
            pipe.exists(key)
        replies = pipe.execute()
        counted = zip(keys, replies[::2], replies[1::2], strict=True)
        return {key.removeprefix(f"{self.prefix}slots:"): int(n) for key, n, present in counted if present}

    def staged_bytes(self) -> int:
        return int(self.client.get(f"{self.prefix}staged:total") or 0)

    def cancel(self, task_id: str, now: float) -> CancelReply:
        """Cancel a task that has not ended, unless its completion is being announced (then the
        backend may already hold task.completed, so the task must end done)."""
        return CancelReply(_text(self._call("cancel", [self.task_key(task_id), self.leases_key], task_id, now)[0]))

    def announce(self, task_id: str, token: int, *, now: float, lease_seconds: float) -> float | None:
        """Record that task.completed is about to be delivered (its lease renewed); return the
        time of the run's first announcement, which the event carries on every delivery (one
        body per webhook-id), or None when the token is stale or the task was canceled: send
        nothing then.

        From here on a cancel is refused and an expired lease queues the task again instead of
        ending it dead, so the same event is delivered again and never followed by task.failed.
        """
        reply = self._call("announce", [self.task_key(task_id), self.leases_key], task_id, token, now, lease_seconds)
        return float(reply[1]) if StepReply(_text(reply[0])) is StepReply.OK else None

    def retry(self, task_id: str, now: float) -> RetryReply:
        """Give an ended (failed/dead/canceled) task fresh attempts."""
        return RetryReply(_text(self._call("retry", [self.task_key(task_id)], task_id, now)[0]))

    def begin_notice(self, task_id: str, seq: int | None, *, busy_until: float) -> NoticeTry:
        """Take one try at the notice the task owes, if ``seq`` is what its chain waits for
        (None: the notice's first try). Until ``busy_until`` the notice counts as in flight."""
        reply = self._call(
            "notify_begin", [self.task_key(task_id), self.notify_key], task_id, "" if seq is None else seq, busy_until
        )
        if _text(reply[0]) != "go":
            return NoticeTry(skipped=_text(reply[1]))
        return NoticeTry(seq=int(reply[1]), tries=int(reply[2]), run=int(_text(reply[3])))

    def notice_later(self, task_id: str, seq: int, *, due: float) -> bool:
        """Try ``seq`` failed: the next one is due at ``due``. False when the chain moved on or
        the notice ended meanwhile (then no further message must be sent)."""
        return bool(self._call("notify_later", [self.task_key(task_id), self.notify_key], task_id, seq, due))

    def end_notice(self, task_id: str, run: int, seq: int | None = None) -> bool:
        """The notice for ``run`` is delivered (``seq`` None: by any try) or given up (only by
        the chain's latest try ``seq``); True when it was owed until now."""
        keys = [self.task_key(task_id), self.notify_key]
        return bool(self._call("notify_end", keys, task_id, run, "" if seq is None else seq))

    def lost_notices(self, *, now: float, grace_seconds: float, limit: int = 1000) -> list[tuple[str, int | None]]:
        """Owed notices whose next try is overdue by ``grace_seconds`` (their message is lost),
        each with the sequence number to send it again with; each returned once per grace."""
        reply = self._call("notify_resend", [self.notify_key], now, grace_seconds, limit)
        pairs = zip(reply[::2], reply[1::2], strict=True)
        return [(_text(task_id), int(_text(seq)) if _text(seq) else None) for task_id, seq in pairs]

    # -- reads ------------------------------------------------------------------------------

    def get(self, task_id: str) -> Task | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.task_key(task_id))
        pipe.get(self.spec_key(task_id))
        pipe.zscore(f"{self.prefix}resting", task_id)
        raw, described_json, resting_until = pipe.execute()
        if not raw or described_json is None:
            return None
        return _task_from(task_id, raw, described_json, float(resting_until or 0))

    def id_by_key(self, key: str) -> str | None:
        """The id of the task an idempotency key names now (the newest, after a replace)."""
        found = self.client.get(f"{self.prefix}key:{key}")
        return _text(found) if found is not None else None

    def counts(self) -> dict[State, int]:
        """Tasks per state, from the per-state sets (one pipelined round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for state in State:
            pipe.zcard(self.state_key(state))
        return dict(zip(State, (int(n) for n in pipe.execute()), strict=True))

    def expired(self, now: float, limit: int = 1000) -> list[str]:
        """Tasks whose lease deadline is past, oldest first: O(log n + found), never a scan."""
        return [_text(v) for v in self.client.zrangebyscore(self.leases_key, "-inf", now, start=0, num=limit)]

    def ids(self, state: State, limit: int = 100) -> list[str]:
        """The most recent task ids in ``state``, newest first."""
        return [_text(v) for v in self.client.zrevrange(self.state_key(state), 0, limit - 1)]

    def finalizing_and_parked(self) -> tuple[int, int]:
        """Tasks finalizing, and how many of them are parked (their storage or receiver is
        down), read in one round trip: the difference is the backlog that pauses claims."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self.state_key(State.FINALIZING))
        pipe.zcard(f"{self.prefix}parked")
        finalizing, parked = pipe.execute()
        return int(finalizing), int(parked)

    def dead_total(self) -> int:
        """Tasks that became dead ever (``stats:dead``, counted by set_state in _lib.lua)."""
        return int(self.client.get(f"{self.prefix}stats:dead") or 0)

    def claims_refused(self) -> dict[str, int]:
        """Claims answered ``full`` ever, by reason (``stats:refused``, kept by claim.lua)."""
        counts: dict[Any, Any] = self.client.hgetall(f"{self.prefix}stats:refused")
        return {_text(reason): int(n) for reason, n in counts.items()}

    def prune_batch(
        self, state: State, *, cutoff: float, limit: int, skip: int = 0
    ) -> tuple[list[tuple[str, State]], int, bool]:
        """Delete up to ``limit`` records of tasks that ended in ``state`` before ``cutoff``, in
        one script call (prune.lua lists what goes with each and what is kept).

        Returns (id, state) of each deleted record; how many entries that ended before the
        cutoff were kept (a notice still owed, say), to pass as ``skip`` to the sweep's next
        batch; and whether more may be left. It looks at 4 x ``limit`` entries at most, so a
        long run of kept records at the head of the set is crossed in bounded steps.
        """
        reply = self._call("prune", [self.state_key(state)], cutoff, max(limit, 1), 4 * max(limit, 1), skip)
        pairs = zip(reply[2::2], reply[3::2], strict=True)
        return [(_text(task_id), State(_text(s))) for task_id, s in pairs], int(reply[0]), bool(reply[1])


def _task_from(task_id: str, raw: dict[Any, Any], described_json: bytes | str, resting_until: float = 0.0) -> Task:
    """A Task from its hash fields and its spec JSON, as stored."""
    data = {_text(k): _text(v) for k, v in raw.items()}
    described = json.loads(described_json)
    spec = TaskSpec(
        files=files_from_json(described["files"]),
        name=described.get("name", ""),
        key=data.get("key") or None,
        webhook=described.get("webhook"),
        accept=tuple(described.get("accept", DEFAULT_ACCEPT)),
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
    )
