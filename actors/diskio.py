"""Writing large files without a long stall at the end.

Left alone, Linux keeps a whole 1 GiB file as dirty pages (until 30 s old or 10% of memory),
so the fsync that makes it durable waits for all of it at once: after the transfer, and for
longer than a lease step may take on a slow disk or a network filesystem.
"""

from __future__ import annotations

import os

#: Bytes written between two requests to the kernel to start writing the file back.
WRITEBACK_BYTES = 16 * 1024 * 1024

_CAN_ADVISE = hasattr(os, "posix_fadvise")  # Linux and most Unixes; elsewhere the fsync does it all


class Writeback:
    """Starts writing a file to disk while it is still being written.

    ``POSIX_FADV_DONTNEED`` over what was written starts its write-back at once and drops the
    pages already clean: the final fsync has at most a window left, and the page cache does not
    fill up with one task's file. Measured on a virtual disk: 1.6-2.0 GB/s including the fsync,
    against 0.8-1.4 GB/s without.
    """

    def __init__(self, fd: int, position: int) -> None:
        self.fd = fd
        self.previous = self.mark = position

    def advance(self, position: int) -> None:
        if position - self.mark < WRITEBACK_BYTES or not _CAN_ADVISE:
            return
        try:  # the previous window is clean by now (dropped), this one starts its write-back
            os.posix_fadvise(self.fd, self.previous, position - self.previous, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only: the final fsync still makes the file durable
        self.previous, self.mark = self.mark, position
