"""The HTTP API's settings (``haul api``): where it listens, who may call it, what it accepts.

Tokens come as ``name:token`` entries (whitespace or commas between them; a bare token is
named by its position, ``token-1``...) so that actions can be attributed to a name and a
token rotated by adding the new one before removing the old. Full tokens
(``HAUL_API_TOKENS``, or ``HAUL_API_TOKENS_FILE``) may do everything, read tokens
(``HAUL_API_READ_TOKENS``, ``_FILE``) read and follow events only. Watch tokens, which let a
customer's browser follow one task, are signed with ``HAUL_API_SIGNING_KEY`` (``_FILE``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from actors import envvars
from actors.envvars import SettingsError

DEFAULT_API_PORT = 9320
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: How long a watch token handed out with a new task lets a browser follow it (seconds).
DEFAULT_WATCH_SECONDS = 7 * 24 * 3600
#: Shortest token or signing key accepted: a short one can be guessed.
MIN_SECRET_CHARS = 16
#: What the command line's actions are recorded as: no token may be named so.
RESERVED_NAME = "cli"
#: Paths of the API the dashboard's prefix may not take.
API_PATHS = ("/v1", "/docs", "/healthz", "/openapi.json")
#: How long a dashboard session lasts unused (seconds).
DEFAULT_UI_IDLE_SECONDS = 30 * 60


@dataclass(frozen=True)
class ApiToken:
    name: str
    token: str = field(repr=False)
    write: bool


@dataclass(frozen=True)
class ApiSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_API_PORT
    tokens: tuple[ApiToken, ...] = field(default=(), repr=False)
    signing_key: str = field(default="", repr=False)
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    watch_seconds: float = DEFAULT_WATCH_SECONDS
    #: Where the dashboard is served (HAUL_UI_PREFIX), for a reverse proxy that maps it.
    ui_prefix: str = "/ui"
    #: How long a dashboard session lasts unused (HAUL_UI_IDLE_SECONDS).
    ui_idle_seconds: float = DEFAULT_UI_IDLE_SECONDS
    #: Peers whose X-Forwarded-Proto and X-Forwarded-Host are believed (HAUL_API_TRUSTED_PROXIES):
    #: a reverse proxy that ends TLS says so (the dashboard's cookie is then Secure) and which
    #: host the browser asked for (its forms are judged against it).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def open(self) -> bool:
        """No token configured: anyone who reaches the port may do anything (loopback only)."""
        return not self.tokens

    def check_exposure(self) -> None:
        """Refuse to serve without tokens anywhere but on loopback (checked by ``haul api``, not
        by every reader of the settings)."""
        if self.open and not _loopback(self.host):
            raise SettingsError(
                f"HAUL_API_HOST={self.host} is not a loopback address but no token is set: anyone on the "
                "network could submit and cancel tasks; set HAUL_API_TOKENS (name:token, ...) or listen on 127.0.0.1"
            )

    def secrets(self) -> list[str]:
        """Values that must never leave the process (for log redaction)."""
        return [t.token for t in self.tokens] + ([self.signing_key] if self.signing_key else [])

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ApiSettings:
        host = env.get("HAUL_API_HOST", "").strip() or "127.0.0.1"
        tokens = parse_tokens(envvars.secret(env, "HAUL_API_TOKENS"), write=True, start=1)
        tokens += parse_tokens(envvars.secret(env, "HAUL_API_READ_TOKENS"), write=False, start=len(tokens) + 1)
        names = [t.name for t in tokens]
        if len(set(names)) != len(names):
            raise SettingsError("HAUL_API_TOKENS / HAUL_API_READ_TOKENS: two tokens share a name; name each once")
        signing_key = envvars.secret(env, "HAUL_API_SIGNING_KEY")
        if signing_key and len(signing_key) < MIN_SECRET_CHARS:
            raise SettingsError(f"HAUL_API_SIGNING_KEY is shorter than {MIN_SECRET_CHARS} characters; use a random one")
        return cls(
            host=host,
            port=int(envvars.number(env, "HAUL_API_PORT", DEFAULT_API_PORT, minimum=0, integer=True)),
            tokens=tokens,
            signing_key=signing_key,
            cors_origins=tuple(o for o in env.get("HAUL_API_CORS_ORIGINS", "").replace(",", " ").split() if o),
            max_body_bytes=int(
                envvars.number(env, "HAUL_API_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, minimum=1024, integer=True)
            ),
            watch_seconds=envvars.number(env, "HAUL_API_WATCH_SECONDS", DEFAULT_WATCH_SECONDS, minimum=60),
            ui_prefix=_prefix(env.get("HAUL_UI_PREFIX", "/ui")),
            ui_idle_seconds=envvars.number(env, "HAUL_UI_IDLE_SECONDS", DEFAULT_UI_IDLE_SECONDS, minimum=1),
            trusted_proxies=_networks(env.get("HAUL_API_TRUSTED_PROXIES", "")),
        )


def _prefix(text: str) -> str:
    """A URL path prefix: one leading slash, none trailing, plain characters only."""
    prefix = "/" + text.strip().strip("/")
    segments = prefix.split("/")[1:]
    plain = all(s and s not in {".", ".."} and s.replace("-", "").replace("_", "").replace(".", "").isalnum()
                and s.isascii() for s in segments)  # fmt: skip
    taken = any(prefix == path or prefix.startswith(path + "/") for path in API_PATHS)
    if prefix == "/" or not plain or taken:
        raise SettingsError(f"HAUL_UI_PREFIX={text!r} must be a path of its own such as /ui or /haul/ui")
    return prefix


def _networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for entry in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise SettingsError(
                f"HAUL_API_TRUSTED_PROXIES: {entry!r} is not an address or network (10.0.0.5, 10.0.0.0/8)"
            ) from None
    return tuple(networks)


def parse_tokens(text: str, *, write: bool, start: int) -> tuple[ApiToken, ...]:
    """``name:token`` entries; a bare token is ``token-<position>``. The message never echoes
    a token."""
    tokens = []
    for position, entry in enumerate((e for e in text.replace(",", " ").split() if e), start=start):
        name, sep, token = entry.partition(":")
        if not sep:
            name, token = f"token-{position}", entry
        # The messages name the entry by position: a bare token holding ':' would be split, and
        # its first half, taken for a name, must not be shown.
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise SettingsError(f"API token #{position}: its name must be letters, digits, '-', '_' or '.'")
        if name == RESERVED_NAME:
            raise SettingsError(f"API token #{position}: {RESERVED_NAME!r} names the command line's actions; rename it")
        if len(token) < MIN_SECRET_CHARS:
            raise SettingsError(
                f"API token #{position} is shorter than {MIN_SECRET_CHARS} characters; use a random one "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        tokens.append(ApiToken(name, token, write))
    return tuple(tokens)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
