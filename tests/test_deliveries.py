"""Each webhook try of a task, recorded for the dashboard (actors/deliveries.py,
actors/store_deliveries.py): real Redis, real receivers on 127.0.0.1, an in-process worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from actors.deliveries import DELIVERIES_KEPT, DETAIL_CHARS, Delivery, DeliveryOutcome, DeliveryRecorder
from actors.errors import WebhookUndelivered
from actors.interrupt import Interrupter, interruptible, within
from actors.manifest import spec_from_manifest, spec_from_urls
from actors.netguard import DestinationPolicy
from actors.settings import Settings
from actors.states import State
from actors.store import TaskStore
from actors.store_base import text_of
from actors.webhook import COMPLETED, WebhookSender, make_event
from tests.conftest import WEBHOOK_SECRET, InProcessWorker, end_task, in_process_worker, submit_spec, wait_for
from tests.servers import Delivery as Received
from tests.servers import Origin, Receiver, free_port

NOW = 1_700_000_000.0
CUTOFF = NOW + 100


def submit(store: TaskStore, origin: Origin, *, webhook: str | None = None, missing: bool = False) -> str:
    """A one-file task (its file missing from the origin: it fails at once and owes task.failed)."""
    url = origin.url("/missing.mp4") if missing else origin.put("/v.mp4", b"video" * 100)
    manifest: dict[str, Any] = {"files": [{"url": url, "path": "v.mp4"}]}
    if webhook:
        manifest["webhook"] = webhook
    return submit_spec(spec_from_manifest(manifest), store)


def recorded(
    store: TaskStore, task_id: str, until: Callable[[list[Delivery]], bool], timeout: float = 20
) -> list[Delivery]:
    """The task's tries once ``until`` holds for them (a notice's are written after its state)."""
    deadline = time.monotonic() + timeout
    while not until(found := store.deliveries(task_id)):
        assert time.monotonic() < deadline, f"task {task_id}: tries recorded so far: {found}"
        time.sleep(0.02)
    return found


def raw(store: TaskStore, task_id: str) -> str:
    """The task's list as Redis holds it, every entry."""
    return "\n".join(text_of(entry) for entry in store.client.lrange(store.deliveries_key(task_id), 0, -1))


@pytest.fixture
def quick(settings: Settings, store: TaskStore) -> Iterator[InProcessWorker]:
    """A worker whose receiver read timeout is half a second."""
    with in_process_worker(settings.replace(read_timeout_seconds=0.5), store) as running:
        yield running


def test_a_completed_task_records_its_delivery(
    worker: InProcessWorker, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    started = time.time()
    task_id = submit(store, origin)
    assert wait_for(store, task_id).state is State.DONE
    [delivery] = store.deliveries(task_id)
    assert (delivery.type, delivery.url, delivery.attempt) == (COMPLETED, receiver.url, 1)
    assert (delivery.outcome, delivery.status, delivery.detail, delivery.gave_up) == ("delivered", 204, "", False)
    assert delivery.elapsed_ms is not None and 0 <= delivery.elapsed_ms < 5000
    assert started <= delivery.at <= time.time()


def test_a_503_then_a_200_records_the_failed_try_then_the_delivered_one(
    worker: InProcessWorker, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    # Given a receiver that answers 503, saying why, then 200
    receiver.statuses.extend([503, 200])
    receiver.answer_body = b"queue full,\n  try later"
    task_id = submit(store, origin)
    assert wait_for(store, task_id).state is State.DONE
    # Then both tries are recorded, newest first: the answer, with the body's start on one line
    delivered, failed = store.deliveries(task_id)
    assert (delivered.outcome, delivered.status, delivered.attempt) == ("delivered", 200, 2)
    assert (failed.outcome, failed.status, failed.attempt) == ("failed", 503, 1)
    assert failed.detail == "503 Service Unavailable: queue full, try later"
    assert failed.elapsed_ms is not None and not failed.gave_up and failed.at <= delivered.at


def test_a_receiver_that_does_not_answer_in_time_is_recorded_as_a_timeout(
    quick: InProcessWorker, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    # Given a receiver that holds its first answer past the worker's read timeout (0.5 s)
    arrived: list[Received] = []

    def hold_first(delivery: Received) -> None:
        arrived.append(delivery)
        if len(arrived) == 1:
            time.sleep(1.5)

    receiver.on_delivery = hold_first
    task_id = submit(store, origin)
    assert wait_for(store, task_id).state is State.DONE
    delivered, late = store.deliveries(task_id)
    assert (late.outcome, late.status, late.attempt) == ("failed", None, 1)
    assert late.detail == "timeout: no answer in time (ReadTimeout)"
    assert late.elapsed_ms is not None and 400 <= late.elapsed_ms < 1500
    assert (delivered.outcome, delivered.attempt) == ("delivered", 2)


def test_no_secret_of_the_url_or_the_settings_is_stored(
    worker: InProcessWorker, store: TaskStore, origin: Origin, receiver: Receiver, settings: Settings
) -> None:
    # Given a task whose receiver URL carries credentials and a token, and a receiver that
    # refuses (400) with a body echoing them and haul's signing secret
    webhook = f"http://hook-user:hunter2pw@127.0.0.1:{receiver.port}/hook?token=abc"
    bare = WEBHOOK_SECRET.removeprefix("whsec_")
    receiver.statuses.append(400)
    receiver.answer_body = (
        f"bad signature; secret {WEBHOOK_SECRET} or {bare}? got /hook?token=abc as hunter2pw".encode()
    )
    task_id = submit(store, origin, webhook=webhook)
    assert wait_for(store, task_id).state is State.DONE  # the 400 parks the task; the next run delivers
    delivered, refused = store.deliveries(task_id)
    # Then the URL is the one display_url shows, and the reason keeps none of the secrets
    assert delivered.url == refused.url == f"http://***@127.0.0.1:{receiver.port}/hook?[redacted]"
    assert (refused.outcome, refused.status) == ("failed", 400)
    assert refused.detail.startswith("400 Bad Request: bad signature; secret [redacted] or [redacted]?")
    stored = raw(store, task_id)
    for secret in ("hunter2pw", "hook-user", "token=abc", "abc", WEBHOOK_SECRET, bare):
        assert secret not in stored, secret
    assert receiver.received()[0].headers["authorization"].startswith("Basic ")  # they were sent, though


def test_a_notice_given_up_is_recorded_so(
    settings: Settings, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    # Given a receiver down for good and a notice given up two seconds after its task failed
    receiver.down_until = time.time() + 3600
    quick = settings.replace(finalize_give_up_seconds=2.0, retry_min_seconds=0.3, retry_max_seconds=0.6)
    with in_process_worker(quick, store, threads=2):
        task_id = submit(store, origin, missing=True)
        tries = recorded(store, task_id, lambda found: any(d.gave_up for d in found))
    # Then every try of the chain is there, numbered, newest first, and only the last gave up
    assert [d.attempt for d in tries] == list(range(len(tries), 0, -1)) and len(tries) >= 2
    assert {(d.type, d.outcome, d.status) for d in tries} == {("task.failed", "failed", 503)}
    assert [d.gave_up for d in tries] == [True] + [False] * (len(tries) - 1)


def test_a_forbidden_receiver_is_recorded_as_refused(
    worker: InProcessWorker, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    task_id = submit(store, origin, webhook="http://169.254.169.254/hook", missing=True)
    [refused] = recorded(store, task_id, lambda found: bool(found))
    assert (refused.type, refused.outcome, refused.status, refused.elapsed_ms) == ("task.failed", "refused", None, None)
    assert "169.254.169.254 is 169.254.169.254, a link-local or cloud metadata address" in refused.detail
    assert refused.gave_up and len(refused.detail) <= DETAIL_CHARS


@pytest.mark.fast
def test_a_redis_error_while_recording_does_not_fail_the_delivery(
    store: TaskStore, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a recorder whose Redis is gone
    task_id, _ = store.create(spec_from_urls(["https://cdn.example.com/a.mp4"]), now=NOW)
    task = store.get(task_id)
    assert task is not None
    gone = TaskStore(redis.Redis(port=free_port(), socket_connect_timeout=1))
    sender = WebhookSender((WEBHOOK_SECRET,), DestinationPolicy(True), timeout=(2, 5))
    # When a delivery is made and recorded through it
    now = time.time()
    with DeliveryRecorder(gone, task_id, [WEBHOOK_SECRET]) as tries:
        sender.deliver(receiver.url, make_event(task, COMPLETED, [], None, now), now=now, task_id=task_id,
                       on_answer=tries.add)  # fmt: skip
    gone.client.close()
    # Then the delivery stands; the lost line is logged
    assert len(receiver.accepted()) == 1
    assert "could not record webhook task.completed try 1 (delivered)" in caplog.text


@pytest.mark.fast
def test_a_dripped_refusal_or_acceptance_holds_a_try_for_one_read_or_the_try_time_not_per_byte(
    store: TaskStore, receiver: Receiver
) -> None:
    # Given a receiver that drips a 5,100-byte answer, a byte every 50 ms (each read well
    # within the 1 s read timeout: 250 s to read it all)
    task_id, _ = store.create(spec_from_urls(["https://cdn.example.com/a.mp4"]), now=NOW)
    task = store.get(task_id)
    assert task is not None
    sender = WebhookSender((WEBHOOK_SECRET,), DestinationPolicy(True), timeout=(2, 1))
    receiver.answer_body, receiver.drip_seconds = b"no " * 1700, 0.05
    event = make_event(task, COMPLETED, [], None, time.time())
    # When it refuses: the excerpt is one read of what came, not 2 KB of drops
    receiver.statuses.append(503)
    started = time.monotonic()
    with pytest.raises(WebhookUndelivered):
        sender.deliver(receiver.url, event, now=time.time(), task_id=task_id, tries=1)
    assert time.monotonic() - started < 3
    # When it accepts, on the notice path: the try's time ends the body's read
    receiver.statuses.append(200)
    started = time.monotonic()
    with within(1.0):
        sender.deliver(receiver.url, event, now=time.time(), task_id=task_id, tries=1)
    assert time.monotonic() - started < 3
    # ... and so does the thread's own guard (a stop, a lost lease), however long the try's time
    stop = Interrupter()
    receiver.statuses.append(200)
    started = time.monotonic()
    threading.Timer(1.0, stop.fire).start()
    with interruptible(stop.guard), within(60):
        sender.deliver(receiver.url, event, now=time.time(), task_id=task_id, tries=1)
    assert time.monotonic() - started < 3
    # When it accepts with a body longer than a receiver's "ok": the body is not read at all
    receiver.answer_body = b"ok " * 30_000
    receiver.statuses.append(200)
    started = time.monotonic()
    sender.deliver(receiver.url, event, now=time.time(), task_id=task_id, tries=1)
    assert time.monotonic() - started < 3


@pytest.mark.fast
def test_the_list_keeps_the_latest_twenty_and_a_gone_task_gets_none(store: TaskStore) -> None:
    t1, _ = store.create(spec_from_urls(["https://cdn.example.com/a.mp4"]), now=NOW)
    for n in range(1, 26):
        try_n = Delivery(NOW + n, COMPLETED, "http://h/hook", n, DeliveryOutcome.FAILED, 503, 10, "503")
        assert store.record_delivery(t1, try_n, secrets=())
    kept = store.deliveries(t1)
    assert [d.attempt for d in kept] == list(range(25, 5, -1)) and len(kept) == DELIVERIES_KEPT
    assert store.client.llen(store.deliveries_key(t1)) == DELIVERIES_KEPT
    assert [d.attempt for d in store.deliveries(t1, limit=3)] == [25, 24, 23]
    assert kept[0] == Delivery(NOW + 25, COMPLETED, "http://h/hook", 25, DeliveryOutcome.FAILED, 503, 10, "503")
    with pytest.raises(ValueError, match="limit must be at least 1"):
        store.deliveries(t1, limit=0)
    # A try that ends after prune took its task leaves no list behind
    late = Delivery(NOW, COMPLETED, "http://h/hook", 1, DeliveryOutcome.FAILED, 503, 10, "503", gave_up=True)
    assert not store.record_delivery("pruned-task", late, secrets=())
    assert not store.client.exists(store.deliveries_key("pruned-task"))


@pytest.mark.fast
def test_prune_removes_the_list_with_the_task(store: TaskStore) -> None:
    # Given an old done task and a young one, each with tries recorded
    tries = {}
    for at in (NOW, CUTOFF + 1):
        task_id = store.create(spec_from_urls(["https://cdn.example.com/a.mp4"]), now=at)[0]
        assert end_task(store, task_id, State.DONE, now=at) is State.DONE
        store.record_delivery(task_id, Delivery(at, COMPLETED, "http://h/", 1, DeliveryOutcome.DELIVERED), secrets=())
        tries[at] = task_id
    # When the done tasks are pruned
    pruned, _, _ = store.prune_batch(State.DONE, cutoff=CUTOFF, limit=500)
    # Then the old one's list went with it; the young one's stays
    assert pruned == [(tries[NOW], State.DONE)]
    assert not store.client.exists(store.deliveries_key(tries[NOW]))
    assert len(store.deliveries(tries[CUTOFF + 1])) == 1


@pytest.mark.fast
def test_a_stored_reason_is_redacted_one_line_and_cut() -> None:
    long = Delivery(NOW, COMPLETED, "https://u:pw@h/x?sig=1", 1, DeliveryOutcome.FAILED, 500, 3, "a\nb " + "x" * 500)
    shown = long.redacted(["xxxx"])
    assert shown.url == "https://***@h/x?[redacted]"
    assert shown.detail.startswith("a b [redacted]") and len(shown.detail) <= DETAIL_CHARS
    assert Delivery.from_json(shown.to_json()) == shown


@pytest.mark.fast
def test_a_worker_without_a_secret_records_why_nothing_was_sent(store: TaskStore, receiver: Receiver) -> None:
    task_id, _ = store.create(spec_from_urls(["https://cdn.example.com/a.mp4"]), now=NOW)
    task = store.get(task_id)
    assert task is not None
    told: list[tuple[Delivery, bool]] = []
    sender = WebhookSender((), DestinationPolicy(True), timeout=(2, 5))
    with pytest.raises(WebhookUndelivered, match="HAUL_WEBHOOK_SECRET"):
        sender.deliver(receiver.url, make_event(task, COMPLETED, [], None, NOW), now=NOW, task_id=task_id,
                       on_answer=lambda delivery, last: told.append((delivery, last)))  # fmt: skip
    [(delivery, last)] = told
    assert last and (delivery.outcome, delivery.status, delivery.elapsed_ms) == ("failed", None, None)
    assert delivery.detail == "no signing secret (HAUL_WEBHOOK_SECRET)" and receiver.received() == []
