"""Bytes moved and seconds spent per stage, counted in each worker, added up in Redis.

A worker process counts what its runs do (bytes received from origins while downloading,
bytes sent to storage while finalizing, and the seconds each run spends in each stage) and
the lease keeper adds the counts to Redis's totals once a tick, in the round trip that renews
the leases. The supervisor exposes the totals as ``haul_stage_bytes_total`` and
``haul_stage_seconds_total``: one pair of counters for every worker on every host, so a
dashboard divides one by the other for the speed of a stage, and a rate of the seconds is the
number of runs busy in it. A worker killed with SIGKILL loses at most its last tick.
"""

from __future__ import annotations

import threading
import time

#: The stages a run is counted in: what a worker downloads, what a finalize stores.
DOWNLOAD = "download"
FINALIZE = "finalize"
STAGES = (DOWNLOAD, FINALIZE)

#: Counts by stage: (bytes, seconds).
Tallies = dict[str, tuple[int, float]]


class StageMeter:
    """This process's counts not yet added to Redis's totals (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Tallies = {}

    def add(self, stage: str, moved: int, seconds: float) -> None:
        with self._lock:
            before = self._pending.get(stage, (0, 0.0))
            self._pending[stage] = (before[0] + moved, before[1] + seconds)

    def take(self) -> Tallies:
        """What was counted since the last take (nothing twice)."""
        with self._lock:
            taken, self._pending = self._pending, {}
        return taken

    def put_back(self, tallies: Tallies) -> None:
        """Counts Redis did not take (unreachable): added with the next tick's."""
        for stage, (moved, seconds) in tallies.items():
            self.add(stage, moved, seconds)


class StageClock:
    """One run's counts in its current stage, told to the meter as they pass.

    The run's threads add the bytes they move (:meth:`add`) and the working thread says when
    the run enters another stage; the keeper calls :meth:`tell` each tick, so a run of an
    hour shows in the totals while it runs, not in one step when it ends.
    """

    def __init__(self, meter: StageMeter, stage: str, since: float) -> None:
        self.meter = meter
        self.stage = stage
        self.moved = 0
        self._told = 0
        self._told_at = since
        self._lock = threading.Lock()

    def add(self, size: int) -> None:
        """``size`` more bytes moved (by any of the run's threads: a task's files download in
        parallel)."""
        with self._lock:
            self.moved += size

    def enter(self, stage: str) -> None:
        """The run moves on to ``stage``: what came before is told as the old one's."""
        with self._lock:
            self._tell(time.monotonic())
            self.stage = stage

    def tell(self, now: float | None = None) -> None:
        """Add what this run did since the last tell to the meter."""
        with self._lock:
            self._tell(time.monotonic() if now is None else now)

    def _tell(self, now: float) -> None:
        moved, now = self.moved, max(now, self._told_at)  # a tick's clock read before an enter()
        self.meter.add(self.stage, moved - self._told, now - self._told_at)
        self._told, self._told_at = moved, now
