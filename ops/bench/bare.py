"""The baseline for the throughput benchmark: a bare Dramatiq actor doing GET + write + POST,
with nothing of haul (no store, no lease, no checks). Run as ``dramatiq ops.bench.bare``."""

import os

import dramatiq
import redis
import requests
from dramatiq.brokers.redis import RedisBroker

URL = os.environ["BARE_REDIS_URL"]
dramatiq.set_broker(RedisBroker(url=URL, namespace="bare"))  # type: ignore[no-untyped-call]
_counter = redis.Redis.from_url(URL)
_session = requests.Session()


@dramatiq.actor(queue_name="bare", max_retries=0)
def fetch(url: str, path: str, hook: str) -> None:
    response = _session.get(url, timeout=30)
    with open(path, "wb") as handle:
        handle.write(response.content)
    _session.post(hook, json={"path": path}, timeout=30)
    _counter.incr("bare:done")
