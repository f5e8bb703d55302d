"""The ``haul`` command: submit and inspect tasks, run workers, run a local stack.

Exit codes: 0 success, 1 the operation failed (Redis unreachable, task missing), 2 bad input or
configuration (nothing was changed then).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from actors.apisettings import RESERVED_NAME
from actors.client import CancelRefused, Client, ClientError, RetryRefused
from actors.errors import InvalidTask
from actors.manifest import check_accept, check_url, spec_from_manifest, spec_from_urls
from actors.settings import Settings, SettingsError
from actors.states import State
from actors.store import TaskStore
from actors.task import TaskSpec
from supervisor.local import run_local_stack
from supervisor.statustext import format_rows, format_task
from supervisor.workers import run_worker

#: Who an action of the command line is recorded as (the API records its token's name).
CLI_ACTOR = RESERVED_NAME
EXIT_FAILED = 1
EXIT_USAGE = 2
#: The task's state does not allow it (a retry of a task that has not ended, a cancel of one that
#: has, or whose completion is being announced): nothing changed, and retrying the command will not help.
EXIT_REFUSED = 3


def build_parser() -> argparse.ArgumentParser:
    """Every command and option of ``haul`` (a line or two each, so past 50 lines)."""
    parser = argparse.ArgumentParser(prog="haul", description="Move media from HTTP origins into storage, reliably.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="create a task from URLs or a manifest; prints its id last")
    submit.add_argument("urls", nargs="*", metavar="URL")
    submit.add_argument(
        "--page", action="append", default=[], metavar="URL", help="a page showing the video (a share link, a "
        "streaming site's page), resolved by a worker with haul[resolve] when it downloads (repeat)",
    )  # fmt: skip
    submit.add_argument("--format", help="how to choose among a page's formats (a yt-dlp format selector)")
    submit.add_argument(
        "--manifest", type=Path, help='JSON file {"name", "key", "webhook", "accept", "files": [...]}; - reads stdin'
    )
    submit.add_argument("--name", default="")
    submit.add_argument(
        "--key", help="idempotency key: the same key and request again returns the same task; another request exits 2"
    )
    submit.add_argument("--webhook", help="receiver for this task's events (default HAUL_WEBHOOK_URL)")
    submit.add_argument(
        "--accept", action="append", metavar="TYPE", help="a content type the files may have (repeat; default: media, "
        "PDF, subtitles, archives, playlists, octet-stream; '*/*' takes anything)",
    )  # fmt: skip
    submit.add_argument(
        "--replace", action="store_true", help="put this request under --key when its task failed, died or was canceled"
    )

    status = commands.add_parser("status", help="one task, or counts by state")
    status.add_argument("task_id", nargs="?")
    status.add_argument("--key", help="the task this idempotency key names")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--state", choices=[s.value for s in State], help="list the tasks in this state")
    status.add_argument("--limit", type=int, default=50, help="most tasks listed with --state")

    retry = commands.add_parser("retry", help="give a failed, dead or canceled task fresh attempts")
    retry.add_argument("task_id")
    cancel = commands.add_parser("cancel", help="stop a task that has not ended")
    cancel.add_argument("task_id")

    commands.add_parser("worker", help="run Dramatiq workers for every stage (other options go to dramatiq)")

    commands.add_parser("supervisor", help="run the supervisor daemon (sweeps, alerts, /healthz, /metrics)")
    watch = commands.add_parser("watch", help="live progress of tasks (every active task without ids)")
    watch.add_argument("task_ids", nargs="*", metavar="ID")
    commands.add_parser("api", help="serve the HTTP API (HAUL_API_HOST:HAUL_API_PORT, default 127.0.0.1:9320)")
    commands.add_parser("up", help="a local stack: its own Redis (or HAUL_REDIS_URL's), workers, supervisor")

    reindex = commands.add_parser(
        "reindex", help="bring the search indexes up to date now, after an upgrade (the supervisor does it slowly)"
    )
    reindex.add_argument("--again", action="store_true", help="start over, even if it finished before")

    webhook = commands.add_parser("webhook", help="webhook helpers")
    webhook_commands = webhook.add_subparsers(dest="webhook_command", required=True)
    webhook_commands.add_parser("new-secret", help="print a new Standard Webhooks secret (whsec_...)")
    verify = webhook_commands.add_parser(
        "verify", help="check a delivery's signature against HAUL_WEBHOOK_SECRET (for debugging receivers)"
    )
    verify.add_argument("--body", type=Path, required=True, help="file with the raw body as received ('-': stdin)")
    verify.add_argument(
        "--header", action="append", default=[], metavar="'NAME: VALUE'", help="a received header (repeat)"
    )
    verify.add_argument("--headers", type=Path, help="file of received headers, one 'Name: value' per line")
    listen = webhook_commands.add_parser("listen", help="receive webhooks on 127.0.0.1, verify and print each one")
    listen.add_argument("--port", type=int, default=9320, help="port to receive on (0: any free one; default 9320)")
    listen.add_argument("--secret-file", type=Path, help="the secret (default: HAUL_WEBHOOK_SECRET, or haul up's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, passed_on = parser.parse_known_args(argv)
    if passed_on and args.command != "worker":
        parser.error(f"unrecognized arguments: {' '.join(passed_on)}")
    try:
        if args.command == "webhook" and args.webhook_command == "new-secret":
            print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
            return 0
        if args.command == "webhook" and args.webhook_command == "listen":
            from supervisor.listen import run_listener

            return run_listener(os.environ, args.port, args.secret_file)
        if args.command == "up":
            return run_local_stack(os.environ)
        settings = Settings.from_env()
        if args.command == "webhook":
            return cmd_webhook_verify(settings, args)
        if args.command in ("worker", "supervisor"):  # they send webhooks, so they must sign them
            settings.check_signing()
        if args.command == "worker":
            return run_worker(settings, passed_on)
        if args.command == "supervisor":
            from actors.logs import setup_logging
            from supervisor.daemon import run

            setup_logging(settings.log_format)
            logging.getLogger("apscheduler").setLevel(logging.WARNING)  # a line per job run is noise
            return run(settings)
        if args.command == "api":
            from supervisor.api.server import run_api

            return run_api(settings)
        handler = {
            "submit": cmd_submit, "status": cmd_status, "retry": cmd_retry, "cancel": cmd_cancel, "watch": cmd_watch,
            "reindex": cmd_reindex,
        }  # fmt: skip
        return handler[args.command](settings, args)
    except (SettingsError, InvalidTask) as exc:
        print(f"haul: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RetryRefused, CancelRefused) as exc:
        print(f"haul: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ClientError as exc:
        print(f"haul: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except redis.RedisError as exc:
        print(f"haul: Redis at HAUL_REDIS_URL did not answer ({exc}); is redis-server running?", file=sys.stderr)
        return EXIT_FAILED


def _client(settings: Settings) -> Client:
    return Client(settings)


def read_spec(args: argparse.Namespace) -> TaskSpec:
    # Options are checked under their own names first, so a mistake is not reported as a
    # manifest field the caller never wrote.
    if args.webhook is not None:
        check_url(args.webhook, "--webhook")
    accept = list(check_accept(args.accept, "--accept")) if args.accept is not None else None
    if args.replace and not args.key:
        raise InvalidTask("--replace needs --key (or a manifest with a key): it replaces the task a key names")
    if args.manifest is not None:
        if args.urls or args.page or args.format:
            raise InvalidTask("give either URLs and pages or --manifest, not both")
        source = "from standard input" if str(args.manifest) == "-" else str(args.manifest)
        try:
            text = sys.stdin.read() if str(args.manifest) == "-" else args.manifest.read_text(encoding="utf-8")
            data = json.loads(text)
        except OSError as exc:
            raise InvalidTask(f"manifest {source}: cannot be read ({exc.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidTask(f"manifest {source}: not valid JSON ({exc})") from None
        if isinstance(data, dict):
            options = (("name", args.name or None), ("key", args.key), ("webhook", args.webhook), ("accept", accept))
            for field, value in options:
                if value is not None:
                    data[field] = value
        return spec_from_manifest(data)
    if not args.urls and not args.page:
        raise InvalidTask("nothing to download: give one or more URLs or --page URLs, or --manifest FILE.json")
    return spec_from_urls(args.urls, name=args.name, key=args.key, webhook=args.webhook, accept=accept,
                          pages=args.page, format=args.format)  # fmt: skip


def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    spec = read_spec(args)  # validated before anything touches Redis
    if args.replace and not spec.key:
        raise InvalidTask("--replace needs --key (or a manifest with a key): it replaces the task a key names")
    print(_client(settings).submit_spec(spec, replace=args.replace))
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    client = _client(settings)
    if args.key is not None and args.task_id:
        raise InvalidTask("give either a task id or --key, not both")
    if args.key is not None or args.task_id:
        status = (client.find(args.key) if args.key is not None else client.get(args.task_id)).as_status()
        print(json.dumps(status, indent=2) if args.json else format_task(status))
        return 0
    if args.state:
        tasks = client.list(State(args.state), args.limit)
        rows = [t.as_status() for t in tasks]
        print(json.dumps(rows, indent=2) if args.json else format_rows(tasks, time.time()))
        return 0
    counts = {state.value: n for state, n in client.counts().items()}
    if args.json:
        print(json.dumps(counts))
    else:
        width = max(len(s) for s in counts)
        print("\n".join(f"{state:<{width}}  {n}" for state, n in counts.items()))
    return 0


def cmd_watch(settings: Settings, args: argparse.Namespace) -> int:
    from supervisor.watch import watch

    try:
        return watch(_client(settings), args.task_ids)
    except KeyboardInterrupt:
        return 0


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    _client(settings).retry(args.task_id, by=CLI_ACTOR)
    print(f"task {args.task_id}: queued again")
    return 0


def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    """Cancel a task and send task.canceled, unless its completion is already being announced."""
    if not _client(settings).cancel(args.task_id, by=CLI_ACTOR):
        print(f"haul: task {args.task_id}: task.canceled not queued now; the supervisor will send it "
              "within HAUL_ORPHAN_SECONDS", file=sys.stderr)  # fmt: skip
    print(f"task {args.task_id}: canceled; task.canceled goes to its webhook")
    return 0


def cmd_reindex(settings: Settings, args: argparse.Namespace) -> int:
    """Run the search indexes' backfill to its end in the foreground (the supervisor's job does
    it a few batches a sweep), from where it stopped, or from scratch with --again."""
    from supervisor.backfill import advance

    store = TaskStore.from_url(settings.redis_url)
    if args.again:
        store.reset_backfill()
    shown, phase = 0.0, ""
    while (state := advance(store, time.time(), batches=1)) is not None:
        if state.done or state.phase != phase or time.monotonic() - shown >= 1:  # a line a second at most
            print(f"{state.phase}: {state.indexed} task(s) indexed, {state.dropped} entr(ies) of gone tasks dropped",
                  flush=True)  # fmt: skip
            shown, phase = time.monotonic(), state.phase
        if state.done:
            return 0
    done_at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(store.backfill_done_at() or 0))
    print(f"the search indexes were brought up to date at {done_at}; nothing to do (--again runs it again)")
    return 0


def cmd_webhook_verify(settings: Settings, args: argparse.Namespace) -> int:
    """Say whether a delivery verifies with any configured secret, and if not, why."""
    from standardwebhooks import Webhook, WebhookVerificationError

    if not settings.webhook_secrets:
        raise InvalidTask("set HAUL_WEBHOOK_SECRET (or HAUL_WEBHOOK_SECRET_FILE) to the receiver's secret(s)")
    body = sys.stdin.buffer.read() if str(args.body) == "-" else _read_input(args.body, "body")
    lines = list(args.header)
    if args.headers is not None:
        lines += _read_input(args.headers, "headers").decode("utf-8", "replace").splitlines()
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise InvalidTask(f"header {line!r} is not 'Name: value'")
        headers[name.strip().lower()] = value.strip()
    reasons = []
    for index, secret in enumerate(settings.webhook_secrets, start=1):
        try:
            Webhook(secret).verify(body, headers)
        except WebhookVerificationError as exc:
            reasons.append(f"secret #{index}: {exc}")
            continue
        print(f"valid: webhook-id {headers.get('webhook-id')} verifies with secret #{index}")
        return 0
    print("invalid: " + "; ".join(reasons), file=sys.stderr)
    return EXIT_FAILED


def _read_input(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidTask(f"{what} file {path}: cannot be read ({exc.strerror})") from None


if __name__ == "__main__":
    sys.exit(main())
