"""A download's progress and its fence: the checks made before every chunk is written.

The fetcher calls :meth:`FileProgress.on_progress` before writing each chunk, so a stopping
worker, a lost lease, an overrun step or a sibling file's failure stops the download there,
and the lease keeper reads the figures it renews the lease with from :class:`Progress`. A
task's files may download side by side (:mod:`actors.lanes`): each has its own
:class:`FileProgress`, on the lane (thread) that fetches it; the figures are the task's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from actors.errors import Stopping, TooLarge
from actors.lease import Lane, Lease
from actors.runtime import Runtime
from actors.store import FilesProgress
from actors.task import Task


class Halted(Exception):
    """Another file of the task failed: this one stops at its next chunk (its error is the
    one the run ends with, not this)."""


class Progress:
    """A download's figures (bytes per file), written by the threads fetching its files.

    Each file's entries are written by the one thread fetching it, and each is replaced whole,
    so the keeper reads the old or the new value, never half of one.
    """

    def __init__(self, rt: Runtime, task: Task, lease: Lease) -> None:
        self.rt = rt
        self.task = task
        self.lease = lease
        self.read_seconds = rt.settings.read_timeout_seconds
        self.max_task_bytes = rt.settings.max_task_bytes
        self.sizes = [f.size for f in task.spec.files]
        self.done = [0] * len(task.spec.files)
        self.finished = 0
        #: Indexes of the files finished, in the order they finished, and of those downloading
        #: with the connections each uses.
        self.order: list[int] = []
        self.active: dict[int, int] = {}
        #: Why the files still downloading must stop (another one failed), once one did.
        self.halted: str | None = None
        self._lock = threading.Lock()

    @property
    def bytes_done(self) -> int:
        return sum(self.done)

    def figures(self) -> tuple[int, int, int]:
        """(bytes done, bytes total, files done), as the store records them."""
        return self.bytes_done, sum(size or 0 for size in self.sizes), self.finished

    def files(self) -> FilesProgress:
        """Which files finished, in order, and how far each one downloading is (status, events)."""
        with self._lock:
            order, active = tuple(self.order), sorted(self.active.items())
        return FilesProgress(order, tuple((i, self.done[i], self.sizes[i] or 0, n) for i, n in active))

    @contextmanager
    def file(self, index: int, lane: Lane) -> Iterator[FileProgress]:
        """File ``index`` downloading on ``lane`` while the block runs."""
        with self._lock:
            self.active[index] = 1
        try:
            yield FileProgress(self, index, lane)
        finally:
            with self._lock:
                self.active.pop(index, None)

    def file_done(self, index: int, size: int) -> None:
        with self._lock:
            self.sizes[index] = size
            self.done[index] = size
            self.finished += 1
            self.order.append(index)


class FileProgress:
    """One file's transfer, on the lane fetching it: the callbacks the fetcher calls.

    Called before every chunk, so the common path is a few comparisons: the worker is not
    stopping, no sibling file failed, the task's bytes are within its budget, the lease is
    still ours (:meth:`Lane.step` checks the fence), and the next read may take up to the read
    timeout.
    """

    def __init__(self, progress: Progress, index: int, lane: Lane) -> None:
        self.progress = progress
        self.index = index
        self.lane = lane
        self.doing = f"downloading {progress.task.spec.files[index].path!r}"

    def on_total(self, size: int) -> None:
        """The file's size, once its answer gives it: refused at once (before a byte of it is
        written) when with the files finished and in flight it passes the task's budget."""
        p = self.progress
        with p._lock:
            p.sizes[self.index] = size
            if not p.max_task_bytes:
                return
            claimed = sum(p.sizes[i] or p.done[i] for i in {*p.order, *p.active})
        if claimed > p.max_task_bytes:
            raise TooLarge(
                f"task {p.task.id}: {p.task.spec.files[self.index].path!r} is {size} bytes; with its other files "
                f"the task comes to at least {claimed}, above HAUL_MAX_TASK_BYTES={p.max_task_bytes}; "
                "nothing more of it was downloaded"
            )

    def on_progress(self, position: int) -> None:
        self.tick(position, self.lane)

    def on_connections(self, count: int) -> None:
        """The connections the file uses now (a split download's)."""
        with self.progress._lock:
            if self.index in self.progress.active:
                self.progress.active[self.index] = max(1, count)

    def tick(self, position: int, lane: Lane) -> None:
        """Before a chunk of the file is written by ``lane``'s thread (one of a split file's
        connections, or the file's own)."""
        p = self.progress
        p.done[self.index] = position
        if p.rt.stopper.is_set():
            raise Stopping(f"task {p.task.id}: the worker is stopping; handing the task back")
        if p.halted is not None:
            raise Halted(p.halted)
        if p.max_task_bytes and p.bytes_done > p.max_task_bytes:  # files side by side share it
            raise TooLarge(
                f"task {p.task.id}: its files grew past HAUL_MAX_TASK_BYTES={p.max_task_bytes} bytes; "
                f"cut while downloading {p.task.spec.files[self.index].path!r}"
            )
        lane.step(p.read_seconds, self.doing)

    def on_received(self, size: int) -> None:
        """A chunk came over the network and was written (the stage metrics' bytes)."""
        self.progress.lease.tally.add(size)

    def step(self, seconds: float) -> None:
        self.lane.step(seconds, self.doing)

    def guard(self, closeable: Any) -> AbstractContextManager[None]:
        return guard_lease(self.progress.rt, self.lane, closeable)


@contextmanager
def guard_lease(rt: Runtime, lane: Lease | Lane, closeable: Any) -> Iterator[None]:
    """A graceful stop, a lost lease or a step past its deadline wakes a wait on ``closeable``."""
    with rt.stopper.guard(closeable), lane.guard(closeable):
        yield
