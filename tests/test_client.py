"""Importing haul does nothing but define names; a backend submits through an explicit client
built from Settings; the worker's entry is the one module that sets a process up. Each check runs
in a fresh Python process, since an import can only be observed once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from actors.settings import Settings
from actors.states import State
from actors.store import TaskStore
from tests.conftest import in_process_worker, wait_for
from tests.processes import REPO, base_env
from tests.servers import Origin, Receiver, free_port

#: What the CLI's read-only commands must not load (each costs tens of milliseconds at start).
HEAVY = ("dramatiq", "sentry_sdk", "requests", "apscheduler", "prometheus_client")


def python(code: str, **haul: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=base_env(**haul),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_importing_every_module_reads_no_environment_and_starts_nothing() -> None:
    # Given a bad HAUL_LEASE_SECONDS and a Redis URL where nothing listens
    result = python(
        """
        import importlib, json, logging, pkgutil, threading
        import actors, supervisor
        names = [m.name for p in (actors, supervisor) for m in pkgutil.iter_modules(p.__path__, p.__name__ + ".")]
        for name in names:
            if name not in ("actors.worker", "supervisor.__main__"):  # the two entries
                importlib.import_module(name)
        import dramatiq.broker, sentry_sdk
        print(json.dumps({
            "modules": len(names),
            "threads": threading.active_count(),
            "broker": dramatiq.broker.global_broker is not None,
            "sentry": sentry_sdk.get_client().is_active(),
            "log_handlers": len(logging.getLogger().handlers),
            "record_factory": logging.getLogRecordFactory() is logging.LogRecord,
        }))
        """,
        HAUL_LEASE_SECONDS="bad",
        HAUL_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        HAUL_SENTRY_DSN="http://public@127.0.0.1:9/1",
    )
    # Then every import succeeds, and nothing was built, started or replaced
    assert result.returncode == 0 and result.stderr == "", result.stderr
    seen = json.loads(result.stdout)
    assert seen["modules"] > 30
    assert seen == seen | {"threads": 1, "broker": False, "sentry": False, "log_handlers": 0, "record_factory": True}


def test_the_worker_entry_alone_reads_the_environment_and_says_what_is_wrong() -> None:
    result = python("import actors.worker", HAUL_LEASE_SECONDS="bad")
    assert result.returncode == 2 and "HAUL_LEASE_SECONDS" in result.stderr and "Traceback" not in result.stderr


def test_status_loads_no_heavy_library_and_submit_only_dramatiq(redis_url: str, origin: Origin) -> None:
    result = python(
        f"""
        import contextlib, io, json, sys
        from supervisor.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            codes = [main(["status", "--json"])]
            status = sorted(m for m in {HEAVY!r} if m in sys.modules)
            codes.append(main(["submit", {origin.put("/a.mp4", b"a")!r}]))
        print(json.dumps({{"codes": codes, "status": status,
                           "submit": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
        """,
        HAUL_REDIS_URL=redis_url,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"codes": [0, 0], "status": [], "submit": ["dramatiq"]}


def test_a_backend_submits_through_a_client_built_from_settings_alone(
    settings: Settings, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    # Given a backend process with no usable HAUL_* variable, passing its Settings explicitly
    url = origin.put("/lesson.mp4", b"lesson one")
    result = python(
        f"""
        from actors.client import Client
        from actors.settings import Settings
        haul = Client(Settings(redis_url={settings.redis_url!r}))
        task_id = haul.submit([{url!r}], name="Course 7", key="order-7")
        assert haul.submit([{url!r}], name="Course 7", key="order-7") == task_id  # idempotent
        print(task_id, haul.get(task_id).state.value)
        haul.close()
        """,
        HAUL_LEASE_SECONDS="bad",
        HAUL_REDIS_URL="redis://127.0.0.1:1/0",
    )
    assert result.returncode == 0, result.stderr
    task_id, state = result.stdout.split()
    assert state == "queued"
    # When a worker runs, the claim message the client sent through its own broker is taken
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, task_id)
    assert task.state is State.DONE and task.spec.key == "order-7"
    assert (settings.storage_dir / task_id / "lesson.mp4").read_bytes() == b"lesson one"
    assert [d.event["type"] for d in receiver.accepted()] == ["task.completed"]
