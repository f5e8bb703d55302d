"""Redis losing its latest writes: fencing tokens never repeat, and a holder Redis forgot stops.

Redis can come back older than it was: a host crash with ``appendfsync everysec`` loses the
last second, an RDB-only Redis restarts from its last snapshot, a replica that had not caught
up is promoted. Every write since that point is forgotten, a fencing counter included; a
counter would then hand a live holder's token to the next worker (issue 11, item 3). Tokens
come from the Redis server's clock instead (``next_token`` in ``actors/lua/_lib.lua``), so
one issued after a rollback differs from every one issued before it.

Each test here makes a real redis-server forget: it copies the data (``RedisServer.snapshot``:
a SAVE with RDB only, or the append-only folder), goes on, then SIGKILLs Redis and starts it
on the same port from the copy (``RedisServer.restore``). What a rollback cannot undo is
spelled out where it shows: a completion Redis forgot is delivered again (same webhook-id,
same files; the event's timestamp is that of the new announcement).

Past 300 lines: each test restarts a real redis-server from older data of its own.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

from actors.manifest import spec_from_manifest, spec_from_urls
from actors.states import CancelReply, State
from actors.store import Claim, Renewal, TaskStore
from tests.conftest import wait_for
from tests.processes import Process, running, wait_until
from tests.redisserver import RedisServer
from tests.servers import Origin, Receiver
from tests.test_faults import Stack

KIB, MIB = 1024, 1024 * 1024
SPEC = spec_from_urls(["https://cdn.example.com/a.mp4"], name="A", key="order-11")
LEASE = 30.0
MAX_ATTEMPTS = 5


@pytest.fixture(params=["rdb", "aof"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of its own: RDB only (``--save ""``, snapshots by SAVE) or append-only."""
    redis_server = RedisServer(tmp_path / "redis", appendonly=request.param == "aof")
    redis_server.start()
    yield redis_server
    redis_server.stop()


@pytest.fixture
def store(server: RedisServer) -> Iterator[TaskStore]:
    task_store = TaskStore.from_url(server.url)
    yield task_store
    task_store.client.close()


def claim(store: TaskStore, task_id: str, worker: str, now: float) -> Claim:
    c = store.claim(
        task_id, worker=worker, now=now, lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS, start=State.DOWNLOADING
    )
    assert c.ok, c
    return c


def assert_fenced(store: TaskStore, task_id: str, token: int, now: float) -> None:
    """Every write of the holder of ``token`` is refused, and a read says it holds nothing."""
    assert not store.holds(task_id, token)
    assert not store.heartbeat(task_id, token, now=now, lease_seconds=LEASE, bytes_done=1, bytes_total=2, files_done=0)
    assert store.renew_many([Renewal(task_id, token)], now=now, lease_seconds=LEASE) == [False]
    assert store.release(task_id, token, State.DONE, now=now, max_attempts=MAX_ATTEMPTS) is None
    assert store.announce(task_id, token, now=now, lease_seconds=LEASE) is None


# -- the store on a Redis that forgets ------------------------------------------------------


def test_a_claim_redis_forgot_never_hands_its_token_to_the_next_worker(
    server: RedisServer, store: TaskStore, tmp_path: Path
) -> None:
    # Given a task in the data Redis will come back with (a snapshot, or the AOF as it was)
    now = time.time()
    task_id, _ = store.create(SPEC, now=now)
    copy = server.snapshot(tmp_path / "before-the-claim")
    issued: dict[int, str] = {}
    holder = claim(store, task_id, "worker-A", now)
    issued[holder.token] = "worker-A"
    assert store.heartbeat(
        task_id, holder.token, now=now, lease_seconds=LEASE, bytes_done=5, bytes_total=9, files_done=0
    )
    # Three times, from the same copy (a restart from one old backup, twice over)
    for n, worker in enumerate(["worker-B", "worker-C", "worker-D"], start=1):
        # When Redis is killed and comes back from the copy, the claims since are forgotten
        server.restore(copy)
        task = store.get(task_id)
        assert task is not None and task.state is State.QUEUED and task.attempts == 0, task
        # Then the next claim gets a token no worker was ever given
        now = time.time()
        taker = claim(store, task_id, worker, now)
        assert taker.token not in issued, f"restore {n}: {worker} got token {taker.token} of {issued[taker.token]}"
        # and every earlier holder, still running, is refused: its renewals, its release(done)
        for token in issued:
            assert_fenced(store, task_id, token, now)
        assert store.holds(task_id, taker.token)
        task = store.get(task_id)
        assert task is not None and task.token == taker.token and task.worker == worker
        assert task.state is State.DOWNLOADING
        issued[taker.token] = worker


def test_a_requeue_after_a_rollback_issues_a_new_token(server: RedisServer, store: TaskStore, tmp_path: Path) -> None:
    # Given a claim whose lease has run out in the copy
    now = time.time()
    task_id, _ = store.create(SPEC, now=now)
    first = claim(store, task_id, "worker-A", now - 2 * LEASE)
    copy = server.snapshot(tmp_path / "expired")
    # The supervisor takes it back (new token) and worker B claims it (another)
    assert store.requeue_expired([task_id], now=now, max_attempts=MAX_ATTEMPTS) == ["queued"]
    requeued = store.get(task_id)
    assert requeued is not None
    b = claim(store, task_id, "worker-B", now)
    issued = {first.token, requeued.token, b.token}
    assert len(issued) == 3
    # When Redis comes back from the copy, and the supervisor takes the task back again
    server.restore(copy)
    now = time.time()
    assert store.requeue_expired([task_id], now=now, max_attempts=MAX_ATTEMPTS) == ["queued"]
    again = store.get(task_id)
    assert again is not None and again.state is State.QUEUED
    # Then its token is none of those issued before the rollback, nor is the next claim's
    assert again.token not in issued
    c = claim(store, task_id, "worker-C", now)
    assert c.token not in issued and c.token != again.token
    assert_fenced(store, task_id, b.token, now)  # B, still downloading, is refused


def test_a_cancel_after_a_rollback_issues_a_new_token(server: RedisServer, store: TaskStore, tmp_path: Path) -> None:
    # Given worker A downloading in the copy
    now = time.time()
    task_id, _ = store.create(SPEC, now=now)
    a = claim(store, task_id, "worker-A", now)
    copy = server.snapshot(tmp_path / "downloading")
    # An operator cancels (new token), retries (another), worker B claims (another)
    assert store.cancel(task_id, now) is CancelReply.OK
    canceled = store.get(task_id)
    assert canceled is not None
    assert store.retry(task_id, now) == "ok"
    retried = store.get(task_id)
    assert retried is not None
    b = claim(store, task_id, "worker-B", now + LEASE + 1)  # after A's fence (fenced_until)
    issued = {a.token, canceled.token, retried.token, b.token}
    assert len(issued) == 4
    # When Redis comes back from the copy and the operator cancels again
    server.restore(copy)
    now = time.time()
    assert store.cancel(task_id, now) is CancelReply.OK
    # Then the cancel's token is none of those issued before, and B is refused
    task = store.get(task_id)
    assert task is not None and task.state is State.CANCELED
    assert task.token not in issued
    assert_fenced(store, task_id, b.token, now)
    assert_fenced(store, task_id, a.token, now)


def test_a_retry_after_a_rollback_issues_a_new_token(server: RedisServer, store: TaskStore, tmp_path: Path) -> None:
    # Given a failed task in the copy
    now = time.time()
    task_id, _ = store.create(SPEC, now=now)
    a = claim(store, task_id, "worker-A", now)
    assert (
        store.release(task_id, a.token, State.FAILED, now=now, error="404", max_attempts=MAX_ATTEMPTS) is State.FAILED
    )
    copy = server.snapshot(tmp_path / "failed")
    # An operator retries it (new token) and worker B claims it (another)
    assert store.retry(task_id, now) == "ok"
    retried = store.get(task_id)
    assert retried is not None
    b = claim(store, task_id, "worker-B", now)
    issued = {a.token, retried.token, b.token}
    assert len(issued) == 3
    # When Redis comes back from the copy and the operator retries again
    server.restore(copy)
    now = time.time()
    assert store.retry(task_id, now) == "ok"
    again = store.get(task_id)
    assert again is not None
    # Then neither the retry's token nor the next claim's was issued before, and B is refused
    assert again.token not in issued
    c = claim(store, task_id, "worker-C", now)
    assert c.token not in issued
    assert_fenced(store, task_id, b.token, now)


def test_entering_finalize_after_a_rollback_issues_a_new_token(
    server: RedisServer, store: TaskStore, tmp_path: Path
) -> None:
    # Given a task finalizing in the copy, its finalize message holding the token
    now = time.time()
    task_id, _ = store.create(SPEC, now=now)
    a = claim(store, task_id, "worker-A", now)
    entry = store.finish_download(task_id, a.token, now=now, lease_seconds=LEASE, progress=(9, 9, 1), finalize_limit=0)
    assert entry == ("ok", a.token)
    copy = server.snapshot(tmp_path / "finalizing")
    # Worker F1 takes the message: finalize's own token; it announces the completion
    outcome, f1 = store.enter_finalize(task_id, a.token, now=now, lease_seconds=LEASE, limit=0, due=now)
    assert outcome == "ok"
    assert store.announce(task_id, f1, now=now, lease_seconds=LEASE) is not None
    # When Redis comes back from the copy, and the message is delivered again (to F2)
    server.restore(copy)
    now = time.time()
    outcome, f2 = store.enter_finalize(task_id, a.token, now=now, lease_seconds=LEASE, limit=0, due=now)
    # Then F2's token is not F1's, and F1, still finalizing, is refused
    assert outcome == "ok"
    assert f2 not in (a.token, f1)
    assert_fenced(store, task_id, f1, now)
    assert store.release(task_id, f2, State.DONE, now=now, max_attempts=MAX_ATTEMPTS) is State.DONE


# -- real workers on a Redis that forgets ---------------------------------------------------


def group_of(pgid: int) -> set[int]:
    """The pids of process group ``pgid`` (a worker and the processes Dramatiq forks)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
                pids.add(int(entry))
    return pids


def open_under(pgid: int, folder: Path) -> list[str]:
    """Files under ``folder`` that process group ``pgid`` holds open."""
    found = []
    for pid in group_of(pgid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(f"{folder}/"):
                found.append(f"{pid}: {target}")
    return found


def held_by(store: TaskStore, task_id: str, worker: Process) -> bool:
    """Whether the task is active and its claim names a process of ``worker``'s group."""
    task = store.get(task_id)
    pid = task.worker.rsplit(":", 1)[-1] if task is not None else ""
    return task is not None and task.state.active and pid.isdigit() and int(pid) in group_of(worker.popen.pid)


def send_claim(redis_url: str, task_id: str) -> None:
    broker = RedisBroker(url=redis_url)  # type: ignore[no-untyped-call]
    try:
        broker.enqueue(Message(queue_name="claim", actor_name="claim", args=(task_id,), kwargs={}, options={}))
    finally:
        broker.close()


def submit(stack: Stack, origin: Origin, path: str, data: bytes) -> str:
    """Create the task (sha256 and size declared) without its claim message."""
    entry = {"url": origin.put(f"/{path}", data), "path": path, "size": len(data)}
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    task_id, _ = stack.store.create(spec_from_manifest({"files": [entry]}), now=time.time())
    return task_id


@pytest.mark.e2e
def test_a_worker_whose_claim_redis_forgot_stops_writing_and_the_task_completes_once(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    # A long lease and read timeout: worker A's own fence must not be what stops it, only its
    # token being refused.
    stack = Stack(
        tmp_path, receiver, HAUL_LEASE_SECONDS="60", HAUL_READ_TIMEOUT_SECONDS="30",
        HAUL_ORPHAN_SECONDS="1", HAUL_SWEEP_SECONDS="0.3",
    )  # fmt: skip
    processes: list[Process] = []
    try:
        data = os.urandom(6 * MIB)
        origin.rate = 512 * KIB  # 12 s for the whole file
        # Given a task Redis will come back with, and worker A downloading it
        task_id = submit(stack, origin, "lesson.mp4", data)
        copy = stack.redis.snapshot(tmp_path / "before-the-claim")
        sandbox = Path(stack.env["HAUL_STAGING_DIR"]) / task_id
        a = stack.worker(threads=1)
        processes.append(a)
        send_claim(stack.redis.url, task_id)
        wait_until(lambda: origin.served["/lesson.mp4"] >= MIB, 30, "worker A to download 1 MiB")
        assert held_by(stack.store, task_id, a)
        claimed = stack.store.get(task_id)
        assert claimed is not None
        # When Redis loses A's claim (killed, restarted from the copy) and worker B claims the
        # task before A's next renewal (A is paused meanwhile: the order in which a counter
        # handed B the token A holds)
        os.killpg(a.popen.pid, signal.SIGSTOP)
        try:
            stack.redis.restore(copy)
            forgotten = stack.store.get(task_id)
            assert forgotten is not None and forgotten.state is State.QUEUED and forgotten.token == 0
            b, sup = stack.worker(threads=1), stack.supervisor()
            processes += [b, sup]  # the supervisor re-sends the claim message Redis forgot
            wait_until(lambda: held_by(stack.store, task_id, b), 30, "worker B to claim the task")
        finally:
            os.killpg(a.popen.pid, signal.SIGCONT)
        taken = stack.store.get(task_id)
        assert taken is not None
        # Then A's next renewal is refused and it stops writing: it holds no file of the task
        # open, and the origin sends to one client only
        try:
            wait_until(lambda: not open_under(a.popen.pid, sandbox), 8, "worker A to close the task's files")
        except AssertionError:
            raise AssertionError(
                f"worker A still writes {open_under(a.popen.pid, sandbox)} after B claimed the task "
                f"(A's token {claimed.token}, B's token {taken.token}); A's log:\n{a.output()[-2000:]}"
            ) from None
        wait_until(lambda: origin.in_flight["/lesson.mp4"] <= 1, 5, "the origin to notice A went away")
        assert taken.token != claimed.token
        assert a.popen.poll() is None  # A lives on, only the task was taken from it
        task = wait_for(stack.store, task_id, timeout=90)
        # and the task completes once, with its files whole
        assert task.state is State.DONE, task.error
        completed = [d for d in receiver.deliveries if d.event["type"] == "task.completed"]
        assert len(completed) == 1 and completed[0].id == f"{task_id}.task.completed.0", completed
        stored = stack.storage / task_id / "lesson.mp4"
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
        assert sorted(p.relative_to(stack.storage).as_posix() for p in stack.storage.rglob("*") if p.is_file()) == [
            f"{task_id}/lesson.mp4"
        ]
        assert not open_under(a.popen.pid, sandbox)
    finally:
        with running(*processes):
            pass
        stack.close()


@pytest.mark.e2e
def test_a_completion_redis_forgot_is_delivered_again_under_the_same_webhook_id(
    tmp_path: Path, origin: Origin, receiver: Receiver
) -> None:
    """What a rollback cannot undo: the backend heard task.completed, Redis forgot it. The task
    runs again and announces again: same webhook-id, same files; the event's timestamp is
    the new announcement's (Redis forgot the first one too), so a receiver must dedupe on the
    webhook-id, not on the body."""
    stack = Stack(tmp_path, receiver, HAUL_ORPHAN_SECONDS="1", HAUL_SWEEP_SECONDS="0.3")
    try:
        data = os.urandom(512 * KIB)
        # Given a task Redis will come back with, completed after the copy was taken
        task_id = submit(stack, origin, "clip.mp4", data)
        copy = stack.redis.snapshot(tmp_path / "before-the-claim")
        worker, sup = stack.worker(), stack.supervisor()
        with running(worker, sup):
            send_claim(stack.redis.url, task_id)
            assert wait_for(stack.store, task_id, timeout=60).state is State.DONE
            first = [d for d in receiver.deliveries if d.event["type"] == "task.completed"]
            # When Redis comes back from the copy: the task is queued again, never claimed
            stack.redis.restore(copy)
            task = stack.store.get(task_id)
            assert task is not None and task.state is State.QUEUED
            # Then it runs again (the supervisor re-sends its lost message) and ends done
            wait_until(
                lambda: len([d for d in receiver.deliveries if d.event["type"] == "task.completed"]) > len(first),
                60,
                "the second announcement",
            )
            task = wait_for(stack.store, task_id, timeout=60)
        assert task.state is State.DONE and task.attempts == 1
        completed = [d for d in receiver.deliveries if d.event["type"] == "task.completed"]
        assert len(first) == 1 and len(completed) == 2
        # under the same webhook-id, with the same files
        assert {d.id for d in completed} == {f"{task_id}.task.completed.0"}
        assert completed[0].event["data"] == completed[1].event["data"]
        assert (stack.storage / task_id / "clip.mp4").read_bytes() == data
        assert all(d.verified for d in completed)
    finally:
        stack.close()
