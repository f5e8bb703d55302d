"""``haul status`` for people: one task, or a list of tasks, as aligned text (``--json`` gives
the same fields as data)."""

from __future__ import annotations

from typing import Any

from actors.task import Task


def format_task(status: dict[str, Any]) -> str:
    lines = [
        f"task      {status['id']}",
        f"name      {status['name']}",
        f"state     {status['state']}",
        f"attempts  {status['attempts']}",
        f"files     {status['files_done']}/{status['files_total']}",
        f"bytes     {human_size(status['bytes_done'])} of {'' if status['bytes_total_known'] else 'at least '}"
        f"{human_size(status['bytes_total'])}",
    ]
    if status.get("bytes_stored"):
        lines.append(f"stored    {human_size(status['bytes_stored'])} of {human_size(status['bytes_total'])}")
    if status.get("key"):
        lines.append(f"key       {status['key']}")
    waiting = status.get("waiting")
    if waiting:
        lines.append(f"waiting   {_WAITING[waiting['for']]}{_behind(waiting)} {_when(waiting)}")
    if status.get("error"):
        lines.append(f"error     {status['error']}")
    return "\n".join(lines)


#: What ``waiting.for`` means, for people.
_WAITING = {
    "outage": "parked: its storage or webhook receiver is down; next try",
    "finalize_slot": "for a finalize slot; next try",
    "stage_slot": "for a stage slot",
    "backoff": "backoff after a transient error; next attempt not before",
}


#: The limit a claim was refused by (``waiting.limit``), and the setting that raises it.
_LIMITS = {
    "download": "downloads at once, HAUL_DOWNLOAD_CONCURRENCY",
    "download_per_host": "downloads from {host} at once, HAUL_DOWNLOAD_PER_HOST",
    "staging_bytes": "bytes in staging, HAUL_STAGING_MAX_BYTES",
    "finalize_backlog": "tasks waiting to finalize, twice HAUL_FINALIZE_CONCURRENCY",
}


def _behind(waiting: dict[str, Any]) -> str:
    limit = _LIMITS.get(waiting.get("limit", ""))
    return f" (limit on {limit.format(host=waiting.get('host', '?'))})" if limit else ""


def _when(waiting: dict[str, Any]) -> str:
    return f"since {waiting['since']}" if "since" in waiting else str(waiting["until"])


def format_rows(tasks: list[Task], now: float) -> str:
    header = f"{'ID':<32}  {'STATE':<11}  {'KEY':<16}  {'AGE':>6}  {'TRIES':>5}  NAME / ERROR"
    lines = [header]
    for t in tasks:
        note = t.name + (f"  [{t.error}]" if t.error else "")
        key = t.spec.key or "-"
        age = short_age(now - t.created_at)
        lines.append(f"{t.id:<32}  {t.state.value:<11}  {key:<16}  {age:>6}  {t.attempts:>5}  {note}")
    return "\n".join(lines)


def short_age(seconds: float) -> str:
    """A short age: 45s, 12m, 5h, 3d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
