"""What an operator dashboard's overview reads besides the task counts (``haul api``), from a
few known keys in one round trip, never a scan::

    haul:stats:minute:<m>    hash, <m> the minute since the epoch (floor(now / 60)):
                             done, failed, dead: tasks that entered the state in that minute
                             (set_state in _lib.lua, by the script's ``now``);
                             download:bytes, finalize:bytes: bytes moved, added by every
                             worker's lease keeper with the stage totals (``renew_many``);
                             it expires MINUTE_TTL_SECONDS after its last write
    haul:supervisor:report   hash: node, last_sweep, checked_at, problems (a JSON list), written
                             by the leader only (report.lua), with a TTL of a few sweeps
                             (supervisor/report.py), so a dead supervisor's report goes away

Counts per minute rather than rates: any reader divides by 60, and workers and scripts only
ever add, so the figures of every worker and every replica add up without coordination.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from actors.stagemeter import DOWNLOAD, FINALIZE, Tallies
from actors.store_base import StoreBase, text_of

#: Seconds in a bucket of figures.
MINUTE_SECONDS = 60
#: A minute's figures are kept this long after their last write (seconds): enough for a
#: dashboard's last few minutes, and the buckets stay a dozen small keys. _lib.lua's MINUTE_TTL
#: is the same number (the scripts count tasks, the lease keepers bytes).
MINUTE_TTL_SECONDS = 900


@dataclass(frozen=True)
class MinuteFigures:
    """One minute's throughput, every worker's added up."""

    #: The minute's first second (since the epoch, a multiple of 60).
    start: int
    done: int = 0
    failed: int = 0
    dead: int = 0
    download_bytes: int = 0
    finalize_bytes: int = 0


@dataclass(frozen=True)
class SupervisorReport:
    """The leading supervisor's last report, and who holds the leader lock now: a report from a
    node that no longer leads (``from_leader`` False) is the previous leader's, until the new
    one's first sweep replaces it."""

    #: The replica that wrote it (the lock's holder then).
    node: str
    #: When its requeue sweep last ended (seconds since the epoch), None before the first.
    last_sweep: float | None
    #: When its configuration check last ran, None when it has not run yet.
    checked_at: float | None
    #: What that check found: limits, timing, storage and Redis persistence problems.
    problems: tuple[str, ...]
    #: Who holds the leader lock now (None: nobody), and its seconds left (None: no expiry).
    leader: str | None
    lock_seconds_left: float | None

    @property
    def from_leader(self) -> bool:
        return self.leader is not None and self.leader == self.node


def lock_of(holder: Any, pttl: Any) -> tuple[str | None, float | None]:
    """The leader lock's holder and seconds left from a GET and a PTTL of its key."""
    if holder is None:
        return None, None
    return text_of(holder), (pttl / 1000 if pttl >= 0 else None)


class FigureStore(StoreBase):
    """The dashboard's throughput and the supervisor's report (see the module's key list)."""

    def minute_key(self, minute: int) -> str:
        return f"{self.prefix}stats:minute:{minute}"

    @property
    def report_key(self) -> str:
        return f"{self.prefix}supervisor:report"

    def add_minute_bytes(self, pipe: Any, now: float, tallies: Tallies) -> None:
        """Queue on ``pipe`` the bytes of ``tallies`` added to the minute ``now`` falls in (the
        lease keeper's tick, in the round trip that adds them to the stage totals)."""
        key = self.minute_key(int(now // MINUTE_SECONDS))
        moved = {stage: n for stage, (n, _) in tallies.items() if n}
        for stage, n in moved.items():
            pipe.hincrby(key, f"{stage}:bytes", n)
        if moved:
            pipe.expire(key, MINUTE_TTL_SECONDS)

    def throughput(self, now: float, minutes: int = 5) -> list[MinuteFigures]:
        """The last ``minutes`` complete minutes and the current one (so far), oldest first, in
        one pipelined round trip; a minute nothing happened in reads as zeros."""
        current = int(now // MINUTE_SECONDS)
        first = current - max(minutes, 0)
        pipe = self.client.pipeline(transaction=False)
        for minute in range(first, current + 1):
            pipe.hgetall(self.minute_key(minute))
        return [_minute(minute, raw) for minute, raw in enumerate(pipe.execute(), start=first)]

    def publish_report(
        self,
        node: str,
        *,
        ttl_seconds: float,
        last_sweep: float | None,
        checked_at: float | None,
        problems: Sequence[str],
    ) -> bool:
        """Replace the supervisor's report with ``node``'s, kept ``ttl_seconds``, if ``node``
        holds the leader lock (False otherwise: nothing written). ``problems`` are shown to
        anyone who can read the dashboard: they must hold no secret."""
        fields: list[Any] = []
        if last_sweep is not None:
            fields += ["last_sweep", float(last_sweep)]
        if checked_at is not None:
            fields += ["checked_at", float(checked_at), "problems", json.dumps(list(problems))]
        keys = [self.leader_key, self.report_key]
        return bool(self._call("report", keys, node, int(ttl_seconds * 1000), *fields))

    def supervisor_report(self) -> SupervisorReport | None:
        """The leader's last report and the leader lock, in one round trip; None when no report
        is stored (no supervisor has led for the report's TTL)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.report_key)
        pipe.get(self.leader_key)
        pipe.pttl(self.leader_key)
        raw, holder, pttl = pipe.execute()
        fields = {text_of(k): text_of(v) for k, v in raw.items()}
        if "node" not in fields:
            return None
        leader, left = lock_of(holder, pttl)
        return SupervisorReport(
            node=fields["node"],
            last_sweep=_time(fields.get("last_sweep")),
            checked_at=_time(fields.get("checked_at")),
            problems=tuple(str(p) for p in json.loads(fields.get("problems") or "[]")),
            leader=leader,
            lock_seconds_left=left,
        )


def _minute(minute: int, raw: dict[Any, Any]) -> MinuteFigures:
    fields = {text_of(k): text_of(v) for k, v in raw.items()}

    def count(name: str) -> int:
        return int(fields.get(name, 0))

    return MinuteFigures(
        start=minute * MINUTE_SECONDS,
        done=count("done"),
        failed=count("failed"),
        dead=count("dead"),
        download_bytes=count(f"{DOWNLOAD}:bytes"),
        finalize_bytes=count(f"{FINALIZE}:bytes"),
    )


def _time(text: str | None) -> float | None:
    return float(text) if text else None
