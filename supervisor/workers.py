"""How haul starts Dramatiq worker processes: the command line and the environment of
``haul worker``, which ``haul up`` runs too."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

from actors.settings import Settings

#: Messages a worker process takes beyond one per thread (see worker_environment).
PREFETCH_SPARE = 2


def worker_command(settings: Settings, extra: Sequence[str] = ()) -> list[str]:
    """The Dramatiq command line ``haul worker`` runs."""
    command = [sys.executable, "-m", "dramatiq", "actors.worker"]
    if settings.log_format == "json":  # Dramatiq's main process too logs JSON (see actors/logs.py)
        from actors import logs

        command = [sys.executable, logs.__file__, "json", "actors.worker"]
    if "--processes" not in extra and "-p" not in extra:
        command += ["--processes", str(settings.worker_processes)]
    if "--threads" not in extra and "-t" not in extra:
        command += ["--threads", str(settings.worker_threads)]
    return command + list(extra)


def worker_environment(settings: Settings, extra: Sequence[str] = ()) -> dict[str, str]:
    """Dramatiq's tuning for haul, read from the environment when Dramatiq is imported.

    Prefetch is the thread count plus PREFETCH_SPARE: by default a process takes twice as many
    messages as it has threads, and the extra ones wait behind hour-long downloads while other
    workers idle; with none spare, a thread that finishes waits for the next poll. (A message
    that does wait is re-sent by the supervisor after HAUL_ORPHAN_SECONDS.) The poll pause is
    HAUL_WORKER_POLL_MS instead of a second.
    """
    threads = settings.worker_threads
    for flag in ("--threads", "-t"):
        if flag in extra and extra.index(flag) + 1 < len(extra):
            threads = int(extra[extra.index(flag) + 1])
    return {
        "dramatiq_queue_prefetch": str(threads + PREFETCH_SPARE),
        "dramatiq_worker_timeout": str(settings.worker_poll_ms),
    }


def run_worker(settings: Settings, extra: Sequence[str]) -> int:
    """Exec Dramatiq; with worker metrics on, start from an empty metrics folder."""
    os.environ.update(worker_environment(settings, extra))
    if settings.worker_metrics_port:
        from actors.broker import prometheus_environment

        shutil.rmtree(settings.metrics_dir, ignore_errors=True)
        settings.metrics_dir.mkdir(parents=True)
        os.environ.update(prometheus_environment(settings))
    command = worker_command(settings, extra)
    os.execv(command[0], command)
    return 0  # not reached
