"""Sentry for haul processes: set-up, secret scrubbing, and the events haul sends itself.

Events are explicit: a permanent failure, a dead task, a crash. Log lines become breadcrumbs
only (``event_level=None``), because Dramatiq and APScheduler log a failure with ``exc_info``
before the richer event is captured, and Sentry would keep the log line's event and drop the
one with haul's tags as a duplicate. Transient errors never become events. Every event passes
:func:`scrub`, which removes the configured secrets, URL credentials and query strings (signed
origin URLs) wherever they appear, including the Dramatiq message the integration attaches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.logging import LoggingIntegration, ignore_logger

from actors.errors import TransientError
from actors.redact import REDACTED, redact_text, secrets_of
from actors.settings import Settings

#: Fields whose whole value is secret wherever they appear in an event (breadcrumbs of the
#: HTTP integrations keep the query string apart from the URL, for one).
SECRET_KEYS = frozenset({"http.query", "query_string", "authorization", "cookie", "cookies", "set-cookie"})


def scrub(value: Any, secrets: Iterable[str]) -> Any:
    """``value`` with :func:`redact_text` applied to every string inside it."""
    secrets = tuple(secrets)
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, dict):
        return {
            scrub(k, secrets): REDACTED if str(k).lower() in SECRET_KEYS else scrub(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub(v, secrets) for v in value]
    return value


def init_sentry(settings: Settings, component: str) -> bool:
    """Initialise Sentry when ``HAUL_SENTRY_DSN`` is set (in a worker, before its broker is
    created: the Dramatiq integration patches ``Broker.__init__``)."""
    if not settings.sentry_dsn:
        return False
    secrets = secrets_of(settings)

    def before_send(event: Any, hint: dict[str, Any]) -> Any:
        exc_info = hint.get("exc_info")
        if exc_info and isinstance(exc_info[1], TransientError):
            return None  # retried with backoff: a breadcrumb in the log, not an alert
        return scrub(event, secrets)

    def before_breadcrumb(crumb: Any, hint: dict[str, Any]) -> Any:
        return scrub(crumb, secrets)

    integrations: list[Any] = [LoggingIntegration(level=logging.INFO, event_level=None)]
    if component == "worker":  # imported here: it loads Dramatiq, which only a worker needs
        from sentry_sdk.integrations.dramatiq import DramatiqIntegration

        integrations.append(DramatiqIntegration())
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        server_name=None,
        send_default_pii=False,
        include_local_variables=False,
        traces_sample_rate=0.0,
        before_send=before_send,
        before_breadcrumb=before_breadcrumb,
        integrations=integrations,
    )
    for name in ("dramatiq.worker.WorkerThread", "apscheduler.executors.default"):
        ignore_logger(name)
    sentry_sdk.set_tag("component", component)
    return True


def report_task(
    message: str,
    *,
    kind: str,
    task_id: str,
    stage: str,
    attempt: int,
    origin_host: str | None = None,
    file: str | None = None,
    storage: str | None = None,
    error_code: str | None = None,
) -> None:
    """An event about one task (``kind``: the error class, or ``dead``), tagged with the task,
    and grouped by kind and stage rather than by its message (which names the task). A file
    that could not be stored adds the file, the storage (bucket and prefix, or remote) and the
    error's code (``s3_accessdenied``: the service's own)."""
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("task_id", task_id)
        scope.set_tag("stage", stage)
        scope.set_tag("attempt", str(attempt))
        optional = {"origin_host": origin_host, "file": file, "storage": storage, "error_code": error_code}
        for name, value in optional.items():
            if value:
                scope.set_tag(name, value)
        scope.fingerprint = ["haul", kind, stage]
        sentry_sdk.capture_message(message, level="error")
