"""The operator dashboard, served by ``haul api`` under HAUL_UI_PREFIX (``/ui``): pages
rendered on the server from the same client the API uses, signed in with an API token
(:mod:`supervisor.api.sessions`).

Everything shown is hostile input (task names, paths, errors, page titles): every value goes
through :func:`html.escape`, and every answer carries a Content-Security-Policy that allows no
inline script or style and no framing (``frame-ancestors 'none'``: a page of another site
cannot overlay a button), ``nosniff``, ``same-origin`` referrers (a page with none sends
``Origin: null`` with its forms) and ``no-store``; so do the errors under its prefix. A form is
taken only from a page of the dashboard itself (``Sec-Fetch-Site``, else ``Origin``, compared
with the host the browser asked for, as a trusted proxy says it). The dashboard needs tokens:
with none set (HAUL_API_TOKENS, HAUL_API_READ_TOKENS) it answers that it is off.
"""

from __future__ import annotations

import html
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.client import CancelRefused, Client, RetryRefused, TaskNotFound
from actors.events import EventLog
from actors.registry import WorkerInfo, WorkerRegistry
from actors.settings import Settings
from actors.states import RETRYABLE_STATES, State
from actors.store import Cursor
from actors.task import Task
from supervisor.api import bulk, uilive, uipages
from supervisor.api.bulk import BulkRetries
from supervisor.api.sessions import COOKIE, Session, Sessions, from_proxy, over_tls
from supervisor.api.sse import SSE_HEADERS
from supervisor.api.uilive import LiveUpdates, View

log = logging.getLogger(__name__)

#: Tasks a page of the tasks list shows, unless asked for another of PAGE_SIZES.
PAGE_SIZE = 50
PAGE_SIZES = (50, 100, 200)
#: The searches of the tasks page: an id or key (one task), a name's start, an origin host.
SEARCHES = ("key", "name", "host")
#: Minutes of throughput the overview shows (and the current one).
THROUGHPUT_MINUTES = 5
#: Leased tasks read to say which worker holds which.
MAX_HELD_LISTED = 5000
#: Largest sign-in or action form read.
MAX_FORM_BYTES = 4096
#: What every dashboard answer allows the browser to do.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC = Path(__file__).parent / "static"
ASSET_TYPES = {"css": "text/css", "js": "text/javascript"}

Handler = Callable[[Request], Awaitable[Response]]


class Dashboard:
    """The dashboard's pages over ``client``, its sessions in ``sessions``."""

    def __init__(
        self, settings: Settings, client: Client, sessions: Sessions, bulk: BulkRetries, live: LiveUpdates
    ) -> None:
        self.settings, self.api = settings, settings.api
        self.client, self.sessions, self.bulk, self.live = client, sessions, bulk, live
        #: What every error, answer and history line shown goes through (the live updates' too).
        self.redact = live.redact
        self.prefix = self.api.ui_prefix

    def routes(self) -> list[BaseRoute]:
        p = self.prefix
        return [
            Route(p, self.home, methods=["GET"], include_in_schema=False),
            Route(f"{p}/", self._guarded(self.overview), methods=["GET"], include_in_schema=False),
            Route(f"{p}/tasks", self._guarded(self.tasks), methods=["GET"], include_in_schema=False),
            Route(f"{p}/workers", self._guarded(self.workers), methods=["GET"], include_in_schema=False),
            Route(f"{p}/bulk/confirm", self._guarded(self.bulk_confirm), methods=["POST"], include_in_schema=False),
            Route(f"{p}/bulk/retry", self._guarded(self.bulk_retry), methods=["POST"], include_in_schema=False),
            Route(f"{p}/tasks/{{task_id}}", self._guarded(self.task), methods=["GET"], include_in_schema=False),
            Route(
                f"{p}/tasks/{{task_id}}/{{action}}", self._guarded(self.act), methods=["POST"], include_in_schema=False
            ),
            Route(f"{p}/sign-in", self.sign_in_form, methods=["GET"], include_in_schema=False),
            Route(f"{p}/sign-in", self.sign_in, methods=["POST"], include_in_schema=False),
            Route(f"{p}/sign-out", self.sign_out, methods=["POST"], include_in_schema=False),
            Route(f"{p}/live", self.live_updates, methods=["GET"], include_in_schema=False),
            Route(f"{p}/static/ui.css", self.asset, methods=["GET"], include_in_schema=False),
            Route(f"{p}/static/ui.js", self.asset, methods=["GET"], include_in_schema=False),
        ]

    # -- pages ------------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        """The prefix without its slash: to the overview, by a path of this host (not a URL
        built from a Host header a proxy may have rewritten)."""
        return RedirectResponse(f"{self.prefix}/", status_code=303)

    async def sign_in_form(self, request: Request) -> Response:
        return self._page("Sign in", self._sign_in_body(""), None)

    async def sign_in(self, request: Request) -> Response:
        if self.api.open:
            return self._off()
        if not self._same_origin(request):  # a page of another site signing the browser in as its own
            return self._page("Refused", "<p>Sign in from this dashboard's own page.</p>", None, status=403)
        form = await _form(request)
        started = await self.sessions.start(form.get("token", ""), time.time())
        if started is not None:  # the browser's earlier session, if any, ends here
            await self.sessions.forget(request.cookies.get(COOKIE))
        if started is None:
            body = self._sign_in_body("That is not one of this API's tokens (HAUL_API_TOKENS, HAUL_API_READ_TOKENS).")
            return self._page("Sign in", body, None, status=401)
        session_id, session = started
        log.info("ui: %s signed in", session.name)
        response = RedirectResponse(f"{self.prefix}/", status_code=303)
        response.set_cookie(
            COOKIE, session_id, path=self.prefix, httponly=True, samesite="strict", secure=over_tls(request, self.api)
        )
        return response

    async def sign_out(self, request: Request) -> Response:
        session = await self._session(request)
        if session is None:
            return self._to_sign_in()
        form = await self._posted(request, session, acting=False)
        if isinstance(form, Response):
            return form
        await self.sessions.end(session)
        log.info("ui: %s signed out", session.name)
        response = self._to_sign_in()
        response.delete_cookie(COOKIE, path=self.prefix)
        return response

    async def overview(self, request: Request, session: Session) -> Response:
        figures = await run_in_threadpool(self._figures, time.time())
        body = f"<h1>Overview</h1>{uipages.overview(figures, self._limits())}"
        return self._page("Overview", body, session, live=self._live_url([], counts=True, tables="overview"))

    def _figures(self, now: float) -> uipages.Figures:
        """What the overview shows, read from Redis: a few known keys, never a scan."""
        store = self.client.store
        return uipages.Figures(
            now=now,
            counts=store.counts(),
            minutes=store.throughput(now, THROUGHPUT_MINUTES),
            slots=store.slots_in_use(now),
            staged_bytes=store.staged_bytes(),
            report=store.supervisor_report(),
        )

    def _limits(self) -> dict[str, int]:
        """The stage limits as this process is configured (0: none); workers should agree,
        which the supervisor's configuration check says when they do not."""
        s = self.settings
        return {"download": s.download_concurrency, "finalize": s.finalize_concurrency,
                "host": s.download_per_host, "staging_bytes": s.staging_max_bytes}  # fmt: skip

    async def tasks(self, request: Request, session: Session) -> Response:
        """Tasks in one state, newest first, a page at a time; or the task an id or key names."""
        query = request.query_params
        wanted = "".join(ch for ch in query.get("q", "") if ch.isprintable()).strip()[:200]
        by = str(query.get("by")) if query.get("by") in SEARCHES else "key"
        if wanted and by != "key":
            return await self._found(request, session, wanted, by)
        if wanted:
            found = await run_in_threadpool(self._lookup, wanted)
            if found is not None:
                return RedirectResponse(f"{self.prefix}/tasks/{quote(found, safe='')}", 303)
        state = _state(query.get("state")) or State.DOWNLOADING
        cursor = _cursor(query.get("cursor"))
        size = _page_size(query.get("per"))
        tasks, following = await run_in_threadpool(self.client.page, state, size, cursor)
        counts = await run_in_threadpool(self.client.counts)
        more = ""
        if following is not None:
            href = f"{self.prefix}/tasks?" + urlencode(
                {"state": state.value, "per": size, "cursor": f"{following.at!r}:{following.task_id}"}
            )
            more = f'<p><a href="{uipages.attr(href)}" rel="next">Older</a></p>'
        missing = f"<p>No task has the id or key {uipages.text(wanted)}.</p>" if wanted else ""
        offer = ""
        if session.write and state in RETRYABLE_STATES and counts.get(state):
            offer = uipages.bulk_offer(self.prefix, state, session.csrf)
        body = (
            f"<h1>Tasks</h1>{uipages.search_form(self.prefix, wanted, by)}{missing}"
            f"{uipages.state_tabs(self.prefix, state, counts)}{offer}"
            f"{uipages.task_rows(self.prefix, tasks, time.time(), self.redact)}{more}"
        )
        return self._page("Tasks", body, session, live=self._live_url([t.id for t in tasks], counts=True))

    async def _found(self, request: Request, session: Session, wanted: str, by: str) -> Response:
        """The tasks whose name starts with ``wanted`` (in name order), or with a file on the
        host ``wanted`` (newest first): from the store's indexes, a page at a time."""
        query = request.query_params
        size = _page_size(query.get("per"))
        following: str | None = None
        if by == "name":
            tasks, after = await run_in_threadpool(self.client.by_name, wanted, size, query.get("after") or None)
            following = after and urlencode({"q": wanted, "by": by, "per": size, "after": after})
        else:
            host = wanted.lower()
            tasks, cursor = await run_in_threadpool(self.client.by_host, host, size, _cursor(query.get("cursor")))
            if cursor is not None:
                at = f"{cursor.at!r}:{cursor.task_id}"
                following = urlencode({"q": wanted, "by": by, "per": size, "cursor": at})
        href = uipages.attr(f"{self.prefix}/tasks?{following}")
        more = f'<p><a href="{href}" rel="next">More</a></p>' if following else ""
        said = "whose name starts with" if by == "name" else "with a file on"
        body = (
            f"<h1>Tasks</h1>{uipages.search_form(self.prefix, wanted, by)}"
            f"<p>Tasks {said} {uipages.text(wanted)}:</p>"
            f"{uipages.task_rows(self.prefix, tasks, time.time(), self.redact)}{more}"
        )
        if by == "host" and session.write:  # an origin's outage over: its failures retried together
            offers = "".join(uipages.bulk_offer(self.prefix, state, session.csrf, wanted.lower())
                             for state in sorted(RETRYABLE_STATES, key=list(State).index))  # fmt: skip
            body += f'<div class="actions">{offers}</div>'
        live = self._live_url([t.id for t in tasks], counts=False) if tasks else None
        return self._page("Tasks", body, session, live=live)

    def _lookup(self, wanted: str) -> str | None:
        """The id of the task whose id or idempotency key is ``wanted``."""
        if self.client.store.get(wanted) is not None:
            return wanted
        try:
            return self.client.find(wanted).id
        except TaskNotFound:
            return None

    async def task(self, request: Request, session: Session) -> Response:
        task_id = request.path_params["task_id"]
        try:
            task = await run_in_threadpool(self.client.get, task_id)
        except TaskNotFound:
            return self._page("No such task", f"<p>No task {uipages.text(task_id)}.</p>", session, status=404)
        log_ = EventLog(self.client.store.client, self.client.store.prefix)
        events = await run_in_threadpool(log_.state_changes, task_id, uipages.HISTORY_SHOWN)
        deliveries = await run_in_threadpool(self._delivery_rows, task_id)
        status = task.as_status()
        body = uipages.task_detail(status, events, deliveries, self._actions(task, session), self.redact)
        live = self._live_url([task_id], counts=False, since=events[-1].id if events else "", tables="deliveries")
        return self._page(status["name"] or task_id, body, session, live=live)

    def _actions(self, task: Task, session: Session) -> str:
        """The buttons an operator may press on ``task`` (none for a read token); the one its
        state does not allow is hidden, and shown by the live updates once it does."""
        if not session.write:
            return ""
        buttons = []
        for action, offered in (("retry", task.state in RETRYABLE_STATES), ("cancel", not task.state.final)):
            target = f"{self.prefix}/tasks/{quote(task.id, safe='')}/{action}"
            buttons.append(
                f'<form method="post" action="{uipages.attr(target)}" class="inline" data-offer="{action}"'
                f'{"" if offered else " hidden"}><input type="hidden" name="csrf" value="{uipages.attr(session.csrf)}">'
                f'<button type="submit" class="{action}">{action.capitalize()}</button></form>'
            )
        return f'<div class="actions">{"".join(buttons)}</div>'

    async def act(self, request: Request, session: Session) -> Response:
        """Retry or cancel a task: a full token's session, its CSRF token, a page of this host."""
        task_id, action = request.path_params["task_id"], request.path_params["action"]
        if action not in ("retry", "cancel"):
            return self._page("No such action", "<p>Only retry and cancel.</p>", session, status=404)
        form = await self._posted(request, session)
        if isinstance(form, Response):
            return form
        try:
            await run_in_threadpool(self.client.retry if action == "retry" else self.client.cancel, task_id,
                                    f"ui:{session.name}")  # fmt: skip
        except TaskNotFound:
            return self._page("No such task", f"<p>No task {uipages.text(task_id)}.</p>", session, status=404)
        except (RetryRefused, CancelRefused) as exc:
            return self._page("Refused", f"<p>{uipages.text(exc)}</p>", session, status=409)
        log.info("ui: task %s %s by %s", task_id, "retried" if action == "retry" else "canceled", session.name)
        return RedirectResponse(f"{self.prefix}/tasks/{quote(task_id, safe='')}", 303)

    async def workers(self, request: Request, session: Session) -> Response:
        """Each registered worker process, its heartbeat's age and the tasks it holds."""
        workers, held = await run_in_threadpool(self._workers)
        body = "<h1>Workers</h1>" + uipages.worker_rows(self.prefix, workers, held, time.time())
        return self._page("Workers", body, session)

    def _workers(self) -> tuple[list[WorkerInfo], dict[str, list[str]]]:
        """The registry's workers, and the ids of the tasks each holds."""
        store = self.client.store
        workers = WorkerRegistry(store.client, store.prefix).workers()
        return sorted(workers, key=lambda w: (w.host, w.pid)), store.holders(MAX_HELD_LISTED)

    async def asset(self, request: Request) -> Response:
        """The stylesheet or the script, shipped in the package (no CDN, no build step)."""
        name = request.url.path.rpartition("/")[2]
        return FileResponse(STATIC / name, media_type=ASSET_TYPES[name.rpartition(".")[2]])

    async def live_updates(self, request: Request) -> Response:
        """The live updates of a page (:mod:`supervisor.api.uilive`): the tasks it names
        (``task``, repeated; with ``since``, the one whose page it is and its state changes
        after that entry), the counts by state (``counts=1``), and a group of tables read again
        (``tables``: ``overview``, or ``deliveries`` of a task's page). Without a session, or
        with no tokens set: 204, which an EventSource takes as the end; ``probe=1`` answers 200
        or 401 (whether the session lives, without renewing it) and streams nothing."""
        if self.api.open:
            return Response(status_code=204)
        session_id = request.cookies.get(COOKIE)
        signed_in = await self.sessions.find(session_id, time.time(), renew=False) is not None
        if request.query_params.get("probe") == "1":  # the page asks whether its stream can go on
            return Response(status_code=200 if signed_in else 401)
        if not signed_in:
            return Response(status_code=204)

        async def alive() -> bool:
            return await self.sessions.find(session_id, time.time(), renew=False) is not None

        query = request.query_params
        task_ids = tuple(dict.fromkeys(query.getlist("task")))[: uilive.MAX_FOLLOWED]
        tables: Callable[[], dict[str, uipages.Rows]] | None = None
        if query.get("tables") == "overview":
            tables = self._overview_rows
        elif query.get("tables") == "deliveries" and len(task_ids) == 1:
            tables = self._deliveries_table(task_ids[0])
        since = query.get("since")
        if since and not re.fullmatch(r"[0-9]{1,20}-[0-9]{1,20}", since):  # not a stream's entry: all of it
            since = ""
        view = View(task_ids=task_ids, counts=query.get("counts") == "1", since=since, read_tables=tables)
        frames = await self.live.stream(view, alive)
        return StreamingResponse(frames, media_type="text/event-stream", headers=SSE_HEADERS)

    def _overview_rows(self) -> dict[str, uipages.Rows]:
        return uipages.overview_rows(self._figures(time.time()), self._limits())

    def _delivery_rows(self, task_id: str) -> uipages.Rows:
        return uipages.delivery_rows(self.client.store.deliveries(task_id))

    def _deliveries_table(self, task_id: str) -> Callable[[], dict[str, uipages.Rows]]:
        return lambda: {"deliveries": self._delivery_rows(task_id)}

    def _live_url(self, task_ids: list[str], counts: bool, since: str | None = None, tables: str | None = None) -> str:
        """The URL of a page's live updates (:meth:`live_updates` reads it back)."""
        query = [("task", task_id) for task_id in task_ids] + ([("counts", "1")] if counts else [])
        query += ([("since", since)] if since is not None else []) + ([("tables", tables)] if tables else [])
        return f"{self.prefix}/live?{urlencode(query)}"

    # -- plumbing ---------------------------------------------------------------------------

    def _guarded(self, page: Callable[[Request, Session], Awaitable[Response]]) -> Handler:
        """``page`` for a signed-in operator; anyone else is sent to sign in."""

        async def handler(request: Request) -> Response:
            if self.api.open:
                return self._off()
            session = await self._session(request)
            if session is None:
                return self._to_sign_in()
            return await page(request, session)

        return handler

    async def _posted(self, request: Request, session: Session, acting: bool = True) -> dict[str, str] | Response:
        """The form of an action, or the refusal: not from a page of the dashboard, without the
        session's CSRF token, or (``acting``) from a read token's session."""
        form = await _form(request)
        if not self._same_origin(request) or not session.csrf_matches(form.get("csrf")):
            return self._page("Refused", "<p>This form is stale or forged; reload the page.</p>", session, status=403)
        if acting and not session.write:
            return self._page("Refused", "<p>A read token cannot act.</p>", session, status=403)
        return form

    async def bulk_confirm(self, request: Request, session: Session) -> Response:
        """Count the tasks a bulk retry would take, keep exactly those, ask to confirm."""
        form = await self._posted(request, session)
        if isinstance(form, Response):
            return form
        state = _state(form.get("state"))
        if state not in RETRYABLE_STATES:
            return self._page("Refused", "<p>Only failed, dead or canceled tasks are retried.</p>", session, 400)
        host = (form.get("host") or "").strip().lower() or None
        if host is not None and not re.fullmatch(r"[a-z0-9._:\[\]-]{1,253}", host):
            return self._page("Refused", "<p>That is not a host name.</p>", session, 400)
        counted = await self.bulk.count(self.client.store, state, session.key, host)
        return self._page("Retry all?", uipages.bulk_confirmation(self.prefix, counted, session.csrf), session)

    async def bulk_retry(self, request: Request, session: Session) -> Response:
        """Retry exactly the tasks a confirmation counted, once."""
        form = await self._posted(request, session)
        if isinstance(form, Response):
            return form
        ids = await self.bulk.take(form.get("confirm", ""), session.key)
        if ids is None:
            body = "<p>This confirmation was used already or has expired; count the tasks again.</p>"
            return self._page("Nothing retried", body, session, status=409)
        outcome = await run_in_threadpool(bulk.retry_all, self.client, ids, f"ui:{session.name}")
        log.info("ui: %d tasks retried in bulk by %s (%d refused, %d gone)", outcome.retried, session.name,
                 outcome.refused, outcome.missing)  # fmt: skip
        return self._page("Retried", uipages.bulk_outcome(self.prefix, outcome), session)

    async def _session(self, request: Request) -> Session | None:
        return await self.sessions.find(request.cookies.get(COOKIE), time.time())

    def _same_origin(self, request: Request) -> bool:
        """Whether a form was posted from a page of the dashboard itself: the browser says so
        (``Sec-Fetch-Site``), or names a page of the host it asked for (``Origin``; the host as
        a trusted proxy says, if one is in front). A client that says neither (not a browser of
        this decade) is judged by the session's CSRF token alone."""
        site = request.headers.get("sec-fetch-site")
        if site is not None:
            return site == "same-origin"
        origin = request.headers.get("origin")
        if origin is None:
            return True
        asked = from_proxy(request, self.api, "x-forwarded-host") or request.headers.get("host") or ""
        scheme = "https" if over_tls(request, self.api) else request.url.scheme
        return _authority(origin) == _authority(f"{scheme}://{asked}")

    def _ended_notice(self) -> str:
        """What a live page shows once its session ended (hidden until then)."""
        return (
            '<p class="problem" role="status" data-live-ended="" hidden>Live updates stopped: the session ended. '
            f'<a href="{html.escape(self.prefix)}/sign-in">Sign in</a> again.</p>'
        )

    def _to_sign_in(self) -> Response:
        return RedirectResponse(f"{self.prefix}/sign-in", status_code=303)

    def _off(self) -> Response:
        body = "<p>The dashboard needs tokens: set HAUL_API_TOKENS (name:token) on <code>haul api</code>.</p>"
        return self._page("Dashboard off", body, None, status=403)

    def _sign_in_body(self, problem: str) -> str:
        said = f'<p class="problem" role="alert">{html.escape(problem)}</p>' if problem else ""
        return (
            f"<h1>Sign in</h1>{said}"
            f'<form method="post" action="{html.escape(self.prefix)}/sign-in">'
            '<label for="token">API token</label> '
            '<input id="token" name="token" type="password" autocomplete="current-password" required> '
            '<button type="submit">Sign in</button></form>'
        )

    def _page(
        self, title: str, body: str, session: Session | None, status: int = 200, live: str | None = None
    ) -> Response:
        """A whole page: ``body`` (already escaped) under the header; the sign-out form when
        signed in; with ``live``, the URL of its live updates and the script that reads them."""
        prefix = html.escape(self.prefix)
        who = ""
        if session is not None:
            who += (
                f'<nav><a href="{prefix}/">Overview</a> <a href="{prefix}/tasks">Tasks</a> '
                f'<a href="{prefix}/workers">Workers</a></nav>'
            )
            role = "may act" if session.write else "read only"
            who += (
                f'<span class="who">{html.escape(session.name)} ({role})</span>'
                f'<form method="post" action="{prefix}/sign-out" class="inline">'
                f'<input type="hidden" name="csrf" value="{html.escape(session.csrf)}">'
                '<button type="submit">Sign out</button></form>'
            )
        document = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)} · haul</title>"
            f'<link rel="stylesheet" href="{prefix}/static/ui.css">'
            + (f'<script src="{prefix}/static/ui.js" defer></script>' if live else "")
            + f'</head><body><header><a href="{prefix}/" class="brand">haul</a>{who}</header>'
            + (f'<main data-live="{html.escape(live)}">{self._ended_notice()}' if live else "<main>")
            + f"{body}</main></body></html>"
        )
        return HTMLResponse(document, status_code=status)


class DashboardHeaders:
    """ASGI middleware, the one place SECURITY_HEADERS are added: every answer under the
    dashboard's prefix carries them, the errors Starlette writes (404, 405, 503) too."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app, self.prefix = app, prefix
        self.headers = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == self.prefix or path.startswith(self.prefix + "/")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in self.headers if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, with_headers)


def _state(text: str | None) -> State | None:
    try:
        return State(text or "")
    except ValueError:
        return None


def _page_size(text: str | None) -> int:
    """The page size asked for, if it is one of PAGE_SIZES."""
    return int(text) if text in {str(size) for size in PAGE_SIZES} else PAGE_SIZE


def _cursor(text: str | None) -> Cursor | None:
    """A page's place in a state's list (``time:task id``), as the Older link gave it."""
    at, _, task_id = (text or "").partition(":")
    try:
        return Cursor(float(at), task_id) if task_id and math.isfinite(float(at)) else None
    except ValueError:
        return None


def _authority(url: str) -> str:
    """``url``'s host and port, the scheme's default port left out (``null``: nothing)."""
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        return ""
    if not host:
        return ""
    return host if port in (None, {"http": 80, "https": 443}.get(parts.scheme)) else f"{host}:{port}"


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (the first of each), at most MAX_FORM_BYTES read."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=16)
    except ValueError:  # more fields than any of these forms has
        return {}
    return {name: values[0] for name, values in fields.items() if values}
