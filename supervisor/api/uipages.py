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
#: What a task's history says of each event beside its type (the live updates say the same).
HISTORY_FIELDS = ("state", "attempt", "error", "error_code", "path", "by", "worker", "format_id", "extractor")


def text(value: object) -> str:
    """``value`` as text that reads as text: escaped, its direction isolated."""
    return f"<bdi>{html.escape(str(value))}</bdi>"


def attr(value: object) -> str:
    """``value`` escaped for an attribute (quotes included)."""
    return html.escape(str(value), quote=True)


def bar(done: int, total: int | None) -> str:
    """A progress bar and its label, as the page's script updates them (no inline style)."""
    label = f"{human_size(done)} of {human_size(total)}" if total else human_size(done)
    shown = f'<bdi data-label="">{html.escape(label)}</bdi>'
    if not total:  # a size not known yet: an empty bar (an indeterminate one animates for ever)
        return f'<progress data-field="bar" max="1" value="0" aria-label="{attr(label)}"></progress> {shown}'
    return (
        f'<progress data-field="bar" max="{total}" value="{min(done, total)}" aria-label="{attr(label)}"></progress>'
        f" {shown}"
    )


def field(name: str, value: object) -> str:
    """``value`` as :func:`text`, marked as the figure ``name`` the live updates replace."""
    return f'<bdi data-field="{name}">{html.escape(str(value))}</bdi>'


def counts_table(counts: dict[State, int]) -> str:
    rows = "".join(
        f'<tr><th scope="row">{text(state.value)}</th><td data-count="{state.value}">{counts.get(state, 0)}</td></tr>'
        for state in State
    )
    return f'<table class="counts"><caption>Tasks by state</caption>{rows}</table>'


def state_tabs(prefix: str, current: State, counts: dict[State, int]) -> str:
    links = []
    for state in State:  # in the order a task goes through them
        chosen = ' aria-current="page"' if state is current else ""
        href = f"{prefix}/tasks?{urlencode({'state': state.value})}"
        count = f'<span data-count="{state.value}">{counts.get(state, 0)}</span>'
        links.append(f'<a href="{attr(href)}"{chosen}>{text(state.value)} ({count})</a>')
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
        total = task.bytes_total if task.bytes_total_known else None
        rows.append(
            f'<tr data-task="{attr(task.id)}" data-total="{total or 0}">'
            f'<td><a href="{attr(link)}">{text(task.name or task.id)}</a></td>'
            f"<td>{field('state', task.state.value)}</td>"
            f"<td>{bar(task.bytes_done, total)}</td>"
            f"<td>{field('attempts', task.attempts)}</td>"
            f"<td>{text(short_age(now - task.created_at))}</td>"
            f'<td class="error">{field("error", task.error)}</td>'
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
    """A task's page: what it is, its files with their progress, its error, its history; the
    figures that change marked for the live updates."""
    total = task["bytes_total"] if task["bytes_total_known"] else 0
    facts = [("id", text(task["id"])), ("name", text(task["name"])), ("key", text(task["key"] or "")),
             ("state", field("state", task["state"])), ("attempts", field("attempts", task["attempts"])),
             ("created", text(task["created_at"])), ("updated", text(task["updated_at"])),
             ("worker", text(task["worker"] or "")),
             ("progress", bar(task["bytes_done"], total or None))]  # fmt: skip
    dl = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts)
    hidden = "" if task.get("error") else " hidden"
    error = (
        f'<section data-when-error=""{hidden}><h2>Error</h2>'
        f'<pre class="error">{field("error", task.get("error") or "")}</pre></section>'
    )
    files = "".join(_file_row(index, entry) for index, entry in enumerate(task["files"][:FILES_SHOWN]))
    if len(task["files"]) > FILES_SHOWN:
        files += f'<tr><td colspan="4">and {len(task["files"]) - FILES_SHOWN} more</td></tr>'
    history = "".join(
        f"<tr><td>{text(time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(e.at / 1000)))}</td><td>{text(e.type)}</td>"
        f"<td>{text(_said(e))}</td></tr>"
        for e in events
    )
    return (
        f'<article data-task="{attr(task["id"])}" data-total="{total}">'
        f'<h1>{text(task["name"] or task["id"])}</h1>{actions}<dl class="facts">{dl}</dl>{error}'
        f'<h2>Files</h2><table class="files"><thead><tr><th>path</th><th>state</th><th>progress</th>'
        f"<th>stored</th></tr></thead><tbody>{files}</tbody></table>"
        f'<h2>History</h2><table class="history"><thead><tr><th>when (UTC)</th><th>event</th><th>details</th></tr>'
        f'</thead><tbody data-field="history">{history}</tbody></table></article>'
    )


def _file_row(index: int, entry: dict[str, Any]) -> str:
    state = entry.get("state", "")
    if state == "downloading":
        progress = bar(int(entry.get("bytes_done") or 0), entry.get("size"))
    elif state == "done":
        progress = "whole"
    else:
        progress = ""
    stored = entry.get("location") or ""
    return (
        f'<tr data-file="{index}" data-size="{int(entry.get("size") or 0)}"><td>{text(entry.get("path", ""))}</td>'
        f'<td>{field("state", state)}</td><td data-field="progress">{progress}</td><td>{text(stored)}</td></tr>'
    )


def _said(event: Event) -> str:
    """What an event says beside its type, briefly."""
    return ", ".join(f"{name}: {event.data[name]}" for name in HISTORY_FIELDS if event.data.get(name) not in (None, ""))
