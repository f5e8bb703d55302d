"""How haul processes write their logs: ``HAUL_LOG_FORMAT=text`` (default) or ``json``.

``json`` writes one object a line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
``process``, ``thread``, any of :data:`CONTEXT_FIELDS` a record carries (``extra=``), and
``traceback`` when there is one. Redaction happens before formatting, when the record is made
(:func:`actors.redact.install_log_redaction`), so both formats carry the same redacted text.

This module imports the standard library only: ``haul worker`` runs it as a script to set up
Dramatiq's main process (which never imports the ``actors`` package) before Dramatiq's own CLI.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

#: The text format (Dramatiq's, so worker and supervisor lines look alike).
TEXT_FORMAT = "[%(asctime)s] [PID %(process)d] [%(threadName)s] [%(name)s] [%(levelname)s] %(message)s"
#: Record attributes (given as ``extra=``) copied into JSON lines when present.
CONTEXT_FIELDS = ("task_id", "stage", "attempt", "file", "seconds", "bytes")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        for name in CONTEXT_FIELDS:
            if name in record.__dict__:
                line[name] = record.__dict__[name]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["traceback"] = record.exc_text
        return json.dumps(line, default=str)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time: Dramatiq's worker processes point it
    at the pipe their main process reads, after this handler was made."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def setup_logging(log_format: str, level: int = logging.INFO) -> None:
    """Log every record at ``level`` and above to standard error in ``log_format``."""
    handler = StderrHandler()
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def reformat(log_format: str) -> None:
    """Give the handlers already set up (Dramatiq's, in a worker process) ``log_format``."""
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())


def run_dramatiq(log_format: str) -> int:
    """Dramatiq's CLI, with its main process logging in ``log_format`` (its own set-up is then
    a no-op: the root logger already has a handler)."""
    setup_logging(log_format)
    from dramatiq.cli import main

    return int(main() or 0)  # type: ignore[no-untyped-call]


if __name__ == "__main__":  # haul worker: python actors/logs.py FORMAT actors.worker --processes N ...
    sys.path[0] = str(__import__("pathlib").Path(__file__).resolve().parent.parent)  # not actors/ itself
    chosen = sys.argv.pop(1)
    sys.exit(run_dramatiq(chosen))
