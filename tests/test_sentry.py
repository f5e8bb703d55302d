"""Sentry with a real local endpoint: a worker's permanent failure and the supervisor's dead
task, vanished worker and failing sweep arrive as events with haul's tags, and no secret is in
any envelope."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from actors.manifest import spec_from_urls
from actors.registry import HEARTBEAT_SECONDS, MISSED_HEARTBEATS, WorkerRegistry
from actors.store import TaskStore
from tests import processes
from tests.conftest import WEBHOOK_SECRET
from tests.processes import running, submitted, wait_until
from tests.redisserver import RedisServer
from tests.sentry_sink import SentrySink
from tests.servers import Origin, Receiver, Site, free_port

pytestmark = pytest.mark.e2e

SIGNED = "TOPSECRETSIGNATURE"
URL_PASSWORD = "s3cretpass"
REDIS_PASSWORD = "hunter2redispass"


@pytest.fixture
def sink() -> Any:
    server = SentrySink()
    yield server
    server.close()


def assert_no_secret(sink: SentrySink) -> None:
    raw = sink.all_bytes()
    for secret in (WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_"), SIGNED, URL_PASSWORD, REDIS_PASSWORD):
        at = raw.find(secret.encode())
        assert at < 0, (secret, raw[max(0, at - 300) : at + 50])


def test_worker_reports_a_permanent_failure_with_tags_and_no_secrets(
    tmp_path: Path, redis_url: str, store: TaskStore, origin: Origin, receiver: Receiver, sink: SentrySink
) -> None:
    env = processes.stack_env(tmp_path, redis_url, receiver.url, HAUL_SENTRY_DSN=sink.dsn)
    url = f"http://user:{URL_PASSWORD}@127.0.0.1:{origin.port}/missing.mp4?sig={SIGNED}"
    worker = processes.worker(env, tmp_path / "worker.log")
    with running(worker):
        result = subprocess.run(
            [sys.executable, "-m", "supervisor.cli", "submit", url], env=env, capture_output=True, text=True
        )
        task_id = result.stdout.strip().splitlines()[-1]
        wait_until(lambda: store.get(task_id).state.value == "failed", 30, "the task to fail")  # type: ignore[union-attr]
        wait_until(lambda: sink.events(), 15, "a Sentry event")
        worker.terminate()
    [event] = sink.events()
    tags = dict(event["tags"]) if isinstance(event["tags"], dict) else {k: v for k, v in event["tags"]}
    assert tags["task_id"] == task_id and tags["stage"] == "downloading" and tags["attempt"] == "1"
    assert tags["origin_host"] == "127.0.0.1"
    assert "404" in json.dumps(event)
    task = store.get(task_id)
    assert task is not None and URL_PASSWORD not in task.error and SIGNED not in task.error
    assert_no_secret(sink)
    assert URL_PASSWORD not in worker.output() and SIGNED not in worker.output()


def test_a_page_files_cookie_and_header_reach_no_sentry_event(
    tmp_path: Path, redis_url: str, store: TaskStore, origin: Origin, receiver: Receiver, sink: SentrySink
) -> None:
    """A page behind a sign-in resolves with the task's cookie and header; its media is gone,
    the task fails, and the report to Sentry holds neither."""
    cookie, header = "SENTRYcookie0x5eed", "SENTRYheader0xcafe"
    site = Site()
    try:
        site.required = ("Cookie", f"session={cookie}")
        page = site.page("/lesson", f'<html><body><video src="{origin.url("/gone.mp4")}"></video></body></html>')
        manifest = tmp_path / "page.json"
        manifest.write_text(json.dumps({
            "files": [{"page": page, "path": "lesson.mp4"}], "headers": {"X-Course-Token": header},
            "cookies": f"# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tsession\t{cookie}\n",
        }))  # fmt: skip
        env = processes.stack_env(tmp_path, redis_url, receiver.url, HAUL_SENTRY_DSN=sink.dsn,
                                  HAUL_HOST_MIN_INTERVAL_SECONDS="0")  # fmt: skip
        worker = processes.worker(env, tmp_path / "worker.log")
        with running(worker):
            task_id = submitted(env, manifest)
            wait_until(lambda: store.get(task_id).state.value == "failed", 60, "the task to fail")  # type: ignore[union-attr]
            wait_until(lambda: sink.events(), 15, "a Sentry event")
            worker.terminate()
        assert site.requests and all(r.headers.get("X-Course-Token") == header for r in site.requests)
        assert "origin_404" in json.dumps(sink.events())
        raw = sink.all_bytes()
        assert cookie.encode() not in raw and header.encode() not in raw
        assert cookie not in worker.output() and header not in worker.output()
    finally:
        site.close()


def test_supervisor_reports_dead_tasks_failing_sweeps_and_checks_in(
    tmp_path: Path, sink: SentrySink, receiver: Receiver
) -> None:
    server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD)
    server.start()
    port = free_port()
    env = processes.stack_env(
        tmp_path, server.url, receiver.url,
        HAUL_MAX_ATTEMPTS="1", HAUL_LEASE_SECONDS="3", HAUL_SWEEP_SECONDS="0.3",
        HAUL_SUPERVISOR_PORT=str(port), HAUL_SENTRY_DSN=sink.dsn,
    )  # fmt: skip
    store = TaskStore.from_url(server.url)
    try:
        # Given a task whose only attempt's worker vanished long ago
        task_id, _ = store.create(spec_from_urls(["https://cdn.example.com/v.mp4"]), now=time.time())
        store.claim(task_id, worker="gone:1", now=time.time() - 60, lease_seconds=3, max_attempts=1)
        sup = processes.supervisor(env, tmp_path / "sup.log")
        with running(sup):
            wait_until(lambda: any(task_id in json.dumps(e) for e in sink.events()), 20, "the dead-task event")
            assert store.get(task_id).state.value == "dead"  # type: ignore[union-attr]
            # Each sweep checks in as its own cron monitor (prune runs every minute: not yet)
            every = {
                "haul-requeue-stuck", "haul-rescue-orphans", "haul-resend-finalizes", "haul-resend-notices",
                "haul-watch-workers", "haul-check-config",
            }  # fmt: skip
            wait_until(lambda: {c["monitor_slug"] for c in sink.check_ins()} >= every, 10, "every sweep's check-in")
            # When Redis goes away, the sweeps raise and each failure is an event
            server.stop()
            wait_until(
                lambda: any("ConnectionError" in json.dumps(e) for e in sink.events()), 20, "a sweep-error event"
            )
            wait_until(lambda: str((processes.health(port) or {}).get("redis")).startswith("unreachable"), 10, "503")
            sup.terminate()
        dead = next(e for e in sink.events() if task_id in json.dumps(e))
        assert f"task {task_id} is dead" in dead["message"] or task_id in json.dumps(dead.get("logentry", {}))
        assert {c["status"] for c in sink.check_ins()} >= {"in_progress", "ok"}
        assert_no_secret(sink)
    finally:
        server.stop()


def test_supervisor_reports_a_worker_killed_with_sigkill(
    tmp_path: Path, redis_url: str, store: TaskStore, receiver: Receiver, sink: SentrySink
) -> None:
    env = processes.stack_env(
        tmp_path, redis_url, receiver.url, HAUL_SWEEP_SECONDS="0.5", HAUL_SENTRY_DSN=sink.dsn
    )  # fmt: skip
    registry = WorkerRegistry(store.client)
    worker = processes.worker(env, tmp_path / "worker.log")
    sup = processes.supervisor(env, tmp_path / "sup.log")
    with running(worker, sup):
        wait_until(lambda: registry.workers(), 30, "the worker to register")
        [info] = registry.workers()
        # When the worker's whole process group dies at once (no shutdown hook runs)
        worker.kill()
        wait_until(
            lambda: any("stopped sending heartbeats" in json.dumps(e) for e in sink.events()),
            HEARTBEAT_SECONDS * MISSED_HEARTBEATS + 15, "the vanished-worker event",
        )  # fmt: skip
        sup.terminate()
    event = next(e for e in sink.events() if "stopped sending heartbeats" in json.dumps(e))
    tags = dict(event["tags"]) if isinstance(event["tags"], dict) else {k: v for k, v in event["tags"]}
    assert tags["worker"] == info.id and str(info.pid) in json.dumps(event)
    assert registry.workers() == []


def test_no_secret_in_logs_webhooks_metrics_or_sentry(
    tmp_path: Path, origin: Origin, receiver: Receiver, sink: SentrySink
) -> None:
    import requests

    server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD)
    server.start()
    sup_port, metrics_port = free_port(), free_port()
    env = processes.stack_env(
        tmp_path, server.url, receiver.url,
        HAUL_SENTRY_DSN=sink.dsn, HAUL_SWEEP_SECONDS="0.3", HAUL_SUPERVISOR_PORT=str(sup_port),
        HAUL_WORKER_METRICS_PORT=str(metrics_port), HAUL_WORKER_METRICS_DIR=str(tmp_path / "metrics"),
    )  # fmt: skip
    worker = processes.Process(
        [sys.executable, "-m", "supervisor.cli", "worker", "--processes", "1", "--threads", "2"],
        env,
        tmp_path / "worker.log",
    )
    sup = processes.supervisor(env, tmp_path / "sup.log")
    try:
        with running(worker, sup):
            good = f"http://user:{URL_PASSWORD}@127.0.0.1:{origin.port}/ok.mp4?sig={SIGNED}"
            origin.put("/ok.mp4", b"fine")
            bad = f"http://user:{URL_PASSWORD}@127.0.0.1:{origin.port}/gone.mp4?sig={SIGNED}"
            ids = []
            for url in (good, bad):
                result = subprocess.run(
                    [sys.executable, "-m", "supervisor.cli", "submit", url], env=env, capture_output=True, text=True
                )
                assert result.returncode == 0, result.stderr
                ids.append(result.stdout.strip().splitlines()[-1])
            wait_until(lambda: len(receiver.accepted()) == 2, 30, "both webhooks")
            wait_until(lambda: sink.events(), 15, "the failure's Sentry event")
            texts = [
                requests.get(f"http://127.0.0.1:{sup_port}/metrics", timeout=5).text,
                requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text,
            ]
            texts.append(all_command_lines())  # what `ps` shows
            worker.terminate()
            sup.terminate()
        texts += [worker.output(), sup.output()]
        texts += [repr(d.headers) + d.body.decode() for d in receiver.deliveries]
        assert {d.event["type"] for d in receiver.accepted()} == {"task.completed", "task.failed"}
        assert "haul_tasks" in texts[0] and "dramatiq_messages_total" in texts[1]
        assert ids[0] in worker.output()  # the worker log does talk about the tasks
        for text in texts:
            for secret in (WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_"), SIGNED, URL_PASSWORD, REDIS_PASSWORD):
                assert secret not in text, (secret, text[max(0, text.find(secret) - 200) : text.find(secret) + 50])
        assert_no_secret(sink)
    finally:
        server.stop()


def all_command_lines() -> str:
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return "\n".join(lines)
