"""The lease keeper on a real Redis: renewal follows the working thread's steps, not its bytes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from actors.errors import LeaseLost
from actors.lease import LEASE_SAFETY, LeaseKeeper
from actors.manifest import spec_from_urls
from actors.states import State

pytestmark = pytest.mark.fast

LEASE = 1.0


def claimed(store: Any) -> tuple[str, int]:
    task_id, _ = store.create(spec_from_urls(["http://origin.example/a.mp4"]), now=time.time())
    claim = store.claim(task_id, worker="w", now=time.time(), lease_seconds=LEASE, max_attempts=5)
    assert claim.ok
    return task_id, claim.token


@pytest.fixture
def keeper(store: Any) -> Iterator[LeaseKeeper]:
    keeper = LeaseKeeper(store, LEASE)
    yield keeper
    keeper.stop()


def lease_until(store: Any, task_id: str) -> float:
    return float(store.client.hget(store.task_key(task_id), "lease_until"))


def test_a_step_within_its_deadline_keeps_the_lease_without_a_byte(store: Any, keeper: LeaseKeeper) -> None:
    task_id, token = claimed(store)
    with keeper.hold(task_id, token, since=time.monotonic()) as lease:
        # Given a step (a read, a webhook call) that may take 3 s, three leases long ...
        lease.step(3.0, "waiting for the origin")
        time.sleep(2.5 * LEASE)
        # ... the lease was renewed meanwhile and the holder may still write
        assert lease_until(store, task_id) > time.time()
        lease.check()


def test_a_step_past_its_deadline_stops_renewal_and_trips_the_fence(store: Any, keeper: LeaseKeeper) -> None:
    task_id, token = claimed(store)
    with keeper.hold(task_id, token, since=time.monotonic()) as lease:
        # Given a step that should have ended at once (deadline = its slack) ...
        lease.step(0.0, "hashing")
        lease.main.deadline = time.monotonic()  # no slack: a thread hung at once
        time.sleep(LEASE * (LEASE_SAFETY + 0.3))
        # ... nothing renews it, and the holder refuses to write before the lease runs out
        with pytest.raises(LeaseLost, match="lease not renewed"):
            lease.check()
        assert lease_until(store, task_id) <= time.time() + LEASE * (1 - LEASE_SAFETY)


def test_a_cancel_is_seen_by_the_keeper_and_wakes_a_blocked_step(store: Any, keeper: LeaseKeeper) -> None:
    task_id, token = claimed(store)
    closed = threading.Event()

    class Socket:
        def close(self) -> None:
            closed.set()

    with keeper.hold(task_id, token, since=time.monotonic()) as lease, lease.guard(Socket()):
        lease.step(30.0, "waiting for the origin")
        # When an operator cancels the task while the thread waits on a socket ...
        assert store.cancel(task_id, time.time()) == "ok"
        # ... the keeper's next renewal finds the token moved on and closes the socket
        assert closed.wait(5 * LEASE)
        with pytest.raises(LeaseLost, match="took the task over"):
            lease.check()
    assert store.get(task_id).state is State.CANCELED


def test_many_leases_are_renewed_together_with_their_progress(store: Any) -> None:
    keeper = LeaseKeeper(store, 30.0)
    held = [claimed(store) for _ in range(3)]
    with (
        keeper.hold(*held[0], since=time.monotonic(), figures=lambda: (5, 10, 0)),
        keeper.hold(*held[1], since=time.monotonic()),
        keeper.hold(*held[2], since=time.monotonic()),
    ):
        assert keeper.renew_due() == 3
    task = store.get(held[0][0])
    assert (task.bytes_done, task.bytes_total) == (5, 10)
    keeper.stop()
