"""Dramatiq middleware tying a worker process's life to haul: graceful stop and Sentry flush."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import redis
import sentry_sdk
from dramatiq import Broker, Middleware

from actors.pages import RESOLVE_EXTRA, resolver_works
from actors.registry import Heartbeat, WorkerInfo, WorkerLimits, WorkerRegistry, queues_of
from actors.runtime import Runtime

log = logging.getLogger(__name__)

#: Seconds a stopping worker waits for Sentry to send what it has queued.
SENTRY_FLUSH_SECONDS = 2.0
#: Seconds between two probes of the storage (a write and a delete of a small object).
STORAGE_PROBE_SECONDS = 600.0


class Lifecycle(Middleware):
    """Registers the worker process (with a heartbeat) when it boots; on SIGTERM tells in-flight
    downloads to hand their tasks back before threads are joined; at exit unregisters and
    flushes Sentry, since Dramatiq ends worker processes with ``os._exit``."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.heartbeat: Heartbeat | None = None
        self.prober: threading.Thread | None = None

    def after_worker_boot(self, broker: Broker, worker: Any) -> None:
        rt = self.rt
        self.heartbeat = Heartbeat(WorkerRegistry(rt.store.client, rt.store.prefix), rt.worker_id, rt.clock)
        info = WorkerInfo(
            id=rt.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=queues_of(worker.consumer_whitelist, sorted(broker.get_declared_queues())),
            threads=worker.worker_threads,
            started=rt.clock(),
            limits=WorkerLimits.of(rt.settings),  # what this process enforces, for the supervisor's check
            connections=rt.settings.task_parallel_files * rt.settings.split,
            extras=(RESOLVE_EXTRA,) if resolver_works() else (),
        )
        try:
            self.heartbeat.start(info)
        except redis.RedisError as exc:
            log.warning("could not register worker %s (%s); the heartbeat will register it", rt.worker_id, exc)
        # A bucket or remote: say now, not after a download, that it cannot be written, and
        # again every STORAGE_PROBE_SECONDS (credentials get revoked, buckets deleted)
        self.prober = threading.Thread(target=self._probe_storage, name="haul-storage-probe", daemon=True)
        self.prober.start()

    def _probe_storage(self) -> None:
        who = self.rt.worker_id.replace(":", "-")
        while True:
            try:
                problems, warnings = self.rt.storage.probe(who)
            except Exception as exc:  # a probe must never end the thread that repeats it
                problems, warnings = [f"storage probe failed: {exc}"], []
            for problem in problems:
                log.error("storage: %s", problem)
            for warning in warnings:
                log.warning("storage: %s", warning)
            if self.rt.stopper.wait(STORAGE_PROBE_SECONDS):
                return

    def before_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        log.info("worker stopping: in-flight downloads hand their tasks back")
        self.rt.stopper.stop()

    def after_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.rt.leases.stop()  # after the worker threads: their runs' last stage counts go out
        self.rt.close()
        sentry_sdk.flush(SENTRY_FLUSH_SECONDS)
