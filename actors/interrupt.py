"""Waking a thread blocked on a socket, from another thread.

Closing a socket does not interrupt a ``recv`` already waiting on it in another thread;
shutting it down does. A graceful stop, a lost lease and a step past its deadline all use it,
so none waits for a read timeout (which a peer that drips a byte now and then never lets
fire). The working thread says which :class:`Interrupter` guards may close its sockets with
:func:`interruptible`; HTTP connections register their socket while they wait for an answer
(:func:`waiting_on`), and a body being read is registered by its reader.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

#: Registers a closeable for the duration of a block (``Interrupter.guard`` or a combination).
Guard = Callable[[Any], AbstractContextManager[None]]

_local = threading.local()


class Interrupter:
    """Closes every registered closeable once fired, and any registered after."""

    def __init__(self) -> None:
        self._fired = threading.Event()
        self._open: set[Any] = set()
        self._lock = threading.Lock()

    def fired(self) -> bool:
        return self._fired.is_set()

    @contextmanager
    def guard(self, closeable: Any) -> Iterator[None]:
        """Close ``closeable`` if this fires while the block runs (or fired before)."""
        with self._lock:
            self._open.add(closeable)
        try:
            if self._fired.is_set():
                _close(closeable)
            yield
        finally:
            with self._lock:
                self._open.discard(closeable)

    def fire(self) -> None:
        """Close what is registered now and whatever is registered later."""
        self._fired.set()
        self.interrupt()

    def interrupt(self) -> None:
        """Close what is registered now (the step that is blocked), and nothing later. Under the
        lock (closing only shuts a socket down or signals a process): a block leaving its guard
        meanwhile waits, so nothing it goes on to use, a connection back in its pool, is closed
        after it left."""
        with self._lock:
            for closeable in list(self._open):
                _close(closeable)


class SocketShutter:
    """A closeable that shuts a socket down, waking a thread blocked reading it. The reading
    thread then sees the connection end and cleans up itself (closing from here would race
    with its own clean-up). It must check :attr:`shut` afterwards: to the reader, a shutdown
    looks like the peer ending the answer, which must not pass for a complete one."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock
        self.shut = False

    def close(self) -> None:
        self.shut = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


@contextmanager
def interruptible(guard: Guard | None) -> Iterator[None]:
    """Let ``guard`` wake this thread's HTTP calls inside the block while they wait."""
    previous = getattr(_local, "guard", None)
    _local.guard = guard
    try:
        yield
    finally:
        _local.guard = previous


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Wake the block's HTTP calls once ``seconds`` passed: a peer that drips its answer
    (headers or body) must not hold the thread past the time its caller gave it. The thread's
    own guard (a stop, a lost lease), if any, wakes them too."""
    deadline = Interrupter()
    outer: Guard | None = getattr(_local, "guard", None)

    @contextmanager
    def guard(closeable: Any) -> Iterator[None]:
        with deadline.guard(closeable), outer(closeable) if outer is not None else nullcontext():
            yield

    timer = threading.Timer(seconds, deadline.fire)
    timer.daemon = True
    timer.start()
    try:
        with interruptible(guard):
            yield
    finally:
        timer.cancel()


@contextmanager
def waiting_on(sock: socket.socket | None) -> Iterator[SocketShutter]:
    """Register ``sock`` with this thread's guard (if any) while the block waits on it."""
    shutter = SocketShutter(sock)
    with guarded(shutter):
        yield shutter


def guarded(shutter: SocketShutter) -> AbstractContextManager[None]:
    """Register ``shutter`` with this thread's guard (if any) for the block."""
    guard: Guard | None = getattr(_local, "guard", None)
    return guard(shutter) if guard is not None and shutter.sock is not None else nullcontext()


def _close(closeable: Any) -> None:
    try:
        closeable.close()
    except Exception:  # a half-closed socket may complain; it is closed either way
        pass
