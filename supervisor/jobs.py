"""The leader's sweeps as scheduled jobs: one APScheduler job, one Sentry cron monitor
(``haul-<name>``) and one ``job`` label on the sweep metrics per sweep.

A job runs only while this replica holds the leader lock (:meth:`Leadership.holds_lock`), and
the messages it sends are fenced by the lock, so a sweep that outlives it sends nothing more.
What each sweep does to the tasks is :mod:`supervisor.sweeps`; the configuration check is
:mod:`supervisor.configcheck`; the search indexes' one-off backfill :mod:`supervisor.backfill`.
After a requeue sweep and a configuration check the leader publishes its report for the operator
dashboard (:mod:`supervisor.report`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from actors.messages import Messages
from actors.redact import secrets_of
from actors.registry import WorkerRegistry
from actors.settings import Settings
from actors.storage import LocalStorage
from actors.store import TaskStore
from actors.store_uploads import abandoned_uploads, drop_uploads
from supervisor import alerts, backfill, report, sweeps
from supervisor.configcheck import ConfigCheck
from supervisor.leadership import Leadership
from supervisor.metrics import Metrics

if TYPE_CHECKING:
    from actors.s3storage import S3Storage

log = logging.getLogger(__name__)

#: Prune runs at most this often (seconds); it is the least urgent sweep.
PRUNE_SECONDS = 60.0


def _sweep(body: Callable[[SweepJobs, float], None]) -> Callable[[SweepJobs], None]:
    """A sweep named for its method: run only while the lock is held, as a Sentry cron
    check-in, a duration observation and a run the election judges progress by; the body gets
    clock()."""
    job = body.__name__
    slug = f"haul-{job.replace('_', '-')}"

    @functools.wraps(body)
    def run(self: SweepJobs) -> None:
        if not self.lead.holds_lock():
            return
        with self.lead.sweeping(job), alerts.monitored(slug, self.settings.sweep_seconds):
            with self.metrics.sweep_seconds.labels(job).time():
                body(self, self.clock())

    return run


class SweepJobs:
    """The sweeps of one supervisor replica, each a method named for what it does."""

    def __init__(
        self,
        settings: Settings,
        store: TaskStore,
        registry: WorkerRegistry,
        messages: Messages,
        lead: Leadership,
        metrics: Metrics,
        config: ConfigCheck,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.store, self.registry = settings, store, registry
        self.lead, self.metrics, self.config, self.clock = lead, metrics, config, clock
        # A sweep that outlives the lock sends nothing more (the next leader sends what it owed).
        self.send_claim = lead.fenced(messages.claim)
        self.send_notify = lead.fenced(messages.notify)
        self.send_finalize = lead.fenced(messages.finalize)
        #: clock() when requeue_stuck last ended (health, and the last-sweep metric), or None.
        self.last_sweep: float | None = None
        self._storage: S3Storage | None = None
        self._secrets = secrets_of(settings)

    def by_name(self) -> dict[str, Callable[[], None]]:
        """Every sweep by its job name (the monitor is ``haul-`` and the name with dashes)."""
        return {
            "requeue_stuck": self.requeue_stuck,
            "rescue_orphans": self.rescue_orphans,
            "resend_finalizes": self.resend_finalizes,
            "resend_notices": self.resend_notices,
            "watch_workers": self.watch_workers,
            "check_config": self.check_config,
            "prune": self.prune,
            "backfill_indexes": self.backfill_indexes,
            **({"abort_uploads": self.abort_uploads} if self._in_bucket() else {}),
        }

    def every(self, job: str) -> float:
        """Seconds between two runs of ``job``."""
        interval = self.settings.sweep_seconds
        return max(interval, PRUNE_SECONDS) if job == "prune" else interval

    @_sweep
    def requeue_stuck(self, now: float) -> None:
        """Tasks whose lease ran out go back to queued (or dead), and the claims of tasks queued
        again before a lost send go out (the outbox)."""
        outcome = sweeps.requeue_stuck(
            self.store, now, max_attempts=self.settings.max_attempts, send_claim=self.send_claim,
            on_dead=self._dead, on_error=alerts.bad_record,
        )  # fmt: skip
        self.metrics.requeues.labels("lease_expired").inc(outcome["queued"])
        self.metrics.requeues.labels("unsent").inc(outcome["resent"])
        self.last_sweep = self.clock()
        self._publish()

    @_sweep
    def rescue_orphans(self, now: float) -> None:
        """Queued tasks whose claim message is overdue (lost) get it again."""
        found = sweeps.rescue_orphans(self.store, now, send_claim=self.send_claim, grace_seconds=self._orphan_seconds())
        self.metrics.requeues.labels("orphan").inc(found)

    @_sweep
    def resend_finalizes(self, now: float) -> None:
        """Resting finalizing tasks whose finalize message is overdue (lost) get it again."""
        lost = sweeps.resend_finalizes(
            self.store, now, send_finalize=self.send_finalize, grace_seconds=self._orphan_seconds()
        )
        self.metrics.requeues.labels("finalize_lost").inc(lost)

    @_sweep
    def resend_notices(self, now: float) -> None:
        """Owed task.failed / task.canceled notices whose message is overdue (lost) get it again."""
        sweeps.resend_notifications(self.store, now, send_notify=self.send_notify, grace_seconds=self._orphan_seconds())

    @_sweep
    def watch_workers(self, now: float) -> None:
        """Workers whose heartbeat stopped are reported."""
        gone = sweeps.vanished_workers(self.registry, now, on_vanished=alerts.vanished_worker)
        self.metrics.vanished.inc(gone)

    @_sweep
    def check_config(self, now: float) -> None:
        """The limits and timing against the registered workers, and Redis's persistence."""
        self.config.run()
        self._publish()

    @_sweep
    def prune(self, now: float) -> None:
        """Ended records past HAUL_RETAIN_SECONDS, failed tasks' sandboxes, orphaned temporaries."""
        outcome = sweeps.prune(self.store, self.settings.staging_dir, now, retain_seconds=self.settings.retain_seconds)
        temporaries = sweeps.prune_temporaries(LocalStorage(self.settings.storage_dir).temporary_dir, now)
        if temporaries:
            outcome["storage_temporaries"] = temporaries
        if outcome:
            log.info("pruned: %s", dict(outcome))

    @_sweep
    def backfill_indexes(self, now: float) -> None:
        """Tasks stored before the search indexes (an upgrade) are added to them, and entries of
        records deleted without theirs dropped: a few batches a run until done, then one HGET."""
        backfill.advance(self.store, now, batches=backfill.DEFAULT_BACKFILL_BATCHES)

    @_sweep
    def abort_uploads(self, now: float) -> None:
        """Multipart uploads of tasks that ended without finishing them (failed, dead, canceled,
        or pruned) are aborted, so their parts stop costing storage."""
        aborted = 0
        for task_id, records in abandoned_uploads(self.store).items():
            bucket = self._bucket()
            gone = [
                r for r in records
                if bucket.abort(r.record, f"task {task_id}, an upload it left at {bucket.location(r.record.key)}")
            ]  # fmt: skip
            if drop_uploads(self.store, task_id, gone):
                aborted += len(gone)
        if aborted:
            log.info("aborted %d unfinished upload(s) of ended tasks", aborted)

    # -- helpers ----------------------------------------------------------------------------

    def _in_bucket(self) -> bool:
        target = self.settings.object_storage
        return target is not None and target.kind == "s3"

    def close(self) -> None:
        """Release the bucket's connections, if a sweep opened them."""
        if self._storage is not None:
            self._storage.close()
            self._storage = None

    def _bucket(self) -> S3Storage:
        """The bucket's client, built on first use (it loads boto3)."""
        if self._storage is None:
            from actors.runtime import open_storage
            from actors.s3storage import S3Storage

            storage = open_storage(self.settings)
            assert isinstance(storage, S3Storage)
            self._storage = storage
        return self._storage

    def _publish(self) -> None:
        """The dashboard's report: this leader's last sweep and configuration problems."""
        report.publish(
            self.store, self.lead.node_id, sweep_seconds=self.settings.sweep_seconds, last_sweep=self.last_sweep,
            checked=self.config.last, secrets=self._secrets,
        )  # fmt: skip

    def _orphan_seconds(self) -> float:
        return max(self.settings.orphan_seconds, 3 * self.settings.sweep_seconds)

    def _dead(self, task_id: str) -> None:
        task = self.store.get(task_id)
        alerts.dead_task(task_id, task.attempts if task else 0, task.error if task else "lease expired")
        self.send_notify(task_id, None)  # the first try of its task.failed
