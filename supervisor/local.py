"""``haul up``: a whole haul on one machine for a first run, in the current folder.

Redis first, and it must keep every write it acknowledged (append-only file, appendfsync
always). With HAUL_REDIS_URL unset, ``haul up`` always runs a redis-server of its own in
``$HAUL_HOME/redis`` (default ``.haul/redis``) on a free 127.0.0.1 port (the one recorded last
time when it is free) and records its URL in ``$HAUL_HOME/redis.url``, where ``haul submit`` and
``haul status`` in another shell in the same folder find it. It never takes whatever answers at
127.0.0.1:6379: Debian's redis-server package runs one there that only snapshots. With
HAUL_REDIS_URL set, it uses that Redis if it answers and keeps an append-only file synced on
every write, refuses one that does not (exit 2), and starts one there if nothing answers and
the URL is local. It says which Redis it uses, and why (:mod:`supervisor.localredis`).

Then the workers, the supervisor and the HTTP API, and it stops them all on Ctrl-C, SIGTERM or
SIGHUP.
Private networks are allowed by default here, since a first run usually downloads from a server
on the same machine. When HAUL_SUPERVISOR_PORT is not set and 9310 is taken, the supervisor
serves on a free port, which it prints (so does the API when 9320 is taken); a port that was set
(HAUL_SUPERVISOR_PORT, HAUL_API_PORT, HAUL_WORKER_METRICS_PORT) and is taken stops it before
anything starts. With no webhook secret
configured, it signs webhooks with one of its own, made once in ``$HAUL_HOME/webhook-secret``.

Each child runs in a session (and process group) of its own, so a terminal's Ctrl-C, which
goes to every process of the foreground group, reaches ``haul up`` alone; it then stops the
children in order: the API first (nothing new comes in), the workers (they hand in-flight tasks
back, which needs Redis), the supervisor, Redis last. Were Redis stopped at the same time, a downloading task would stay
``downloading`` until its lease ran out, burn an attempt and start its file again from 0.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from actors.settings import DEFAULT_REDIS_URL, Settings, SettingsError, home_folder
from supervisor.localredis import EXIT_USAGE, UpRefused, choose_redis, free_port, port_free
from supervisor.workers import worker_command, worker_environment

#: Seconds a child gets to stop after SIGTERM (workers: to hand their tasks back) before its
#: whole process group is killed.
STOP_SECONDS = 30.0
#: Signals that stop the local stack (SIGHUP: the terminal was closed).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: The file in HAUL_HOME holding the webhook secret haul up made, when none was configured.
WEBHOOK_SECRET_FILE = "webhook-secret"
#: Random bytes in a secret haul up makes (``whsec_`` + their base64).
WEBHOOK_SECRET_BYTES = 24

#: haul up's own lines when HAUL_LOG_FORMAT=json (text: ``haul up: ...`` on stdout or stderr).
logger = logging.getLogger("haul.up")
_json_lines = False


def local_environment(environ: Mapping[str, str], home: Path) -> dict[str, str]:
    env = dict(environ)
    env.setdefault("HAUL_STAGING_DIR", str(home / "staging"))
    env.setdefault("HAUL_STORAGE_DIR", str(home / "storage"))
    env.setdefault("HAUL_ALLOW_PRIVATE_NETWORKS", "1")
    return env


def say(text: str, error: bool = False) -> None:
    if _json_lines:
        logger.log(logging.ERROR if error else logging.INFO, text)
    else:
        print(f"haul up: {text}", file=sys.stderr if error else sys.stdout, flush=True)


def haul_command(cwd: Path) -> str:
    """How to run haul from a shell in ``cwd``: ``haul`` when that is the one on PATH, else the
    path of the script beside this Python (relative when it is under ``cwd``)."""
    script = Path(sys.argv[0]) if Path(sys.argv[0]).name == "haul" else Path(sys.executable).parent / "haul"
    if not script.exists():
        return f"{sys.executable} -m supervisor.cli"
    on_path = shutil.which("haul")
    if on_path is not None and Path(on_path).resolve() == script.resolve():
        return "haul"
    path = script.absolute()
    try:
        relative = path.relative_to(cwd)
    except ValueError:
        return str(path)
    return str(relative) if relative.parent != Path(".") else f"./{relative}"


def configured_secret(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("HAUL_WEBHOOK_SECRET") or environ.get("HAUL_WEBHOOK_SECRET_FILE"))


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(WEBHOOK_SECRET_BYTES)).decode()


def keep_webhook_secret(home: Path, secret: str) -> tuple[Path, bool]:
    """``home/webhook-secret``, written with ``secret`` (mode 0600) unless it exists; whether it
    was made now."""
    path = home / WEBHOOK_SECRET_FILE
    home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path, False
    except OSError as exc:
        raise UpRefused(
            f"cannot write the webhook secret to {path} ({exc.strerror}); set HAUL_WEBHOOK_SECRET_FILE"
        ) from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(secret + "\n")
    return path, True


def chosen_port(host: str, port: int, variable: str, serves: str, environ: Mapping[str, str]) -> int:
    """A port for what ``serves``: ``variable``'s, which must be free, or the default ``port``,
    or when that is taken a free one."""
    if not port or port_free(host, port):
        return port
    if environ.get(variable):
        raise UpRefused(
            f"{host}:{port} is in use (another haul up?), so {serves} could not be served there; "
            f"stop what uses it, or set {variable} to a free port"
        )
    chosen = free_port(port, host)
    say(f"{host}:{port} is in use (another haul up?), so {serves} is served on {host}:{chosen}; set {variable} "
        "to choose the port")  # fmt: skip
    return chosen


def stop_child(name: str, child: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child itself (Dramatiq's master passes it on to its worker processes, as
    systemd's KillMode=mixed does), wait, and kill its whole process group if it hangs."""
    if child.poll() is not None:
        return
    say(f"stopping {name}")
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        say(f"{name} did not stop in {STOP_SECONDS:.0f}s; killing it", error=True)
        try:
            os.killpg(child.pid, signal.SIGKILL)  # its group id is its pid: it is not reaped yet
        except ProcessLookupError:
            pass
        child.wait()


def run_local_stack(environ: Mapping[str, str]) -> int:
    """Run the stack until a stop signal; every way out ends with a ``haul up: stopped`` line."""
    global _json_lines
    if environ.get("HAUL_LOG_FORMAT", "").strip().lower() == "json":
        from actors.logs import setup_logging

        setup_logging("json")
        _json_lines = True
    try:
        status = _run_local_stack(environ)
    except (UpRefused, SettingsError) as exc:
        say(str(exc), error=True)
        status = exc.status if isinstance(exc, UpRefused) else EXIT_USAGE
    say("stopped")
    return status


def _run_local_stack(environ: Mapping[str, str]) -> int:
    home = home_folder(environ)
    env = local_environment(environ, home)
    settings = _prepared(environ, env, home)
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    for signum in STOP_SIGNALS:  # before any child starts: a Ctrl-C now still stops in order
        signal.signal(signum, _stop)
    redis_child: subprocess.Popen[bytes] | None = None
    children: list[tuple[str, subprocess.Popen[bytes]]] = []  # in stopping order
    status = 0
    try:
        redis_url, redis_child = choose_redis(environ, home, settings.supervisor_port, say)
        env["HAUL_REDIS_URL"] = redis_url  # the children use this Redis, wherever they run
        if not stopping:  # a signal while Redis was starting: start nothing more
            _start_children(settings.replace(redis_url=redis_url), env, children)
        if redis_child is not None:
            children.append(("redis-server", redis_child))
        while not stopping:
            for name, child in children:
                if child.poll() is not None:
                    say(f"{name} exited with {child.returncode}; stopping", error=True)
                    status, stopping = 1, True
            time.sleep(0.2)
    except UpRefused as exc:
        say(str(exc), error=True)
        status = exc.status
    finally:
        if redis_child is not None and all(child is not redis_child for _, child in children):
            children.append(("redis-server", redis_child))  # a later step failed
        for name, child in children:  # workers, then the supervisor, then Redis
            stop_child(name, child)
    return status


def _prepared(environ: Mapping[str, str], env: dict[str, str], home: Path) -> Settings:
    """Every value checked, the supervisor's port chosen and the webhook secret kept, before
    anything starts (``env`` gets what the children need); refusals raise :class:`UpRefused`."""
    secret = None if configured_secret(env) else new_webhook_secret()  # kept once nothing refused
    # The Redis URL is haul up's to choose when unset
    checked = env if env.get("HAUL_REDIS_URL") else {**env, "HAUL_REDIS_URL": DEFAULT_REDIS_URL}
    settings = Settings.from_env(checked if secret is None else {**checked, "HAUL_WEBHOOK_SECRET": secret})
    port = chosen_port(settings.supervisor_host, settings.supervisor_port, "HAUL_SUPERVISOR_PORT",
                       "the supervisor's /healthz and /metrics", environ)  # fmt: skip
    env["HAUL_SUPERVISOR_PORT"] = str(port)
    api = settings.api
    api_port = chosen_port(api.host, api.port, "HAUL_API_PORT", "the HTTP API", environ)
    if api_port == port:
        raise UpRefused(f"HAUL_API_PORT and HAUL_SUPERVISOR_PORT are both {port}; give them different ports")
    env["HAUL_API_PORT"] = str(api_port)
    settings = settings.replace(supervisor_port=port, api=dataclasses.replace(api, port=api_port))
    settings.api.check_exposure()
    metrics_port = settings.worker_metrics_port
    if metrics_port and (metrics_port == port or not port_free(settings.supervisor_host, metrics_port)):
        raise UpRefused(
            f"{settings.supervisor_host}:{metrics_port} is in use, so the workers could not serve their metrics "
            "there; stop what uses it, or set HAUL_WORKER_METRICS_PORT to a free port (or unset it)"
        )
    if secret is None:
        return settings
    path, made = keep_webhook_secret(home, secret)
    env["HAUL_WEBHOOK_SECRET_FILE"] = str(path)
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    say(
        f"no webhook secret is configured, so webhooks are signed with the one in {shown} "
        f"({'made now' if made else 'made by an earlier haul up'}, mode 0600; `cat {shown}` shows it, "
        f"`{haul_command(Path.cwd())} webhook listen --secret-file {shown}` receives and checks deliveries)"
    )
    return settings.replace(webhook_secrets=Settings.from_env(env).webhook_secrets)


def _start_children(
    settings: Settings, env: dict[str, str], children: list[tuple[str, subprocess.Popen[bytes]]]
) -> None:
    """Start the workers, then the supervisor, onto ``children`` (their stopping order: one that
    started is stopped even if the next fails to), and say so."""
    worker_env = {**env, **worker_environment(settings)}
    children.append(("workers", subprocess.Popen(worker_command(settings), env=worker_env, start_new_session=True)))
    supervisor = subprocess.Popen([sys.executable, "-m", "supervisor"], env=env, start_new_session=True)
    children.append(("supervisor", supervisor))
    api = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "api"], env=env, start_new_session=True)
    children.insert(0, ("api", api))  # stopped first: nothing new comes in while the rest stops
    haul = haul_command(Path.cwd())
    say(
        f"workers, supervisor and API running; files land in {settings.storage_dir}; "
        f"health and metrics on http://{settings.supervisor_host}:{settings.supervisor_port}/healthz; "
        f"the HTTP API on http://{settings.api.host}:{settings.api.port} (docs at /docs)"
    )
    say(f"in another shell: {haul} submit URL, then {haul} status ID. Ctrl-C stops everything.")
