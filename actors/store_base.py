"""The store's ground floor: haul's Redis keys, its Lua scripts and the connection options.

Each operation that reads then writes is one Lua script in ``actors/lua/`` (its header lists
KEYS and ARGV); ``_lib.lua`` is prepended to each. Keys, all under one prefix::

    haul:task:<id>       hash: the task's state, attempts, token, lease, progress, ...
    haul:spec:<id>       string: what it asks for (JSON: files, name, webhook, accept)
    haul:key:<key>       string: idempotency key -> task id
    haul:state:<state>   sorted set: task ids in that state, by time of entry
    haul:leases          sorted set: task ids holding a lease, by deadline
    haul:notify          sorted set: failed/dead/canceled tasks whose task.failed or task.canceled is
                         owed, by when its next try is due (see actors/notify.py)
    haul:supervisor:leader  string with TTL: the supervisor replica that runs the sweeps
    haul:supervisor:report  hash with TTL: the leader's last sweep and configuration problems, for
                         the operator dashboard (actors/store_figures.py)
    haul:slots:<stage>   sorted sets: stage slots, by the lease deadline of their holder
    haul:slots:host:<h>  the same per origin host; a task's run that downloads several files from
                         one host at once holds one member more per connection ('<id>#<n>')
    haul:slotkeys        set: the slot sets that exist (read by /metrics instead of a scan)
    haul:pace:<host>     string with TTL: when the next page of that host may be asked for
                         (HAUL_HOST_MIN_INTERVAL_SECONDS)
    haul:staged          hash: bytes each sandbox holds (and haul:staged:total, their sum)
    haul:resting         sorted set: finalizing tasks between runs, by when their message is due
    haul:parked          sorted set: of those, the ones parked while storage or receiver is down
    haul:outbox:claim    sorted set: tasks queued again whose claim message is not confirmed sent
    haul:stats:dead      counter: tasks that ever went dead (haul_dead_tasks_total)
    haul:stats:refused   hash: claims answered full, by reason (haul_claims_refused_total)
    haul:stats:stages    hash: <stage>:bytes and <stage>:seconds, added by every worker's lease
                         keeper (haul_stage_bytes_total, haul_stage_seconds_total)
    haul:stats:minute:<m>  hash with TTL: tasks done, failed, dead and bytes moved in minute <m>
                         since the epoch, for the operator dashboard (actors/store_figures.py)
    haul:uploads:<id>    hash: file index -> the multipart upload in progress (JSON: key, upload
                         id, part size), kept by the run holding the task (actors/store_uploads.py)
    haul:uploading       set: the tasks that have such records
    haul:deliveries:<id> list: the task's latest webhook tries and their answers, newest first
                         (JSON each; written by the worker that tried, :mod:`actors.store_deliveries`)
    haul:index:name      sorted set: '<casefolded name>\\0<id>', all scores 0 (name prefix search)
    haul:index:names     hash: task id -> its member of index:name (for prune)
    haul:index:host:<h>  sorted set: ids of the tasks with a file on <h>, by created_at
                         (:mod:`actors.store_index`)
    haul:index:backfill  hash: how far the walk that brings those indexes up to date got, and
                         when it finished (:mod:`actors.store_backfill`)

Every call that depends on time takes ``now`` (seconds since the epoch) as a parameter. The
operations are :class:`actors.store.TaskStore` (a task's runs and reads) on top of
:class:`actors.store_sweeps.SweepStore` (what the supervisor's sweeps and metrics need), on top
of :class:`actors.store_figures.FigureStore` (what the operator dashboard reads), beside
:class:`actors.store_deliveries.DeliveryStore` (each task's webhook tries, for the same) and
:class:`actors.store_backfill.BackfillStore` (the indexes brought up to date after an upgrade).
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Self

import redis

from actors.states import State

DEFAULT_PREFIX = "haul:"

#: Every Redis call gives up after this long (seconds): a half-open connection (a dead peer, a
#: dropped NAT entry) must not block a sweep or a lease renewal for the minutes TCP takes to
#: notice. Every script haul runs is bounded, so a healthy Redis answers in milliseconds.
REDIS_SOCKET_TIMEOUT_SECONDS = 10.0
REDIS_CONNECT_TIMEOUT_SECONDS = 5.0


def redis_options() -> dict[str, Any]:
    """Connection options for every Redis client haul makes (the store and the broker)."""
    return {
        "socket_timeout": REDIS_SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_SECONDS,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }


def _load_script(name: str) -> str:
    folder = resources.files("actors") / "lua"
    return (folder / "_lib.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


def text_of(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class StoreBase:
    """The keys, under one prefix, and the scripts; the only code besides the worker registry
    that knows haul's Redis layout is this class and its subclasses."""

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._scripts = {
            name: client.register_script(_load_script(name))
            for name in (
                "create",
                "delivery",
                "claim",
                "connection",
                "resolved",
                "pace",
                "advance",
                "heartbeat",
                "release",
                "cancel",
                "retry",
                "requeue",
                "rescue",
                "prune",
                "leader",
                "resign",
                "enter_finalize",
                "announce",
                "notify_begin",
                "notify_later",
                "notify_end",
                "notify_resend",
                "park",
                "finalize_resend",
                "upload",
                "upload_drop",
                "report",
            )  # fmt: skip
        }

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX) -> Self:
        return cls(redis.Redis.from_url(url, **redis_options()), prefix)

    def task_key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def spec_key(self, task_id: str) -> str:
        """What the task asks for (files, name, webhook), apart from the hash: a long value would
        turn the whole hash from Redis's compact encoding into a hash table (3x the memory)."""
        return f"{self.prefix}spec:{task_id}"

    def state_key(self, state: State) -> str:
        return f"{self.prefix}state:{state.value}"

    @property
    def name_index_key(self) -> str:
        return f"{self.prefix}index:name"

    @property
    def name_members_key(self) -> str:
        return f"{self.prefix}index:names"

    def host_index_key(self, host: str) -> str:
        return f"{self.prefix}index:host:{host}"

    @property
    def leases_key(self) -> str:
        return f"{self.prefix}leases"

    @property
    def notify_key(self) -> str:
        return f"{self.prefix}notify"

    @property
    def stage_totals_key(self) -> str:
        return f"{self.prefix}stats:stages"

    @property
    def leader_key(self) -> str:
        return f"{self.prefix}supervisor:leader"

    def _call(self, name: str, keys: list[str], *args: Any, client: Any = None) -> Any:
        """Run a script (or queue it on a pipeline ``client``)."""
        return self._scripts[name](keys=keys, args=self._argv(args), client=client)

    def _argv(self, args: tuple[Any, ...]) -> list[Any]:
        """A script's ARGV: the prefix, then ``args`` with times (floats) as milliseconds-precise
        text, which is all we need."""
        return [self.prefix, *(f"{a:.3f}" if isinstance(a, float) else a for a in args)]

    @staticmethod
    def script_text(name: str) -> str:
        """A script's source, for a client of another kind (redis.asyncio) to run it."""
        return _load_script(name)
