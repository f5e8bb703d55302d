"""Reading one ``HAUL_*`` value: a parser per kind (number, limit, flag, choice, URL, folder,
secret), each refusing a bad value with a :class:`SettingsError` that names the variable and
says what it takes. :mod:`actors.settings` says which variables exist and their defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from standardwebhooks import Webhook

#: How a flag may be spelled.
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A ``HAUL_*`` variable has a value haul cannot use; the message names it."""


def secret(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    path = env.get(f"{name}_FILE", "")
    if value and path:
        raise SettingsError(f"both {name} and {name}_FILE are set; keep one")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError(f"{name}_FILE={path} cannot be read ({exc.strerror})") from None
    return value.strip()


def webhook_secrets(text: str) -> tuple[str, ...]:
    """Split a rotation list (whitespace or commas) and check each is a usable secret."""
    secrets = tuple(part for part in text.replace(",", " ").split() if part)
    for index, secret in enumerate(secrets, start=1):
        if not secret.startswith("whsec_"):
            raise SettingsError(
                f"HAUL_WEBHOOK_SECRET: secret #{index} does not start with 'whsec_'; "
                "use a Standard Webhooks secret (`haul webhook new-secret` makes one)"
            )
        try:
            Webhook(secret)
        except Exception:
            raise SettingsError(f"HAUL_WEBHOOK_SECRET: secret #{index} is not valid base64 after 'whsec_'") from None
    return secrets


def redis_url(value: str) -> str:
    scheme = urlsplit(value).scheme
    if scheme not in {"redis", "rediss", "unix"}:
        raise SettingsError(f"HAUL_REDIS_URL must start with redis://, rediss:// or unix:// (got scheme {scheme!r})")
    return value


def http_url(value: str, name: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise SettingsError(f"{name} must be an http:// or https:// URL with a host (got {value!r})")
    return value


def directory(env: Mapping[str, str], name: str, default: Path | None) -> Path | None:
    value = env.get(name)
    if value is None or value == "":
        return default
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise SettingsError(f"{name}={value} exists and is not a directory")
    return path.absolute()


def number(
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    minimum: float,
    maximum: float | None = None,
    integer: bool = False,
) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise SettingsError(f"{name} must be {kind} (got {raw!r})") from None
    if value < minimum or value != value:
        raise SettingsError(f"{name} must be at least {minimum:g} (got {raw!r})")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be at most {maximum:g} (got {raw!r})")
    return value


def limit(env: Mapping[str, str], name: str, default: int = 0) -> int:
    """A limit: a whole number, 0 meaning no limit."""
    return int(number(env, name, default, minimum=0, integer=True))


def host_ports(text: str) -> frozenset[str]:
    """``HAUL_ALLOW_HOSTS``: comma-separated ``host:port`` entries, matched exactly."""
    entries = set()
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(
                f"HAUL_ALLOW_HOSTS: {raw.strip()!r} is not host:port (e.g. cdn.internal:8080 or [::1]:9000)"
            )
        entries.add(entry)
    return frozenset(entries)


def proxy(value: str) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https", "socks5", "socks5h"} or not parts.hostname:
        raise SettingsError("HAUL_PROXY must be a proxy URL such as http://proxy.internal:3128")
    return value


def choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first when unset)."""
    value = (env.get(name) or choices[0]).strip().lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)} (got {env.get(name)!r})")
    return value


def flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    text = raw.strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise SettingsError(f"{name} must be one of 1/0, true/false, yes/no, on/off (got {raw!r})")
