"""Dramatiq middleware tying a worker process's life to haul: graceful stop and Sentry flush."""

from __future__ import annotations

import logging
from typing import Any

import sentry_sdk
from dramatiq import Broker, Middleware

from actors import runtime

log = logging.getLogger(__name__)

#: Seconds a stopping worker waits for Sentry to send what it has queued.
SENTRY_FLUSH_SECONDS = 2.0


class Lifecycle(Middleware):  # type: ignore[misc]
    """On SIGTERM, tell in-flight downloads to hand their tasks back before threads are joined;
    at exit, flush Sentry, since Dramatiq ends worker processes with ``os._exit``."""

    def before_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        log.info("worker stopping: in-flight downloads hand their tasks back")
        runtime.current().stopper.stop()

    def after_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        sentry_sdk.flush(SENTRY_FLUSH_SECONDS)
