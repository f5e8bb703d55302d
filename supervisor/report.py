"""The leader's report for the operator dashboard (``haul api`` reads it with
:meth:`actors.store_figures.FigureStore.supervisor_report`): which replica leads, when its
requeue sweep last ended, and what its last configuration check found.

Only the leader's report is shown. Every replica checks its configuration at start, but only the
lock's holder writes (report.lua refuses anyone else, so a replica that lost the lock mid-sweep
cannot overwrite the new leader's), after each requeue sweep and each configuration check. The
report lives a few sweep intervals: a dead supervisor's report goes away instead of showing an
old sweep as the last. Problems are redacted like log lines: they reach whoever can read the
dashboard.
"""

from __future__ import annotations

from collections.abc import Iterable

from actors.redact import redact_text
from actors.store import TaskStore
from supervisor.configcheck import Checked

#: The report lives this many sweep intervals after its last write, and at least this long (s).
REPORT_SWEEPS = 10
MIN_REPORT_SECONDS = 60.0


def report_seconds(sweep_seconds: float) -> float:
    """How long a report is kept after it was written (seconds)."""
    return max(MIN_REPORT_SECONDS, REPORT_SWEEPS * sweep_seconds)


def publish(
    store: TaskStore,
    node: str,
    *,
    sweep_seconds: float,
    last_sweep: float | None,
    checked: Checked | None,
    secrets: Iterable[str] = (),
) -> bool:
    """Write ``node``'s report if it holds the leader lock; False when it does not."""
    hidden = tuple(secrets)
    return store.publish_report(
        node,
        ttl_seconds=report_seconds(sweep_seconds),
        last_sweep=last_sweep,
        checked_at=checked.at if checked is not None else None,
        problems=[redact_text(p, hidden) for p in checked.problems] if checked is not None else [],
    )
