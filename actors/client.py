"""haul for a backend (and the CLI): submit tasks and follow, retry or cancel them.

>>> from actors.client import Client
>>> from actors.settings import Settings
>>> haul = Client(Settings.from_env())
>>> task_id = haul.submit(["https://cdn.example.com/course/01.mp4"], name="Course 12", key="order-981")

A client owns its Redis connection and, from its first message, a Dramatiq broker of its own:
importing this module, or building a client, starts nothing and reads no environment (the
caller passes Settings). ``key`` makes submitting idempotent: the same key with the same
request returns the first task's id and creates nothing, so a backend can retry its own call
safely; the same key with a different request raises :class:`actors.task.KeyConflict` naming
the first differing field. ``replace=True`` puts a corrected request under the key of a failed,
dead or canceled task. Files may be plain URLs (named after their last path segment) or
``{"url", "path", "size"?, "sha256"?}`` objects.
"""

from __future__ import annotations

import builtins
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from actors.errors import InvalidTask
from actors.manifest import spec_from_manifest, spec_from_urls
from actors.pages import RESOLVE_EXTRA
from actors.registry import WorkerRegistry
from actors.settings import Settings
from actors.states import CancelReply, RetryReply, State
from actors.storagetarget import check_keys
from actors.store import Cursor, TaskStore
from actors.task import Task, TaskSpec

if TYPE_CHECKING:
    from actors.messages import Messages, QueuedMessage

log = logging.getLogger(__name__)


class ClientError(Exception):
    """An operation on a task was refused or found nothing; the message says why and what to do."""


class TaskNotFound(ClientError):
    def __init__(self, what: str) -> None:
        super().__init__(f"no {what} in Redis (ended tasks are pruned after HAUL_RETAIN_SECONDS)")


class RetryRefused(ClientError):
    """Only a failed, dead or canceled task gets fresh attempts."""


class CancelRefused(ClientError):
    """The task has ended, or its completion is being announced."""


@dataclass(frozen=True)
class Creation:
    """A task about to be created (:meth:`Client.prepare`): the create step writes it and its
    claim message together (``claim`` None: the broker is not Redis's, the message goes apart)."""

    spec: TaskSpec
    task_id: str
    now: float
    replace: bool
    claim: QueuedMessage | None


class Client:
    """Submits and follows tasks in the Redis of ``settings`` (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: TaskStore | None = None,
        messages: Messages | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store or TaskStore.from_url(settings.redis_url)
        self._messages = messages
        self.clock = clock

    @property
    def messages(self) -> Messages:
        """The client's broker, built when it first sends (reading tasks needs no Dramatiq)."""
        if self._messages is None:
            from actors.messages import Messages, redis_broker

            self._messages = Messages(redis_broker(self.settings))
        return self._messages

    def submit(
        self,
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
        subclass :class:`actors.task.KeyConflict`; nothing is stored or queued then.
        """
        if all(isinstance(item, str) for item in files):
            spec = spec_from_urls([str(item) for item in files], name=name, key=key, webhook=webhook, accept=accept)
        else:
            manifest: dict[str, Any] = {"name": name, "key": key, "webhook": webhook, "files": list(files)}
            if accept is not None:
                manifest["accept"] = list(accept)
            spec = spec_from_manifest(manifest)
        return self.submit_spec(spec, replace=replace)

    def submit_spec(self, spec: TaskSpec, *, replace: bool = False) -> str:
        """Store a validated spec and send its claim message; return the task's id."""
        return self.create(spec, replace=replace)[0].id

    def create(self, spec: TaskSpec, *, replace: bool = False, by: str = "") -> tuple[Task, bool]:
        """:meth:`submit_spec`, answering the task as it is stored and whether it is new (False:
        its key named it). ``by`` names the submitter in the log (the API's token name)."""
        creation = self.prepare(spec, replace=replace)
        task_id, created = self.store.create(
            spec, now=creation.now, task_id=creation.task_id, replace=replace, claim=creation.claim
        )
        if created:
            return self.created(creation, by=by), True
        log.info("task %s: key %r seen before; not created again", task_id, spec.key)
        task = self.get(task_id)
        if task.state is State.QUEUED:
            self.messages.claim(task_id)  # harmless if its message exists; recovers one that was lost
        return task, False

    def prepare(self, spec: TaskSpec, *, replace: bool = False) -> Creation:
        """A new task's id, time and claim message, once its storage keys are known to be valid."""
        settings = self.settings
        problem = check_keys(settings.object_storage, settings.storage_key, spec.key, [f.path for f in spec.files])
        if problem is not None:
            raise InvalidTask(problem)
        pages = [f.path for f in spec.files if f.page]
        known = spec.key is not None and not replace and self.store.id_by_key(spec.key) is not None
        if pages and not known and not self._pages_resolvable():  # a key seen before answers as it did
            raise InvalidTask(
                f"manifest.files: {pages[0]!r} is given as a page, but no running worker can resolve pages; install "
                "the extra on the workers (pip install 'haul[resolve]'), start them, then submit again"
            )
        task_id = uuid.uuid4().hex
        return Creation(spec, task_id, self.clock(), replace, self.messages.queued_claim(task_id))

    def _pages_resolvable(self) -> bool:
        """Whether a running worker that claims tasks can resolve pages."""
        from actors.messages import CLAIM_QUEUE  # Dramatiq's import only where it is used

        return WorkerRegistry(self.store.client, self.store.prefix).have(RESOLVE_EXTRA, CLAIM_QUEUE, time.time())

    def created(self, creation: Creation, *, by: str = "") -> Task:
        """The task ``creation`` made, as the create wrote it (no read), its claim message sent
        where the create could not queue it."""
        spec, task_id, now = creation.spec, creation.task_id, creation.now
        log.info(
            "task %s: submitted%s (%d file(s), key %r)", task_id, f" by {by}" if by else "", len(spec.files), spec.key
        )
        if creation.claim is None:
            self.messages.claim(task_id)
        return Task(id=task_id, spec=spec, state=State.QUEUED, created_at=now, updated_at=now,
                    bytes_total=spec.known_bytes)  # fmt: skip

    def get(self, task_id: str) -> Task:
        task = self.store.get(task_id)
        if task is None:
            raise TaskNotFound(f"task {task_id!r}")
        return task

    def find(self, key: str) -> Task:
        """The task an idempotency key names now (the newest, after a replace)."""
        task_id = self.store.id_by_key(key)
        if task_id is None:
            raise TaskNotFound(f"task under key {key!r}")
        return self.get(task_id)

    def list(self, state: State, limit: int = 50) -> list[Task]:
        """The newest tasks in ``state``, newest first."""
        return self._tasks(self.store.ids(state, limit))

    def page(self, state: State, limit: int, after: Cursor | None = None) -> tuple[builtins.list[Task], Cursor | None]:
        """Up to ``limit`` tasks in ``state``, newest first, after ``after``; and the cursor of
        the next page (None at the end)."""
        entries = self.store.page(state, limit + 1, after)
        tasks = self._tasks([i for i, _ in entries[:limit]])
        return tasks, (Cursor(entries[limit - 1][1], entries[limit - 1][0]) if len(entries) > limit else None)

    def by_name(self, prefix: str, limit: int, after: str | None = None) -> tuple[builtins.list[Task], str | None]:
        """Up to ``limit`` tasks whose name starts with ``prefix`` (any case), in name order,
        after the cursor ``after``; and the cursor of the next page (None at the end). Two round
        trips: the index, then the tasks. A task pruned meanwhile is left out, so a page may be
        short of ``limit`` with more to come. An empty prefix raises ValueError."""
        task_ids, cursor = self.store.tasks_by_name(prefix, limit, after)
        return self._tasks(task_ids), cursor

    def by_host(self, host: str, limit: int, before: Cursor | None = None) -> tuple[builtins.list[Task], Cursor | None]:
        """Up to ``limit`` tasks with a file on ``host`` (a hostname, any case), newest first,
        older than the cursor ``before``; and the cursor of the next page (None at the end). A
        task pruned meanwhile is left out, as in :meth:`by_name`."""
        task_ids, cursor = self.store.tasks_by_host(host, limit, before)
        return self._tasks(task_ids), cursor

    def counts(self) -> dict[State, int]:
        return self.store.counts()

    def _tasks(self, task_ids: Sequence[str]) -> builtins.list[Task]:
        """The tasks ``task_ids`` name, read in one round trip; one pruned meanwhile left out."""
        return [t for t in self.store.get_many(task_ids) if t is not None]

    def retry(self, task_id: str, by: str = "") -> None:
        """Give a failed, dead or canceled task fresh attempts and queue it (``by``: who, on
        its task.retried event)."""
        result = self.store.retry(task_id, self.clock(), by)
        if result is RetryReply.MISSING:
            raise TaskNotFound(f"task {task_id!r}")
        if result is RetryReply.NOT_ENDED:
            task = self.store.get(task_id)
            if task is not None and task.state is State.DONE:
                raise RetryRefused(
                    f"task {task_id} is done (stored and announced); retry is for failed, dead or canceled tasks"
                )
            raise RetryRefused(f"task {task_id} has not ended; only failed, dead or canceled tasks are retried")
        if result is RetryReply.REPLACED:
            key = self.get(task_id).spec.key
            raise RetryRefused(
                f"task {task_id} was replaced under key {key!r} by task {self.store.id_by_key(key or '')}; "
                "retry that one (or submit the order again with a new key)"
            )
        self.messages.claim(task_id)

    def cancel(self, task_id: str, by: str = "") -> bool:
        """Cancel a task that has not ended, unless its completion is already being announced.
        task.canceled goes to its webhook; False when its message could not be sent now (the
        notice is recorded with the cancel, so the supervisor sends it). ``by``: who, on its
        task.canceled event."""
        result = self.store.cancel(task_id, self.clock(), by)
        if result is CancelReply.MISSING:
            raise TaskNotFound(f"task {task_id!r}")
        if result is CancelReply.FINAL:
            raise CancelRefused(f"task {task_id} has already ended; `haul status {task_id}` says how")
        if result is CancelReply.ANNOUNCING:
            raise CancelRefused(
                f"task {task_id} was not canceled: the completion is being announced (the backend may "
                "already hold task.completed), so the task ends done; undo it in the backend if needed"
            )
        try:
            self.messages.notify(task_id)
        except redis.RedisError as exc:
            log.warning("task %s: canceled; task.canceled not queued (%s), the supervisor sends it", task_id, exc)
            return False
        return True

    def close(self) -> None:
        self.store.client.close()
        if self._messages is not None:
            self._messages.broker.close()
