"""The configuration check: haul's limits and timing against the registered workers, and
whether Redis keeps what it acknowledged.

A limit or timing problem is logged and sent to Sentry once, when it appears; a persistence
problem is a health problem instead (``/healthz`` says it, and its incident is the Sentry
event), so it is kept here for :mod:`supervisor.health` to read. What the last check found is
kept too (``last``): the leader publishes it for the operator dashboard (supervisor/report.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from actors.registry import WorkerRegistry
from actors.settings import Settings
from actors.store import TaskStore
from supervisor import alerts, limits
from supervisor.metrics import Metrics

log = logging.getLogger(__name__)


#: The bucket is probed at most this often (seconds): a write and a delete each time.
STORAGE_PROBE_SECONDS = 600.0


@dataclass(frozen=True)
class Checked:
    """What one check found, and when (seconds since the epoch)."""

    at: float
    problems: tuple[str, ...]


class ConfigCheck:
    """What the last check found, and which problems were already reported."""

    def __init__(
        self,
        settings: Settings,
        store: TaskStore,
        registry: WorkerRegistry,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.store, self.registry, self.metrics = settings, store, registry, metrics
        #: Redis's persistence as last read, or None before the first read.
        self.persistence: limits.Persistence | None = None
        #: What the last complete check found, or None before the first.
        self.last: Checked | None = None
        self._reported: set[str] = set()
        self.clock, self.wall_clock = clock, wall_clock
        self._storage: tuple[float, list[str]] | None = None  # (when probed, problems found)

    def storage_problems(self) -> list[str]:
        """A bucket that cannot be written (probed at most every STORAGE_PROBE_SECONDS)."""
        if self.settings.object_storage is None:
            return []
        now = self.clock()
        if self._storage is None or now - self._storage[0] >= STORAGE_PROBE_SECONDS:
            from actors.runtime import open_storage  # here: a bucket's loads boto3

            storage = open_storage(self.settings)
            try:
                problems, warnings = storage.probe("supervisor")
            finally:
                storage.close()
            for warning in warnings:
                log.warning("storage: %s", warning)
            self._storage = (now, problems)
        return self._storage[1]

    def run(self) -> list[str]:
        """Every problem found now (limits, timing, storage, persistence); new ones are logged."""
        problems = limits.check(self.settings, self.registry.workers()) + self.storage_problems()
        self.check_persistence()
        persistence = list(self.persistence.problems) if self.persistence is not None else []
        self.metrics.config_problems.set(len(problems) + len(persistence))
        for problem in problems + persistence:
            if problem not in self._reported:
                log.error("configuration: %s", problem)
                if problem in problems:
                    alerts.config_problem(problem)
        self._reported = set(problems + persistence)
        self.last = Checked(self.wall_clock(), tuple(problems + persistence))
        return problems + persistence

    def check_persistence(self) -> None:
        self.persistence = limits.redis_persistence(self.store.client)

    def persistence_problems(self) -> tuple[str, ...]:
        return tuple(self.persistence.problems) if self.persistence is not None else ()
