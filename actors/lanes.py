"""A task's files side by side: up to HAUL_TASK_PARALLEL_FILES at once, under one lease.

A CDN that caps what one connection gets makes a course of a hundred files take a hundred
times one file's wait; several files at once make the host's link the limit again. The working
thread downloads files itself and, beside it, threads from the worker's pool
(:attr:`actors.runtime.Runtime.beside`), each on a :class:`actors.lease.Lane` of the task's
one lease: the fence, the stop and the hung-step checks hold for every one of them, and the
task's lease is renewed only while every lane is within its step.

Politeness: with HAUL_DOWNLOAD_PER_HOST set, each connection to a host counts. The claim took
one slot of each of the task's hosts; a second connection to the same host takes one more
(``connection.lua``), held until the file ends and bound to the lease like the first, so the
limit holds across every worker. A lane that finds the host full waits for a slot (its own
run's first one included) rather than skipping ahead. A page file's media is often on
another host than its page (a CDN), which the claim could not know: its download takes a slot
of that host too (:meth:`FileLanes.connected`), and its split connections count there.
HAUL_DOWNLOAD_CONCURRENCY counts tasks, not connections.

The first file to fail stops the others at their next chunk (each keeps its ``.part`` for the
next attempt) and is the error the run ends with.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from urllib.parse import urlsplit

import redis

from actors.errors import HostBusy, LeaseLost
from actors.interrupt import interruptible
from actors.lease import Lane, Lease
from actors.progress import FileProgress, Halted, Progress, guard_lease
from actors.runtime import Runtime
from actors.split import Connection, SplitPlan
from actors.states import StepReply
from actors.task import Task

log = logging.getLogger(__name__)

#: How often a lane waiting for a connection slot asks again, in seconds.
SLOT_POLL_SECONDS = 1.0
#: Longest a page file's lane waits for a slot of its media's host before handing the task back.
HOST_PATIENCE_SECONDS = 60.0
#: Longest the working thread waits for the lanes beside it between two of its own steps.
JOIN_STEP_SECONDS = 1.0
#: Longest it waits for them to stop once the run failed (a lane still in a step that closing
#: its socket does not end, a disk write, is fenced by its own lease check if it lingers).
JOIN_AFTER_FAILURE_SECONDS = 10.0

#: Fetches file ``index`` on ``lane`` (the caller's download of one file).
FetchFile = Callable[[int, Lane], None]


class FileLanes:
    """Runs a task's pending files on up to ``width`` lanes; see the module docstring."""

    def __init__(self, rt: Runtime, task: Task, lease: Lease, progress: Progress, width: int) -> None:
        self.rt = rt
        self.task = task
        self.lease = lease
        self.progress = progress
        self.width = width
        self.per_host = rt.settings.download_per_host
        self._lock = threading.Condition()
        self._queue: list[int] = []
        #: The hosts the claim took a slot of (the task's files' hosts), and those whose
        #: claimed slot a lane of this run uses now.
        self._claimed = {urlsplit(f.url).hostname or "" for f in task.spec.files}
        self._claimed_in_use: set[str] = set()
        #: Slots beyond the claimed ones that lanes of this run hold now, by host.
        self._extra_held: Counter[str] = Counter()
        self._error: BaseException | None = None
        #: Connection numbers beyond the lanes' (a split file's connections).
        self._numbers = itertools.count(width)
        #: Slots of connections that ended but Redis did not take back yet: tried again with the next.
        self._owed: list[tuple[str, int]] = []

    def run(self, indexes: Sequence[int], fetch: FetchFile) -> None:
        """Fetch every file of ``indexes``; raise the first failure once every lane stopped."""
        self._queue = list(reversed(indexes))
        lanes = min(self.width, len(indexes))
        pending = [self.rt.beside.submit(self._beside, number, fetch) for number in range(1, lanes)]
        self._lane(0, self.lease.main, fetch)
        for future in pending:
            future.cancel()  # not started (the pool busy): the queue is empty or a file failed
        try:
            for future in pending:
                while not future.done():
                    self.lease.step(JOIN_STEP_SECONDS + 1, "waiting for the files downloading beside it")
                    futures.wait([future], JOIN_STEP_SECONDS)
        except BaseException as exc:  # the lease lost, the worker stopping: the lanes stop too
            self._fail(exc)
            futures.wait(pending, JOIN_AFTER_FAILURE_SECONDS)  # each is fenced if it lingers
        if self._error is not None:
            raise self._error

    def _beside(self, number: int, fetch: FetchFile) -> None:
        with self.lease.lane() as lane:
            self._lane(number, lane, fetch)

    def _lane(self, number: int, lane: Lane, fetch: FetchFile) -> None:
        """Take files from the queue until it is empty or a file failed."""
        while True:
            with self._lock:
                if not self._queue or self._error is not None:
                    return
                index = self._queue.pop()
            host = urlsplit(self.task.spec.files[index].url).hostname or ""
            try:
                extra = self._connect(host, number, lane)
                try:
                    fetch(index, lane)
                finally:
                    self._disconnect(host, number, extra)
            except Halted:
                return
            except BaseException as exc:
                self._fail(exc)
                return

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is not None:
                return
            self._error = exc
            self.progress.halted = f"task {self.task.id}: another of its files failed ({exc})"
            self._lock.notify_all()
        for lane in self.lease.lanes():  # wake the lanes blocked on a read: they stop now
            lane.wake(lane.deadline)

    @contextmanager
    def connected(self, host: str, lane: Lane) -> Iterator[None]:
        """While the block runs, the lane holds a connection slot of ``host`` too (a page
        file's media, resolved on another host than the page), waiting while it is full: for
        at most HOST_PATIENCE_SECONDS while other tasks hold it (the lane holds its page's host
        meanwhile: two tasks could each hold the host the other waits for), for as long as it
        takes while another lane of this run does (it frees it)."""
        number = next(self._numbers)
        extra = self._connect(host, number, lane, patience=HOST_PATIENCE_SECONDS)
        try:
            yield
        finally:
            self._disconnect(host, number, extra)

    def _connect(self, host: str, number: int, lane: Lane, patience: float | None = None) -> bool:
        """Open a connection to ``host``: the claimed slot when no lane of this run uses it,
        else one more slot (True), waiting while the host is full (at most ``patience`` seconds)."""
        since = time.monotonic()
        while True:
            with self._lock:
                if self.progress.halted is not None:
                    raise Halted(self.progress.halted)
                if not self.per_host or (host in self._claimed and host not in self._claimed_in_use):
                    if self.per_host:
                        self._claimed_in_use.add(host)
                    return False
                if host in self._claimed_in_use or self._extra_held[host] > 0:
                    since = time.monotonic()  # a lane of this run holds it: it will free it
            lane.step(self.rt.settings.connect_timeout_seconds, f"taking a connection slot of {host}")
            try:
                if self._take(host, number):
                    with self._lock:
                        self._extra_held[host] += 1
                    return True
            except redis.RedisError as exc:  # waited out like a full host; the lease's fence bounds it
                log.warning("task %s: cannot take a connection slot of %s yet (%s)", self.task.id, host, exc)
            if patience is not None and time.monotonic() - since > patience:
                raise HostBusy(
                    f"task {self.task.id}: {host} had no connection slot free for {patience:.0f}s "
                    "(HAUL_DOWNLOAD_PER_HOST); the task waits queued for its turn",
                    retry_after=patience * random.uniform(0.5, 1.5),
                )
            lane.step(SLOT_POLL_SECONDS, f"waiting for a connection slot of {host} (HAUL_DOWNLOAD_PER_HOST)")
            with self._lock:  # a file of this run ending frees its claimed slot: woken then
                self._lock.wait(SLOT_POLL_SECONDS)

    def _disconnect(self, host: str, number: int, extra: bool) -> None:
        with self._lock:
            if extra:
                self._extra_held[host] -= 1
            else:
                self._claimed_in_use.discard(host)
            self._lock.notify_all()
        if extra:
            self._give_back(host, number)

    def _take(self, host: str, number: int) -> bool:
        """Take connection ``number``'s slot of ``host``; False when the host is full."""
        reply = self.rt.store.connection(
            self.task.id, self.lease.token, host, number, limit=self.per_host, now=self.rt.clock(), take=True
        )
        if reply is StepReply.STALE:
            raise LeaseLost(f"task {self.task.id}: lease lost while taking a connection to {host}")
        return reply is StepReply.OK

    def _give_back(self, host: str, number: int) -> None:
        """Give the slot back at once, and any an earlier call could not (the lease renews them
        while the run lasts, so left alone they would hold the host's budget until it ends)."""
        with self._lock:
            owed, self._owed = [*self._owed, (host, number)], []
        for slot in owed:
            try:
                self.rt.store.connection(
                    self.task.id, self.lease.token, slot[0], slot[1], limit=self.per_host, now=self.rt.clock(),
                    take=False,
                )  # fmt: skip
            except redis.RedisError as exc:
                log.warning("task %s: a connection slot of %s not given back yet (%s)", self.task.id, slot[0], exc)
                with self._lock:
                    self._owed.append(slot)

    def split_plan(self, host: str, file: FileProgress, lane: Lane, base: int = 0) -> SplitPlan | None:
        """How a file of ``host``, downloading on ``lane``, may open connections beside its own
        (HAUL_SPLIT): each on a thread of the pool, a lane of the lease and a host slot of its
        own (without waiting: a full host means no more connections for now). ``base``: bytes
        of the file before what this download writes (a page's track after another)."""
        settings = self.rt.settings
        if settings.split <= 1:
            return None

        def open_connection(work: Callable[[Connection], None]) -> futures.Future[None] | None:
            number = next(self._numbers)
            if self.per_host:
                try:
                    if not self._take(host, number):
                        return None
                except redis.RedisError as exc:  # no connection more, for now
                    log.warning("task %s: no connection slot of %s taken (%s)", self.task.id, host, exc)
                    return None

            def run() -> None:
                try:
                    with self.lease.lane() as beside:
                        guard = functools.partial(guard_lease, self.rt, beside)
                        with interruptible(guard):
                            work(Connection(
                                ranges=self.rt.fetcher, tick=functools.partial(_tick, file, beside, base),
                                step=functools.partial(_step, beside, file.doing),
                                wake=functools.partial(_wake, beside), guard=guard,
                            ))  # fmt: skip
                finally:
                    if self.per_host:
                        self._give_back(host, number)

            try:
                return self.rt.beside.submit(run)
            except RuntimeError:  # the worker is stopping: its pool takes nothing new
                if self.per_host:
                    self._give_back(host, number)
                return None

        return SplitPlan(
            width=settings.split, min_bytes=settings.min_split_bytes, open_connection=open_connection,
            on_connections=file.on_connections, wake=functools.partial(_wake, lane),
        )  # fmt: skip


def _tick(file: FileProgress, lane: Lane, base: int, position: int) -> None:
    file.tick(base + position, lane)


def _step(lane: Lane, doing: str, seconds: float) -> None:
    lane.step(seconds, doing)


def _wake(lane: Lane) -> None:
    lane.wake(lane.deadline)
