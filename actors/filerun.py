"""One file's download within a task's run: what its steps share (the lane, the progress, the
sandbox, the limits), and its download through the fetcher."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from actors.httprules import FetchRules
from actors.lanes import FileLanes
from actors.lease import Lane
from actors.progress import FileProgress, Progress
from actors.runtime import Runtime
from actors.sandbox import Sandbox
from actors.split import SplitPlan
from actors.task import FileSpec, Task


@dataclass(frozen=True)
class FileRun:
    """File ``index`` of ``task``, downloading on ``lane`` into ``part`` for the run holding ``token``."""

    rt: Runtime
    task: Task
    token: int
    index: int
    part: Path
    file: FileProgress
    lane: Lane
    lanes: FileLanes
    sandbox: Sandbox
    progress: Progress

    @property
    def spec(self) -> FileSpec:
        return self.task.spec.files[self.index]

    def rules(self) -> FetchRules:
        """The limits for the file: the file limit, or what the task's other files left of its
        budget (this file's own bytes so far are not counted against it: it may start again)."""
        s = self.rt.settings
        limits = [s.max_file_bytes] if s.max_file_bytes else []
        if s.max_task_bytes:
            others = self.progress.bytes_done - self.progress.done[self.index]
            limits.append(max(1, s.max_task_bytes - others))
        return FetchRules(
            max_bytes=min(limits) if limits else 0,
            accept=self.task.spec.accept,
            lowest_speed_bytes=s.lowest_speed_bytes,
            lowest_speed_seconds=s.lowest_speed_seconds,
        )

    def plan(self, url: str, base: int = 0) -> SplitPlan | None:
        """How a download from ``url`` may open connections beside the lane's (HAUL_SPLIT)
        (``base``: bytes of the file before what it writes)."""
        return self.lanes.split_plan(urlsplit(url).hostname or "", self.file, self.lane, base)

    def hold(self, url: str) -> AbstractContextManager[None]:
        """A connection slot of ``url``'s host while the block runs (HAUL_DOWNLOAD_PER_HOST),
        unless it is the file's own host, whose slot the claim took (a page's media elsewhere)."""
        host = urlsplit(url).hostname or ""
        if not self.rt.settings.download_per_host or host == (urlsplit(self.spec.url).hostname or ""):
            return nullcontext()
        return self.lanes.connected(host, self.lane)

    def fetch(
        self,
        media: FileSpec,
        headers: Mapping[str, str],
        shown: Callable[[str], str],
        into: Path | None = None,
        base: int = 0,
    ) -> int:
        """``media`` through the fetcher (resumed, split, checked) into the file's ``.part``, or,
        for a track of a page's format, into ``into`` after ``base`` bytes of the tracks before
        it (its size and sha256 are not the file's); its size."""
        part, rules = into or self.part, self.rules()
        if base and rules.max_bytes:
            rules = dataclasses.replace(rules, max_bytes=max(1, rules.max_bytes - base))
        whole = into is None
        hashing = whole and self.rt.settings.file_hash == "sha256"
        return self.rt.fetcher.fetch(
            media,
            part,
            task_id=self.task.id,
            on_progress=functools.partial(_offset, self.file.on_progress, base),
            on_total=self.file.on_total if whole else None,
            guard=self.file.guard,
            rules=rules,
            step=self.file.step,
            on_sha256=functools.partial(self.sandbox.record_sha256, part) if hashing else None,
            on_received=self.file.on_received,
            split=self.plan(media.url, base),
            headers=headers,
            shown=shown,
        )


def _offset(report: Callable[[int], None], base: int, position: int) -> None:
    report(base + position)
