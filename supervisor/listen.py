"""``haul webhook listen``: a webhook receiver on 127.0.0.1 for a first run, as ``stripe listen``.

Each POST is verified with the secret(s) (Standard Webhooks) and answered 204, with one line on
standard output: the event type, the task id and its files; a delivery that does not verify is
answered 401 and said on standard error, so a wrong secret shows at once. Nothing is stored.

The secret comes from ``--secret-file``, else HAUL_WEBHOOK_SECRET / _FILE, else the one
``haul up`` made in ``$HAUL_HOME/webhook-secret``.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

from actors.settings import Settings, SettingsError, home_folder

#: Port ``haul webhook listen`` receives on unless told (0: any free one).
DEFAULT_LISTEN_PORT = 9320
#: The largest body read, in bytes: haul's events are a few KiB.
MAX_BODY_BYTES = 1024 * 1024


def listen_secrets(environ: Mapping[str, str], secret_file: Path | None) -> tuple[tuple[str, ...], str]:
    """The secrets to verify with, and where they came from; SettingsError when there are none."""
    if secret_file is not None:
        return Settings.from_env({"HAUL_WEBHOOK_SECRET_FILE": str(secret_file)}).webhook_secrets, str(secret_file)
    configured = Settings.from_env(environ).webhook_secrets
    if configured:
        return configured, "HAUL_WEBHOOK_SECRET" + ("_FILE" if environ.get("HAUL_WEBHOOK_SECRET_FILE") else "")
    local = home_folder(environ) / "webhook-secret"
    if local.exists():
        return Settings.from_env({"HAUL_WEBHOOK_SECRET_FILE": str(local)}).webhook_secrets, str(local)
    raise SettingsError(
        "no webhook secret: give --secret-file FILE, or set HAUL_WEBHOOK_SECRET (or _FILE), or run haul up here "
        "first (it makes .haul/webhook-secret)"
    )


def describe(body: bytes) -> str:
    """One line for a verified delivery: type, task id, files."""
    try:
        event: Any = json.loads(body)
        data = event.get("data") or {}
        files = ", ".join(str(f.get("path", "?")) for f in data.get("files") or []) or "-"
        line = f"{event.get('type', '?')}  task {data.get('id', '?')}  files: {files}"
        return line + (f"  error: {data['error']}" if data.get("error") else "")
    except (ValueError, AttributeError, TypeError):
        return f"a verified body that is not a haul event ({len(body)} bytes)"


def create_listener(host: str, port: int, secrets: Sequence[str]) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) that verifies and reports each delivery."""
    hooks = [Webhook(secret) for secret in secrets]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length > MAX_BODY_BYTES:
                self._answer(413)
                return
            body = self.rfile.read(length)
            headers = {name.lower(): value for name, value in self.headers.items()}
            for hook in hooks:
                try:
                    hook.verify(body, headers)
                except WebhookVerificationError:
                    continue
                print(describe(body), flush=True)
                self._answer(204)
                return
            print(
                f"haul webhook listen: refused a delivery (webhook-id {headers.get('webhook-id')}): its signature "
                "does not verify with this secret (401)",
                file=sys.stderr,
                flush=True,
            )
            self._answer(401)

        def _answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_listener(environ: Mapping[str, str], port: int, secret_file: Path | None) -> int:
    """Receive until Ctrl-C or SIGTERM; exit 2 with one line when the secret or port is unusable."""
    secrets, source = listen_secrets(environ, secret_file)
    try:
        server = create_listener("127.0.0.1", port, secrets)
    except OSError as exc:
        print(f"haul webhook listen: cannot listen on 127.0.0.1:{port} ({exc.strerror}); use --port", file=sys.stderr)
        return 2
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    print(
        f"haul webhook listen: receiving on {url}, verifying with the secret from {source}; "
        f"point HAUL_WEBHOOK_URL (or haul submit --webhook) there. Ctrl-C stops.",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
