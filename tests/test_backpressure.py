"""Waiting without harm: a task that waits (for a stage slot, for its receiver, for a thread)
neither pauses other tenants' work, nor multiplies its messages, nor uses up its attempts.

Real worker and supervisor processes, a real redis-server, origins and receivers on 127.0.0.1
(issue 11, items 1, 2 and 7), and the supervisor's sweeps against a real Redis for the outbox
and the lost-message rescue of resting tasks.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

from actors.manifest import spec_from_manifest
from actors.states import State
from actors.store import TaskStore
from supervisor import sweeps
from tests.conftest import WEBHOOK_SECRET, wait_for
from tests.processes import running, wait_until
from tests.servers import Origin, Receiver, free_port
from tests.test_faults import Stack

KIB, MIB = 1024, 1024 * 1024
NOW = 1_700_000_000.0


def submit(stack: Stack, origin: Origin, name: str, data: bytes, webhook: str | None = None) -> str:
    """Create a task (with its own webhook, if given) and send its claim message."""
    manifest: dict[str, object] = {"files": [{"url": origin.put(f"/{name}", data), "path": name}]}
    if webhook:
        manifest["webhook"] = webhook
    task_id, _ = stack.store.create(spec_from_manifest(manifest), now=time.time())
    broker = RedisBroker(url=stack.redis.url)  # type: ignore[no-untyped-call]
    broker.enqueue(Message(queue_name="claim", actor_name="claim", args=(task_id,), kwargs={}, options={}))
    broker.close()
    return task_id


def parked(store: TaskStore) -> set[str]:
    members = store.client.zrange(f"{store.prefix}parked", 0, -1)
    return {v.decode() if isinstance(v, bytes) else str(v) for v in members}


def scrape(port: int) -> dict[str, float]:
    """The supervisor's /metrics as {'name{labels}': value}."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


@pytest.fixture
def down() -> Iterator[Receiver]:
    """A tenant's webhook receiver that is down for the whole test (503 to everything)."""
    receiver = Receiver(WEBHOOK_SECRET)
    receiver.down_until = float("inf")
    yield receiver
    receiver.close()


@pytest.mark.e2e
def test_a_tenants_dead_receiver_does_not_pause_claims_of_the_others(
    tmp_path: Path, origin: Origin, receiver: Receiver, down: Receiver
) -> None:
    # Given one finalize slot (claims pause at a backlog of 2) and two tasks of a tenant whose
    # receiver answers 503: both finish their download and park between rounds of tries ...
    stack = Stack(
        tmp_path, receiver, HAUL_FINALIZE_CONCURRENCY="1", HAUL_RETRY_MIN_SECONDS="5", HAUL_RETRY_MAX_SECONDS="10"
    )
    try:
        worker = stack.worker(threads=4)
        with running(worker):
            stuck = [submit(stack, origin, f"stuck{n}.mp4", os.urandom(64 * KIB), down.url) for n in range(2)]
            wait_until(lambda: len(down.received()) >= 10, 40, "a round of tries for both tasks")
            assert parked(stack.store)
            # ... when another tenant's task comes, it is claimed and done at once: parked tasks
            # use no finalize capacity, so they do not count toward the backlog
            other = submit(stack, origin, "other.mp4", os.urandom(64 * KIB))
            task = wait_for(stack.store, other, timeout=30)
            assert task.state is State.DONE and task.attempts == 1, task
            for task_id in stuck:
                waiting = stack.store.get(task_id)
                assert waiting is not None and waiting.state is State.FINALIZING and waiting.attempts == 1
                assert "503" in waiting.error  # `haul status` says why it waits
            assert len(down.received()) >= 2
    finally:
        stack.close()


@pytest.mark.e2e
def test_a_task_waiting_for_a_download_slot_keeps_one_claim_chain(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    # Given one download slot held by a slow download, and a supervisor whose orphan rescue
    # looks at queued tasks every 1.5 s ...
    port = free_port()
    stack = Stack(
        tmp_path, receiver, HAUL_DOWNLOAD_CONCURRENCY="1", HAUL_SUPERVISOR_PORT=str(port), HAUL_ORPHAN_SECONDS="1"
    )
    origin.rate = 100 * KIB
    try:
        worker, sup = stack.worker(threads=4), stack.supervisor()
        with running(worker, sup):
            slow = submit(stack, origin, "slow.mp4", os.urandom(1200 * KIB))
            wait_until(lambda: stack.store.get(slow).state is State.DOWNLOADING, 20, "the slow download")  # type: ignore[union-attr]
            waiting = submit(stack, origin, "waiting.mp4", os.urandom(16 * KIB))
            # ... when a second task waits about 10 s for that slot ...
            time.sleep(10)
            refused = int(stack.store.client.hget(f"{stack.store.prefix}stats:refused", "download") or 0)
            metrics = scrape(port)
            assert stack.store.get(waiting).state is State.QUEUED  # type: ignore[union-attr]
            origin.rate = None
            assert wait_for(stack.store, waiting, timeout=40).state is State.DONE
        # ... its one message chain asked a few times, with growing pauses (0.5 s, then about a
        # quarter of the wait: about 9 claims in 10 s), and the supervisor sent no second claim
        # for it: waiting for a slot is not a lost message
        assert 3 <= refused <= 15, refused
        assert metrics.get('haul_requeues_total{reason="orphan"}', 0) == 0, metrics
        assert "sending its claim again" not in sup.output()
    finally:
        stack.close()


@pytest.mark.e2e
def test_a_parked_finalize_waiting_behind_a_long_download_keeps_its_attempts(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    # Given a worker with one thread, a 3 s lease, and a task whose first round of task.completed
    # tries (5 within the run) is answered 503: it parks, its next round due in 2-3 s ...
    stack = Stack(tmp_path, receiver, HAUL_RETRY_MIN_SECONDS="2", HAUL_RETRY_MAX_SECONDS="3")
    try:
        worker, sup = stack.worker(threads=1), stack.supervisor()
        with running(worker, sup):
            receiver.statuses.extend([503] * 5)
            first = submit(stack, origin, "first.mp4", os.urandom(64 * KIB))
            wait_until(lambda: len(receiver.received()) == 5, 20, "the first round of tries")
            # ... when a 10 s download takes the only thread first, its message waits in the
            # queue for much longer than its pause plus a lease ...
            origin.rate = 120 * KIB
            long = submit(stack, origin, "long.mp4", os.urandom(1200 * KIB))
            wait_until(lambda: stack.store.get(long).state is State.DOWNLOADING, 10, "the long download")  # type: ignore[union-attr]
            done = wait_for(stack.store, first, timeout=60)
            assert wait_for(stack.store, long, timeout=30).state is State.DONE
        # ... yet nothing took it back: it is done on its first attempt, announced 6 times (the
        # 503s, then the delivery) under one webhook-id, never downloaded again
        assert done.state is State.DONE and done.attempts == 1, done
        assert len(origin.requests_for("/first.mp4")) == 1
        ids = [d.id for d in receiver.received() if json.loads(d.body)["data"]["id"] == first]
        assert len(ids) == 6 and len(set(ids)) == 1
        assert "lease expired" not in sup.output()
    finally:
        stack.close()


def test_a_lost_message_of_a_resting_task_is_sent_again_with_its_token(store: TaskStore) -> None:
    from tests.test_store import finalizing

    # Given one finalize slot held, a task waiting for it (next message due at NOW + 3), and a
    # task parked while its receiver is down (due at NOW + 12) ...
    holder, holder_token = finalizing(store)
    assert store.enter_finalize(holder, holder_token, now=NOW + 2, lease_seconds=30, limit=1, due=0)[0] == "ok"
    waiting, token = finalizing(store)
    entry, waiting_token = store.enter_finalize(waiting, token, now=NOW + 2, lease_seconds=30, limit=1, due=NOW + 3)
    parked_id, token = finalizing(store)
    parked_token = store.park(parked_id, token, now=NOW + 2, due=NOW + 12, failing_since=NOW + 1, error="503")
    assert entry == "full" and parked_token is not None
    sent: list[tuple[str, int, float]] = []

    def send(task_id: str, token: int, failing_since: float) -> None:
        sent.append((task_id, token, failing_since))

    # ... nothing is re-sent while their messages may still come ...
    assert sweeps.resend_finalizes(store, NOW + 12, send_finalize=send, grace_seconds=60) == 0
    # ... once overdue by the grace, each is re-sent once, with the token it expects
    assert sweeps.resend_finalizes(store, NOW + 64, send_finalize=send, grace_seconds=60) == 1
    assert sweeps.resend_finalizes(store, NOW + 73, send_finalize=send, grace_seconds=60) == 1
    assert sent == [(waiting, waiting_token, 0.0), (parked_id, parked_token, NOW + 1)]
    assert sweeps.resend_finalizes(store, NOW + 80, send_finalize=send, grace_seconds=60) == 0
    # The message (the lost one or the new one) enters with that token; the other is stale
    assert store.enter_finalize(parked_id, parked_token, now=NOW + 81, lease_seconds=30, limit=0, due=0)[0] == "ok"
    assert store.enter_finalize(parked_id, parked_token, now=NOW + 81, lease_seconds=30, limit=0, due=0)[0] == "stale"
    assert sweeps.resend_finalizes(store, NOW + 500, send_finalize=send, grace_seconds=60) == 1  # the waiting one


def test_a_claim_lost_between_requeue_and_send_goes_out_at_the_next_sweep(store: TaskStore) -> None:
    # Given two tasks whose worker died (their leases ran out) ...
    specs = [spec_from_manifest({"files": [{"url": f"https://cdn.example.com/{n}.mp4", "path": f"{n}.mp4"}]})
             for n in range(2)]  # fmt: skip
    ids = [store.create(spec, NOW)[0] for spec in specs]
    for task_id in ids:
        assert store.claim(task_id, worker="w", now=NOW, lease_seconds=10, max_attempts=5).ok
    sent: list[str] = []

    def send_then_lose_redis(task_id: str) -> None:
        if not sent:
            sent.append("lost")
            raise redis.ConnectionError("connection lost mid-sweep")
        sent.append(task_id)

    # ... when the sweep that queues them again loses Redis before their messages are sent ...
    with pytest.raises(redis.ConnectionError):
        sweeps.requeue_stuck(store, NOW + 20, max_attempts=5, send_claim=send_then_lose_redis, on_dead=sent.append)
    assert all(store.get(t).state is State.QUEUED for t in ids)  # type: ignore[union-attr]
    # ... the next sweep sends both (not the orphan rescue, minutes later), and only once
    outcome = sweeps.requeue_stuck(
        store, NOW + 21, max_attempts=5, send_claim=send_then_lose_redis, on_dead=sent.append
    )
    assert outcome["resent"] == 2 and sorted(sent[1:]) == sorted(ids)
    assert sweeps.requeue_stuck(store, NOW + 22, max_attempts=5, send_claim=sent.append, on_dead=sent.append) == {}
    assert len(sent) == 3


@pytest.mark.e2e
def test_a_parked_task_whose_message_is_lost_is_finalized_all_the_same(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    # Given a task parked while its receiver is down, holding no lease ...
    stack = Stack(tmp_path, receiver, HAUL_RETRY_MIN_SECONDS="1", HAUL_ORPHAN_SECONDS="1")
    try:
        first = stack.worker(threads=1)
        with running(first):
            receiver.statuses.extend([503] * 5)
            task_id = submit(stack, origin, "lost.mp4", os.urandom(64 * KIB))
            wait_until(lambda: parked(stack.store) == {task_id}, 30, "the task to park")
            # ... when its worker is killed and Redis loses every queued message (the delayed
            # finalize message with them) ...
            first.kill()
        doomed = [key for key in stack.store.client.scan_iter(match="dramatiq:*")]
        stack.store.client.delete(*doomed)
        # ... the supervisor sends the message again, and a new worker finishes the task
        second, sup = stack.worker(threads=1), stack.supervisor()
        with running(second, sup):
            task = wait_for(stack.store, task_id, timeout=30)
        assert task.state is State.DONE and task.attempts == 1, task
        assert "finalize message is overdue" in sup.output()
    finally:
        stack.close()
