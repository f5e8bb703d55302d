"""The leader's report for the operator dashboard (supervisor/report.py) on a real Redis: written
by the lock's holder after its requeue sweeps and configuration checks, never by a standby, read
with the lock in one round trip, and gone once no supervisor renews it."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from actors.registry import WorkerInfo, WorkerRegistry
from actors.store import TaskStore
from actors.store_base import text_of
from supervisor import report
from supervisor.configcheck import Checked
from supervisor.daemon import Supervisor
from tests.conftest import WEBHOOK_SECRET, ClaimsOnly


@pytest.fixture
def fast(settings: Any) -> Any:
    """Sweeps every 0.2 s; a lease of 2 s, too short for one slow Redis call: a problem to report."""
    return settings.replace(lease_seconds=2, sweep_seconds=0.2)


def report_ttl(store: TaskStore) -> float:
    return int(store.client.pttl(store.report_key)) / 1000


def test_the_leader_reports_its_last_sweep_and_what_its_configuration_check_found(fast: Any, store: TaskStore) -> None:
    # Given no supervisor yet: no report
    assert store.supervisor_report() is None
    a = Supervisor(fast, store, ClaimsOnly(), node_id="a")
    # When a replica checks its configuration at start, before it may lead: nothing is published
    problems = a.check_config()
    assert any("HAUL_LEASE_SECONDS=2 leaves no room" in p for p in problems), problems
    assert any("appendonly no" in p for p in problems), problems  # the session Redis keeps no AOF
    assert store.supervisor_report() is None
    # When it leads and its requeue sweep ends
    a.elect()
    a.jobs.requeue_stuck()
    # Then the report names it, its sweep, and the problems its check found (persistence too)
    found = store.supervisor_report()
    assert found is not None and found.node == "a" and found.leader == "a" and found.from_leader
    assert found.last_sweep == pytest.approx(a.jobs.last_sweep, abs=0.001)
    assert found.problems == tuple(problems) and found.checked_at is not None
    assert found.lock_seconds_left is not None and 0 < found.lock_seconds_left <= a.lock_seconds
    # ... kept a few sweeps (at least a minute), so a dead supervisor's report goes away
    assert report.report_seconds(fast.sweep_seconds) == 60
    assert 59 < report_ttl(store) <= 60
    # When a worker that consumes only 'claim' registers, the next check says so
    WorkerRegistry(store.client, store.prefix).register(WorkerInfo("w1", "h", 1, ("claim",), 8, 0.0), now=time.time())
    a.jobs.check_config()
    later = store.supervisor_report()
    assert later is not None and later.checked_at is not None and later.checked_at >= found.checked_at
    assert any("no registered worker consumes the 'finalize' queue" in p for p in later.problems), later
    assert later.last_sweep == found.last_sweep


def test_a_standby_never_overwrites_the_leader_s_report(fast: Any, store: TaskStore) -> None:
    # Given a leader that reported, and a standby whose own check found other problems
    a = Supervisor(fast, store, ClaimsOnly(), node_id="a")
    b = Supervisor(fast.replace(lease_seconds=30), store, ClaimsOnly(), node_id="b")
    a.check_config()
    a.elect()
    a.jobs.requeue_stuck()
    b.check_config()
    b.elect()
    assert a.is_leader and not b.is_leader
    # When the standby's jobs come, and even when it writes directly (a sweep that outlived its lock)
    b.jobs.requeue_stuck()
    b.jobs.check_config()
    assert not store.publish_report("b", ttl_seconds=60, last_sweep=time.time(), checked_at=None, problems=[])
    # Then the report is still the leader's
    found = store.supervisor_report()
    assert found is not None and found.node == "a" and any("HAUL_LEASE_SECONDS=2" in p for p in found.problems)
    # When the leader resigns, its report stays until the next leader's, which replaces it whole
    a.lead.resign()
    gone = store.supervisor_report()
    assert gone is not None and gone.node == "a" and gone.leader is None and not gone.from_leader
    b.elect()
    b.jobs.requeue_stuck()
    taken = store.supervisor_report()
    assert taken is not None and taken.node == "b" and taken.from_leader
    assert not any("HAUL_LEASE_SECONDS" in p for p in taken.problems), taken


def test_a_report_nobody_renews_disappears(store: TaskStore) -> None:
    store.client.set(store.leader_key, "a", px=5000)
    assert store.publish_report("a", ttl_seconds=0.2, last_sweep=None, checked_at=None, problems=[])
    found = store.supervisor_report()
    assert found is not None and found.last_sweep is None and found.checked_at is None and found.problems == ()
    time.sleep(0.3)
    assert store.supervisor_report() is None


def test_no_secret_reaches_the_report(fast: Any, store: TaskStore) -> None:
    # Given a problem whose text held the webhook secret, URL credentials and a signed query
    # (no check writes such text today; a storage error quoting its service might)
    a = Supervisor(fast, store, ClaimsOnly(), node_id="a")
    a.config.last = Checked(
        time.time(),
        (f"probe at https://key:hunter22@minio.example.com/b/x?X-Amz-Signature=f00d refused ({WEBHOOK_SECRET})",),
    )
    a.elect()
    a.jobs.requeue_stuck()
    # Then what Redis holds has none of them
    stored = json.dumps({text_of(k): text_of(v) for k, v in store.client.hgetall(store.report_key).items()})
    assert "minio.example.com" in stored
    for secret in ("hunter22", "f00d", WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_")):
        assert secret not in stored, stored
