"""Who calls: a bearer token (full or read-only, by name), or a watch token that lets a
customer's browser read one task and follow its events.

Tokens are compared in constant time against every configured one (the loop does not stop at
a match). A watch token is ``w1.<expires>.<signature>``: an HMAC-SHA256 with
HAUL_API_SIGNING_KEY of the task id and the expiry, so it is bound to one task and cannot be
stretched; it goes in ``?watch_token=`` because a browser's EventSource cannot send headers.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from actors.apisettings import ApiSettings, ApiToken
from supervisor.api.problems import Problem

WATCH_PREFIX = "w1"
#: What a watch token's holder (a customer's browser) is not shown: where haul fetches from
#: and reports to (signed URLs, the backend's webhook), which worker runs the task, and the
#: error texts, which name them (the machine-readable ``error_code`` stays), nor which operator acted.
HIDDEN_FROM_WATCHERS = frozenset({"webhook", "worker", "lease_until", "error", "error_file", "host", "by"})
#: Of each file in a status: its source (a URL or page) and the host its page resolved to.
HIDDEN_FILE_FIELDS = frozenset({"url", "page"})
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="haul"'}


@dataclass(frozen=True)
class Caller:
    """Who is calling: a token's name, whether it may act, and for a watch token its task."""

    name: str
    write: bool
    task_id: str | None = None

    def may_read(self, task_id: str | None) -> bool:
        return self.task_id is None or self.task_id == task_id


def watcher_view(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a task's status or an event) without what a watcher is not shown."""
    shown = {k: v for k, v in data.items() if k not in HIDDEN_FROM_WATCHERS}
    if isinstance(shown.get("files"), list):
        shown["files"] = [_watcher_file(f) for f in shown["files"]]
    return shown


def _watcher_file(entry: dict[str, Any]) -> dict[str, Any]:
    shown = {k: v for k, v in entry.items() if k not in HIDDEN_FILE_FIELDS}
    if isinstance(shown.get("resolved"), dict):
        shown["resolved"] = {k: v for k, v in shown["resolved"].items() if k != "host"}
    return shown


def view_for(caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as ``caller`` may see it."""
    return data if caller.task_id is None else watcher_view(data)


def authenticate(api: ApiSettings, authorization: str | None, watch_token: str | None, now: float) -> Caller:
    """The caller a request's ``Authorization`` header (or watch token) names; raises a 401
    :class:`Problem` otherwise. With no token configured every caller may do everything (the
    API then listens on loopback only)."""
    if authorization:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Problem(401, "Authorization must be 'Bearer <token>'", headers=_CHALLENGE)
        match = matching_token(api, given.strip())
        if match is not None:
            return Caller(match.name, write=match.write)
        if api.open:
            return Caller("anonymous", write=True)
        raise Problem(401, "the bearer token is not one of HAUL_API_TOKENS or HAUL_API_READ_TOKENS",
                      headers=_CHALLENGE)  # fmt: skip
    if watch_token:
        task_id = read_watch_token(api, watch_token, now)
        if task_id is not None:
            return Caller(f"watch:{task_id}", write=False, task_id=task_id)
        raise Problem(401, "the watch token is not valid (expired, or for another task)", headers=_CHALLENGE)
    if api.open:
        return Caller("anonymous", write=True)
    raise Problem(401, "this API needs 'Authorization: Bearer <token>'", headers=_CHALLENGE)


def matching_token(api: ApiSettings, given: str) -> ApiToken | None:
    """The configured token ``given`` is, if any."""
    found = None
    for token in api.tokens:  # every one compared: the time does not say which matched
        if hmac.compare_digest(token.token.encode(), given.encode("utf-8", "replace")):
            found = token
    return found


def make_watch_token(api: ApiSettings, task_id: str, now: float) -> str | None:
    """A watch token for ``task_id`` valid for HAUL_API_WATCH_SECONDS; None without a signing key."""
    if not api.signing_key:
        return None
    expires = int(now + api.watch_seconds)
    return f"{WATCH_PREFIX}.{task_id}.{expires}.{_signature(api.signing_key, task_id, expires)}"


def read_watch_token(api: ApiSettings, token: str, now: float) -> str | None:
    """The task a valid, unexpired watch token is for; None otherwise."""
    if not api.signing_key:
        return None
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != WATCH_PREFIX or not (parts[2].isascii() and parts[2].isdigit()):
        return None
    _, task_id, expires, signature = parts
    expected = _signature(api.signing_key, task_id, int(expires))
    if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected.encode()):
        return None
    return task_id if int(expires) > now else None


def _signature(key: str, task_id: str, expires: int) -> str:
    return hmac.new(key.encode(), f"{WATCH_PREFIX}.{task_id}.{expires}".encode(), hashlib.sha256).hexdigest()
