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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests
from standardwebhooks import Webhook

from actors.connections import refused_at_connect, shutter_of
from actors.errors import ForbiddenDestination, WebhookUndelivered
from actors.interrupt import guarded
from actors.netguard import DestinationPolicy
from actors.redact import display_url
from actors.task import Task

log = logging.getLogger(__name__)

COMPLETED = "task.completed"
FAILED = "task.failed"
CANCELED = "task.canceled"

#: Delivery tries within one run before the task is retried later with backoff, and the
#: first pause between them (doubling; never longer than HAUL_RETRY_MIN_SECONDS).
DEFAULT_DELIVERY_TRIES = 5
DEFAULT_DELIVERY_BACKOFF_SECONDS = 0.5
#: Answers worth another try at once; any other non-2xx answer is retried with the task's backoff.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    body: str


def make_event(
    task: Task,
    event_type: str,
    files: Sequence[dict[str, Any]],
    error: str | None,
    now: float,
    ended: Mapping[str, Any] | None = None,
) -> Event:
    """The event for ``task``; its id depends only on the task, the type and the operator run.

    File URLs go out without credentials or query strings (signed URLs are secrets too); the
    backend matches files by ``path``. ``ended`` (task.failed and task.canceled, see
    :func:`ended_fields`) adds how the task ended, machine-readable, to ``data``; it is read
    from the ended task's record, so every try of one event id sends the same body.
    """
    data = {
        "id": task.id,
        "name": task.spec.name,
        "key": task.spec.key,
        "files": [{**f, "url": display_url(f["url"])} if "url" in f else dict(f) for f in files],
        "error": error,
        **(ended or {}),
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


def ended_fields(task: Task, code: str, file: str) -> dict[str, Any]:
    """What a backend decides on (a refund, say) without parsing ``error``: the final ``state``
    (failed, dead, canceled), the ``error_code`` (actors/errors.py; '' read as None), the
    ``attempts`` made, and the ``error_file`` the error is about (path and display URL) or None."""
    spec = next((f for f in task.spec.files if f.path == file), None) if file else None
    return {
        "state": task.state.value,
        "error_code": code or None,
        "attempts": task.attempts,
        "error_file": {"path": spec.path, "url": display_url(spec.url)} if spec is not None else None,
    }


def sign(secrets: Sequence[str], event_id: str, timestamp: datetime, body: str) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64>`` per secret, space-separated."""
    return " ".join(Webhook(secret).sign(msg_id=event_id, timestamp=timestamp, data=body) for secret in secrets)


class WebhookSender:
    """Posts signed events; a few quick tries here, the task's backoff beyond them.

    Tries are made here rather than by urllib3's retry, so that each is a step the caller
    sees (``on_try``: renew the lease for the length of one call, check the fence) and a read
    timeout is retried like any other failure: the receiver dedupes on ``webhook-id``.
    """

    def __init__(
        self,
        secrets: Sequence[str],
        policy: DestinationPolicy,
        *,
        timeout: tuple[float, float],
        backoff_seconds: float = DEFAULT_DELIVERY_BACKOFF_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._secrets = tuple(secrets)
        self.policy = policy
        self.timeout = timeout
        self.backoff_seconds = backoff_seconds
        self.sleep = sleep
        self.session = policy.session()

    @property
    def call_seconds(self) -> float:
        """The longest one delivery try may take (connect, then wait for the answer)."""
        return self.timeout[0] + self.timeout[1]

    def deliver(
        self,
        url: str,
        event: Event,
        *,
        now: float,
        task_id: str,
        tries: int = DEFAULT_DELIVERY_TRIES,
        on_try: Callable[[float], None] | None = None,
    ) -> None:
        """Deliver ``event`` to ``url`` or raise :class:`WebhookUndelivered` saying why.

        ``on_try(seconds)`` is called before each try with the longest it may take; raising
        there stops the delivery before the request is sent.
        """
        where = f"task {task_id}: webhook {event.type} (id {event.id}) to {display_url(url)}"
        if not self._secrets:
            raise WebhookUndelivered(
                f"{where}: no signing secret is configured; set HAUL_WEBHOOK_SECRET or HAUL_WEBHOOK_SECRET_FILE",
                code="no_webhook_secret",
            )
        self.policy.check(url, purpose=where)
        pause = self.backoff_seconds
        for attempt in range(1, tries + 1):
            if on_try is not None:
                on_try(self.call_seconds)
            try:
                self._post(url, event, now, where)
                log.debug("%s: delivered", where)
                return
            except _Retryable as exc:
                if attempt == tries:
                    raise WebhookUndelivered(str(exc)) from exc.__cause__
                log.info("%s; trying again in %.1fs", exc, pause)
            self.sleep(pause)
            pause *= 2

    def _post(self, url: str, event: Event, now: float, where: str) -> None:
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
                url, data=event.body.encode(), headers=headers, timeout=self.timeout, allow_redirects=False, stream=True
            )
        except requests.RequestException as exc:
            if refused_at_connect(exc):
                raise ForbiddenDestination(f"{where}: resolved to a non-public address at connect time") from exc
            raise _Retryable(f"{where}: delivery failed ({type(exc).__name__})") from exc
        with response:
            if 200 <= response.status_code < 300:
                # Accepted. The body is read only to keep the connection for the next event,
                # interruptibly: a receiver that drips it must not hold the thread.
                with guarded(shutter_of(response)):
                    try:
                        response.content  # noqa: B018
                    except requests.RequestException:
                        pass
                return
            message = (
                f"{where}: the receiver answered {response.status_code} {response.reason}; "
                "it must answer 2xx once it has stored the event"
            )
            if response.status_code in RETRY_STATUSES:
                raise _Retryable(message)
            raise WebhookUndelivered(message)


class _Retryable(WebhookUndelivered):
    """A failed try worth repeating within this delivery."""
