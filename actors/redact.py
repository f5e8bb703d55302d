"""Keeping secrets out of text that leaves the process: logs, errors, webhooks, Sentry.

Origin URLs often carry credentials (``https://user:pass@host``) or signed query strings
(``?X-Amz-Signature=...``) that are as good as a password until they expire.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from actors.settings import Settings

REDACTED = "[redacted]"
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@", re.I)
_URL_QUERY = re.compile(r"(?P<base>https?://[^\s?#\"']+)\?[^\s#\"']*", re.I)


def secrets_of(settings: Settings) -> list[str]:
    """Every value that must never leave the process."""
    values = list(settings.webhook_secrets)
    for secret in settings.webhook_secrets:
        values.append(secret.removeprefix("whsec_"))
    password = urlsplit(settings.redis_url).password
    if password:
        values.append(password)
    if settings.sentry_dsn:
        values.append(settings.sentry_dsn)
    return [v for v in values if len(v) >= 4]


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove secrets, URL passwords (``user:***@``) and query strings from ``text``."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _URL_QUERY.sub(lambda m: f"{m['base']}?{REDACTED}", text)


def display_url(url: str) -> str:
    """``url`` as it may appear in messages: no password, no query string."""
    return redact_text(url)
