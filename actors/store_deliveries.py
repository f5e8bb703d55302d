"""The webhook tries of each task, for the operator dashboard's task page (one key per task)::

    haul:deliveries:<id>   list: the task's latest DELIVERIES_KEPT webhook tries, newest first,
                           each a compact JSON object (:class:`actors.deliveries.Delivery`);
                           deleted with the task by prune.lua

Written by the worker that made the try, through delivery.lua, which records it only while the
task is stored (prune deletes the list with the task; a try that ends after must not leave one
behind). A record is a line of history, not part of a task's state: losing one to a Redis
error costs the dashboard a line and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable

from actors.deliveries import DELIVERIES_KEPT, Delivery
from actors.store_base import StoreBase


class DeliveryStore(StoreBase):
    """Each task's list of webhook tries."""

    def deliveries_key(self, task_id: str) -> str:
        return f"{self.prefix}deliveries:{task_id}"

    def record_delivery(self, task_id: str, delivery: Delivery, *, secrets: Iterable[str]) -> bool:
        """Add one try to the task's list, with ``secrets`` (and URL credentials) redacted,
        keeping the latest DELIVERIES_KEPT; one atomic step (no reader sees more). False when
        the task is gone (pruned meanwhile): nothing is written."""
        keys = [self.task_key(task_id), self.deliveries_key(task_id)]
        return bool(self._call("delivery", keys, delivery.redacted(secrets).to_json(), DELIVERIES_KEPT))

    def deliveries(self, task_id: str, limit: int = DELIVERIES_KEPT) -> list[Delivery]:
        """The task's latest ``limit`` webhook tries, newest first ([] for none, or a pruned task)."""
        if limit < 1:
            raise ValueError(f"deliveries: limit must be at least 1 (got {limit})")
        return [Delivery.from_json(raw) for raw in self.client.lrange(self.deliveries_key(task_id), 0, limit - 1)]
