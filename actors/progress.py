"""A download's progress and its fence: the checks made before every chunk is written.

The fetcher calls :meth:`Progress.on_progress` before writing each chunk, so a stopping worker,
a lost lease or an overrun step stops the download there, and the lease keeper reads the
figures it renews the lease with from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from actors.errors import Stopping
from actors.lease import Lease
from actors.runtime import Runtime
from actors.task import Task


class Progress:
    """A download's figures (bytes per file), and its checks before every chunk is written.

    Called before every chunk, so the common path is a few comparisons: the worker is not
    stopping, the lease is still ours (:meth:`Lease.step` checks the fence), and the next read
    may take up to the read timeout. The lease keeper writes the figures with each renewal.
    """

    def __init__(self, rt: Runtime, task: Task, lease: Lease) -> None:
        self.rt = rt
        self.task = task
        self.lease = lease
        self.read_seconds = rt.settings.read_timeout_seconds
        self.sizes = [f.size for f in task.spec.files]
        self.done = [0] * len(task.spec.files)
        self.finished = 0
        self.current: int | None = None
        self.doing = "downloading"

    @property
    def bytes_done(self) -> int:
        return sum(self.done)

    def figures(self) -> tuple[int, int, int]:
        """(bytes done, bytes total, files done), as the store records them."""
        return self.bytes_done, sum(size or 0 for size in self.sizes), self.finished

    def start_file(self, index: int) -> None:
        self.current = index
        self.doing = f"downloading {self.task.spec.files[index].path!r}"

    def on_total(self, size: int) -> None:
        if self.current is not None:
            self.sizes[self.current] = size

    def on_progress(self, position: int) -> None:
        if self.current is not None:
            self.done[self.current] = position
        if self.rt.stopper.is_set():
            raise Stopping(f"task {self.task.id}: the worker is stopping; handing the task back")
        self.lease.step(self.read_seconds, self.doing)

    def on_received(self, size: int) -> None:
        """A chunk came over the network and was written (the stage metrics' bytes)."""
        self.lease.tally.moved += size

    def step(self, seconds: float) -> None:
        self.lease.step(seconds, self.doing)

    def guard(self, closeable: Any) -> AbstractContextManager[None]:
        return guard_lease(self.rt, self.lease, closeable)

    def file_done(self, index: int, size: int) -> None:
        self.sizes[index] = size
        self.done[index] = size
        self.finished += 1
        self.current = None


@contextmanager
def guard_lease(rt: Runtime, lease: Lease, closeable: Any) -> Iterator[None]:
    """A graceful stop, a lost lease or a step past its deadline wakes a wait on ``closeable``."""
    with rt.stopper.guard(closeable), lease.guard(closeable):
        yield
