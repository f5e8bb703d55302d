"""Telling the backend: Standard Webhooks events, signed, delivered with retries.

Each event has an id that never changes across retries (``<task id>.<type>.<run>``; ``run``
grows only when an operator retries the task), so a receiver dedupes on ``webhook-id``. The
signature covers id, timestamp and body, and is made with every configured secret so that a
receiver verifying with either the old or the new secret accepts during a rotation. The secret
travels in no body, header, log line or error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests
from standardwebhooks import Webhook
from urllib3.util.retry import Retry

from actors.errors import ForbiddenDestination, WebhookUndelivered
from actors.netguard import DestinationPolicy, refused_at_connect
from actors.redact import display_url
from actors.task import Task

log = logging.getLogger(__name__)

COMPLETED = "task.completed"
FAILED = "task.failed"

#: Deliveries retried within one run before the task is retried later with backoff, and the
#: first pause between them (doubling; never longer than HAUL_RETRY_MIN_SECONDS).
DEFAULT_DELIVERY_RETRIES = 4
DEFAULT_DELIVERY_BACKOFF_SECONDS = 0.5


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    body: str


def make_event(task: Task, event_type: str, files: Sequence[dict[str, Any]], error: str | None, now: float) -> Event:
    """The event for ``task``; its id depends only on the task, the type and the operator run.

    File URLs go out without credentials or query strings (signed URLs are secrets too); the
    backend matches files by ``path``.
    """
    data = {
        "id": task.id,
        "name": task.spec.name,
        "key": task.spec.key,
        "files": [{**f, "url": display_url(f["url"])} if "url" in f else dict(f) for f in files],
        "error": error,
    }
    body = {
        "type": event_type,
        "timestamp": datetime.fromtimestamp(now, tz=UTC).isoformat().replace("+00:00", "Z"),
        "data": data,
    }
    return Event(
        id=f"{task.id}.{event_type}.{task.run}",
        type=event_type,
        body=json.dumps(body, separators=(",", ":"), sort_keys=True),
    )


def sign(secrets: Sequence[str], event_id: str, timestamp: datetime, body: str) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64>`` per secret, space-separated."""
    return " ".join(Webhook(secret).sign(msg_id=event_id, timestamp=timestamp, data=body) for secret in secrets)


class WebhookSender:
    """Posts signed events; a few quick retries here, the task's backoff beyond them."""

    def __init__(
        self,
        secrets: Sequence[str],
        policy: DestinationPolicy,
        *,
        timeout: tuple[float, float],
        retries: int = DEFAULT_DELIVERY_RETRIES,
        backoff_factor: float = DEFAULT_DELIVERY_BACKOFF_SECONDS,
    ) -> None:
        self._secrets = tuple(secrets)
        self.policy = policy
        self.timeout = timeout
        retry = Retry(
            total=retries,
            backoff_factor=backoff_factor,
            status_forcelist=(408, 425, 429, 500, 502, 503, 504),
            allowed_methods=frozenset({"POST"}),
            respect_retry_after_header=False,
            raise_on_status=False,
            redirect=0,
        )
        self.session = policy.session()
        for adapter in self.session.adapters.values():
            adapter.max_retries = retry  # type: ignore[attr-defined]

    def deliver(self, url: str, event: Event, *, now: float, task_id: str) -> None:
        """Deliver ``event`` to ``url`` or raise :class:`WebhookUndelivered` saying why."""
        where = f"task {task_id}: webhook {event.type} (id {event.id}) to {display_url(url)}"
        if not self._secrets:
            raise WebhookUndelivered(
                f"{where}: no signing secret is configured; set HAUL_WEBHOOK_SECRET or HAUL_WEBHOOK_SECRET_FILE"
            )
        self.policy.check(url, purpose=where)
        timestamp = datetime.fromtimestamp(int(now), tz=UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": event.id,
            "webhook-timestamp": str(int(now)),
            "webhook-signature": sign(self._secrets, event.id, timestamp, event.body),
            "user-agent": "haul-webhook/1",
        }
        try:
            response = self.session.post(
                url, data=event.body.encode(), headers=headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            if refused_at_connect(exc):
                raise ForbiddenDestination(f"{where}: resolved to a non-public address at connect time") from exc
            raise WebhookUndelivered(f"{where}: delivery failed ({type(exc).__name__})") from exc
        with response:
            if not 200 <= response.status_code < 300:
                raise WebhookUndelivered(
                    f"{where}: the receiver answered {response.status_code} {response.reason}; "
                    "it must answer 2xx once it has stored the event"
                )
        log.debug("%s: delivered", where)
