"""Each webhook delivery try of a task and the receiver's answer, for the operator dashboard.

:meth:`actors.webhook.WebhookSender.deliver` tells each try's facts (when, the answer, how long)
as it ends; the caller, which knows the try's number in its chain and whether haul gives the
event up, writes them through a :class:`DeliveryRecorder`. The store keeps the latest
:data:`DELIVERIES_KEPT` per task (:mod:`actors.store_deliveries`). What is stored is shown to
anyone who can read the dashboard: the URL and a reason text redacted of the settings' secrets
and the URL's own (:func:`actors.redact.secrets_in_url`: credentials, query, long path
segments), the reason cut short, since it may quote the receiver's body.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from actors.redact import redact_text

if TYPE_CHECKING:
    from actors.store_deliveries import DeliveryStore

log = logging.getLogger(__name__)

#: Tries kept per task, newest first: a receiver down for a day leaves a bounded list.
DELIVERIES_KEPT = 20
#: Longest reason text stored (characters), cut after redaction so no secret is cut in half.
DETAIL_CHARS = 300


class DeliveryOutcome(enum.StrEnum):
    """How one try ended."""

    #: The receiver answered 2xx.
    DELIVERED = "delivered"
    #: No 2xx: another status, a timeout, a connection error, no secret to sign with.
    FAILED = "failed"
    #: Never sent, or cut at connect time: the destination is forbidden (a PermanentError).
    REFUSED = "refused"


@dataclass(frozen=True)
class Delivery:
    """One try at delivering one event of a task."""

    #: When the try began (seconds since the epoch).
    at: float
    #: The event type: task.completed, task.failed or task.canceled.
    type: str
    #: The receiver's URL without credentials, query string or long path segments.
    url: str
    #: The try's number: in a notice's chain (task.failed, task.canceled), or in the run that
    #: delivers task.completed (a finalize parked and run again counts from 1 again).
    attempt: int
    outcome: DeliveryOutcome
    #: The receiver's HTTP status (None: no answer).
    status: int | None = None
    #: From sending the request to its answer, or to the failure (None: nothing was sent).
    elapsed_ms: int | None = None
    #: Why a try failed or was refused: the status and an excerpt of the receiver's body, or
    #: the timeout or connection error; '' when delivered.
    detail: str = ""
    #: Haul stops trying this event after this try.
    gave_up: bool = False

    def redacted(self, secrets: Iterable[str]) -> Self:
        """This try as it may be stored: ``secrets``, URL credentials and query strings out of
        the URL and the reason (as :func:`actors.redact.display_url`), the reason on one line and
        cut to DETAIL_CHARS."""
        values = tuple(secrets)
        detail = redact_text(" ".join(self.detail.split()), values)
        if len(detail) > DETAIL_CHARS:
            detail = detail[: DETAIL_CHARS - 1] + "…"
        return dataclasses.replace(self, url=redact_text(self.url, values), detail=detail)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        data: dict[str, Any] = json.loads(text)
        return cls(
            at=float(data["at"]),
            type=str(data["type"]),
            url=str(data["url"]),
            attempt=int(data["attempt"]),
            outcome=DeliveryOutcome(data["outcome"]),
            status=None if data.get("status") is None else int(data["status"]),
            elapsed_ms=None if data.get("elapsed_ms") is None else int(data["elapsed_ms"]),
            detail=str(data.get("detail", "")),
            gave_up=bool(data.get("gave_up", False)),
        )


class DeliveryRecorder:
    """Writes the tries of one event's delivery to its task's list, numbered from ``first_try``.

    A try that the sender follows with another is written at once; the last try of a call waits
    for the caller's verdict (:meth:`settle`: whether haul gives the event up) unless it was
    delivered. Leaving the ``with`` block settles it as not given up (a lost lease, a stop: the
    event is tried again). A failure to write is logged and never fails the delivery.
    """

    def __init__(self, store: DeliveryStore, task_id: str, secrets: Sequence[str], first_try: int = 1) -> None:
        self.store = store
        self.task_id = task_id
        self.secrets = tuple(secrets)
        self.first_try = first_try
        self.pending: Delivery | None = None

    def add(self, delivery: Delivery, last: bool) -> None:
        """``deliver``'s ``on_answer``: one try's answer; ``last``: the call makes no other."""
        self.settle(gave_up=False)
        numbered = dataclasses.replace(delivery, attempt=self.first_try + delivery.attempt - 1)
        if last and numbered.outcome is not DeliveryOutcome.DELIVERED:
            self.pending = numbered
        else:
            self._write(numbered)

    def settle(self, gave_up: bool) -> None:
        """Write the try waiting for a verdict, if any: after it haul gives up, or not."""
        if self.pending is not None:
            delivery, self.pending = self.pending, None
            self._write(dataclasses.replace(delivery, gave_up=gave_up))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.settle(gave_up=False)

    def _write(self, delivery: Delivery) -> None:
        try:
            self.store.record_delivery(self.task_id, delivery, secrets=self.secrets)
        except Exception:  # a Redis outage: the dashboard misses a line, the delivery stands
            log.warning(
                "task %s: could not record webhook %s try %d (%s) for the dashboard",
                self.task_id, delivery.type, delivery.attempt, delivery.outcome, exc_info=True,
            )  # fmt: skip
