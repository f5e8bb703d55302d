"""The dashboard's pages as HTML, from the same shapes the API answers with (a task's status,
its events). Every value is hostile: each goes through :func:`text`, which escapes it and
isolates its direction (``<bdi>``: a path holding U+202E cannot reorder what follows it)."""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlencode

from actors.events import Event
from actors.registry import WorkerInfo
from actors.states import State
from actors.task import Task
from supervisor.api.bulk import Counted, Outcome
from supervisor.statustext import human_size, short_age

#: Files a task's page lists (a course may have thousands).
FILES_SHOWN = 500


def text(value: object) -> str:
    """``value`` as text that reads as text: escaped, its direction isolated."""
    return f"<bdi>{html.escape(str(value))}</bdi>"


def attr(value: object) -> str:
    """``value`` escaped for an attribute (quotes included)."""
    return html.escape(str(value), quote=True)


def bar(done: int, total: int | None) -> str:
    """A progress bar (the element itself: no script, no inline style)."""
    label = f"{human_size(done)} of {human_size(total)}" if total else human_size(done)
    if not total:
        return f'<progress aria-label="{attr(label)}"></progress> {text(label)}'
    return f'<progress max="{total}" value="{min(done, total)}" aria-label="{attr(label)}"></progress> {text(label)}'


def state_tabs(prefix: str, current: State, counts: dict[State, int]) -> str:
    links = []
    for state in State:  # in the order a task goes through them
        chosen = ' aria-current="page"' if state is current else ""
        href = f"{prefix}/tasks?{urlencode({'state': state.value})}"
        links.append(f'<a href="{attr(href)}"{chosen}>{text(state.value)} ({counts.get(state, 0)})</a>')
    return f'<nav class="tabs">{" ".join(links)}</nav>'


def search_form(prefix: str, query: str) -> str:
    return (
        f'<form method="get" action="{attr(prefix)}/tasks" class="search" role="search">'
        '<label for="q">Task id or key</label> '
        f'<input id="q" name="q" value="{attr(query)}" maxlength="200"> <button type="submit">Find</button></form>'
    )


def task_rows(prefix: str, tasks: Iterable[Task], now: float) -> str:
    """A row a task: what the list shows of it (its files' statuses are the task page's)."""
    rows = []
    for task in tasks:
        link = f"{prefix}/tasks/{quote(task.id, safe='')}"
        rows.append(
            "<tr>"
            f'<td><a href="{attr(link)}">{text(task.name or task.id)}</a></td>'
            f"<td>{text(task.state.value)}</td>"
            f"<td>{bar(task.bytes_done, task.bytes_total if task.bytes_total_known else None)}</td>"
            f"<td>{task.attempts}</td>"
            f"<td>{text(short_age(now - task.created_at))}</td>"
            f'<td class="error">{text(task.error)}</td>'
            "</tr>"
        )
    if not rows:
        return "<p>No tasks.</p>"
    head = "<tr><th>task</th><th>state</th><th>progress</th><th>attempts</th><th>age</th><th>error</th></tr>"
    return f'<table class="tasks"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def bulk_offer(prefix: str, state: State, csrf: str) -> str:
    """The button that counts a state's tasks for a bulk retry (nothing is retried yet)."""
    return (
        f'<form method="post" action="{attr(prefix)}/bulk/confirm" class="inline">'
        f'<input type="hidden" name="csrf" value="{attr(csrf)}"><input type="hidden" name="state" '
        f'value="{attr(state.value)}"><button type="submit">Retry all {text(state.value)}…</button></form>'
    )


def bulk_confirmation(prefix: str, counted: Counted, csrf: str) -> str:
    """How many tasks a bulk retry takes, exactly those counted now, and the button that does it."""
    count = len(counted.ids)
    newest = f" (the newest {count} of {counted.matching})" if counted.matching > count else ""
    back = f"{prefix}/tasks?{urlencode({'state': counted.state.value})}"
    return (
        f"<h1>Retry {count} {text(counted.state.value)} tasks?</h1>"
        f"<p>These {count} tasks{newest}, counted now, and no others: a task that ends "
        f"{text(counted.state.value)} after this count is not taken. They are queued at a measured pace.</p>"
        f'<form method="post" action="{attr(prefix)}/bulk/retry" class="inline">'
        f'<input type="hidden" name="csrf" value="{attr(csrf)}">'
        f'<input type="hidden" name="confirm" value="{attr(counted.confirm_id)}">'
        f'<button type="submit">Retry these {count}</button></form> <a href="{attr(back)}">Back</a>'
    )


def bulk_outcome(prefix: str, outcome: Outcome) -> str:
    said = [f"{outcome.retried} retried"]
    if outcome.refused:
        said.append(f"{outcome.refused} no longer ended (retried by someone else, or replaced), left as they are")
    if outcome.missing:
        said.append(f"{outcome.missing} pruned meanwhile")
    return f'<h1>Retried</h1><p>{text("; ".join(said))}.</p><p><a href="{attr(prefix)}/tasks">Tasks</a></p>'


def worker_rows(prefix: str, workers: list[WorkerInfo], held: dict[str, list[str]], now: float) -> str:
    """The workers table: who, where, how many threads, when last heard from, what it holds."""
    if not workers:
        return "<p>No worker is registered.</p>"
    rows = []
    for w in workers:
        tasks = " ".join(
            f'<a href="{attr(prefix)}/tasks/{attr(quote(task_id, safe=""))}">{text(task_id[:8])}</a>'
            for task_id in held.get(w.id, [])
        )
        rows.append(
            f"<tr><td>{text(w.host)}</td><td>{w.pid}</td><td>{w.threads}</td><td>{text(' '.join(w.queues))}</td>"
            f"<td>{text(' '.join(w.extras))}</td><td>{text(short_age(now - w.seen))} ago</td>"
            f"<td>{text(short_age(now - w.started))}</td><td>{tasks}</td></tr>"
        )
    head = ("<tr><th>host</th><th>pid</th><th>threads</th><th>queues</th><th>extras</th><th>heartbeat</th>"
            "<th>up</th><th>tasks held</th></tr>")  # fmt: skip
    return f'<table class="workers"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def task_detail(task: dict[str, Any], events: list[Event], actions: str) -> str:
    """A task's page: what it is, its files with their progress, its error, its history."""
    facts = [("id", task["id"]), ("name", task["name"]), ("key", task["key"] or ""), ("state", task["state"]),
             ("attempts", task["attempts"]), ("created", task["created_at"]), ("updated", task["updated_at"]),
             ("worker", task["worker"] or "")]  # fmt: skip
    dl = "".join(f"<dt>{name}</dt><dd>{text(value)}</dd>" for name, value in facts)
    error = f'<h2>Error</h2><pre class="error">{text(task["error"])}</pre>' if task.get("error") else ""
    files = "".join(_file_row(entry) for entry in task["files"][:FILES_SHOWN])
    if len(task["files"]) > FILES_SHOWN:
        files += f'<tr><td colspan="4">and {len(task["files"]) - FILES_SHOWN} more</td></tr>'
    history = "".join(
        f"<tr><td>{text(time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(e.at / 1000)))}</td><td>{text(e.type)}</td>"
        f"<td>{text(_said(e))}</td></tr>"
        for e in events
    )
    return (
        f'<h1>{text(task["name"] or task["id"])}</h1>{actions}<dl class="facts">{dl}</dl>{error}'
        f'<h2>Files</h2><table class="files"><thead><tr><th>path</th><th>state</th><th>progress</th>'
        f"<th>stored</th></tr></thead><tbody>{files}</tbody></table>"
        f'<h2>History</h2><table class="history"><thead><tr><th>when (UTC)</th><th>event</th><th>details</th></tr>'
        f"</thead><tbody>{history}</tbody></table>"
    )


def _file_row(entry: dict[str, Any]) -> str:
    state = entry.get("state", "")
    if state == "downloading":
        progress = bar(int(entry.get("bytes_done") or 0), entry.get("size"))
    elif state == "done":
        progress = "whole"
    else:
        progress = ""
    stored = entry.get("location") or ""
    return (
        f"<tr><td>{text(entry.get('path', ''))}</td><td>{text(state)}</td><td>{progress}</td>"
        f"<td>{text(stored)}</td></tr>"
    )


def _said(event: Event) -> str:
    """What an event says beside its type, briefly."""
    keep = ("state", "attempt", "error", "error_code", "path", "by", "format_id", "extractor")
    return ", ".join(f"{name}: {event.data[name]}" for name in keep if event.data.get(name) not in (None, ""))
