"""The dashboard's pages as HTML, from the same shapes the API answers with (a task's status,
its events). Every value is hostile: each goes through :func:`text`, which escapes it and
isolates its direction (``<bdi>``: a path holding U+202E cannot reorder what follows it)."""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from actors.deliveries import Delivery
from actors.events import Event
from actors.registry import WorkerInfo
from actors.states import State
from actors.store_figures import MinuteFigures, SupervisorReport
from actors.task import Task
from supervisor.api.bulk import Counted, Outcome
from supervisor.statustext import human_size, short_age

#: Files a task's page lists (a course may have thousands).
FILES_SHOWN = 500
#: Origin hosts the overview lists with their slots in use (the busiest first would need a sort
#: of every host; these are in name order).
HOSTS_SHOWN = 20
#: A task's latest state changes its page shows.
HISTORY_SHOWN = 200
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


#: The searches the tasks page offers, as its form names them.
SEARCH_LABELS = {"key": "id or key", "name": "name starts with", "host": "origin host"}


def search_form(prefix: str, query: str, by: str = "key") -> str:
    options = "".join(
        f'<option value="{name}"{" selected" if name == by else ""}>{label}</option>'
        for name, label in SEARCH_LABELS.items()
    )
    return (
        f'<form method="get" action="{attr(prefix)}/tasks" class="search" role="search">'
        f'<label for="by">Find a task by</label> <select id="by" name="by">{options}</select> '
        f'<input id="q" name="q" value="{attr(query)}" maxlength="200" aria-label="what to find" required> '
        '<button type="submit">Find</button></form>'
    )


@dataclass(frozen=True)
class Figures:
    """What the overview shows, as read at ``now``."""

    now: float
    counts: dict[State, int]
    minutes: list[MinuteFigures]
    slots: dict[str, int]
    staged_bytes: int
    report: SupervisorReport | None


#: The tables the live updates replace the rows of: name, caption and column heads (the first
#: column heads its rows).
TABLES = {
    "throughput": ("Per minute (UTC; newest first)", ("minute", "done", "failed", "downloaded", "stored")),
    "stages": ("Stage slots in use", ("stage", "in use", "limit")),
    "supervisor": ("Supervisor", ("", "")),
    "deliveries": ("Webhook deliveries (newest first)", ("when (UTC)", "event", "to", "try", "answer")),
}

Rows = list[list[str]]
#: Text as the dashboard may show it: the configured secrets, URL credentials and queries out.
Redact = Callable[[str], str]


def overview(figures: Figures, limits: dict[str, int]) -> str:
    """The overview: counts by state, throughput by minute, stage slots against their limits
    and staged bytes, the supervisor's leader, last sweep and configuration problems; each
    table marked for the live updates, which replace its rows."""
    tables = "".join(table(name, rows) for name, rows in overview_rows(figures, limits).items())
    return f'<div class="panels">{counts_table(figures.counts)}{tables}</div>'


def overview_rows(figures: Figures, limits: dict[str, int]) -> dict[str, Rows]:
    """The rows of each of the overview's tables, as text (escaped where they are shown)."""
    return {
        "throughput": _throughput(figures.minutes),
        "stages": _stages(figures.slots, figures.staged_bytes, limits),
        "supervisor": _supervisor(figures.report, figures.now),
    }


def table(name: str, rows: Rows) -> str:
    """One of TABLES with ``rows``, each value escaped and direction-isolated."""
    caption, heads = TABLES[name]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in heads) if any(heads) else ""
    body = "".join(
        f'<tr><th scope="row">{text(row[0])}</th>{"".join(f"<td>{text(cell)}</td>" for cell in row[1:])}</tr>'
        for row in rows
    )
    return (
        f'<table class="{name}" data-table="{name}"><caption>{html.escape(caption)}</caption>'
        f"{f'<thead><tr>{head}</tr></thead>' if head else ''}<tbody>{body}</tbody></table>"
    )


def delivery_rows(deliveries: Iterable[Delivery]) -> Rows:
    """A task's webhook tries as its page shows them: when, which event, to where (as logs show
    the URL: no credentials, no query), which try, and what the receiver answered."""
    rows = [
        [time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.at)), d.type, receiver(d.url), str(d.attempt), _answer(d)]
        for d in deliveries
    ]
    return rows or [["none yet", "", "", "", ""]]


def receiver(url: str) -> str:
    """Where a webhook went, as the dashboard shows it: its scheme and host only, as receivers
    (Slack's, Discord's) keep their secret in the path."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}" + ("/…" if parts.path.strip("/") else "/")


def _answer(d: Delivery) -> str:
    said = d.outcome.value
    if d.status is not None:
        said += f", {d.status}"
    if d.elapsed_ms is not None:
        said += f" in {d.elapsed_ms} ms"
    if d.detail:
        said += f": {d.detail}"
    return said + ("; haul gave up" if d.gave_up else "")


def _throughput(minutes: list[MinuteFigures]) -> Rows:
    return [
        [time.strftime("%H:%M", time.gmtime(m.start)), str(m.done), str(m.failed + m.dead),
         human_size(m.download_bytes), human_size(m.finalize_bytes)]
        for m in reversed(minutes)
    ]  # fmt: skip


def _stages(slots: dict[str, int], staged: int, limits: dict[str, int]) -> Rows:
    def limit(n: int, shown: str) -> str:
        return f"of {shown}" if n else "no limit"

    hosts = sorted((name.removeprefix("host:"), n) for name, n in slots.items() if name.startswith("host:") and n)
    return [
        ["download", str(slots.get("download", 0)), limit(limits["download"], str(limits["download"]))],
        ["finalize", str(slots.get("finalize", 0)), limit(limits["finalize"], str(limits["finalize"]))],
        *([host, str(n), limit(limits["host"], str(limits["host"]))] for host, n in hosts[:HOSTS_SHOWN]),
        ["staged bytes", human_size(staged), limit(limits["staging_bytes"], human_size(limits["staging_bytes"]))],
    ]


def _supervisor(report: SupervisorReport | None, now: float) -> Rows:
    if report is None:
        return [["leader", "none: no supervisor reported lately, so stuck tasks are not requeued; "
                 "is `haul supervisor` running?"]]  # fmt: skip
    leader = report.leader or "none (the lock is free)"
    if report.leader and not report.from_leader:
        leader += f" (this report is {report.node}'s, the leader before)"
    sweep = f"{short_age(now - report.last_sweep)} ago" if report.last_sweep else "not yet"
    rows = [["leader", leader], ["last sweep", sweep]]
    if report.problems:
        rows += [["problem", problem] for problem in report.problems]
    elif report.checked_at:
        rows.append(["problems", f"none found ({short_age(now - report.checked_at)} ago)"])
    else:
        rows.append(["problems", "not checked yet"])
    return rows


def task_rows(prefix: str, tasks: Iterable[Task], now: float, redact: Redact) -> str:
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
            f'<td class="error">{field("error", redact(task.error))}</td>'
            "</tr>"
        )
    if not rows:
        return "<p>No tasks.</p>"
    head = "<tr><th>task</th><th>state</th><th>progress</th><th>attempts</th><th>age</th><th>error</th></tr>"
    return f'<table class="tasks"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def bulk_offer(prefix: str, state: State, csrf: str, host: str | None = None) -> str:
    """The button that counts a state's tasks (with ``host``, those with a file on it) for a
    bulk retry; nothing is retried yet."""
    on_host = f'<input type="hidden" name="host" value="{attr(host)}">' if host else ""
    said = f" from {text(host)}" if host else ""
    return (
        f'<form method="post" action="{attr(prefix)}/bulk/confirm" class="inline">'
        f'<input type="hidden" name="csrf" value="{attr(csrf)}"><input type="hidden" name="state" '
        f'value="{attr(state.value)}">{on_host}'
        f'<button type="submit">Retry all {text(state.value)}{said}…</button></form>'
    )


def bulk_confirmation(prefix: str, counted: Counted, csrf: str) -> str:
    """How many tasks a bulk retry takes, exactly those counted now, and the button that does it."""
    count = len(counted.ids)
    of_all = str(counted.matching) if counted.exact else f"at least {counted.matching}"
    newest = f" (the newest {count} of {of_all})" if counted.matching > count or not counted.exact else ""
    where = f" with a file on {text(counted.host)}" if counted.host else ""
    filtered = {"q": counted.host, "by": "host"} if counted.host else {"state": counted.state.value}
    back = f"{prefix}/tasks?{urlencode(filtered)}"
    if not counted.ids:
        return (f"<h1>Nothing to retry</h1><p>No task is {text(counted.state.value)}{where} now.</p>"
                f'<p><a href="{attr(back)}">Back</a></p>')  # fmt: skip
    return (
        f"<h1>Retry {count} {text(counted.state.value)} tasks{where}?</h1>"
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


def task_detail(task: dict[str, Any], events: list[Event], deliveries: Rows, actions: str, redact: Redact) -> str:
    """A task's page: what it is, its files with their progress, its error (``redact``ed, as
    its history), its history, its webhook deliveries; the figures that change marked for the
    live updates."""
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
        f'<pre class="error">{field("error", redact(task.get("error") or ""))}</pre></section>'
    )
    files = "".join(_file_row(index, entry) for index, entry in enumerate(task["files"][:FILES_SHOWN]))
    if len(task["files"]) > FILES_SHOWN:
        files += f'<tr><td colspan="4">and {len(task["files"]) - FILES_SHOWN} more</td></tr>'
    history = "".join(
        f"<tr><td>{text(time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(e.at / 1000)))}</td><td>{text(e.type)}</td>"
        f"<td>{text(said(e.data, redact))}</td></tr>"
        for e in events
    )
    return (
        f'<article data-task="{attr(task["id"])}" data-total="{total}">'
        f'<h1>{text(task["name"] or task["id"])}</h1>{actions}<dl class="facts">{dl}</dl>{error}'
        f'<h2>Files</h2><table class="files"><thead><tr><th>path</th><th>state</th><th>progress</th>'
        f"<th>stored</th></tr></thead><tbody>{files}</tbody></table>"
        f'<h2>History</h2><table class="history"><thead><tr><th>when (UTC)</th><th>event</th><th>details</th></tr>'
        f'</thead><tbody data-field="history" data-last="{attr(events[-1].id if events else "")}">{history}</tbody>'
        f"</table><h2>Webhooks</h2>{table('deliveries', deliveries)}</article>"
    )


def _file_row(index: int, entry: dict[str, Any]) -> str:
    state = entry.get("state", "")
    if state == "downloading":
        progress = bar(int(entry.get("bytes_done") or 0), entry.get("bytes_total") or entry.get("size"))
    elif state == "done":
        progress = "whole"
    else:
        progress = ""
    stored = entry.get("location") or ""
    path = entry.get("path", "")
    link = str(entry.get("link") or "")
    opened = f' <a href="{attr(link)}" rel="noreferrer noopener" target="_blank">link</a>' if _web(link) else ""
    return (
        f'<tr data-file="{index}" data-path="{attr(path)}" data-size="{int(entry.get("size") or 0)}">'
        f'<td>{text(path)}</td><td>{field("state", state)}</td><td data-field="progress">{progress}</td>'
        f"<td>{field('stored', stored)}{opened}</td></tr>"
    )


def _web(url: str) -> bool:
    """Whether ``url`` may be a link on the page: http(s) only (never ``javascript:``)."""
    return urlsplit(url).scheme in ("http", "https")


def said(data: Mapping[str, Any], redact: Redact) -> str:
    """What a state change says beside its type, briefly, redacted (the page's render and its
    live updates say it alike)."""
    told = ", ".join(f"{name}: {data[name]}" for name in HISTORY_FIELDS if data.get(name) not in (None, ""))
    return redact(told)
