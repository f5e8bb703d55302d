"""The broker of a worker process: haul's actors declared, and the middleware a worker needs.

Nothing here touches the process: no global broker, no Sentry, no logging set-up. The worker's
entry (:mod:`actors.worker`) does those, in the order they need.
"""

from __future__ import annotations

import os

from dramatiq import Middleware
from dramatiq.brokers.redis import RedisBroker

from actors.handlers import declare_actors
from actors.lifecycle import Lifecycle
from actors.messages import redis_broker
from actors.runtime import Runtime
from actors.settings import Settings


def prometheus_environment(settings: Settings) -> dict[str, str]:
    """What Dramatiq's Prometheus middleware reads from the environment, at import time."""
    return {
        "dramatiq_prom_db": str(settings.metrics_dir),
        "dramatiq_prom_port": str(settings.worker_metrics_port),
        "dramatiq_prom_host": settings.supervisor_host,
        "PROMETHEUS_MULTIPROC_DIR": str(settings.metrics_dir),
    }


def prometheus_middleware(settings: Settings) -> Middleware:
    """Dramatiq's (opt-in) Prometheus middleware, configured before prometheus_client loads.

    ``haul worker`` wipes the folder before the processes start: a SIGKILLed process leaves
    its live gauges behind there.
    """
    os.environ.update(prometheus_environment(settings))
    from dramatiq.middleware.prometheus import Prometheus

    return Prometheus()


def worker_broker(settings: Settings, rt: Runtime) -> RedisBroker:
    """A broker with haul's actors declared on it, running with ``rt``, and the middleware a
    worker process needs (registration and graceful stop; Prometheus when configured)."""
    broker = redis_broker(settings)
    broker.add_middleware(Lifecycle(rt))
    if settings.worker_metrics_port:
        broker.add_middleware(prometheus_middleware(settings))
    declare_actors(broker, rt)
    return broker
