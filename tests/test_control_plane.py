"""The supervisor's control plane on real Redis servers: leadership follows sweep progress (a
sweep blocked in Python or on a stalled connection hands the lock to a standby), a sweep never
acts on a lock it does not hold, and /healthz means someone leads and sweeps (503 with a reason
otherwise, one Sentry event per incident, no crash on a read-only Redis)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from actors.manifest import spec_from_urls
from actors.states import State
from actors.store import TaskStore
from supervisor.daemon import Supervisor
from tests import processes
from tests.conftest import ClaimsOnly
from tests.processes import base_env, running, wait_until
from tests.redisserver import RedisServer
from tests.sentry_sink import SentrySink
from tests.servers import TcpProxy, free_port

#: Added to every time bound: scheduling jitter of threads and processes on a busy machine.
SLACK_SECONDS = 0.5


@pytest.fixture
def fast(settings: Any) -> Any:
    """Sweeps every 0.2 s: a lock of 1 s, an election every 1/3 s."""
    return settings.replace(lease_seconds=2, sweep_seconds=0.2)


@pytest.fixture
def aof(redis_client: redis.Redis) -> Iterator[None]:
    """The session's Redis keeps an append-only file synced on every write meanwhile."""
    redis_client.config_set("appendonly", "yes")
    redis_client.config_set("appendfsync", "always")
    yield
    redis_client.config_set("appendonly", "no")


@pytest.fixture
def sink() -> Iterator[SentrySink]:
    server = SentrySink()
    yield server
    server.close()


def expired_task(store: TaskStore) -> str:
    """A task whose worker vanished a minute ago: its lease ran out long since."""
    task_id, _ = store.create(spec_from_urls(["https://cdn.example.com/v.mp4"]), now=time.time())
    store.claim(task_id, worker="gone:1", now=time.time() - 60, lease_seconds=2, max_attempts=5)
    return task_id


def test_a_sweep_blocked_in_python_hands_the_lock_to_the_standby_and_sends_nothing_more(
    fast: Any, store: TaskStore, redis_url: str, aof: None
) -> None:
    gate = threading.Event()
    blocked_at: list[float] = []
    sent: dict[str, list[str]] = {"a": [], "b": []}

    def send_blocking(task_id: str) -> None:
        sent["a"].append(task_id)
        if len(sent["a"]) == 1:
            blocked_at.append(time.monotonic())
            gate.wait(30)  # a sweep blocked in Python (a lock, a DNS lookup, a bug)

    a = Supervisor(
        fast,
        TaskStore.from_url(redis_url),
        ClaimsOnly(send_blocking),
        node_id="a",
    )
    b = Supervisor(
        fast,
        TaskStore.from_url(redis_url),
        ClaimsOnly(sent["b"].append),
        node_id="b",
    )
    a.start()
    b.start()
    try:
        assert a.is_leader and not b.is_leader
        # Given two tasks whose worker vanished, and the leader's sweep blocked on the first claim
        ids = {expired_task(store), expired_task(store)}
        wait_until(lambda: blocked_at, 5, "the leader's sweep to block")
        # When the sweep stays blocked, the leader lets the lock go and the standby takes it
        bound = a.lock_seconds + fast.sweep_seconds
        wait_until(lambda: b.is_leader and store.leader() == "b", bound + 5, "the standby to take over")
        took = time.monotonic() - blocked_at[0]
        assert took <= bound + SLACK_SECONDS, f"took {took:.2f}s, more than the lock's TTL plus a sweep"
        # ... and sends both claims, which waited in the outbox
        wait_until(lambda: ids <= set(sent["b"]), 5, "the new leader to send the claims")
        healthy, body = a.health()
        assert not healthy and body["role"] == "standby" and "requeue_stuck" in body["reason"], body
        healthy, body = b.health()
        assert healthy and body["role"] == "leader", body
        # Then the old leader's sweep, woken up, sends nothing more: it lost the lock
        gate.set()
        time.sleep(3 * fast.sweep_seconds)
        assert len(sent["a"]) == 1, sent
        assert b.is_leader and not a.is_leader
    finally:
        gate.set()
        a.stop()
        b.stop()


def test_a_sweep_starts_only_while_the_lock_is_held(fast: Any, store: TaskStore) -> None:
    sent: list[str] = []
    task_id = expired_task(store)
    # Given a leader whose lock Redis now gives to another replica (it expired, and was taken)
    a = Supervisor(fast, store, ClaimsOnly(sent.append), node_id="a")
    a.elect()
    assert a.is_leader
    store.client.set(store.leader_key, "b", px=5000)
    # When its sweep comes, it acts on nothing
    a.jobs.requeue_stuck()
    assert sent == []
    # Given a leader whose last renewal is older than the lock's safe share by its own clock
    # (its process was paused), though Redis still names it
    store.client.delete(store.leader_key)
    c = Supervisor(fast, store, ClaimsOnly(sent.append), node_id="c")
    c.elect()
    assert c.is_leader
    time.sleep(c.lock_seconds * 0.85)
    assert store.leader() == "c"
    c.jobs.requeue_stuck()
    assert sent == []
    task = store.get(task_id)
    assert task is not None and task.state is State.CLAIMED  # nothing was touched


def test_no_sweep_job_runs_while_another_replica_holds_the_lock(fast: Any, store: TaskStore) -> None:
    sent: list[str] = []
    expired_task(store)
    # Given a replica that lost the election to another
    store.client.set(store.leader_key, "b", px=5000)
    a = Supervisor(fast, store, ClaimsOnly(sent.append), node_id="a")
    a.elect()
    assert not a.is_leader
    # When each of its jobs comes: none of them sweeps, sends or records a run
    for job, run in a.jobs.by_name().items():
        run()
        assert a.metrics.registry.get_sample_value("haul_sweep_duration_seconds_count", {"job": job}) is None, job
    assert sent == []
    # ... while as leader every one of them runs, each under its own name
    store.client.delete(store.leader_key)
    a.elect()
    assert a.is_leader
    for job, run in a.jobs.by_name().items():
        run()
        assert a.metrics.registry.get_sample_value("haul_sweep_duration_seconds_count", {"job": job}) == 1, job
    assert len(sent) == 1


class StallingProxy(TcpProxy):
    """A proxy in front of a redis-server that, once armed, stops forwarding on the connection
    that carries a request holding every one of ``marks``: that request and everything after
    it, both ways, while the connection stays open (a half-open connection, or a Redis that
    stopped answering, as its client sees it)."""

    def __init__(self, target_port: int, marks: tuple[bytes, ...]) -> None:
        self.marks = marks
        self.armed = threading.Event()
        self.stalled_at: float | None = None
        super().__init__(target_port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def passes(self, data: bytes) -> bool:
        if self.armed.is_set() and all(mark in data for mark in self.marks):
            self.stalled_at = self.stalled_at or time.monotonic()
            return False
        return True


def supervisor_env(tmp_path: Path, redis_url: str, port: int, **more: str) -> dict[str, str]:
    return base_env(
        HAUL_REDIS_URL=redis_url, HAUL_SUPERVISOR_PORT=str(port), HAUL_SWEEP_SECONDS="0.5",
        HAUL_STAGING_DIR=str(tmp_path / "staging"), HAUL_STORAGE_DIR=str(tmp_path / "storage"), **more,
    )  # fmt: skip


@pytest.mark.e2e
def test_a_sweep_stalled_on_its_redis_connection_hands_the_lock_to_the_standby(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    # The requeue sweep's read of expired leases; the leader's other calls (its elections) go through
    proxy = StallingProxy(server.port, (b"ZRANGEBYSCORE", b"haul:leases"))
    ports = [free_port(), free_port()]
    leader = processes.supervisor(supervisor_env(tmp_path, proxy.url, ports[0]), tmp_path / "leader.log")
    standby: processes.Process | None = None
    try:
        wait_until(lambda: (processes.health(ports[0]) or {}).get("role") == "leader", 30, "the first to lead")
        standby = processes.supervisor(supervisor_env(tmp_path, server.url, ports[1]), tmp_path / "standby.log")
        wait_until(lambda: (processes.health(ports[1]) or {}).get("role") == "standby", 30, "the standby")
        # When the leader's requeue sweep stalls on its connection (Redis never answers it)
        proxy.armed.set()
        wait_until(lambda: proxy.stalled_at is not None, 5, "the sweep to stall")
        # Then the standby leads within the lock's TTL (1.5 s) plus a sweep (0.5 s)
        wait_until(lambda: (processes.health(ports[1]) or {}).get("role") == "leader", 10, "the takeover")
        took = time.monotonic() - (proxy.stalled_at or 0.0)
        assert took <= 1.5 + 0.5 + SLACK_SECONDS, f"took {took:.2f}s"
        body = processes.health(ports[1]) or {}
        assert body["healthy"] is True and TaskStore.from_url(server.url).leader() == body["node"], body
        # ... and the stalled replica, still running, stands aside and says why
        assert leader.popen.poll() is None
        old = processes.health(ports[0]) or {}
        assert old["role"] == "standby" and old["healthy"] is False and "requeue_stuck" in str(old["reason"]), old
    finally:
        leader.close()
        if standby is not None:
            standby.close()
        proxy.close()
        server.stop()


def unhealthy_events(sink: SentrySink, cause: str = "") -> list[dict[str, Any]]:
    return [e for e in sink.events() if "is unhealthy" in json.dumps(e) and cause in json.dumps(e)]


@pytest.mark.e2e
def test_a_supervisor_on_a_read_only_redis_keeps_running_says_why_and_alerts_once_per_incident(
    tmp_path: Path, sink: SentrySink
) -> None:
    primary = RedisServer(tmp_path / "primary", appendonly=True)
    replica = RedisServer(tmp_path / "replica", appendonly=True)
    primary.start()
    replica.start()
    to_replica = redis.Redis(port=replica.port)
    port = free_port()
    try:
        # Given a Redis that is a replica of another: it answers PING, and refuses every write
        to_replica.replicaof("127.0.0.1", primary.port)
        sup = processes.supervisor(
            supervisor_env(tmp_path, replica.url, port, HAUL_SENTRY_DSN=sink.dsn), tmp_path / "sup.log"
        )
        with running(sup):
            wait_until(lambda: "READONLY" in str((processes.health(port) or {}).get("reason")), 20, "a 503")
            answer = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            assert answer.status_code == 503
            assert "point HAUL_REDIS_URL at the primary" in answer.json()["reason"]
            assert answer.json()["role"] == "standby" and answer.json()["redis"] == "ok"
            # When a dozen elections (0.5 s apart) find it read-only: still running, one event
            time.sleep(6)
            assert sup.popen.poll() is None, sup.output()
            wait_until(lambda: unhealthy_events(sink), 5, "the incident's event")
            [event] = unhealthy_events(sink)
            assert "READONLY" in json.dumps(event)
            assert not [e for e in sink.events() if "ReadOnlyError" in json.dumps(e)]  # no error per interval
            # When the replica is promoted, the supervisor leads and is healthy: the incident ends
            to_replica.replicaof("NO", "ONE")
            wait_until(lambda: (processes.health(port) or {}).get("healthy") is True, 10, "health to return")
            assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            # ... and when it turns read-only again, that is a second incident, a second event
            to_replica.replicaof("127.0.0.1", primary.port)
            wait_until(lambda: len(unhealthy_events(sink, "READONLY")) == 2, 10, "the second incident's event")
            sup.terminate()
    finally:
        to_replica.close()
        replica.stop()
        primary.stop()


def test_a_standby_is_healthy_only_while_another_replica_holds_and_renews_the_lock(
    fast: Any, store: TaskStore, aof: None
) -> None:
    a = Supervisor(fast, store, ClaimsOnly(), node_id="a")
    b = Supervisor(fast, store, ClaimsOnly(), node_id="b")
    a.elect()
    b.elect()
    healthy, body = b.health()
    assert healthy and body["role"] == "standby", body
    # Given a lock that names a replica which does not renew it (set by hand, with a long TTL)
    store.client.set(store.leader_key, "ghost", px=60_000)
    b.elect()
    election = b.lock_seconds / 3
    deadline = time.monotonic() + b.lock_seconds + election + 2
    while b.health()[0] and time.monotonic() < deadline:
        time.sleep(election)
        b.elect()
    healthy, body = b.health()
    assert not healthy and "ghost has not renewed its lock" in body["reason"], body
    # Given a lock without any expiry: nobody could ever take over
    store.client.persist(store.leader_key)
    b.elect()
    healthy, body = b.health()
    assert not healthy and "has no expiry" in body["reason"], body
    # When it is deleted, the standby takes the lock and is healthy again
    store.client.delete(store.leader_key)
    b.elect()
    healthy, body = b.health()
    assert healthy and body["role"] == "leader" and body["leader"] == "b", body


def start_redis_without_config(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """A redis-server with CONFIG disabled, as managed Redis services have it."""
    folder.mkdir(parents=True, exist_ok=True)
    server = shutil.which("redis-server")
    assert server is not None
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
         "--appendonly", "yes", "--appendfsync", "always", "--rename-command", "CONFIG", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    wait_until(lambda: _answers(client), 10, "redis-server to answer")
    client.close()
    return process


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_managed_redis_without_config_is_reported_as_unknown_not_as_a_problem(fast: Any, tmp_path: Path) -> None:
    port = free_port()
    process = start_redis_without_config(tmp_path / "managed", port)
    store = TaskStore.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        sup = Supervisor(fast, store, ClaimsOnly(), node_id="a")
        sup.elect()
        sup.jobs.requeue_stuck()
        healthy, body = sup.health()
        assert healthy, body
        assert str(body.get("persistence")).startswith("unknown: CONFIG is disabled"), body
    finally:
        store.client.close()
        process.terminate()
        process.wait(10)
