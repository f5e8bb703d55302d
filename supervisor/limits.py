"""Checks that limits, worker threads, lease and timing settings agree, and that Redis keeps
what it is told; says what does not, each problem a sentence naming the settings and the fix.

A mismatch does not break anything at once, it quietly wastes or starves capacity (a
semaphore of 5 in front of a third-party limit of 3 leaves threads blocked; a lease that a
slow Redis call outlasts stops healthy runs), so it is reported at start and on every sweep,
never fatal: a test or a first run with a short lease still runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from actors.lease import LEASE_SAFETY, RENEW_SECONDS, RENEWALS_PER_LEASE
from actors.messages import QUEUES
from actors.notify import MIN_PAUSE_SECONDS, try_seconds
from actors.registry import WorkerInfo, WorkerLimits
from actors.settings import Settings
from actors.store_base import REDIS_SOCKET_TIMEOUT_SECONDS

#: Each limit a worker registers, with the variable that sets it.
LIMIT_VARIABLES = (
    ("download_concurrency", "HAUL_DOWNLOAD_CONCURRENCY"),
    ("download_per_host", "HAUL_DOWNLOAD_PER_HOST"),
    ("finalize_concurrency", "HAUL_FINALIZE_CONCURRENCY"),
    ("staging_max_bytes", "HAUL_STAGING_MAX_BYTES"),
    ("lease_seconds", "HAUL_LEASE_SECONDS"),
)
#: How to make Redis keep every acknowledged write, for the messages below.
PERSISTENCE_FIX = (
    "set `appendonly yes` and `appendfsync always` in redis.conf (or start redis-server with "
    "--appendonly yes --appendfsync always; on a running server CONFIG SET both, then CONFIG REWRITE)"
)


def renewal_seconds(lease_seconds: float) -> float:
    """How often a worker's lease keeper renews (actors/lease.py ``LeaseKeeper.interval``)."""
    return min(RENEW_SECONDS, lease_seconds / RENEWALS_PER_LEASE)


def notice_seconds(settings: Settings) -> float:
    """How long after a task ended its task.failed / task.canceled may still be tried
    (actors/notify.py): tries go on until HAUL_FINALIZE_GIVE_UP_SECONDS, the last one due at
    most one shortest pause later, and a try lasts up to ``try_seconds``."""
    return settings.finalize_give_up_seconds + MIN_PAUSE_SECONDS + try_seconds(settings)


def check(settings: Settings, workers: Sequence[WorkerInfo]) -> list[str]:
    """Every problem found, each a sentence naming the settings involved and what to change.

    Checked, with this supervisor's settings:

    - the lease leaves room for a renewal that waits on one slow Redis call: a holder stops
      writing once LEASE_SAFETY (80%) of HAUL_LEASE_SECONDS passed since its last renewal,
      renewals come every min(1 s, lease / 4), and one Redis call may block for the Redis socket
      timeout (10 s), so 0.8 x lease must exceed renewal interval + socket timeout;
    - HAUL_SWEEP_SECONDS is at most HAUL_LEASE_SECONDS;
    - HAUL_RETAIN_SECONDS is longer than HAUL_FINALIZE_GIVE_UP_SECONDS and than the time an owed
      task.failed / task.canceled is still tried after its task ended (``notice_seconds``);
    - HAUL_DOWNLOAD_PER_HOST (connections) is at most the connections HAUL_DOWNLOAD_CONCURRENCY
      tasks open, HAUL_TASK_PARALLEL_FILES x HAUL_SPLIT each.

    With registered workers: no stage limit is above the threads consuming its queue (the
    per-host limit: above their connections, each thread's HAUL_TASK_PARALLEL_FILES x
    HAUL_SPLIT); every
    queue has a consumer; every worker runs with the same stage limits and lease as the others
    and as this supervisor (workers registered by an older haul, which did not say, are left out).
    """
    problems = _timing(settings)
    connections = settings.download_concurrency * settings.task_parallel_files * settings.split
    if 0 < connections < settings.download_per_host:
        problems.append(
            f"HAUL_DOWNLOAD_PER_HOST={settings.download_per_host} is above the {connections} connections that "
            f"HAUL_DOWNLOAD_CONCURRENCY={settings.download_concurrency} tasks open at once "
            f"(HAUL_TASK_PARALLEL_FILES={settings.task_parallel_files} files each, HAUL_SPLIT={settings.split} "
            "connections a file): the per-host limit can never be reached; lower it"
        )
    if workers:
        problems += _threads(settings, workers) + _disagreements(settings, workers)
    return problems


def _timing(settings: Settings) -> list[str]:
    problems = []
    lease = settings.lease_seconds
    needed = renewal_seconds(lease) + REDIS_SOCKET_TIMEOUT_SECONDS
    if LEASE_SAFETY * lease <= needed:
        shortest = (RENEW_SECONDS + REDIS_SOCKET_TIMEOUT_SECONDS) / LEASE_SAFETY
        problems.append(
            f"HAUL_LEASE_SECONDS={lease:g} leaves no room for one slow Redis call: a run stops writing "
            f"{LEASE_SAFETY * lease:g}s ({LEASE_SAFETY:.0%} of the lease) after its last renewal, but a renewal "
            f"(every {renewal_seconds(lease):g}s) may wait {REDIS_SOCKET_TIMEOUT_SECONDS:g}s on Redis (its socket "
            f"timeout), so a slow Redis stops healthy runs; raise HAUL_LEASE_SECONDS above {shortest:g}"
        )
    if settings.sweep_seconds > lease:
        problems.append(
            f"HAUL_SWEEP_SECONDS={settings.sweep_seconds:g} is longer than HAUL_LEASE_SECONDS="
            f"{lease:g}: a killed worker's task waits a whole sweep; lower the sweep interval"
        )
    owed = notice_seconds(settings)
    if settings.retain_seconds <= owed:
        problems.append(
            f"HAUL_RETAIN_SECONDS={settings.retain_seconds:g} is not longer than the {owed:g}s in which a failed or "
            f"canceled task's notice may still be tried (HAUL_FINALIZE_GIVE_UP_SECONDS="
            f"{settings.finalize_give_up_seconds:g} after the task ended, plus a last try of up to "
            f"{try_seconds(settings):g}s: HAUL_CONNECT_TIMEOUT_SECONDS + HAUL_READ_TIMEOUT_SECONDS + 5): ended "
            f"tasks, their idempotency keys and failed tasks' sandboxes go while their backend may still wait "
            f"to hear about them; raise HAUL_RETAIN_SECONDS above {owed:g} or lower HAUL_FINALIZE_GIVE_UP_SECONDS"
        )
    return problems


def _threads(settings: Settings, workers: Sequence[WorkerInfo]) -> list[str]:
    problems = []
    served = {queue: sum(w.threads for w in workers if queue in w.queues) for queue in QUEUES}
    for name, limit, queue in (
        ("HAUL_DOWNLOAD_CONCURRENCY", settings.download_concurrency, "claim"),
        ("HAUL_FINALIZE_CONCURRENCY", settings.finalize_concurrency, "claim"),
    ):
        if served[queue] and limit > served[queue]:
            problems.append(
                f"{name}={limit} is above the {served[queue]} worker threads that consume the {queue!r} "
                f"queue: the limit is never reached and tasks queue behind busy threads instead; "
                f"lower it to {served[queue]} or add workers"
            )
    connections = sum(w.threads * w.connections for w in workers if "claim" in w.queues)
    if connections and settings.download_per_host > connections:
        problems.append(
            f"HAUL_DOWNLOAD_PER_HOST={settings.download_per_host} is above the {connections} connections the "
            "worker threads that consume the 'claim' queue open at once (each thread HAUL_TASK_PARALLEL_FILES x "
            f"HAUL_SPLIT of them): the limit is never reached; lower it to {connections} or add workers"
        )
    for queue, threads in served.items():
        if threads == 0:
            problems.append(
                f"no registered worker consumes the {queue!r} queue; tasks will wait there forever "
                f"(run `haul worker` without --queues, or add {queue!r})"
            )
    return problems


def _disagreements(settings: Settings, workers: Sequence[WorkerInfo]) -> list[str]:
    """Workers whose stage limits or lease differ from each other's or from this supervisor's:
    each claim enforces the limits of the worker that makes it, so the real limit depends on
    which worker claims, and this supervisor's checks judge settings nobody runs with."""
    ours = WorkerLimits.of(settings)
    problems = []
    for field, name in LIMIT_VARIABLES:
        runs: dict[Any, list[str]] = {}
        for worker in workers:
            if worker.limits is not None:
                runs.setdefault(getattr(worker.limits, field), []).append(worker.id)
        mine = getattr(ours, field)
        if not runs or set(runs) == {mine}:
            continue
        groups = "; ".join(
            f"{name}={_show(value)} on worker{'s' if len(ids) > 1 else ''} {', '.join(sorted(ids))}"
            for value, ids in sorted(runs.items())
        )
        problems.append(
            f"{name} is not the same everywhere: {groups}; this supervisor has {name}={_show(mine)}. A claim "
            f"applies the limits and lease of the worker that makes it, and this supervisor checks its own; give "
            f"every worker and the supervisor the same {name} and restart the ones that differ"
        )
    return problems


def _show(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Persistence:
    """What Redis said about keeping writes: ``summary`` for /healthz, ``problems`` to fix."""

    summary: str
    problems: tuple[str, ...] = ()


def redis_persistence(client: redis.Redis) -> Persistence:
    """Redis must keep every write it acknowledged across a restart and a host crash, or tasks,
    done marks and the announcements that make a cancel refuse vanish: an append-only file
    (snapshots lose the last minutes) synced on every write (``everysec`` loses up to a second).
    A managed Redis that disables CONFIG is "unknown", not a problem."""
    try:
        config: Any = client.config_get("append*")
    except redis.ResponseError:
        return Persistence(
            "unknown: CONFIG is disabled (a managed Redis?); make sure it keeps an append-only file "
            "with appendfsync always"
        )
    appendonly, fsync = config.get("appendonly", "?"), config.get("appendfsync", "?")
    summary = f"appendonly {appendonly}, appendfsync {fsync}"
    if appendonly != "yes":
        save: Any = client.config_get("save").get("save", "")
        snapshots = f", RDB snapshots only (save {save})" if save else ", no snapshots either"
        return Persistence(
            summary,
            (
                f"Redis keeps no append-only file (appendonly {appendonly}{snapshots}): a restart or crash of "
                f"Redis loses every write since the last snapshot (submitted tasks, done marks, fencing "
                f"state); {PERSISTENCE_FIX}",
            ),
        )
    if fsync != "always":
        lost = "up to a second of" if fsync == "everysec" else "whatever the OS had not written of"
        return Persistence(
            summary,
            (
                f"Redis syncs its append-only file only with appendfsync {fsync}: a crash of its host loses "
                f"{lost} the writes it already acknowledged (a submitted task, a done mark, the announcement "
                f"that makes a cancel refuse); set `appendfsync always` in redis.conf (or --appendfsync always; "
                f"on a running server CONFIG SET appendfsync always, then CONFIG REWRITE)",
            ),
        )
    return Persistence(summary)


def check_redis(client: redis.Redis) -> list[str]:
    """The persistence problems of :func:`redis_persistence`, as sentences."""
    return list(redis_persistence(client).problems)
