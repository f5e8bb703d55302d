"""The one place a Dramatiq broker is built, from Settings.

Order matters: Sentry's Dramatiq integration patches ``Broker.__init__``, so Sentry (when it is
configured) is initialised before the broker is created, then the broker is made current.
"""

from __future__ import annotations

import os

import dramatiq
import redis
from dramatiq import Middleware
from dramatiq.brokers.redis import RedisBroker

from actors import runtime
from actors.lifecycle import Lifecycle
from actors.logs import reformat
from actors.redact import install_log_redaction, secrets_of
from actors.sentry import init_sentry
from actors.settings import Settings
from actors.store import redis_options

#: Dramatiq queues: ``claim`` runs a task (claim, download, finalize in one thread), ``finalize``
#: resumes finalizing tasks that waited for a slot or an outage, and sends task.failed.
#: ``haul worker`` consumes both.
QUEUES = ("claim", "finalize")


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


def setup(settings: Settings) -> RedisBroker:
    """Create the Redis broker for ``settings``, make it Dramatiq's current one, and remember
    ``settings`` for the actors' runtime."""
    install_log_redaction(secrets_of(settings))
    reformat(settings.log_format)  # a worker process: Dramatiq's handler, now in HAUL_LOG_FORMAT
    init_sentry(settings, component="worker")
    # Dramatiq drops connection options given beside a URL, so the pool is built here.
    pool = redis.ConnectionPool.from_url(settings.redis_url, **redis_options())
    broker = RedisBroker(connection_pool=pool)  # type: ignore[no-untyped-call]
    broker.add_middleware(Lifecycle())
    if settings.worker_metrics_port:
        broker.add_middleware(prometheus_middleware(settings))
    dramatiq.set_broker(broker)
    runtime.configure(settings)
    return broker
