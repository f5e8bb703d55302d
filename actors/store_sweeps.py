"""The store's side the supervisor uses: expired leases, orphans, lost messages, the outbox,
prune, the leader lock, and the figures its metrics report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actors.stagemeter import STAGES, Tallies
from actors.states import FINAL_STATES, RequeueReply, State
from actors.store_base import text_of
from actors.store_figures import FigureStore, lock_of
from actors.store_index import MAX_INDEXED_HOSTS


class SweepStore(FigureStore):
    """Bounded reads and guarded writes for the supervisor's sweeps (see supervisor/sweeps.py)."""

    def requeue_expired(self, task_ids: list[str], *, now: float, max_attempts: int) -> list[RequeueReply | Exception]:
        """Take back tasks whose lease ran out, in one pipelined round trip; for each: ``queued``,
        ``dead``, ``skip`` (renewed or ended meanwhile), or the error its script raised (an
        unreadable record). A Redis outage raises, as for any call."""
        pipe = self.client.pipeline(transaction=False)
        for task_id in task_ids:
            self._call("requeue", [self.task_key(task_id), self.leases_key], task_id, now, max_attempts, client=pipe)
        replies = pipe.execute(raise_on_error=False)
        return [r if isinstance(r, Exception) else RequeueReply(text_of(r[0])) for r in replies]

    def rescue_candidates(self, *, now: float, grace_seconds: float, limit: int = 1000) -> list[str]:
        """Queued tasks past their not-before time by ``grace_seconds``: maybe their message is lost.

        Each is returned at most once per grace period, so a long backlog is not flooded.
        """
        reply = self._call("rescue", [self.state_key(State.QUEUED)], now, grace_seconds, limit)
        return [text_of(v) for v in reply]

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
        return lock_of(holder, pttl)

    def leader(self) -> str | None:
        value = self.client.get(self.leader_key)
        return text_of(value) if value is not None else None

    def lost_finalizes(self, *, now: float, grace_seconds: float, limit: int = 1000) -> list[tuple[str, int, float]]:
        """Resting finalizing tasks whose message is overdue by ``grace_seconds`` (it is lost):
        (id, token, failing since) for each, to send the message again; each once per grace."""
        reply = self._call("finalize_resend", [f"{self.prefix}resting"], now, grace_seconds, limit)
        triples = zip(reply[::3], reply[1::3], reply[2::3], strict=True)
        return [(text_of(task_id), int(token), float(since)) for task_id, token, since in triples]

    def claims_sent(self, task_ids: Sequence[str]) -> None:
        """The claim messages of these requeued tasks went out (see ``unsent_claims``)."""
        if task_ids:
            self.client.zrem(f"{self.prefix}outbox:claim", *task_ids)

    def unsent_claims(self, *, before: float, limit: int = 1000) -> list[str]:
        """Tasks requeued before ``before`` whose claim message was never confirmed sent (the
        supervisor lost Redis or died between the requeue and the send)."""
        found = self.client.zrangebyscore(f"{self.prefix}outbox:claim", "-inf", before, start=0, num=limit)
        return [text_of(v) for v in found]

    def slots_in_use(self, now: float) -> dict[str, int]:
        """Live slots per slot set (download, finalize, each host): the sets ``slotkeys`` lists
        that exist (an emptied set's key is gone), in two round trips whatever the keyspace
        holds, never a scan."""
        keys = sorted(text_of(k) for k in self.client.smembers(f"{self.prefix}slotkeys"))
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.zcount(key, now, "+inf")
            pipe.exists(key)
        replies = pipe.execute()
        counted = zip(keys, replies[::2], replies[1::2], strict=True)
        return {key.removeprefix(f"{self.prefix}slots:"): int(n) for key, n, present in counted if present}

    def staged_bytes(self) -> int:
        return int(self.client.get(f"{self.prefix}staged:total") or 0)

    def lost_notices(self, *, now: float, grace_seconds: float, limit: int = 1000) -> list[tuple[str, int | None]]:
        """Owed notices whose next try is overdue by ``grace_seconds`` (their message is lost),
        each with the sequence number to send it again with; each returned once per grace."""
        reply = self._call("notify_resend", [self.notify_key], now, grace_seconds, limit)
        pairs = zip(reply[::2], reply[1::2], strict=True)
        return [(text_of(task_id), int(text_of(seq)) if text_of(seq) else None) for task_id, seq in pairs]

    def expired(self, now: float, limit: int = 1000) -> list[str]:
        """Tasks whose lease deadline is past, oldest first: O(log n + found), never a scan."""
        return [text_of(v) for v in self.client.zrangebyscore(self.leases_key, "-inf", now, start=0, num=limit)]

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
        return {text_of(reason): int(n) for reason, n in counts.items()}

    def stage_totals(self) -> Tallies:
        """Bytes moved and seconds spent in each stage ever, by every worker (``stats:stages``)."""
        fields = {text_of(k): text_of(v) for k, v in self.client.hgetall(self.stage_totals_key).items()}
        return {
            stage: (int(fields.get(f"{stage}:bytes", 0)), float(fields.get(f"{stage}:seconds", 0))) for stage in STAGES
        }

    def prune_batch(
        self, state: State, *, cutoff: float, limit: int, skip: int = 0
    ) -> tuple[list[tuple[str, State]], int, bool]:
        """Delete up to ``limit`` records of tasks that ended in ``state`` before ``cutoff``, in
        one script call (prune.lua lists what goes with each, its search index entries among
        them, and what is kept).

        Returns (id, state) of each deleted record; how many entries that ended before the
        cutoff were kept (a notice still owed, say), to pass as ``skip`` to the sweep's next
        batch; and whether more may be left. It looks at 4 x ``limit`` entries at most, so a
        long run of kept records at the head of the set is crossed in bounded steps.
        """
        bounds = (max(limit, 1), 4 * max(limit, 1), skip, MAX_INDEXED_HOSTS)
        reply = self._call("prune", [self.state_key(state)], cutoff, *bounds)
        pairs = zip(reply[2::2], reply[3::2], strict=True)
        return [(text_of(task_id), State(text_of(s))) for task_id, s in pairs], int(reply[0]), bool(reply[1])
