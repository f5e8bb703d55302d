"""The supervisor's Prometheus metrics, in a registry of its own (never the global one)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from actors.policy import FINALIZE_BACKLOG_FACTOR
from actors.registry import WorkerRegistry
from actors.store import TaskStore

#: Why a claim can be refused (claim.lua); each is shown, 0 until it first happens.
REFUSAL_REASONS = ("download", "download_per_host", "staging_bytes", "finalize_backlog")


class _Live(Collector):
    """Figures read from Redis at scrape time: tasks by state, dead tasks ever, workers, slots,
    the finalize backlog and why claims paused, last sweep age. Each is a read of a few known
    keys (never a scan), so a scrape costs the same with a million tasks stored. The dead count
    is a counter kept in Redis, since ``haul_tasks{state="dead"}`` is a gauge that prune
    lowers, and the supervisor alone never sees a task die in a worker."""

    def __init__(
        self,
        store: TaskStore,
        workers: WorkerRegistry,
        last_sweep: Callable[[], float | None],
        limits: dict[str, int],
    ) -> None:
        self.store = store
        self.workers = workers
        self.last_sweep = last_sweep
        self.limits = limits

    def collect(self) -> Iterator[Metric]:
        tasks = GaugeMetricFamily("haul_tasks", "Tasks by state", labels=["state"])
        for state, count in self.store.counts().items():
            tasks.add_metric([state.value], count)
        yield tasks
        yield CounterMetricFamily(
            "haul_dead_tasks", "Tasks that became dead (attempts used up), wherever they died",
            value=self.store.dead_total(),
        )  # fmt: skip
        workers = self.workers.workers()
        yield GaugeMetricFamily("haul_workers", "Registered worker processes", value=len(workers))
        yield GaugeMetricFamily(
            "haul_worker_threads", "Worker threads across registered processes", value=sum(w.threads for w in workers)
        )
        in_use = GaugeMetricFamily("haul_stage_slots_in_use", "Live stage slots", labels=["slots"])
        for name, count in self.store.slots_in_use(time.time()).items():
            in_use.add_metric([name], count)
        yield in_use
        limit = GaugeMetricFamily("haul_stage_limit", "Configured stage limits (0: none)", labels=["stage"])
        for stage, value in self.limits.items():
            limit.add_metric([stage], value)
        if "finalize_backlog" not in self.limits:  # derived as the workers' claims derive it
            limit.add_metric(["finalize_backlog"], FINALIZE_BACKLOG_FACTOR * self.limits.get("finalize", 0))
        yield limit
        finalizing, parked = self.store.finalizing_and_parked()
        yield GaugeMetricFamily(
            "haul_tasks_parked",
            "Finalizing tasks parked while their storage or webhook receiver is down (not in the backlog)",
            value=parked,
        )
        yield GaugeMetricFamily(
            "haul_finalize_backlog",
            "Finalizing tasks that count toward the backlog that pauses claims at its limit",
            value=max(finalizing - parked, 0),
        )
        refused = CounterMetricFamily(
            "haul_claims_refused", "Claims refused by a full stage, by reason", labels=["reason"]
        )
        counts = dict.fromkeys(REFUSAL_REASONS, 0) | self.store.claims_refused()
        for reason, count in counts.items():
            refused.add_metric([reason], count)
        yield refused
        yield GaugeMetricFamily("haul_staged_bytes", "Bytes held in staging sandboxes", value=self.store.staged_bytes())
        moved = CounterMetricFamily(
            "haul_stage_bytes",
            "Bytes moved by every worker, by stage: received from origins (download), sent to storage (finalize)",
            labels=["stage"],
        )
        spent = CounterMetricFamily(
            "haul_stage_seconds", "Seconds runs spent in each stage, added up over every worker", labels=["stage"]
        )
        for stage, (count, seconds) in self.store.stage_totals().items():
            moved.add_metric([stage], count)
            spent.add_metric([stage], seconds)
        yield moved
        yield spent
        last = self.last_sweep()
        age = GaugeMetricFamily("haul_last_sweep_age_seconds", "Seconds since this replica last finished a sweep")
        age.add_metric([], time.time() - last if last is not None else float("inf"))
        yield age


class Metrics:
    def __init__(
        self,
        store: TaskStore,
        workers: WorkerRegistry,
        last_sweep: Callable[[], float | None],
        limits: dict[str, int],
    ) -> None:
        self.registry = CollectorRegistry()
        self.requeues = Counter("haul_requeues", "Tasks sent back to the queue", ["reason"], registry=self.registry)
        self.sweep_errors = Counter("haul_sweep_errors", "Sweep jobs that raised", ["job"], registry=self.registry)
        self.vanished = Counter("haul_vanished_workers", "Workers that stopped heartbeating", registry=self.registry)
        self.config_problems = Gauge(
            "haul_config_problems", "Problems found in limits and timing settings", registry=self.registry
        )
        self.sweep_seconds = Histogram(
            "haul_sweep_duration_seconds",
            "Duration of each sweep job",
            ["job"],
            buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 1, 5, 30),
            registry=self.registry,
        )
        self.leader = Gauge("haul_supervisor_leader", "1 while this replica holds the lock", registry=self.registry)
        self.registry.register(_Live(store, workers, last_sweep, limits))
