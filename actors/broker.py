"""The one place a Dramatiq broker is built, from Settings.

Order matters: Sentry's Dramatiq integration patches ``Broker.__init__``, so Sentry (when it is
configured) is initialised before the broker is created, then the broker is made current.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from actors import runtime
from actors.settings import Settings

#: Dramatiq queue of each stage; ``haul worker`` consumes all of them by default.
QUEUES = ("claim", "download", "finalize")


def setup(settings: Settings) -> RedisBroker:
    """Create the Redis broker for ``settings``, make it Dramatiq's current one, and remember
    ``settings`` for the actors' runtime."""
    broker = RedisBroker(url=settings.redis_url)  # type: ignore[no-untyped-call]
    dramatiq.set_broker(broker)
    runtime.configure(settings)
    return broker
