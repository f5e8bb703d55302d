"""The dashboard's live updates: one Server-Sent Events stream per open page, saying what
changed in the tasks the page shows (and, for pages that show them, the counts by state).

However fast events come, a page hears once per TICK_SECONDS at most: the events of a tick are
merged per task into the latest of each figure (a patch; one frame for all its tasks), and the
counts are sent when a state changed, or when they moved without one (prune, a Redis restart).
The script on the page (``static/ui.js``) merges frames again until the browser next paints, so
a hidden tab does no work at all.

A stream starts with the followed tasks as the store has them, read after the position of
the stream of all tasks was noted: an event at or before that position is already in what
was read and is skipped, one after it is applied over it, in order. A page opened a while ago
is thus brought up to date, and nothing between its render and its stream is missed.

A stream does not keep its session alive (it is not the operator's doing); it ends when the
session does, checked every SESSION_CHECK_SECONDS (or half the idle timeout, if shorter); a
stream asked for without a session is answered 204, which tells an EventSource not to
reconnect (the page's script then finds out whether it was signed out).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from actors.client import Client
from actors.events import STATE_EVENTS, Event, EventLog, stream_id_key
from actors.states import State
from actors.task import Task
from supervisor.api.sse import KEEPALIVE_SECONDS, RETRY_MS, Hub
from supervisor.api.sse import frame as sse_frame
from supervisor.api.uipages import FILES_SHOWN, HISTORY_SHOWN, Redact, Rows, said

#: Longest a change waits before its page hears of it (seconds): one batch of frames a tick at most.
TICK_SECONDS = 0.5
#: Most tasks one stream follows (as many as the tasks list's largest page).
MAX_FOLLOWED = 200
#: How often a page's tables, and its counts without a state change, are read again (seconds).
REREAD_SECONDS = 5.0
#: How often a stream checks that its session still lives (seconds).
SESSION_CHECK_SECONDS = 30.0

Patch = dict[str, Any]
#: Whether the page's session still lives (read without renewing it).
Alive = Callable[[], Awaitable[bool]]
#: The files a patch names by these marks instead of an index: all of them; those not whole.
EVERY_FILE, EVERY_UNFINISHED_FILE = "*", "~"
ACTIVE = frozenset(state.value for state in State if state.active)


def patch_of(task: Task, files: bool, redact: Redact) -> Patch:
    """What a page shows of ``task`` that changes (``files``: each file's too, for its page)."""
    patch: Patch = {
        "state": task.state.value,
        "attempts": task.attempts,
        "bytes_done": task.bytes_done,
        "bytes_total": task.bytes_total if task.bytes_total_known else 0,
        "files_done": task.files_done,
        "error": redact(task.error),
    }
    if files:
        patch["files"] = {
            str(index): {"state": entry["state"], "bytes_done": entry.get("bytes_done", 0),
                         "bytes_total": entry.get("bytes_total", 0)}
            for index, entry in enumerate(task.as_status()["files"][:FILES_SHOWN])
        }  # fmt: skip
    return patch


def merge(patch: Patch, event: Event, files: bool, redact: Redact) -> None:
    """Apply ``event`` to ``patch``, the task's changes of this tick."""
    data = event.data
    if "state" in data:
        patch["state"] = data["state"]
    if "attempt" in data and event.type in STATE_EVENTS:
        patch["attempts"] = data["attempt"]
    if event.type == "task.retried":  # the retry clears the task's last error
        patch["error"] = ""
    elif data.get("error"):
        patch["error"] = redact(data["error"])
    if event.type == "task.progress":
        for name in ("bytes_done", "bytes_total", "files_done"):
            if name in data:
                patch[name] = data[name]
        if files:
            for entry in data.get("active", ()):
                shown = {"state": "downloading", "bytes_done": entry["bytes_done"], "bytes_total": entry["bytes_total"]}
                patch.setdefault("files", {})[str(entry["index"])] = shown
    elif event.type == "file.completed":
        if "bytes_done" in data:
            patch["bytes_done"] = data["bytes_done"]
        if files:
            patch.setdefault("files", {})[str(data["index"])] = {"state": "done"}
    elif event.type in STATE_EVENTS and files:
        patch.setdefault("history", []).append(history_of(event, redact))
        if data["state"] in (State.FINALIZING.value, State.DONE.value):
            patch["files"] = {EVERY_FILE: {"state": "done"}}
        elif data["state"] not in ACTIVE:  # nothing downloads now: what was not whole waits
            kept = {index: shown for index, shown in patch.get("files", {}).items() if shown.get("state") == "done"}
            patch["files"] = kept | {EVERY_UNFINISHED_FILE: {"state": "waiting"}}
        if event.type == "task.completed":  # where each file went, by path
            patch["stored"] = {entry.get("path", ""): entry.get("location", "") for entry in data.get("files", ())}


def history_of(event: Event, redact: Redact) -> dict[str, Any]:
    """A state change as the task page's history shows it (what it says, as the page renders
    it), with its place in the task's stream (``tid``), by which the page skips one it shows
    already."""
    return {"tid": event.task_stream_id or event.id, "at": event.at, "type": event.type,
            "said": said(event.data, redact)}  # fmt: skip


def frame(name: str, data: Any) -> str:
    return sse_frame(None, name, data)


@dataclass(frozen=True)
class View:
    """What an open page shows that changes: the tasks it lists (or, with ``since``, the one
    whose page it is, with its files and its history after ``since``, the last state change it
    was rendered with: "" for none), the counts by state, and the rows of tables that
    ``read_tables`` reads again every REREAD_SECONDS."""

    task_ids: tuple[str, ...] = ()
    counts: bool = False
    since: str | None = None
    read_tables: Callable[[], dict[str, Rows]] | None = None

    @property
    def files(self) -> bool:
        return self.since is not None and len(self.task_ids) == 1


class LiveUpdates:
    """The streams of open pages, over the API's one event hub and its store client."""

    def __init__(self, hub: Hub, client: Client, redact: Redact, idle_seconds: float) -> None:
        self.hub, self.client, self.redact = hub, client, redact
        self._counting = asyncio.Lock()
        self._counted: tuple[int, float, dict[str, int]] | None = None
        #: A session idle this long ends: a stream notices within half of it (at most SESSION_CHECK_SECONDS).
        self.check_seconds = min(SESSION_CHECK_SECONDS, max(idle_seconds / 2, TICK_SECONDS))

    async def stream(self, view: View, alive: Alive) -> AsyncIterator[str]:
        """The frames of an open page that shows ``view``, while ``alive()``."""
        await self.hub.wait_ready()
        return self._frames(view, alive)

    async def _frames(self, view: View, alive: Alive) -> AsyncIterator[str]:
        sub = self.hub.subscribe(*view.task_ids)  # before the snapshot: nothing after it is missed
        try:
            yield f"retry: {RETRY_MS}\n\n"
            seen, snapshot = await run_in_threadpool(self._snapshot, view)
            if snapshot:
                yield frame("tasks", snapshot)
            changes, counts = self.hub.state_changes, await self._counts() if view.counts else {}
            if view.counts:
                yield frame("counts", counts)
            checked = quiet_since = tabled = counted = time.monotonic()
            shown: dict[str, Rows] = {}
            while True:
                await asyncio.sleep(TICK_SECONDS)
                patches: dict[str, Patch] = {}
                while not sub.queue.empty():
                    event = sub.queue.get_nowait()
                    if stream_id_key(event.id) > seen:
                        merge(patches.setdefault(event.task_id, {}), event, view.files, self.redact)
                now = time.monotonic()
                if patches:
                    yield frame("tasks", patches)
                    quiet_since = now
                if view.counts and (self.hub.state_changes != changes or now - counted >= REREAD_SECONDS):
                    changes, counted, before = self.hub.state_changes, now, counts
                    counts = await self._counts()
                    if counts != before:
                        yield frame("counts", counts)
                        quiet_since = now
                if view.read_tables is not None and now - tabled >= REREAD_SECONDS:
                    tabled = now
                    tables = await run_in_threadpool(view.read_tables)
                    changed = {name: rows for name, rows in tables.items() if shown.get(name) != rows}
                    if changed:  # rows rewritten alike would drop what the operator selected
                        shown |= changed
                        quiet_since = now
                        yield frame("tables", changed)
                if sub.overflowed:  # fell behind: the EventSource reconnects and reads anew
                    return
                if now - checked >= self.check_seconds:
                    checked = now
                    if not await alive():
                        yield frame("ended", {"reason": "signed out"})
                        return
                if now - quiet_since >= KEEPALIVE_SECONDS:
                    quiet_since = now
                    yield ": keep-alive\n\n"
        finally:
            self.hub.unsubscribe(sub)

    def _snapshot(self, view: View) -> tuple[tuple[int, int], dict[str, Patch]]:
        """Where the stream of all tasks ends now, then the followed tasks as stored; for a
        task's own page, its events after the one it was rendered with (the page skips any it
        has: an event may be both here and in what follows)."""
        store = self.client.store
        log = EventLog(store.client, store.prefix)
        seen = stream_id_key(log.position())
        tasks = [task for task in store.get_many(view.task_ids) if task is not None]
        patches = {task.id: patch_of(task, view.files, self.redact) for task in tasks}
        if view.files and tasks and view.since is not None:  # since: for mypy, which files implies
            changes = log.state_changes(tasks[0].id, HISTORY_SHOWN, view.since)
            history = [history_of(e, self.redact) for e in changes]
            if history:
                patches[tasks[0].id]["history"] = history
        return seen, patches

    async def _counts(self) -> dict[str, int]:
        """The counts by state, read once per state change whatever the number of open pages,
        and at least every REREAD_SECONDS (prune and a Redis restart change them without one)."""
        async with self._counting:
            changes, now = self.hub.state_changes, time.monotonic()
            if self._counted is None or self._counted[0] != changes or now - self._counted[1] >= REREAD_SECONDS:
                found = await run_in_threadpool(self.client.counts)
                self._counted = changes, now, {state.value: count for state, count in found.items()}
            return self._counted[2]
