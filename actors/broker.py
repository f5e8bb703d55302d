"""The one place a Dramatiq broker is built, from Settings.

Order matters: Sentry's Dramatiq integration patches ``Broker.__init__``, so Sentry (when it is
configured) is initialised before the broker is created, then the broker is made current.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from actors import runtime
from actors.lifecycle import Lifecycle
from actors.sentry import init_sentry
from actors.settings import Settings

#: Dramatiq queue of each stage; ``haul worker`` consumes all of them by default.
QUEUES = ("claim", "download", "finalize")


def setup(settings: Settings) -> RedisBroker:
    """Create the Redis broker for ``settings``, make it Dramatiq's current one, and remember
    ``settings`` for the actors' runtime."""
    init_sentry(settings, component="worker")
    broker = RedisBroker(url=settings.redis_url)  # type: ignore[no-untyped-call]
    broker.add_middleware(Lifecycle())
    dramatiq.set_broker(broker)
    runtime.configure(settings)
    return broker
