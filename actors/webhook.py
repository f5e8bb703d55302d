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
import urllib3
from standardwebhooks import Webhook

from actors.connections import refused_at_connect, shutter_of
from actors.deliveries import Delivery, DeliveryOutcome
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
#: Bytes of a non-2xx answer's body read for the try's record: more than the record keeps
#: (actors/deliveries.py), so a secret the receiver echoes near the cut is read whole, redacted.
ANSWER_EXCERPT_BYTES = 2048
#: Longest 2xx body read to keep its connection for the next event (a receiver's "ok").
ACCEPTED_BODY_BYTES = 64 * 1024

#: Told each try's answer as it ends, and whether the call makes no other try after it.
OnAnswer = Callable[[Delivery, bool], None]


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secrets = tuple(secrets)
        self.policy = policy
        self.timeout = timeout
        self.backoff_seconds = backoff_seconds
        self.sleep = sleep
        #: When each try begins, for its record (seconds since the epoch).
        self.clock = clock
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
        on_answer: OnAnswer | None = None,
    ) -> None:
        """Deliver ``event`` to ``url`` or raise :class:`WebhookUndelivered` saying why
        (:class:`ForbiddenDestination` for a receiver haul must not contact).

        ``on_try(seconds)`` is called before each try with the longest it may take; raising
        there stops the delivery before the request is sent. ``on_answer(delivery, last)`` is
        told how each try ended (numbered from 1 in this call), before any retry or raise:
        the caller records it (:class:`actors.deliveries.DeliveryRecorder`).
        """
        where = f"task {task_id}: webhook {event.type} (id {event.id}) to {display_url(url)}"
        tell = _Teller(on_answer, event.type, display_url(url))
        if not self._secrets:
            tell(self.clock(), 1, DeliveryOutcome.FAILED, detail="no signing secret (HAUL_WEBHOOK_SECRET)", last=True)
            raise WebhookUndelivered(
                f"{where}: no signing secret is configured; set HAUL_WEBHOOK_SECRET or HAUL_WEBHOOK_SECRET_FILE",
                code="no_webhook_secret",
            )
        try:
            self.policy.check(url, purpose=where)
        except ForbiddenDestination as exc:
            tell(self.clock(), 1, DeliveryOutcome.REFUSED, detail=str(exc).removeprefix(f"{where}: "), last=True)
            raise
        pause = self.backoff_seconds
        for attempt in range(1, tries + 1):
            if on_try is not None:
                on_try(self.call_seconds)
            at, started = self.clock(), time.monotonic()
            try:
                status = self._post(url, event, now, where)
            except _Failed as exc:
                last = attempt == tries or not isinstance(exc, _Retryable)
                tell(at, attempt, DeliveryOutcome.FAILED, exc.status, started, exc.detail, last=last)
                if not isinstance(exc, _Retryable):
                    raise
                if last:
                    raise WebhookUndelivered(str(exc)) from exc.__cause__
                log.info("%s; trying again in %.1fs", exc, pause)
            except ForbiddenDestination:
                tell(at, attempt, DeliveryOutcome.REFUSED, detail=_REFUSED_AT_CONNECT, last=True)
                raise
            else:
                tell(at, attempt, DeliveryOutcome.DELIVERED, status, started, last=True)
                log.debug("%s: delivered", where)
                return
            self.sleep(pause)
            pause *= 2

    def _post(self, url: str, event: Event, now: float, where: str) -> int:
        """One try: the status of a 2xx answer, or raise :class:`_Failed` (or ForbiddenDestination)."""
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
                raise ForbiddenDestination(f"{where}: {_REFUSED_AT_CONNECT}") from exc
            # The exception's own text is left out: it quotes the request's path and query.
            raise _Retryable(f"{where}: delivery failed ({type(exc).__name__})", None, _failure(exc)) from exc
        with response:
            status = response.status_code
            if 200 <= status < 300:
                # Accepted. A short plain body is read only to keep the connection for the next
                # event, interruptibly (a receiver that drips it must not hold the thread); any
                # other is left unread, the connection closed (a huge or compressed one must not
                # fill the worker's memory).
                if _short_and_plain(response):
                    with guarded(shutter_of(response)):
                        try:
                            response.content  # noqa: B018
                        except requests.RequestException:
                            pass
                return status
            answered = f"{status} {response.reason or ''}".strip()
            message = f"{where}: the receiver answered {answered}; it must answer 2xx once it has stored the event"
            excerpt = _excerpt(response)
            detail = f"{answered}: {excerpt}" if excerpt else answered
            if status in RETRY_STATUSES:
                raise _Retryable(message, status, detail)
            raise _Failed(message, status, detail)


_REFUSED_AT_CONNECT = "resolved to a non-public address at connect time"


def _failure(exc: requests.RequestException) -> str:
    """A try that got no answer, in a few words (no URL: the record shows it apart)."""
    if isinstance(exc, requests.Timeout):
        return f"timeout: no answer in time ({type(exc).__name__})"
    return f"connection failed ({type(exc).__name__})"


def _short_and_plain(response: requests.Response) -> bool:
    """Whether an answer says it is at most ACCEPTED_BODY_BYTES long and not compressed."""
    length = response.headers.get("content-length", "")
    plain = response.headers.get("content-encoding", "identity").lower() == "identity"
    return plain and length.isdigit() and int(length) <= ACCEPTED_BODY_BYTES


def _excerpt(response: requests.Response) -> str:
    """The start of a refusing answer's body: what the receiver says is wrong; '' when it says
    nothing, cannot be read, or is compressed (decoding could read on without bound). One read
    of the socket at most (interruptibly, as the 2xx body): a dripped body costs one read
    timeout, never one per byte."""
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        return ""  # decoding could read on without bound
    with guarded(shutter_of(response)):
        try:
            head = response.raw.read1(ANSWER_EXCERPT_BYTES, decode_content=False)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
            return ""
    if len(head) >= ANSWER_EXCERPT_BYTES:  # cut at its last whitespace: never half a token, which no redaction knows
        cut = max(head.rfind(sep) for sep in (b" ", b"\n", b"\t"))
        head = head[:cut] if cut > 0 else b""
    return head.decode("utf-8", "replace")


class _Teller:
    """Tells ``on_answer`` how each try of one delivery ended."""

    def __init__(self, on_answer: OnAnswer | None, event_type: str, shown_url: str) -> None:
        self.on_answer, self.event_type, self.url = on_answer, event_type, shown_url

    def __call__(
        self,
        at: float,
        attempt: int,
        outcome: DeliveryOutcome,
        status: int | None = None,
        started: float | None = None,
        detail: str = "",
        *,
        last: bool,
    ) -> None:
        if self.on_answer is None:
            return
        elapsed = None if started is None else round((time.monotonic() - started) * 1000)
        self.on_answer(Delivery(at, self.event_type, self.url, attempt, outcome, status, elapsed, detail), last)


class _Failed(WebhookUndelivered):
    """A try that failed: the receiver's ``status`` (None: no answer) and what went wrong in
    a few words (``detail``, for the try's record)."""

    def __init__(self, message: str, status: int | None, detail: str) -> None:
        super().__init__(message)
        self.status, self.detail = status, detail


class _Retryable(_Failed):
    """A failed try worth repeating within this delivery."""
