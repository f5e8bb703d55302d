"""Whether a supervisor replica is healthy, and the incidents Sentry hears about.

Healthy (``/healthz`` 200) means: Redis answers and keeps an append-only file synced on every
write, and either this replica leads and its sweeps succeed, or another replica holds the lock
and renews it. Anything else is 503 with the reason, and one Sentry event per incident (plus one
for a new cause that joins it), not one per interval.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

import redis

from supervisor import alerts

if TYPE_CHECKING:
    from supervisor.leadership import Leadership

log = logging.getLogger(__name__)

#: Seconds beyond the lock's TTL before a leader's last sweep, or the last election, is stale.
STALE_SLACK_SECONDS = 5.0
#: Elections in a row that find the replica unhealthy before it is an incident (one Sentry
#: event): a lock changing hands is not one.
INCIDENT_AFTER = 2


class Problem(NamedTuple):
    """Why a replica is unhealthy: ``kind`` groups incidents, ``text`` says what to do."""

    kind: str
    text: str


def redis_problem(exc: redis.RedisError) -> Problem:
    """What Redis answered (or how it failed), as a sentence saying what to do."""
    name = type(exc).__name__
    if isinstance(exc, redis.ReadOnlyError):
        return Problem(
            "redis-readonly",
            "Redis refuses writes (READONLY): it is a replica; point HAUL_REDIS_URL at the primary",
        )
    if isinstance(exc, redis.AuthenticationError):
        return Problem("redis-auth", f"Redis refused haul's credentials ({name}); fix the password in HAUL_REDIS_URL")
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return Problem("redis-unreachable", f"Redis is unreachable ({name}: {exc}); start it or fix HAUL_REDIS_URL")
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return Problem("redis-loading", "Redis is loading its data (after a restart or a resync); wait for it")
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return Problem("redis-oom", "Redis refuses writes (OOM): it reached maxmemory; raise maxmemory or free memory")
    if str(exc).startswith("MISCONF"):
        return Problem("redis-misconf", "Redis refuses writes (MISCONF): it cannot save to disk; see its log")
    return Problem("redis-error", f"Redis refused the leader election ({name}: {exc})")


def leadership_problems(lead: Leadership, now: float, since_sweep: float | None) -> list[Problem]:
    """Why this replica is unhealthy by what its elections and sweeps saw (at most one reason);
    ``since_sweep``: seconds since its last successful requeue sweep or since it began leading
    (None while it stands by)."""
    election, stale = lead.election, lead.lock_seconds + STALE_SLACK_SECONDS
    if lead.stuck is not None:
        text = f"this replica gave up leading: {lead.stuck}; it stands aside until the sweep returns"
        return [Problem("stuck-sweep", f"{text} (restart it if that lasts)")]
    if election is None:
        return [Problem("starting", "no leader election has run yet")]
    if election.error is not None:
        return [Problem(*election.error)]
    if now - election.at > stale:
        text = f"this replica's last leader election was {now - election.at:.0f}s ago (a Redis call blocked?)"
        return [Problem("election-stalled", text)]
    if lead.is_leader:
        if since_sweep is None or since_sweep <= stale:
            return []
        text = f"this replica leads but its requeue sweep has not succeeded for {since_sweep:.0f}s"
        return [Problem("sweeps-failing", f"{text}; its log and Sentry have the sweep's error")]
    if election.holder is None:
        return [Problem("no-leader", "no replica holds the leader lock")]
    if election.expires is None:
        text = f"the leader lock {lead.store.leader_key} names {election.holder} but has no expiry (set by hand?)"
        return [Problem("lock-without-expiry", f"{text}; delete it and a replica takes over")]
    if now - election.renewed_at > lead.lock_seconds + lead.elect_seconds:
        text = f"the leader {election.holder} has not renewed its lock for {now - election.renewed_at:.0f}s"
        return [Problem("leader-silent", f"{text}; nobody sweeps until it expires in "
                                         f"{max(0.0, election.expires - now):.0f}s")]  # fmt: skip
    return []


class Incidents:
    """Opens an incident once unhealthy for INCIDENT_AFTER elections in a row: one Sentry event,
    and one more only for a cause that joins it (Redis going away during a persistence
    incident, say), never one per interval. It ends when health returns."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.open: set[str] = set()
        self.unhealthy_runs = 0

    def track(self, problems: list[Problem]) -> None:
        if not problems:
            if self.open:
                log.info("supervisor %s is healthy again (was: %s)", self.node_id, ", ".join(sorted(self.open)))
            self.open, self.unhealthy_runs = set(), 0
            return
        self.unhealthy_runs += 1
        new = [p for p in problems if p.kind not in self.open]
        if self.unhealthy_runs >= INCIDENT_AFTER and new:
            self.open |= {p.kind for p in new}
            text = "; ".join(p.text for p in new)
            log.error("supervisor %s is unhealthy: %s", self.node_id, text)
            alerts.unhealthy(self.node_id, new[0].kind, text)
