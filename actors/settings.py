"""haul's configuration: one frozen object read from ``HAUL_*`` environment variables.

Entry points build it once with :meth:`Settings.from_env` and pass it down; nothing else in
haul reads the environment. Every value is validated here, so a typo fails at start with the
variable's name instead of surfacing as a stuck task an hour later. Secrets may come from
``<NAME>_FILE`` (systemd credentials, Docker secrets) and never appear in ``repr``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from actors import envvars, storagetarget
from actors.apisettings import ApiSettings
from actors.envvars import SettingsError as SettingsError  # its public name
from actors.events import DEFAULT_RETAIN
from actors.storagetarget import DEFAULT_KEY_TEMPLATE, S3Access, StorageTarget

#: Where workers and the CLI find Redis unless told otherwise (and no ``haul up`` ran here).
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: ``haul up``'s folder (its Redis data, staging, storage) unless HAUL_HOME names another.
DEFAULT_HOME = ".haul"
#: The file in that folder where ``haul up`` records the URL of the Redis it runs.
REDIS_URL_FILE = "redis.url"
#: How long a claimed task stays owned without a heartbeat, in seconds.
DEFAULT_LEASE_SECONDS = 60
#: Runs a task gets (lease expiries included) before it is dead.
DEFAULT_MAX_ATTEMPTS = 5
#: Backoff bounds between two runs of a task, in seconds.
DEFAULT_RETRY_MIN_SECONDS = 5.0
DEFAULT_RETRY_MAX_SECONDS = 600.0
#: Socket timeouts towards origins and webhook receivers, in seconds.
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
DEFAULT_READ_TIMEOUT_SECONDS = 60.0
#: Seconds between two supervisor sweeps.
DEFAULT_SWEEP_SECONDS = 10.0
#: A queued task waiting this long past its time gets its claim message again (it may be lost).
DEFAULT_ORPHAN_SECONDS = 300.0
#: Port of the supervisor's /healthz and /metrics.
DEFAULT_SUPERVISOR_PORT = 9310
#: How long finished task records (and failed tasks' sandboxes) are kept, in seconds.
DEFAULT_RETAIN_SECONDS = 7 * 24 * 3600
#: A transfer slower than this many bytes a second over the window below is cut and retried
#: (as aria2's --lowest-speed-limit): an origin trickling bytes must not hold a slot for hours.
DEFAULT_LOWEST_SPEED_BYTES = 1024
DEFAULT_LOWEST_SPEED_SECONDS = 60.0
#: How long a finished task keeps retrying storage and its webhook before it is dead, in seconds.
DEFAULT_FINALIZE_GIVE_UP_SECONDS = 24 * 3600.0
#: Worker process layout used by ``haul worker`` and ``haul up``.
DEFAULT_WORKER_PROCESSES = 2
DEFAULT_WORKER_THREADS = 8
#: Files of one task downloaded at once (HAUL_TASK_PARALLEL_FILES): README's Performance
#: section has the measurement behind it.
DEFAULT_TASK_PARALLEL_FILES = 4
#: The most HAUL_TASK_PARALLEL_FILES may be: connections one task opens at once.
MAX_TASK_PARALLEL_FILES = 16
#: Connections one large file may use (HAUL_SPLIT): politeness first (aria2 uses one per
#: server by default, and many connections get an address banned).
DEFAULT_SPLIT = 4
MAX_SPLIT = 16
#: Files smaller than this are never split (HAUL_MIN_SPLIT_BYTES).
DEFAULT_MIN_SPLIT_BYTES = 20 * 1024 * 1024
#: How a page file's format is chosen when it gives none (HAUL_RESOLVE_FORMAT, a yt-dlp format
#: selector): the best single file with video and audio, else the best video and audio to join.
DEFAULT_RESOLVE_FORMAT = "b/bv*+ba"
#: Longest a page's resolution may take, all its requests together (HAUL_RESOLVE_TIMEOUT_SECONDS).
DEFAULT_RESOLVE_TIMEOUT_SECONDS = 120.0
#: Times one attempt resolves a page again when its media URL is refused as expired (403/410)
#: before the file fails (HAUL_RESOLVE_RETRIES).
DEFAULT_RESOLVE_RETRIES = 2
#: Least time between two page resolutions on one host, across all workers
#: (HAUL_HOST_MIN_INTERVAL_SECONDS): a batch of links must not get the workers' address banned.
DEFAULT_HOST_MIN_INTERVAL_SECONDS = 1.0
#: Longest pause, in ms, between two polls of an idle queue: Dramatiq's Redis broker polls (it
#: has no blocking fetch), and its default of 1000 ms makes an idle worker pick a task up after
#: up to a second. 80 ms costs an idle process a few dozen Redis commands a second.
DEFAULT_WORKER_POLL_MS = 80
#: How every haul process writes its log: ``text`` lines, or ``json``, one object a line.
LOG_FORMATS = ("text", "json")

#: HAUL_HASH values: the digest every file gets in task.completed (the first is the default).
FILE_HASHES = ("sha256", "none")


@dataclass(frozen=True)
class Settings:
    """Everything a haul process needs to know, validated."""

    redis_url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    staging_dir: Path = Path(".haul/staging").absolute()
    storage_dir: Path = Path(".haul/storage").absolute()
    #: HAUL_STORAGE_URL when it names a bucket (s3://) or an rclone remote; None: storage_dir.
    object_storage: StorageTarget | None = None
    #: HAUL_STORAGE_KEY: where a file lands below the bucket's prefix.
    storage_key: str = DEFAULT_KEY_TEMPLATE
    #: The AWS_* variables, resolved (read only when HAUL_STORAGE_URL names a bucket).
    s3: S3Access = S3Access()
    #: HAUL_API_*: the HTTP API's address, tokens and limits (read by ``haul api``).
    api: ApiSettings = ApiSettings()
    #: HAUL_S3_PART_BYTES and HAUL_S3_CONCURRENCY: a multipart upload's part size (grown to stay
    #: under 10,000 parts) and parts of one file in flight.
    s3_part_bytes: int = 8 * 1024 * 1024
    s3_concurrency: int = 4
    #: HAUL_STORAGE_LINK_SECONDS: stored files get a presigned link this long (0: none).
    storage_link_seconds: float = 0.0
    webhook_url: str | None = None
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_min_seconds: float = DEFAULT_RETRY_MIN_SECONDS
    retry_max_seconds: float = DEFAULT_RETRY_MAX_SECONDS
    allow_private_networks: bool = False
    allow_hosts: frozenset[str] = frozenset()
    proxy: str | None = field(default=None, repr=False)
    max_file_bytes: int = 0
    max_task_bytes: int = 0
    lowest_speed_bytes: int = DEFAULT_LOWEST_SPEED_BYTES
    lowest_speed_seconds: float = DEFAULT_LOWEST_SPEED_SECONDS
    finalize_give_up_seconds: float = DEFAULT_FINALIZE_GIVE_UP_SECONDS
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
    read_timeout_seconds: float = DEFAULT_READ_TIMEOUT_SECONDS
    worker_processes: int = DEFAULT_WORKER_PROCESSES
    worker_threads: int = DEFAULT_WORKER_THREADS
    worker_poll_ms: int = DEFAULT_WORKER_POLL_MS
    #: HAUL_TASK_PARALLEL_FILES: files of one task downloaded at once (actors/lanes.py).
    task_parallel_files: int = DEFAULT_TASK_PARALLEL_FILES
    #: HAUL_SPLIT / HAUL_MIN_SPLIT_BYTES: connections one large file may use (actors/split.py).
    split: int = DEFAULT_SPLIT
    min_split_bytes: int = DEFAULT_MIN_SPLIT_BYTES
    #: HAUL_RESOLVE_FORMAT / HAUL_RESOLVE_TIMEOUT_SECONDS: page files (actors/pages.py).
    resolve_format: str = DEFAULT_RESOLVE_FORMAT
    resolve_timeout_seconds: float = DEFAULT_RESOLVE_TIMEOUT_SECONDS
    resolve_retries: int = DEFAULT_RESOLVE_RETRIES
    host_min_interval_seconds: float = DEFAULT_HOST_MIN_INTERVAL_SECONDS
    sweep_seconds: float = DEFAULT_SWEEP_SECONDS
    orphan_seconds: float = DEFAULT_ORPHAN_SECONDS
    supervisor_host: str = "127.0.0.1"
    supervisor_port: int = DEFAULT_SUPERVISOR_PORT
    retain_seconds: float = DEFAULT_RETAIN_SECONDS
    #: HAUL_EVENTS_RETAIN: entries kept in the stream of every task's events (actors/events.py;
    #: the supervisor tells the scripts).
    events_retain: int = DEFAULT_RETAIN
    worker_metrics_port: int = 0
    worker_metrics_dir: Path | None = None
    download_concurrency: int = 0
    download_per_host: int = 0
    finalize_concurrency: int = 0
    staging_max_bytes: int = 0
    #: HAUL_HASH: ``sha256`` puts every file's sha256 (computed while downloading) in
    #: task.completed; ``none`` only the ones the task gave.
    file_hash: str = "sha256"
    sentry_dsn: str | None = field(default=None, repr=False)
    sentry_environment: str | None = None
    log_format: str = "text"

    def __post_init__(self) -> None:
        if self.retry_min_seconds > self.retry_max_seconds:
            raise SettingsError(
                f"HAUL_RETRY_MIN_SECONDS ({self.retry_min_seconds}) is larger than "
                f"HAUL_RETRY_MAX_SECONDS ({self.retry_max_seconds}); set the minimum below the maximum"
            )

    def check_signing(self) -> None:
        """Refuse HAUL_WEBHOOK_URL without a secret: checked where webhooks are sent (workers,
        the supervisor), not by every reader of the settings (``haul submit`` signs nothing)."""
        if self.webhook_url and not self.webhook_secrets:
            raise SettingsError(
                "HAUL_WEBHOOK_URL is set but HAUL_WEBHOOK_SECRET (or HAUL_WEBHOOK_SECRET_FILE) is not: "
                "webhooks are always signed; generate a secret with `haul webhook new-secret`"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every ``HAUL_*`` variable; raise :class:`SettingsError` naming the bad one.

        One line per variable, so it runs past 50 lines; each line is one reader from
        :mod:`actors.envvars`."""
        env = os.environ if environ is None else environ
        secret_text = envvars.secret(env, "HAUL_WEBHOOK_SECRET")
        webhook_url = env.get("HAUL_WEBHOOK_URL") or None
        if webhook_url is not None:
            envvars.http_url(webhook_url, "HAUL_WEBHOOK_URL")
        target = storagetarget.storage_target(env, cls.storage_dir)
        in_bucket = target.kind in ("s3", "rclone")
        return cls(
            redis_url=_redis_url_of(env),
            staging_dir=envvars.directory(env, "HAUL_STAGING_DIR", cls.staging_dir) or cls.staging_dir,
            storage_dir=target.folder or cls.storage_dir,
            object_storage=target if in_bucket else None,
            storage_key=storagetarget.key_template(env),
            s3=storagetarget.s3_access(env) if target.kind == "s3" else S3Access(),
            api=ApiSettings.from_env(env),
            s3_part_bytes=storagetarget.part_bytes(env, cls.s3_part_bytes),
            s3_concurrency=int(envvars.number(env, "HAUL_S3_CONCURRENCY", cls.s3_concurrency, minimum=1, integer=True)),
            storage_link_seconds=storagetarget.link_seconds(env, in_bucket),
            webhook_url=webhook_url,
            webhook_secrets=envvars.webhook_secrets(secret_text),
            lease_seconds=envvars.number(env, "HAUL_LEASE_SECONDS", DEFAULT_LEASE_SECONDS, minimum=1),
            max_attempts=int(envvars.number(env, "HAUL_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, minimum=1, integer=True)),
            retry_min_seconds=envvars.number(env, "HAUL_RETRY_MIN_SECONDS", DEFAULT_RETRY_MIN_SECONDS, minimum=0),
            retry_max_seconds=envvars.number(env, "HAUL_RETRY_MAX_SECONDS", DEFAULT_RETRY_MAX_SECONDS, minimum=0),
            allow_private_networks=envvars.flag(env, "HAUL_ALLOW_PRIVATE_NETWORKS", False),
            allow_hosts=envvars.host_ports(env.get("HAUL_ALLOW_HOSTS", "")),
            proxy=envvars.proxy(envvars.secret(env, "HAUL_PROXY")),
            max_file_bytes=envvars.limit(env, "HAUL_MAX_FILE_BYTES"),
            max_task_bytes=envvars.limit(env, "HAUL_MAX_TASK_BYTES"),
            lowest_speed_bytes=envvars.limit(env, "HAUL_LOWEST_SPEED_BYTES", DEFAULT_LOWEST_SPEED_BYTES),
            finalize_give_up_seconds=envvars.number(
                env, "HAUL_FINALIZE_GIVE_UP_SECONDS", DEFAULT_FINALIZE_GIVE_UP_SECONDS, minimum=0
            ),
            lowest_speed_seconds=envvars.number(
                env, "HAUL_LOWEST_SPEED_SECONDS", DEFAULT_LOWEST_SPEED_SECONDS, minimum=1
            ),
            connect_timeout_seconds=envvars.number(
                env, "HAUL_CONNECT_TIMEOUT_SECONDS", DEFAULT_CONNECT_TIMEOUT_SECONDS, minimum=0.1
            ),
            read_timeout_seconds=envvars.number(
                env, "HAUL_READ_TIMEOUT_SECONDS", DEFAULT_READ_TIMEOUT_SECONDS, minimum=0.1
            ),
            worker_processes=int(
                envvars.number(env, "HAUL_WORKER_PROCESSES", DEFAULT_WORKER_PROCESSES, minimum=1, integer=True)
            ),
            worker_threads=int(
                envvars.number(env, "HAUL_WORKER_THREADS", DEFAULT_WORKER_THREADS, minimum=1, integer=True)
            ),
            worker_poll_ms=int(
                envvars.number(env, "HAUL_WORKER_POLL_MS", DEFAULT_WORKER_POLL_MS, minimum=10, integer=True)
            ),
            task_parallel_files=int(
                envvars.number(
                    env,
                    "HAUL_TASK_PARALLEL_FILES",
                    DEFAULT_TASK_PARALLEL_FILES,
                    minimum=1,
                    maximum=MAX_TASK_PARALLEL_FILES,
                    integer=True,
                )
            ),  # fmt: skip
            split=int(envvars.number(env, "HAUL_SPLIT", DEFAULT_SPLIT, minimum=1, maximum=MAX_SPLIT, integer=True)),
            min_split_bytes=envvars.limit(env, "HAUL_MIN_SPLIT_BYTES", DEFAULT_MIN_SPLIT_BYTES),
            resolve_format=(env.get("HAUL_RESOLVE_FORMAT") or "").strip() or DEFAULT_RESOLVE_FORMAT,
            resolve_timeout_seconds=envvars.number(
                env, "HAUL_RESOLVE_TIMEOUT_SECONDS", DEFAULT_RESOLVE_TIMEOUT_SECONDS, minimum=1
            ),
            resolve_retries=int(
                envvars.number(env, "HAUL_RESOLVE_RETRIES", DEFAULT_RESOLVE_RETRIES, minimum=0, integer=True)
            ),
            host_min_interval_seconds=envvars.number(
                env, "HAUL_HOST_MIN_INTERVAL_SECONDS", DEFAULT_HOST_MIN_INTERVAL_SECONDS, minimum=0
            ),
            sweep_seconds=envvars.number(env, "HAUL_SWEEP_SECONDS", DEFAULT_SWEEP_SECONDS, minimum=0.1),
            orphan_seconds=envvars.number(env, "HAUL_ORPHAN_SECONDS", DEFAULT_ORPHAN_SECONDS, minimum=1),
            supervisor_host=env.get("HAUL_SUPERVISOR_HOST") or "127.0.0.1",
            supervisor_port=int(
                envvars.number(env, "HAUL_SUPERVISOR_PORT", DEFAULT_SUPERVISOR_PORT, minimum=0, integer=True)
            ),
            retain_seconds=envvars.number(env, "HAUL_RETAIN_SECONDS", DEFAULT_RETAIN_SECONDS, minimum=0),
            events_retain=int(envvars.number(env, "HAUL_EVENTS_RETAIN", DEFAULT_RETAIN, minimum=100, integer=True)),
            worker_metrics_port=envvars.limit(env, "HAUL_WORKER_METRICS_PORT"),
            worker_metrics_dir=envvars.directory(env, "HAUL_WORKER_METRICS_DIR", None),
            download_concurrency=envvars.limit(env, "HAUL_DOWNLOAD_CONCURRENCY"),
            download_per_host=envvars.limit(env, "HAUL_DOWNLOAD_PER_HOST"),
            finalize_concurrency=envvars.limit(env, "HAUL_FINALIZE_CONCURRENCY"),
            staging_max_bytes=envvars.limit(env, "HAUL_STAGING_MAX_BYTES"),
            file_hash=envvars.choice(env, "HAUL_HASH", FILE_HASHES),
            sentry_dsn=envvars.secret(env, "HAUL_SENTRY_DSN") or None,
            sentry_environment=env.get("HAUL_SENTRY_ENVIRONMENT") or None,
            log_format=envvars.choice(env, "HAUL_LOG_FORMAT", LOG_FORMATS),
        )

    @property
    def metrics_dir(self) -> Path:
        """Where the worker processes of one ``haul worker`` share their Prometheus files."""
        return (
            self.worker_metrics_dir or Path(tempfile.gettempdir()) / f"haul-worker-metrics-{self.worker_metrics_port}"
        )

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def home_folder(env: Mapping[str, str]) -> Path:
    """HAUL_HOME, or ``.haul`` in the current folder: where ``haul up`` keeps its state."""
    return Path(env.get("HAUL_HOME") or DEFAULT_HOME).expanduser().absolute()


def _redis_url_of(env: Mapping[str, str]) -> str:
    """HAUL_REDIS_URL; unset, the URL ``haul up`` recorded in ``$HAUL_HOME/redis.url``, so a
    second shell in the same folder reaches the Redis that ``haul up`` runs; else the default."""
    value = env.get("HAUL_REDIS_URL", "")
    if value:
        return envvars.redis_url(value)
    path = home_folder(env) / REDIS_URL_FILE
    try:
        recorded = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return DEFAULT_REDIS_URL
    except OSError as exc:
        raise SettingsError(
            f"{path} (haul up's Redis URL) cannot be read ({exc.strerror}); set HAUL_REDIS_URL or remove the file"
        ) from None
    try:
        return envvars.redis_url(recorded)
    except SettingsError:
        raise SettingsError(
            f"{path} (haul up's Redis URL) does not hold a redis:// URL; set HAUL_REDIS_URL or remove the file"
        ) from None
