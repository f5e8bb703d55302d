"""``haul watch [ID ...]``: tasks live, from the same event stream the API serves.

On a terminal, one bar per task (state, files, bytes, speed, time left) and one under it for
the file it is on; a task that fails stays on screen in red with its reason. Without ids it
shows every active task as it starts, and the counts by state. When the output is not a
terminal (a log, a pipe), it prints plain lines instead: one per state change and file, and a
progress line per task at most every PLAIN_PROGRESS_SECONDS.

It reads the position of the stream first, then the tasks' state, then follows the stream
from that position: nothing that happens in between is missed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from actors.client import Client, TaskNotFound
from actors.events import STATE_EVENTS, Event, EventLog
from actors.states import State

#: Plain output: at most one progress line per task this often (seconds).
PLAIN_PROGRESS_SECONDS = 5.0
#: How often the counts by state are read again (seconds), without ids.
COUNTS_SECONDS = 2.0
EXIT_ALL_DONE, EXIT_SOME_NOT_DONE = 0, 1


@dataclass
class Watched:
    """What the watch knows of one task."""

    task_id: str
    name: str
    state: str
    files_total: int
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_stored: int = 0
    #: The files downloading now: index -> (bytes done, bytes total or 0), as last reported.
    active: dict[int, tuple[int, int]] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    error: str = ""
    last_plain: float = 0.0

    @classmethod
    def of(cls, status: dict[str, Any]) -> Watched:
        active = {i: (f["bytes_done"], f.get("size") or 0) for i, f in enumerate(status["files"])
                  if f.get("state") == "downloading"}  # fmt: skip
        return cls(
            task_id=status["id"], name=status["name"] or "", state=status["state"],
            files_total=status["files_total"], files_done=status["files_done"], bytes_total=status["bytes_total"],
            bytes_done=status["bytes_done"], bytes_stored=status.get("bytes_stored") or 0, active=active,
            paths=[f["path"] for f in status["files"]], error=status["error"] or "",
        )  # fmt: skip

    def apply(self, event: Event) -> None:
        data = event.data
        if event.type in STATE_EVENTS:
            self.state = data["state"]
            self.error = data.get("error", "") if self.state != "done" else ""
            if self.state != "downloading":
                self.active = {}
        if event.type == "task.progress":
            self.bytes_done, self.bytes_total = data["bytes_done"], data["bytes_total"]
            self.files_done, self.bytes_stored = data["files_done"], data["bytes_stored"]
            self.active = {f["index"]: (f["bytes_done"], f["bytes_total"]) for f in data.get("active", [])}
        elif event.type == "file.completed":  # files finish in any order side by side
            self.files_done = min(self.files_total, self.files_done + 1)
            self.active.pop(data["index"], None)
        elif event.type in ("task.retried", "task.queued") and event.data.get("attempt") == 0:
            self.files_done = self.bytes_done = 0

    @property
    def label(self) -> str:
        return self.name or self.task_id[:12]

    @property
    def final(self) -> bool:
        return State(self.state).final


class Screen:
    """Bars on a terminal (rich): a task's, and one under it for each file downloading."""

    def __init__(self, console: Console, with_counts: bool) -> None:
        self.console = console
        self.with_counts = with_counts
        self.counts = Text()
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[files]}"), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=console,
        )  # fmt: skip
        self.bars: dict[str, TaskID] = {}
        #: Per task, the bar of each file downloading (removed once it no longer is).
        self.file_bars: dict[str, dict[int, TaskID]] = {}
        #: Why each failing task failed (or its last attempt did), shown in red under the bars.
        self.reasons: dict[str, str] = {}
        self.failures = Text(style="red")
        self.live = Live(self.layout(), console=console, refresh_per_second=4, transient=False)

    def layout(self) -> Group:
        if self.with_counts:
            return Group(self.counts, self.progress, self.failures)
        return Group(self.progress, self.failures)

    def __enter__(self) -> Screen:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def show(self, task: Watched, event: Event | None) -> None:
        if task.task_id not in self.bars:
            self.bars[task.task_id] = self.progress.add_task("", total=None, files="")
        whole, bars = self.bars[task.task_id], self.file_bars.setdefault(task.task_id, {})
        colour = {"done": "green", "failed": "red", "dead": "red", "canceled": "yellow"}.get(task.state, "cyan")
        files = f"{task.files_done}/{task.files_total} files"
        self.progress.update(
            whole, description=f"[{colour}]{escape(task.label)}[/] [dim]{task.state}[/]",
            total=task.bytes_total or None, completed=task.bytes_done, files=files,
        )  # fmt: skip
        # Under it: each file downloading; why it failed goes below the bars, in full
        for index, (done, total) in task.active.items():
            if index not in bars:
                path = task.paths[index] if index < len(task.paths) else f"file {index}"
                bars[index] = self.progress.add_task(f"  [dim]{escape(path[-60:])}[/]", total=None, files="")
            self.progress.update(bars[index], completed=done, total=total or None, visible=True)
        for index in [i for i in bars if i not in task.active]:
            self.progress.remove_task(bars.pop(index))
        if task.error and task.state in ("failed", "dead", "queued"):
            self.reasons[task.task_id] = f"{task.label} ({task.state}): {task.error}"
        else:
            self.reasons.pop(task.task_id, None)
        self.failures.plain = "\n".join(self.reasons.values())

    def show_counts(self, counts: dict[str, int]) -> None:
        self.counts.plain = "  ".join(f"{state} {n}" for state, n in counts.items())


class Lines:
    """Plain lines for a log or a pipe."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.out.flush()

    def show(self, task: Watched, event: Event | None) -> None:
        stamp = time.strftime("%H:%M:%S")
        if event is None:
            line = f"{task.state}, {task.files_done}/{task.files_total} files, {task.bytes_done} bytes"
        elif event.type == "task.progress":
            now = time.monotonic()
            if now - task.last_plain < PLAIN_PROGRESS_SECONDS:
                return
            task.last_plain = now
            speed = event.data.get("speed", 0)
            line = (
                f"{task.files_done}/{task.files_total} files, {task.bytes_done}/{task.bytes_total} bytes, {speed} B/s"
            )
        elif event.type == "file.completed":
            line = f"file {event.data['path']} downloaded"
        else:
            line = event.type + (f": {task.error}" if task.error else "")
        print(f"{stamp} {task.task_id} {task.label}: {line}", file=self.out, flush=True)

    def show_counts(self, counts: dict[str, int]) -> None:
        """Counts are shown on a terminal only (a line every 2 s would drown a log)."""


def watch(client: Client, task_ids: Iterable[str], out: TextIO = sys.stdout, tty: bool | None = None) -> int:
    """Follow ``task_ids`` until each has ended (0 when all are done), or, without ids, every
    active task until interrupted."""
    ids = list(task_ids)
    log = EventLog(client.store.client, client.store.prefix)
    follow = log.follow(log.position(), block_ms=500)  # the position first: nothing after it is missed
    watched: dict[str, Watched] = {}
    for task_id in ids:
        watched[task_id] = Watched.of(client.get(task_id).as_status())  # TaskNotFound: the caller says so
    if not ids:
        for state in (State.CLAIMED, State.DOWNLOADING, State.FINALIZING):
            for active in client.list(state, 200):
                watched[active.id] = Watched.of(active.as_status())
    terminal = out.isatty() if tty is None else tty
    console = Console(file=out, force_terminal=True, width=120) if terminal else None
    view: Screen | Lines = Screen(console, with_counts=not ids) if console is not None else Lines(out)
    counted = 0.0
    with view:
        for known in watched.values():
            view.show(known, None)
        for batch in follow:
            for event in batch:
                task = watched.get(event.task_id)
                if task is None:
                    if ids:
                        continue
                    try:
                        task = watched[event.task_id] = Watched.of(client.get(event.task_id).as_status())
                    except TaskNotFound:
                        continue
                task.apply(event)
                view.show(task, event)
            if not ids and time.monotonic() - counted > COUNTS_SECONDS:
                counted = time.monotonic()
                view.show_counts({state.value: n for state, n in client.counts().items()})
            if ids and all(watched[i].final for i in ids):
                break
    return EXIT_ALL_DONE if all(watched[i].state == "done" for i in ids) else EXIT_SOME_NOT_DONE
