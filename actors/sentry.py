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
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import sentry_sdk
from sentry_sdk.integrations.dramatiq import DramatiqIntegration
from sentry_sdk.integrations.logging import LoggingIntegration, ignore_logger

from actors.errors import TransientError
from actors.settings import Settings

REDACTED = "[redacted]"
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@", re.I)
_URL_QUERY = re.compile(r"(?P<base>https?://[^\s?#\"']+)\?[^\s#\"']*", re.I)


def secrets_of(settings: Settings) -> list[str]:
    """Every value that must never leave the process."""
    values = list(settings.webhook_secrets)
    for secret in settings.webhook_secrets:
        values.append(secret.removeprefix("whsec_"))
    password = urlsplit(settings.redis_url).password
    if password:
        values.append(password)
    if settings.sentry_dsn:
        values.append(settings.sentry_dsn)
    return [v for v in values if len(v) >= 4]


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove secrets, URL passwords (``user:***@``) and query strings from ``text``."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _URL_QUERY.sub(lambda m: f"{m['base']}?{REDACTED}", text)


def scrub(value: Any, secrets: Iterable[str]) -> Any:
    """``value`` with :func:`redact_text` applied to every string inside it."""
    secrets = tuple(secrets)
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v, secrets) for v in value]
    return value


def init_sentry(settings: Settings, component: str) -> bool:
    """Initialise Sentry when ``HAUL_SENTRY_DSN`` is set (before the broker is created)."""
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

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        server_name=None,
        send_default_pii=False,
        include_local_variables=False,
        traces_sample_rate=0.0,
        before_send=before_send,
        before_breadcrumb=before_breadcrumb,
        integrations=[DramatiqIntegration(), LoggingIntegration(level=logging.INFO, event_level=None)],
    )
    for name in ("dramatiq.worker.WorkerThread", "apscheduler.executors.default"):
        ignore_logger(name)
    sentry_sdk.set_tag("component", component)
    return True


def report_task(
    message: str, *, kind: str, task_id: str, stage: str, attempt: int, origin_host: str | None = None
) -> None:
    """An event about one task (``kind``: the error class, or ``dead``), tagged with the task,
    and grouped by kind and stage rather than by its message (which names the task)."""
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("task_id", task_id)
        scope.set_tag("stage", stage)
        scope.set_tag("attempt", str(attempt))
        if origin_host:
            scope.set_tag("origin_host", origin_host)
        scope.fingerprint = ["haul", kind, stage]
        sentry_sdk.capture_message(message, level="error")
