"""The worker's entry: ``dramatiq actors.worker`` (what ``haul worker`` runs).

Importing this module is what starts a worker's set-up, and nothing else imports it: it reads
the ``HAUL_*`` environment (a bad value exits with status 2 and a message naming the
variable), installs log redaction and the log format, keeps yt-dlp from loading plugins,
initialises Sentry (before the broker: Sentry's Dramatiq integration patches
``Broker.__init__``), builds the broker with the actors declared, and makes it Dramatiq's
current one, which the ``dramatiq`` command runs.
"""

from __future__ import annotations

import os
import sys

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from actors.broker import worker_broker
from actors.logs import reformat
from actors.redact import install_log_redaction, secrets_of
from actors.runtime import Runtime
from actors.sentry import init_sentry
from actors.settings import Settings, SettingsError


def start() -> RedisBroker:
    try:
        settings = Settings.from_env()
        settings.check_signing()
    except SettingsError as exc:
        print(f"haul: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    install_log_redaction(secrets_of(settings))
    reformat(settings.log_format)  # Dramatiq's handler, now in HAUL_LOG_FORMAT
    # yt-dlp (page files) would import plugins from the user's folders: code haul never chose
    os.environ.setdefault("YTDLP_NO_PLUGINS", "1")
    init_sentry(settings, component="worker")
    broker = worker_broker(settings, Runtime.build(settings))
    dramatiq.set_broker(broker)
    return broker


broker = start()
