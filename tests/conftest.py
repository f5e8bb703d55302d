"""Shared fixtures: a real redis-server on a free port (its URL in HAUL_REDIS_URL for the
processes tests start), real HTTP peers, test settings, a backend's client, and an in-process
Dramatiq worker."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from actors.broker import worker_broker
from actors.client import Client
from actors.messages import QUEUES, Messages, redis_broker
from actors.runtime import Runtime
from actors.sandbox import Sandbox
from actors.settings import Settings
from actors.states import State
from actors.store import TaskStore
from actors.task import FileSpec, Task, TaskSpec
from supervisor.daemon import Supervisor
from tests.redisserver import RedisServer
from tests.servers import Origin, Receiver

#: A fixed test secret (Standard Webhooks format); never a real one.
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


_SESSION: dict[str, Any] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak-tasks", type=int, default=60, help="tasks in the fault soak (300 or more for a long run)")
    parser.addoption(
        "--guarantee-tasks", type=int, default=24,
        help="tasks in the randomized-timing property test (tests/test_guarantees.py); 300 for a long run",
    )  # fmt: skip
    parser.addoption(
        "--guarantee-seed", type=int, default=None,
        help="seed of that test's plan and fault schedule (default: a fresh one, printed); replays a failure",
    )  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    folder = Path(tempfile.mkdtemp(prefix="haul-test-redis-"))
    server = RedisServer(folder)
    server.start()
    _SESSION["redis"] = server
    os.environ["HAUL_REDIS_URL"] = server.url
    for name in [n for n in os.environ if n.startswith("HAUL_") and n != "HAUL_REDIS_URL"]:
        del os.environ[name]


def pytest_unconfigure(config: pytest.Config) -> None:
    sender = _SESSION.pop("messages", None)
    if sender is not None:
        sender.broker.close()
    server = _SESSION.pop("redis", None)
    if server is not None:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture
def redis_url() -> str:
    return str(_SESSION["redis"].url)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def store(redis_client: redis.Redis) -> TaskStore:
    return TaskStore(redis_client)


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(WEBHOOK_SECRET)
    yield server
    server.close()


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, receiver: Receiver) -> Settings:
    return Settings(
        redis_url=redis_url,
        staging_dir=tmp_path / "staging",
        storage_dir=tmp_path / "storage",
        webhook_url=receiver.url,
        webhook_secrets=(WEBHOOK_SECRET,),
        lease_seconds=10,
        max_attempts=5,
        retry_min_seconds=0.05,
        retry_max_seconds=0.2,
        allow_private_networks=True,
        host_min_interval_seconds=0,  # page pacing is tested on its own
        connect_timeout_seconds=2,
        read_timeout_seconds=5,
    )


def runtime_for(settings: Settings, store: TaskStore) -> Runtime:
    """What a worker process holds, for ``settings`` and the test's store."""
    return Runtime.build(settings, store=store)


@contextmanager
def small_stream_nodes(client: redis.Redis) -> Iterator[None]:
    """Streams of 4 entries a node while it lasts: MAXLEN ~ trims whole nodes, so a test trims
    a stream with a few dozen entries (the setting is the session Redis's, hence restored)."""
    before: Any = client.config_get("stream-node-max-entries")["stream-node-max-entries"]
    client.config_set("stream-node-max-entries", 4)
    try:
        yield
    finally:
        client.config_set("stream-node-max-entries", before)


def messages() -> Messages:
    """Messages sent as a backend or an operator sends them: through the test session's own
    broker on its Redis, so any worker on that Redis takes them."""
    if "messages" not in _SESSION:
        _SESSION["messages"] = Messages(redis_broker(Settings(redis_url=_SESSION["redis"].url)))
    sender: Messages = _SESSION["messages"]
    return sender


def submit_spec(spec: TaskSpec, store: TaskStore, *, replace: bool = False) -> str:
    """Submit as a backend does (:meth:`actors.client.Client.submit_spec`)."""
    return Client(Settings(redis_url=_SESSION["redis"].url), store=store, messages=messages()).submit_spec(
        spec, replace=replace
    )


class ClaimsOnly(Messages):
    """A supervisor's messages handed to ``on_claim`` (claims) or dropped (the rest) instead of
    queued: for tests of the supervisor itself, with no worker to take them."""

    def __init__(self, on_claim: Callable[[str], None] = lambda task_id: None) -> None:
        self.on_claim = on_claim

    def claim(self, task_id: str, delay_seconds: float = 0.0) -> None:
        self.on_claim(task_id)

    def queued_claim(self, task_id: str) -> None:
        return None  # a new task's claim goes to on_claim too

    def finalize(self, task_id: str, token: int, failing_since: float = 0.0, delay_seconds: float = 0.0) -> None:
        pass

    def notify(self, task_id: str, seq: int | None = None, delay_seconds: float = 0.0) -> None:
        pass


def dramatiq_supervisor(settings: Settings, store: TaskStore, node_id: str = "test-sup") -> Supervisor:
    """A supervisor replica whose sweeps send real messages through a broker of its own."""
    return Supervisor(settings, store, Messages(redis_broker(settings)), node_id=node_id)


@pytest.fixture
def runtime(settings: Settings, store: TaskStore) -> Runtime:
    return runtime_for(settings, store)


@pytest.fixture
def client(settings: Settings, store: TaskStore) -> Iterator[Client]:
    """A backend's client on the test's Redis; its messages reach any worker on it."""
    haul = Client(settings, store=store)
    yield haul
    haul.close()


@dataclass
class InProcessWorker:
    rt: Runtime
    broker: RedisBroker
    messages: Messages
    worker: dramatiq.Worker


@contextmanager
def in_process_worker(settings: Settings, store: TaskStore, threads: int = 4) -> Iterator[InProcessWorker]:
    """A Dramatiq worker in this process on the real Redis broker, serving every stage with
    ``settings`` (the actors declared on a broker of its own, as ``actors.worker`` does)."""
    rt = runtime_for(settings, store)
    broker = worker_broker(settings, rt)
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=50)
    worker.start()
    try:
        yield InProcessWorker(rt, broker, Messages(broker), worker)
    finally:
        worker.stop()
        broker.close()
        rt.close()


def settle(running: InProcessWorker, timeout: float = 30.0) -> None:
    """Wait until every message sent so far, delayed ones too, is handled and acknowledged: a
    check that nothing more happened is then deterministic, where a fixed sleep only hopes."""
    for queue in QUEUES:
        running.broker.join(queue, timeout=int(timeout * 1000))


@pytest.fixture
def worker(settings: Settings, store: TaskStore) -> Iterator[InProcessWorker]:
    with in_process_worker(settings, store) as running:
        yield running


def end_task(store: TaskStore, task_id: str, target: State, *, now: float, max_attempts: int = 3) -> State | None:
    """Take a queued task through one run into ``target`` (done only after finalizing, as the
    scripts require); return the state the release reached."""
    run = store.claim(task_id, worker="w", now=now, lease_seconds=30, max_attempts=max_attempts,
                      start=State.DOWNLOADING)  # fmt: skip
    if target is State.DONE:
        store.finish_download(task_id, run.token, now=now, lease_seconds=30, progress=(1, 1, 1), finalize_limit=0)
    return store.release(task_id, run.token, target, now=now, max_attempts=max_attempts)


def eventually_gone(path: Path, timeout: float = 5.0) -> bool:
    """True once ``path`` no longer exists (a sandbox is removed just after the task is done)."""
    deadline = time.monotonic() + timeout
    while path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_for(store: TaskStore, task_id: str, states: set[str] | None = None, timeout: float = 20.0) -> Task:
    """Poll until the task reaches one of ``states`` (default: any final state)."""
    wanted = states or {"done", "failed", "dead", "canceled"}
    deadline = time.monotonic() + timeout
    while True:
        task = store.get(task_id)
        if task is not None and task.state.value in wanted:
            return task
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} did not reach {sorted(wanted)} in {timeout}s: {task}")
        time.sleep(0.02)


def part_bytes(sandbox: Path, index: int = 0) -> int:
    """Bytes staged so far for file ``index`` of a task's sandbox (its runs' ``.part`` files)."""
    sizes = [p.stat().st_size for p in (sandbox / ".parts").glob(f"{index}.*.part") if p.exists()]
    return max(sizes, default=0)


def staged(tmp_path: Path, files: dict[str, bytes]) -> tuple[Sandbox, list[FileSpec]]:
    """A new task's sandbox holding ``files`` as finished downloads."""
    sandbox = Sandbox(tmp_path / "staging", uuid.uuid4().hex)
    specs = [FileSpec(url=f"https://cdn.example.com/{p}", path=p) for p in files]
    for spec, data in zip(specs, files.values(), strict=True):
        target = sandbox.file(spec)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return sandbox, specs
