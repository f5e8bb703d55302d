"""Submitting tasks from Python (a backend) or the CLI.

>>> from actors.submit import submit
>>> task_id = submit(["https://cdn.example.com/course/01.mp4"], name="Course 12", key="order-981")

``key`` makes submitting idempotent: the same key with the same request returns the first
task's id and creates nothing, so a backend can retry its own call safely; the same key with a
different request raises :class:`actors.task.KeyConflict` naming the first differing field.
``replace=True`` puts a corrected request under the key of a failed, dead or canceled task.
Files may be plain URLs (named after their last path segment) or ``{"url", "path", "size"?, "sha256"?}`` objects.
Configuration comes from ``HAUL_*`` (``HAUL_REDIS_URL`` above all), as for the workers.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from actors.dispatch import enqueue_claim
from actors.settings import Settings
from actors.store import TaskStore
from actors.task import State, TaskSpec, spec_from_manifest, spec_from_urls

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _store(redis_url: str) -> TaskStore:
    return TaskStore.from_url(redis_url)


def submit(
    files: Sequence[str | Mapping[str, Any]],
    *,
    name: str = "",
    key: str | None = None,
    webhook: str | None = None,
    accept: Sequence[str] | None = None,
    replace: bool = False,
) -> str:
    """Create a task (or find the one with the same ``key``) and queue it; return its id.

    ``accept`` lists the content types expected (default :data:`actors.task.DEFAULT_ACCEPT`).
    Raises :class:`actors.errors.InvalidTask` with a message naming the bad field, or its
    subclass :class:`actors.task.KeyConflict` (see the module docstring); nothing is stored or
    queued then.
    """
    if all(isinstance(item, str) for item in files):
        spec = spec_from_urls([str(item) for item in files], name=name, key=key, webhook=webhook, accept=accept)
    else:
        manifest: dict[str, Any] = {"name": name, "key": key, "webhook": webhook, "files": list(files)}
        if accept is not None:
            manifest["accept"] = list(accept)
        spec = spec_from_manifest(manifest)
    return submit_spec(spec, _store(Settings.from_env().redis_url), replace=replace)


def submit_spec(spec: TaskSpec, store: TaskStore, *, replace: bool = False) -> str:
    """Store a validated spec and send its claim message (through the broker ``actors`` set up)."""
    task_id, created = store.create(spec, now=time.time(), replace=replace)
    if created:
        log.info("task %s: submitted (%d file(s), key %r)", task_id, len(spec.files), spec.key)
        enqueue_claim(task_id)
    else:
        task = store.get(task_id)
        log.info("task %s: key %r seen before; not created again", task_id, spec.key)
        if task is not None and task.state is State.QUEUED:
            enqueue_claim(task_id)  # harmless if its message exists; recovers one that was lost
    return task_id
