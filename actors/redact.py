"""Keeping secrets out of text that leaves the process: logs, errors, webhooks, Sentry.

Origin URLs often carry credentials (``https://user:pass@host``) or signed query strings
(``?X-Amz-Signature=...``) that are as good as a password until they expire.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote, urlsplit

from actors.settings import Settings

#: Shorter values are not taken for secrets (they would redact ordinary words and numbers).
MIN_SECRET_CHARS = 4
#: A URL path's segments this long are taken for secrets where its answers are recorded.
PATH_SECRET_CHARS = 12
#: What replaces a secret or a query string.
REDACTED = "[redacted]"
#: A URL's userinfo: everything from ``//`` to the authority's LAST ``@`` before the first
#: ``/``, ``?``, ``#`` or whitespace (a password may hold ``@``; a token may be the user name).
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@", re.I)
#: A query string runs to whitespace or ``#``: quotes inside it (``?sig=a"b``) are part of it.
_URL_QUERY = re.compile(r"(?P<base>https?://[^\s?#]+)\?[^\s#]*", re.I)


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
    values.extend(settings.s3.secrets())
    values.extend(settings.api.secrets())
    return [v for v in values if len(v) >= MIN_SECRET_CHARS]


def secrets_in_url(url: str) -> list[str]:
    """A URL's own secrets, for text that may quote them without the URL around them (a
    receiver's answer echoing ``/hook?token=...`` or its request's headers, say): the user name
    and password, and the Basic credentials requests makes of them; the query and its values,
    decoded and as sent; and the path's long segments (Slack and Discord keep their token
    there)."""
    parts = urlsplit(url)
    values = [parts.username or "", parts.password or "", parts.query]
    if parts.username or parts.password:
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
        values.append(base64.b64encode(pair).decode())
    values += [value for _, value in parse_qsl(parts.query, keep_blank_values=True)]
    values += [item.partition("=")[2] for item in parts.query.split("&")]
    values += [segment for segment in parts.path.split("/") if len(segment) >= PATH_SECRET_CHARS]
    return [v for v in values if len(v) >= MIN_SECRET_CHARS]


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove secrets, URL credentials (``***@``) and query strings from ``text``.

    Idempotent: text redacted once (a log line that later reaches Sentry) is left as it is.
    """
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(_masked_userinfo, text)
    return _URL_QUERY.sub(lambda m: f"{m['base']}?{REDACTED}", text)


def _masked_userinfo(match: re.Match[str]) -> str:
    """``***@`` for the whole userinfo: tokens travel as user names too
    (``https://ghp_...@github.com``, ``https://TOKEN:x-oauth-basic@...``)."""
    return f"{match['scheme']}***@"


def display_url(url: str) -> str:
    """``url`` as it may appear in messages: no credentials, no query string."""
    return redact_text(url)


def install_log_redaction(secrets: Iterable[str]) -> None:
    """Redact every log record of this process at creation: message, arguments and traceback.

    A record factory applies to every logger and handler (Dramatiq's, urllib3's, ours), where a
    handler filter would miss handlers added later.
    """
    values = tuple(secrets)
    previous = logging.getLogRecordFactory()
    if getattr(previous, "haul_redacting", False):
        previous = previous.wrapped  # type: ignore[attr-defined]

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is logging's to report, not ours
            return record
        cleaned = redact_text(message, values)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info), values)
        return record

    factory.haul_redacting = True  # type: ignore[attr-defined]
    factory.wrapped = previous  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
