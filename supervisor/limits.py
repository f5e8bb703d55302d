"""Checks that limits, worker threads, lease and timing settings agree, and says what does not.

A mismatch does not break anything at once, it quietly wastes or starves capacity (a
semaphore of 5 in front of a third-party limit of 3 leaves threads blocked; a lease shorter
than a few heartbeats loses healthy tasks), so it is reported at start and on every sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from actors.broker import QUEUES
from actors.lease import RENEW_SECONDS as PROGRESS_INTERVAL_SECONDS
from actors.registry import WorkerInfo
from actors.settings import Settings

#: A lease must outlast this many progress heartbeats, so one slow Redis call never loses it.
MIN_HEARTBEATS_PER_LEASE = 3


def check(settings: Settings, workers: Sequence[WorkerInfo]) -> list[str]:
    """Every problem found, each a sentence naming the settings involved and what to change."""
    problems: list[str] = []
    if settings.lease_seconds < MIN_HEARTBEATS_PER_LEASE * PROGRESS_INTERVAL_SECONDS:
        problems.append(
            f"HAUL_LEASE_SECONDS={settings.lease_seconds:g} is shorter than {MIN_HEARTBEATS_PER_LEASE} progress "
            f"heartbeats ({PROGRESS_INTERVAL_SECONDS:g}s each); raise it to at least "
            f"{MIN_HEARTBEATS_PER_LEASE * PROGRESS_INTERVAL_SECONDS:g}"
        )
    if settings.sweep_seconds > settings.lease_seconds:
        problems.append(
            f"HAUL_SWEEP_SECONDS={settings.sweep_seconds:g} is longer than HAUL_LEASE_SECONDS="
            f"{settings.lease_seconds:g}: a killed worker's task waits a whole sweep; lower the sweep interval"
        )
    if 0 < settings.download_concurrency < settings.download_per_host:
        problems.append(
            f"HAUL_DOWNLOAD_PER_HOST={settings.download_per_host} is above HAUL_DOWNLOAD_CONCURRENCY="
            f"{settings.download_concurrency}: the per-host limit can never be reached; lower it"
        )
    if workers:
        served = {queue: sum(w.threads for w in workers if queue in w.queues) for queue in QUEUES}
        for name, limit, queue in (
            ("HAUL_DOWNLOAD_CONCURRENCY", settings.download_concurrency, "claim"),
            ("HAUL_DOWNLOAD_PER_HOST", settings.download_per_host, "claim"),
            ("HAUL_FINALIZE_CONCURRENCY", settings.finalize_concurrency, "claim"),
        ):
            if served[queue] and limit > served[queue]:
                problems.append(
                    f"{name}={limit} is above the {served[queue]} worker threads that consume the {queue!r} "
                    f"queue: the limit is never reached and tasks queue behind busy threads instead; "
                    f"lower it to {served[queue]} or add workers"
                )
        for queue, threads in served.items():
            if threads == 0:
                problems.append(
                    f"no registered worker consumes the {queue!r} queue; tasks will wait there forever "
                    f"(run `haul worker` without --queues, or add {queue!r})"
                )
    return problems


def check_redis(client: redis.Redis) -> list[str]:
    """Redis must keep what it is told across a restart, or tasks vanish without a trace."""
    try:
        config: Any = client.config_get("appendonly")
        config.update(client.config_get("save"))
    except redis.ResponseError:
        return []  # CONFIG is disabled (managed Redis): the provider's persistence applies
    if config.get("appendonly") == "no" and not config.get("save"):
        return [
            "Redis runs without persistence (appendonly no, no save points): a Redis restart loses every "
            "queued task and message; set appendonly yes (ops/ and haul up do)"
        ]
    return []
