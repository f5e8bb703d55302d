"""Waking a thread blocked on a socket, from another thread.

Closing a socket does not interrupt a ``recv`` already waiting on it in another thread; the
closeables registered here (responses wrapped so that ``close`` shuts their socket down) do.
A graceful stop and a lost lease both use it, so neither waits for a read timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


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
        self._fired.set()
        with self._lock:
            pending = list(self._open)
        for closeable in pending:
            _close(closeable)


def _close(closeable: Any) -> None:
    try:
        closeable.close()
    except Exception:  # a half-closed socket may complain; it is closed either way
        pass
