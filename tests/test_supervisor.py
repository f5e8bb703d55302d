"""The supervisor in-process with a real Dramatiq worker: /healthz and /metrics, configuration
checks, leader election."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests

from actors.manifest import spec_from_manifest
from actors.registry import WorkerInfo, WorkerRegistry
from actors.states import State
from actors.store import TaskStore
from supervisor import limits
from supervisor.daemon import Supervisor
from supervisor.http import create_server, serve_in_background
from tests.conftest import dramatiq_supervisor, in_process_worker, part_bytes, submit_spec
from tests.processes import wait_until
from tests.servers import Fault, Origin, Receiver

MIB = 1024 * 1024


@pytest.fixture
def fast(settings: Any) -> Any:
    return settings.replace(lease_seconds=2, sweep_seconds=0.2)


@pytest.fixture
def supervisor(fast: Any, store: Any) -> Iterator[Supervisor]:
    sup = dramatiq_supervisor(fast, store, node_id="test-sup")
    yield sup
    if sup.scheduler.running:
        sup.stop()


def test_healthz_and_metrics(supervisor: Supervisor, store: Any, redis_url: str) -> None:
    server = create_server("127.0.0.1", 0, supervisor.metrics.registry, supervisor.health)
    serve_in_background(server)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        supervisor.start()
        # A leader that sweeps, on a Redis without an append-only file, is not healthy: a Redis
        # restart would lose acknowledged writes
        health = requests.get(f"{base}/healthz", timeout=5)
        assert health.status_code == 503
        reason = health.json()["reason"]
        assert "appendonly no" in reason and "`appendonly yes` and `appendfsync always`" in reason, reason
        store.client.config_set("appendonly", "yes")
        wait_until(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 200, 5, "health with AOF on")
        body = requests.get(f"{base}/healthz", timeout=5).json()
        assert body["role"] == "leader" and body["redis"] == "ok" and body["last_sweep_age_seconds"] < 5
        assert body["leader"] == "test-sup" and body["persistence"] == "appendonly yes, appendfsync always"
        text = requests.get(f"{base}/metrics", timeout=5).text
        for name in (
            'haul_tasks{state="queued"}', "haul_supervisor_leader 1.0", "haul_last_sweep_age_seconds",
            "haul_sweep_duration_seconds_bucket", "haul_workers", "haul_config_problems",
            'haul_stage_limit{stage="download_per_host"}', "haul_staged_bytes",
        ):  # fmt: skip
            assert name in text, name
        assert requests.get(f"{base}/nope", timeout=5).status_code == 404
    finally:
        server.shutdown()
        server.server_close()
        store.client.config_set("appendonly", "no")


def test_a_leader_whose_sweeps_fail_is_unhealthy(fast: Any, store: Any, redis_url: str) -> None:
    # Given a supervisor whose Redis user may run everything but the sweep's first read
    store.client.config_set("appendonly", "yes")
    store.client.acl_setuser("haul-sup", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                             categories=["+@all"], commands=["-zrangebyscore"])  # fmt: skip
    client = redis.Redis.from_url(redis_url, username="haul-sup", password="pw")
    sup = dramatiq_supervisor(fast, TaskStore(client), node_id="failing")
    try:
        sup.start()
        # Then it leads, but once its sweeps have failed for a while it says so
        assert sup.is_leader
        wait_until(lambda: not sup.health()[0], sup.lock_seconds + 10, "a 503")
        healthy, body = sup.health()
        assert body["role"] == "leader" and "requeue sweep has not succeeded" in body["reason"], body
        assert (sup.metrics.registry.get_sample_value("haul_sweep_errors_total", {"job": "requeue_stuck"}) or 0) > 0
    finally:
        sup.stop()
        client.close()
        store.client.acl_deluser("haul-sup")
        store.client.config_set("appendonly", "no")


def scraped(base: str, sample: str) -> float:
    """The value of one sample line of ``/metrics`` (``name{labels}``), 0 when absent."""
    for line in requests.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_dead_tasks_are_counted_wherever_they_die(supervisor: Supervisor, store: Any) -> None:
    server = create_server("127.0.0.1", 0, supervisor.metrics.registry, supervisor.health)
    serve_in_background(server)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    now = time.time()
    spec = spec_from_manifest({"files": [{"url": "https://cdn.example.com/v.mp4", "path": "v.mp4"}]})
    try:
        assert "# TYPE haul_dead_tasks_total counter" in requests.get(f"{base}/metrics", timeout=5).text
        assert scraped(base, "haul_dead_tasks_total") == 0
        # A worker's run that used the last attempt releases its task to dead ...
        in_run = submit_spec(spec, store)
        claim = store.claim(in_run, worker="w1", now=now, lease_seconds=10, max_attempts=1)
        assert store.release(in_run, claim.token, State.QUEUED, now=now, error="503", max_attempts=1) == State.DEAD
        assert scraped(base, "haul_dead_tasks_total") == 1
        # ... and so does a claim that finds an expired lease with every attempt used
        in_claim = submit_spec(spec, store)
        store.claim(in_claim, worker="w1", now=now, lease_seconds=10, max_attempts=1)
        assert store.claim(in_claim, worker="w2", now=now + 20, lease_seconds=10, max_attempts=1).outcome == "dead"
        assert scraped(base, "haul_dead_tasks_total") == 2
        # Pruning dead records (their task.failed delivered) lowers the gauge of dead tasks,
        # never the count of deaths
        for task_id in store.ids(State.DEAD):
            store.end_notice(task_id, run=0)
        assert len(store.prune_ended(cutoff=now + 60)) == 2
        assert scraped(base, 'haul_tasks{state="dead"}') == 0 and scraped(base, "haul_dead_tasks_total") == 2
    finally:
        server.shutdown()
        server.server_close()


def test_only_one_of_two_supervisors_leads_and_the_other_takes_over(fast: Any, store: Any) -> None:
    first = dramatiq_supervisor(fast, store, node_id="a")
    second = dramatiq_supervisor(fast, store, node_id="b")
    first.elect()
    second.elect()
    assert first.is_leader and not second.is_leader and store.leader() == "a"
    # When the leader dies without resigning, the lock expires and the standby takes over
    deadline = time.monotonic() + first.lock_seconds + 1
    while not second.is_leader and time.monotonic() < deadline:
        time.sleep(0.1)
        second.elect()
    assert second.is_leader and store.leader() == "b"


def test_config_mismatches_are_named(fast: Any, store: Any, caplog: pytest.LogCaptureFixture) -> None:
    registry = WorkerRegistry(store.client)
    registry.register(WorkerInfo("w1", "h", 1, ("claim",), 8, 0.0), now=time.time())
    mismatched = fast.replace(lease_seconds=2, sweep_seconds=5, download_concurrency=3, download_per_host=13,
                              task_parallel_files=2, split=2)  # fmt: skip
    problems = limits.check(mismatched, registry.workers())
    text = json.dumps(problems)
    assert "HAUL_LEASE_SECONDS=2" in text and "HAUL_SWEEP_SECONDS=5" in text and "'finalize' queue" in text
    assert "HAUL_DOWNLOAD_PER_HOST=13 is above the 12 connections" in text  # 3 tasks x 2 files x 2
    # Each thread of a worker of an older haul opens one connection; of this one, files x split
    assert "HAUL_DOWNLOAD_PER_HOST=13 is above the 8 connections the worker threads" in text
    registry.register(WorkerInfo("w1", "h", 1, ("claim",), 8, 0.0, connections=2), now=time.time())
    assert not any("connections the worker threads" in p for p in limits.check(mismatched, registry.workers()))
    # Seed 003: a download limit of 5 in front of 3 threads leaves tasks behind busy threads
    registry.register(WorkerInfo("w1", "h", 1, ("claim", "finalize"), 3, 0.0), now=time.time())
    problems = limits.check(fast.replace(download_concurrency=5), registry.workers())
    assert any("HAUL_DOWNLOAD_CONCURRENCY=5 is above the 3 worker threads" in p for p in problems), problems
    sup = dramatiq_supervisor(fast, store)
    with caplog.at_level(logging.ERROR):
        assert sup.check_config()
    assert sup.metrics.registry.get_sample_value("haul_config_problems") == len(sup.check_config())


def test_redis_that_may_lose_acknowledged_writes_is_reported(store: Any) -> None:
    client = store.client
    try:
        for appendonly, fsync, save, expected in (
            ("no", "always", "3600 1", "RDB snapshots only (save 3600 1)"),  # snapshots lose minutes
            ("yes", "everysec", "", "loses up to a second of the writes it already acknowledged"),
            ("yes", "no", "", "appendfsync no"),
            ("no", "always", "", "no snapshots either"),
        ):
            client.config_set("save", save)
            client.config_set("appendfsync", fsync)
            client.config_set("appendonly", appendonly)
            [problem] = limits.check_redis(client)
            assert expected in problem and "appendfsync always" in problem, problem
        client.config_set("appendfsync", "always")
        client.config_set("appendonly", "yes")
        assert limits.check_redis(client) == []
    finally:
        client.config_set("appendonly", "no")
        client.config_set("appendfsync", "always")
        client.config_set("save", "")


def test_a_graceful_stop_wakes_a_download_blocked_on_a_silent_origin(
    store: Any, origin: Origin, receiver: Receiver, settings: Any
) -> None:
    data = os.urandom(3 * MIB)
    url = origin.put("/silent.mp4", data)
    # Given an origin that goes silent for longer than the read timeout (5 s here) ...
    origin.fault("/silent.mp4", Fault("stall", after=MIB, seconds=20))
    with in_process_worker(settings, store, threads=1) as running:
        task_id = submit_spec(spec_from_manifest({"files": [{"url": url, "path": "v.mp4"}]}), store)
        sandbox = settings.staging_dir / task_id
        deadline = time.monotonic() + 10
        while part_bytes(sandbox) < MIB and time.monotonic() < deadline:
            time.sleep(0.02)
        # ... a stop does not wait for it: the blocked read is woken and the task handed back
        started = time.monotonic()
        running.worker.stop()
        took = time.monotonic() - started
    task = store.get(task_id)
    assert took < 3, f"stop took {took:.1f}s"
    assert task.state.value == "queued" and task.attempts == 0 and "handed back" in task.error
    assert part_bytes(sandbox) >= MIB  # the bytes so far are kept for whoever resumes
