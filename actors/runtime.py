"""What a worker process holds for its actors: settings and the domain objects built from them.

The worker's entry builds one :class:`Runtime` from its Settings and declares the actors with it
(:func:`actors.handlers.declare_actors`); a test builds its own. HTTP sessions are per thread,
since a ``requests.Session`` is not meant to be shared between threads.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from actors.deliveries import DeliveryRecorder
from actors.fetch import Fetcher
from actors.interrupt import Interrupter
from actors.lease import LeaseKeeper
from actors.netguard import DestinationPolicy
from actors.redact import secrets_in_url, secrets_of
from actors.settings import Settings
from actors.storage import LocalStorage, Storage
from actors.store import TaskStore
from actors.webhook import DEFAULT_DELIVERY_BACKOFF_SECONDS, WebhookSender


class Stopper(Interrupter):
    """Tells running downloads that the process is stopping, and unblocks their sockets.

    Checking the flag costs one attribute read per chunk; closing the registered responses
    wakes a thread blocked on a silent origin, so a stop never waits for a read timeout.
    """

    def is_set(self) -> bool:
        return self.fired()

    def stop(self) -> None:
        self.fire()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, ending early (True) once the process is stopping."""
        return self._fired.wait(seconds)


@dataclass
class Runtime:
    settings: Settings
    store: TaskStore
    storage: Storage
    policy: DestinationPolicy
    worker_id: str
    leases: LeaseKeeper
    clock: Callable[[], float] = time.time
    stopper: Stopper = field(default_factory=Stopper)
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _beside: ThreadPoolExecutor | None = field(default=None, repr=False)
    _beside_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Every thread's HTTP sessions, closed with the runtime (a pool thread's would otherwise
    #: leave its sockets to the garbage collector).
    _sessions: list[requests.Session] = field(default_factory=list, repr=False)

    @classmethod
    def build(cls, settings: Settings, store: TaskStore | None = None) -> Runtime:
        store = store or TaskStore.from_url(settings.redis_url)
        return cls(
            settings=settings,
            store=store,
            storage=open_storage(settings),
            policy=DestinationPolicy(settings.allow_private_networks, settings.allow_hosts),
            worker_id=f"{socket.gethostname()}:{os.getpid()}",
            leases=LeaseKeeper(store, settings.lease_seconds),
        )

    @property
    def fetcher(self) -> Fetcher:
        fetcher: Fetcher | None = getattr(self._local, "fetcher", None)
        if fetcher is None:
            fetcher = Fetcher(
                self.policy,
                connect_timeout=self.settings.connect_timeout_seconds,
                read_timeout=self.settings.read_timeout_seconds,
                session=self.policy.session(self.settings.proxy),
            )
            self._local.fetcher = fetcher
            with self._beside_lock:
                self._sessions.append(fetcher.session)
        return fetcher

    @property
    def beside(self) -> ThreadPoolExecutor:
        """The threads that download beside the working threads, each with its own session
        kept across tasks: per working thread, the other files of its task and the connections
        beside each file's own (HAUL_TASK_PARALLEL_FILES x HAUL_SPLIT - 1)."""
        with self._beside_lock:
            if self._beside is None:
                s = self.settings
                extra = max(1, s.worker_threads * (s.task_parallel_files * s.split - 1))
                self._beside = ThreadPoolExecutor(extra, thread_name_prefix="haul-lane")
            return self._beside

    def close(self) -> None:
        """Once the working threads ended: the lanes' threads (idle by then), every thread's
        sessions and the storage."""
        with self._beside_lock:
            if self._beside is not None:
                self._beside.shutdown(wait=False, cancel_futures=True)
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self.storage.close()

    @property
    def webhook_policy(self) -> DestinationPolicy:
        """The operator's own HAUL_WEBHOOK_URL is configuration, not hostile input: trusted
        even on an internal host; a task-given receiver faces the policy like an origin."""
        url = self.settings.webhook_url
        return self.policy.trusting(url) if url else self.policy

    @property
    def webhooks(self) -> WebhookSender:
        sender: WebhookSender | None = getattr(self._local, "webhooks", None)
        if sender is None:
            sender = WebhookSender(
                self.settings.webhook_secrets,
                self.webhook_policy,
                timeout=(self.settings.connect_timeout_seconds, self.settings.read_timeout_seconds),
                backoff_seconds=min(DEFAULT_DELIVERY_BACKOFF_SECONDS, self.settings.retry_min_seconds),
                clock=self.clock,
            )
            self._local.webhooks = sender
            with self._beside_lock:
                self._sessions.append(sender.session)
        return sender

    def delivery_recorder(self, task_id: str, url: str, first_try: int = 1) -> DeliveryRecorder:
        """Where the tries of one delivery to ``url`` are recorded for the dashboard, with this
        worker's secrets and the URL's own kept out (:func:`actors.redact.secrets_in_url`)."""
        return DeliveryRecorder(self.store, task_id, [*secrets_of(self.settings), *secrets_in_url(url)], first_try)


def open_storage(settings: Settings) -> Storage:
    """The bucket or rclone remote HAUL_STORAGE_URL names, else the folder (HAUL_STORAGE_DIR)."""
    target = settings.object_storage
    if target is None:
        return LocalStorage(settings.storage_dir)
    if target.kind == "rclone":
        from actors.rclonestorage import RcloneStorage

        return RcloneStorage(target, key_template=settings.storage_key, link_seconds=settings.storage_link_seconds)
    from actors.s3storage import S3Storage  # here: it loads boto3, which only a bucket needs

    return S3Storage(
        target, settings.s3, key_template=settings.storage_key, part_bytes=settings.s3_part_bytes,
        concurrency=settings.s3_concurrency, connect_timeout=settings.connect_timeout_seconds,
        read_timeout=settings.read_timeout_seconds, pool_size=settings.worker_threads * settings.s3_concurrency,
        link_seconds=settings.storage_link_seconds,
    )  # fmt: skip
