"""Worker processes announce themselves, so the supervisor can tell a vanished one from an idle
one, check that limits match the threads that serve each stage, and check that every worker
runs with the same stage limits and lease (its own, not the supervisor's).

    haul:workers        hash: worker id -> JSON {host, pid, queues, threads, connections, started, limits,
                        extras} (``limits`` and ``extras`` are missing from records written by an older haul)
    haul:workers:seen   sorted set: worker id by its last heartbeat (seconds)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from actors.settings import Settings

log = logging.getLogger(__name__)

#: Seconds between two heartbeats of a worker process.
HEARTBEAT_SECONDS = 5.0
#: Heartbeats missed before the supervisor calls a worker vanished.
MISSED_HEARTBEATS = 3
#: Seconds a stopping worker waits for a heartbeat in flight before it unregisters.
STOP_JOIN_SECONDS = 2.0


@dataclass(frozen=True)
class WorkerLimits:
    """The stage limits (0: none) and lease a worker process runs with, from its own settings."""

    download_concurrency: int
    download_per_host: int
    finalize_concurrency: int
    staging_max_bytes: int
    lease_seconds: float

    @classmethod
    def of(cls, settings: Settings) -> WorkerLimits:
        return cls(
            download_concurrency=settings.download_concurrency,
            download_per_host=settings.download_per_host,
            finalize_concurrency=settings.finalize_concurrency,
            staging_max_bytes=settings.staging_max_bytes,
            lease_seconds=settings.lease_seconds,
        )


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    threads: int
    started: float
    seen: float = 0.0
    #: None for a worker registered by an older haul, which did not say.
    limits: WorkerLimits | None = None
    #: Connections each of its threads may open at once: HAUL_TASK_PARALLEL_FILES x HAUL_SPLIT
    #: (1 for a worker of a haul before either).
    connections: int = 1
    #: The optional extras installed in it (``resolve``: page files, :mod:`actors.pages`).
    extras: tuple[str, ...] = ()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _limits_from(data: Any) -> WorkerLimits | None:
    """A record's limits; None when it has none (an older haul) or lacks one of them."""
    if not isinstance(data, dict):
        return None
    try:
        return WorkerLimits(
            download_concurrency=int(data["download_concurrency"]),
            download_per_host=int(data["download_per_host"]),
            finalize_concurrency=int(data["finalize_concurrency"]),
            staging_max_bytes=int(data["staging_max_bytes"]),
            lease_seconds=float(data["lease_seconds"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


class WorkerRegistry:
    def __init__(self, client: redis.Redis, prefix: str = "haul:") -> None:
        self.client = client
        self.workers_key = f"{prefix}workers"
        self.seen_key = f"{prefix}workers:seen"

    def register(self, info: WorkerInfo, now: float) -> None:
        """Write the worker's info and its seen time in one pipelined round trip."""
        data: dict[str, Any] = {
            "host": info.host,
            "pid": info.pid,
            "queues": list(info.queues),
            "threads": info.threads,
            "connections": info.connections,
            "extras": list(info.extras),
        }
        if info.limits is not None:
            data["limits"] = dataclasses.asdict(info.limits)
        pipe = self.client.pipeline()
        pipe.hset(self.workers_key, info.id, json.dumps({**data, "started": info.started}))
        pipe.zadd(self.seen_key, {info.id: now})
        pipe.execute()

    def beat(self, info: WorkerInfo, now: float) -> None:
        """Register again, not just refresh the seen time: after a Redis outage longer than
        ``MISSED_HEARTBEATS`` beats the supervisor has removed the worker as vanished (and a Redis
        restart may have lost the registry); a worker that only refreshed an existing entry would
        then stay invisible for good (no consumer of its queues, no threads for the limits)."""
        self.register(info, now)

    def unregister(self, worker_id: str) -> None:
        pipe = self.client.pipeline()
        pipe.hdel(self.workers_key, worker_id)
        pipe.zrem(self.seen_key, worker_id)
        pipe.execute()

    def workers(self) -> list[WorkerInfo]:
        pairs: Any = self.client.zrange(self.seen_key, 0, -1, withscores=True)
        seen = {_text(k): float(score) for k, score in pairs}
        entries: Any = self.client.hgetall(self.workers_key)
        result = []
        for key, raw in entries.items():
            worker_id = _text(key)
            data = json.loads(raw)
            result.append(
                WorkerInfo(
                    id=worker_id,
                    host=data["host"],
                    pid=int(data["pid"]),
                    queues=tuple(data["queues"]),
                    threads=int(data["threads"]),
                    started=float(data["started"]),
                    seen=seen.get(worker_id, 0.0),
                    limits=_limits_from(data.get("limits")),
                    connections=int(data.get("connections", 1)),
                    extras=tuple(data.get("extras", ())),
                )
            )
        return result

    def have(self, extra: str, queue: str, now: float, but: str = "") -> bool:
        """Whether a live worker (heard from within ``MISSED_HEARTBEATS`` beats) that consumes
        ``queue`` has ``extra`` installed; ``but``: a worker not to count (the one asking)."""
        cutoff = now - HEARTBEAT_SECONDS * MISSED_HEARTBEATS
        return any(
            extra in worker.extras and queue in worker.queues and worker.seen >= cutoff and worker.id != but
            for worker in self.workers()
        )

    def vanished(self, now: float) -> list[WorkerInfo]:
        """Workers whose heartbeats stopped (killed, OOM, host gone); removed from the registry."""
        cutoff = now - HEARTBEAT_SECONDS * MISSED_HEARTBEATS
        found: Any = self.client.zrangebyscore(self.seen_key, "-inf", cutoff)
        stale = {_text(v) for v in found}
        gone = [w for w in self.workers() if w.id in stale]
        for worker in gone:
            self.unregister(worker.id)
        for orphan in stale - {w.id for w in gone}:
            self.client.zrem(self.seen_key, orphan)
        return gone


class Heartbeat:
    """A daemon thread that keeps one worker's registration fresh until stopped."""

    def __init__(self, registry: WorkerRegistry, worker_id: str, clock: Callable[[], float]) -> None:
        self.registry = registry
        self.worker_id = worker_id
        self.clock = clock
        self.info: WorkerInfo | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="haul-heartbeat", daemon=True)

    def start(self, info: WorkerInfo) -> None:
        """Register and start beating; the thread starts even when this first registration
        fails (Redis down at boot), since every beat registers again."""
        self.info = info
        try:
            self.registry.register(info, self.clock())
        finally:
            self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():  # a beat landing after the unregister would bring the worker back
            self.thread.join(STOP_JOIN_SECONDS)
        try:
            self.registry.unregister(self.worker_id)
        except redis.RedisError as exc:
            log.warning("could not unregister worker %s (%s)", self.worker_id, exc)

    def _run(self) -> None:
        assert self.info is not None
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            try:
                self.registry.beat(self.info, self.clock())
            except redis.RedisError as exc:
                log.warning("worker heartbeat failed (%s); retrying", exc)


def queues_of(consumer_whitelist: Sequence[str] | None, declared: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(consumer_whitelist or declared))
