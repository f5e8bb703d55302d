"""The dashboard's sign-in: an API token, given once in a form, becomes a session kept in Redis.

The browser holds only a random session id, in an HttpOnly, SameSite=Strict cookie scoped to
the dashboard's path, Secure when the request came over TLS (``X-Forwarded-Proto`` is believed
only from HAUL_API_TRUSTED_PROXIES). Redis keeps the session under the id's SHA-256 (whoever
reads Redis cannot use it), bound to the token's name and the token's own SHA-256: a token
removed or rotated ends every session it started, and a read token's session never acts. A
session unused for HAUL_UI_IDLE_SECONDS ends by itself (its key expires; each use renews it).
Every form that acts carries the session's CSRF token, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass

from redis import asyncio as aioredis
from starlette.requests import Request

from actors.apisettings import ApiSettings
from actors.store_base import text_of
from supervisor.api.auth import matching_token

#: The cookie that holds a dashboard session's id.
COOKIE = "haul_session"
#: Longest a session lasts however much it is used (then its operator signs in again).
MAX_SESSION_SECONDS = 12 * 3600
#: Longest session id read from a cookie (ours are 43 characters).
MAX_SESSION_ID_CHARS = 100


@dataclass(frozen=True)
class Session:
    """A signed-in operator: their token's name, whether it may act, the session's CSRF token."""

    key: str
    name: str
    write: bool
    csrf: str

    def csrf_matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(self.csrf.encode(), given.encode("utf-8", "replace"))


def digest(text: str) -> str:
    """What Redis keeps of a secret (a session id, a token, a confirmation): its SHA-256."""
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()


class Sessions:
    """Dashboard sessions in Redis (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, prefix: str, api: ApiSettings) -> None:
        self.redis, self.prefix, self.api = redis, prefix, api

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}ui:session:{digest(session_id)}"

    async def start(self, given: str, now: float) -> tuple[str, Session] | None:
        """A new session for whoever gave token ``given`` (its id, for the cookie); None when
        it is not one of the API's tokens."""
        token = matching_token(self.api, given.strip())
        if token is None:
            return None
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        key = self._key(session_id)
        fields = {"name": token.name, "token": digest(token.token), "csrf": csrf, "started": str(now)}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.expire(key, max(1, int(self.api.ui_idle_seconds)))
            await pipe.execute()
        return session_id, Session(key, token.name, token.write, csrf)

    async def find(self, session_id: str | None, now: float, *, renew: bool = True) -> Session | None:
        """The live session ``session_id`` names, renewed (``renew``: an operator's request,
        not a page's live updates, which must not keep an idle session alive); None when there
        is none (never was, ended, idle too long, older than MAX_SESSION_SECONDS, or its token
        is no longer the API's)."""
        if not session_id or len(session_id) > MAX_SESSION_ID_CHARS:
            return None
        key = self._key(session_id)
        async with self.redis.pipeline(transaction=False) as pipe:  # read and renew: one round trip
            pipe.hgetall(key)
            if renew:
                pipe.expire(key, max(1, int(self.api.ui_idle_seconds)))
            raw = (await pipe.execute())[0]
        data = {text_of(k): text_of(v) for k, v in raw.items()}
        if not data.get("name"):
            return None
        token = next((t for t in self.api.tokens if t.name == data["name"]), None)
        too_old = now - float(data.get("started") or 0) > MAX_SESSION_SECONDS  # however much it is used
        # A removed or rotated token ends its sessions
        if token is None or too_old or not hmac.compare_digest(digest(token.token), data.get("token", "")):
            await self.redis.delete(key)
            return None
        return Session(key, token.name, token.write, data.get("csrf", ""))

    async def forget(self, session_id: str | None) -> None:
        """End the session ``session_id`` names, if any (the browser signs in anew)."""
        if session_id and len(session_id) <= MAX_SESSION_ID_CHARS:
            await self.redis.delete(self._key(session_id))

    async def end(self, session: Session) -> None:
        await self.redis.delete(session.key)


def over_tls(request: Request, api: ApiSettings) -> bool:
    """Whether the browser reached the dashboard over TLS: directly, or through a trusted proxy
    that says so."""
    if request.url.scheme == "https":
        return True
    return from_proxy(request, api, "x-forwarded-proto").lower() == "https"


def from_proxy(request: Request, api: ApiSettings, header: str) -> str:
    """What a trusted proxy (HAUL_API_TRUSTED_PROXIES) says in ``header``: the last value, its
    own (a client may have sent one before it); "" from anyone else."""
    peer = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return ""
    if not any(address in network for network in api.trusted_proxies):
        return ""
    values = ",".join(request.headers.getlist(header)).split(",")
    return values[-1].strip()
