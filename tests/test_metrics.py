"""The supervisor's /metrics over real HTTP and a real Redis: what a scrape reads (a few known
keys, never a scan of the keyspace) and the figures that say why claims pause."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from actors.manifest import spec_from_urls
from actors.registry import WorkerRegistry
from actors.states import State
from actors.store import StageLimits, TaskStore
from supervisor.http import create_server, serve_in_background
from supervisor.metrics import Metrics

pytestmark = pytest.mark.fast

LIMITS = {"download": 100, "download_per_host": 10, "finalize": 3, "staging_bytes": 0}


@pytest.fixture
def metrics_url(store: TaskStore) -> Iterator[str]:
    metrics = Metrics(store, WorkerRegistry(store.client, store.prefix), lambda: None, LIMITS)
    server = create_server("127.0.0.1", 0, metrics.registry, lambda: (True, {}))
    serve_in_background(server)
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def scrape(url: str) -> dict[str, float]:
    """Every sample of one GET of /metrics, by ``name{labels}``."""
    text = requests.get(url, timeout=5).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def new_task(store: TaskStore, host: str, now: float) -> str:
    return store.create(spec_from_urls([f"https://{host}/v.mp4"]), now=now)[0]


def claim(store: TaskStore, task_id: str, now: float, limits: StageLimits) -> int:
    taken = store.claim(task_id, worker="w", now=now, lease_seconds=300, max_attempts=5, limits=limits)
    assert taken.ok, taken
    return taken.token


def test_a_scrape_reads_the_slot_sets_it_knows_and_never_scans(store: TaskStore, metrics_url: str) -> None:
    # Given 3,000 stored tasks, 20 of them holding download slots on 4 hosts
    now = time.time()
    hosts = [f"cdn{n % 4}.example.com" for n in range(3000)]
    ids = [new_task(store, host, now) for host in hosts]
    limits = StageLimits(downloads=LIMITS["download"], downloads_per_host=LIMITS["download_per_host"])
    for task_id in ids[:20]:
        claim(store, task_id, now, limits)
    # ... and a host whose only slot was freed (its set is gone, and so is its listing)
    gone = new_task(store, "gone.example.com", now)
    store.release(gone, claim(store, gone, now, limits), State.QUEUED, now=now, max_attempts=5)
    store.client.config_resetstat()
    # When /metrics is scraped
    samples = scrape(metrics_url)
    # Then the slots come from the set listing the slot sets, and the keyspace was not scanned
    stats = store.client.info("commandstats")
    assert "cmdstat_scan" not in stats and "cmdstat_keys" not in stats
    assert stats["cmdstat_smembers"]["calls"] == 1
    hosts_used = [f"host:{host}" for host in sorted(set(hosts))]
    assert store.client.smembers(f"{store.prefix}slotkeys") == {
        f"{store.prefix}slots:{name}".encode() for name in ("download", *hosts_used)
    }
    assert samples['haul_stage_slots_in_use{slots="download"}'] == 20
    assert 'haul_stage_slots_in_use{slots="host:gone.example.com"}' not in samples
    for n in range(4):
        assert samples[f'haul_stage_slots_in_use{{slots="host:cdn{n}.example.com"}}'] == 5
    assert samples['haul_tasks{state="queued"}'] == 2981 and samples['haul_tasks{state="claimed"}'] == 20
    # A scrape runs a few dozen commands, whatever the number of tasks
    assert sum(int(s["calls"]) for s in stats.values()) < 30


def test_parked_tasks_the_finalize_backlog_and_refused_claims(store: TaskStore, metrics_url: str) -> None:
    # Given nothing stored yet, every figure reads 0 (the finalize backlog's limit is 2 x finalize)
    samples = scrape(metrics_url)
    assert samples["haul_tasks_parked"] == 0 and samples["haul_finalize_backlog"] == 0
    assert samples['haul_stage_limit{stage="finalize_backlog"}'] == 2 * LIMITS["finalize"]
    for reason in ("download", "download_per_host", "staging_bytes", "finalize_backlog"):
        assert samples[f'haul_claims_refused_total{{reason="{reason}"}}'] == 0
    # Given three tasks finalizing, one of them parked while its storage is down
    now = time.time()
    tokens = {}
    for n in range(3):
        task_id = new_task(store, f"cdn{n}.example.com", now)
        tokens[task_id] = claim(store, task_id, now, StageLimits())
        for source, target in ((State.CLAIMED, State.DOWNLOADING), (State.DOWNLOADING, State.FINALIZING)):
            assert store.advance(task_id, tokens[task_id], source, target, now=now, lease_seconds=300)
    parked = next(iter(tokens))
    assert store.park(parked, tokens[parked], now=now, due=now + 60, failing_since=now, error="storage down")
    # ... a download slot taken, and claims refused: one by the download limit, one by the backlog
    holder, refused, waiting = (new_task(store, "cdn9.example.com", now) for _ in range(3))
    claim(store, holder, now, StageLimits(downloads=1))
    assert store.claim(refused, worker="w", now=now, lease_seconds=300, max_attempts=5,
                       limits=StageLimits(downloads=1)).outcome == "full"  # fmt: skip
    assert store.claim(waiting, worker="w", now=now, lease_seconds=300, max_attempts=5,
                       limits=StageLimits(finalize_backlog=2)).outcome == "full"  # fmt: skip
    # When /metrics is scraped
    samples = scrape(metrics_url)
    # Then the operator sees the parked task apart from the backlog, and why claims paused
    assert samples['haul_tasks{state="finalizing"}'] == 3
    assert samples["haul_tasks_parked"] == 1
    assert samples["haul_finalize_backlog"] == 2
    assert samples['haul_claims_refused_total{reason="download"}'] == 1
    assert samples['haul_claims_refused_total{reason="finalize_backlog"}'] == 1
    assert samples['haul_claims_refused_total{reason="download_per_host"}'] == 0
    assert samples['haul_claims_refused_total{reason="staging_bytes"}'] == 0
    assert samples['haul_stage_slots_in_use{slots="download"}'] == 1


def test_bytes_and_seconds_per_stage_add_up_over_every_worker(store: TaskStore, metrics_url: str) -> None:
    # Given nothing counted yet, both stages read 0
    samples = scrape(metrics_url)
    for stage in ("download", "finalize"):
        assert samples[f'haul_stage_bytes_total{{stage="{stage}"}}'] == 0
        assert samples[f'haul_stage_seconds_total{{stage="{stage}"}}'] == 0
    # When two workers' lease keepers add what their runs did (with no lease to renew)
    now = time.time()
    store.renew_many([], now=now, lease_seconds=30, tallies={"download": (5 * 1024, 1.5)})
    store.renew_many([], now=now, lease_seconds=30, tallies={"download": (1024, 0.25), "finalize": (6 * 1024, 0.5)})
    # Then the supervisor shows the sums, whichever replica is scraped
    samples = scrape(metrics_url)
    assert samples['haul_stage_bytes_total{stage="download"}'] == 6 * 1024
    assert samples['haul_stage_seconds_total{stage="download"}'] == 1.75
    assert samples['haul_stage_bytes_total{stage="finalize"}'] == 6 * 1024
    assert samples['haul_stage_seconds_total{stage="finalize"}'] == 0.5
