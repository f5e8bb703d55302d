"""The API's routes: submit, read, list, count, retry, cancel, follow events, health; and the
dashboard's (:mod:`supervisor.api.ui`), on the same client and Redis.

Every route goes through the same :class:`actors.client.Client` a Python backend uses (its
calls run in Starlette's thread pool: a Redis round trip each), so the API holds no task logic
of its own. Two things run on redis.asyncio instead: the events (:mod:`supervisor.api.sse`),
and a submit's create step, the call a busy backend makes hundreds of times a second: the
client prepares it and reads its answer, the API only sends the script (:meth:`Api.create`).
Refusals are problem details (:mod:`supervisor.api.problems`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis
import redis.asyncio as aioredis
import swagger_ui_bundle
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from actors.client import CancelRefused, Client, RetryRefused, TaskNotFound
from actors.errors import InvalidTask
from actors.manifest import spec_from_manifest, spec_from_urls
from actors.redact import redact_text, secrets_of
from actors.settings import Settings
from actors.states import CreateReply, State
from actors.store import Cursor
from actors.store_base import REDIS_SOCKET_TIMEOUT_SECONDS, redis_options, text_of
from actors.task import KeyConflict, Task, TaskSpec
from supervisor.api.auth import Caller, authenticate, make_watch_token, view_for
from supervisor.api.bulk import BulkRetries
from supervisor.api.openapi import DOCS_JS, docs_page, document
from supervisor.api.problems import Problem, invalid_input
from supervisor.api.sessions import Sessions
from supervisor.api.sse import EventStreams, Hub
from supervisor.api.ui import Dashboard, DashboardHeaders
from supervisor.api.uilive import LiveUpdates

log = logging.getLogger(__name__)

MAX_PAGE = 500
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

#: A URLs body: the manifest's fields, with ``urls`` in place of ``files``.
URLS_FIELDS = frozenset({"urls", "name", "key", "webhook", "accept"})


class Api:
    """The handlers, bound to one client, one async Redis for events, and the settings."""

    def __init__(self, settings: Settings, client: Client, clock: Callable[[], float] = time.time) -> None:
        self.settings, self.api, self.client, self.clock = settings, settings.api, client, clock
        # Requests past the pool's size wait for a connection rather than fail; a command whose
        # connection broke is sent again (create.lua answers a resent call without a second task).
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=64, timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
            retry=AsyncRetry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3), **redis_options(),
        )  # fmt: skip
        self.redis = aioredis.Redis(connection_pool=pool)
        client.messages  # noqa: B018  built now, not by two requests at once
        self.create_script = self.redis.register_script(client.store.script_text("create"))
        self.hub = Hub(settings.redis_url, f"{client.store.prefix}events")
        self.streams = EventStreams(self.redis, self.hub, client.store.prefix)

    # -- helpers ------------------------------------------------------------------------

    def caller(self, request: Request, *, write: bool = False, task_id: str | None = None) -> Caller:
        """Who calls, if they may: a 401 without a valid token, a 403 for a read token acting or
        a watch token reaching past its task, or for a page of another origin (below)."""
        self.same_site(request)
        found = authenticate(self.api, request.headers.get("authorization"),
                             request.query_params.get("watch_token"), self.clock())  # fmt: skip
        if write and not found.write:
            raise Problem(403, f"token {found.name!r} may read only; this needs a token from HAUL_API_TOKENS")
        if not found.may_read(task_id):
            raise Problem(403, "a watch token reads its own task only")
        return found

    def same_site(self, request: Request) -> None:
        """Refuse what a web page of another site makes a browser send: a request whose Origin
        is not one of HAUL_API_CORS_ORIGINS, and, while no token is set (any caller may act), a
        Host other than the address the API listens on (DNS rebinding)."""
        origin = request.headers.get("origin")
        if origin is not None and origin not in self.api.cors_origins:
            raise Problem(403, f"requests from pages of {origin} are refused; add it to HAUL_API_CORS_ORIGINS")
        if self.api.open:
            host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
            if host not in LOOPBACK_NAMES and host != self.api.host:
                raise Problem(403, f"Host {host!r} is not this API's address; without tokens it answers loopback only")

    async def create(self, spec: TaskSpec, caller: Caller) -> tuple[Task, bool]:
        """Create a task from the event loop: create.lua runs on the API's async connection, so
        a new task costs one round trip and no thread. An answer other than ``created`` (the key
        names a task: read it, compare the requests, refuse) is the client's, in a thread."""
        by = f"API token {caller.name!r}"
        creation = self.client.prepare(spec)
        if creation.claim is None:  # a broker that is not Redis's: its send blocks
            return await run_in_threadpool(functools.partial(self.client.create, spec, by=by))
        store = self.client.store
        keys, argv = store.create_call(spec, creation.now, creation.task_id, claim=creation.claim)
        reply = await self.create_script(keys=keys, args=argv)
        if CreateReply(text_of(reply[1])) is CreateReply.CREATED:
            return self.client.created(creation, by=by), True
        return await run_in_threadpool(functools.partial(self.client.create, spec, by=by))

    async def task(self, task_id: str) -> Task:
        try:
            return await run_in_threadpool(self.client.get, task_id)
        except TaskNotFound as exc:
            raise Problem(404, str(exc)) from exc

    # -- routes -------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        caller = self.caller(request, write=True)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise Problem(415, f"the body must be application/json, not {kind or 'unstated'}")
        body = await read_json(request, self.api.max_body_bytes)
        spec = spec_of(body, idempotency_key(request.headers.get("idempotency-key")))
        try:
            task, created = await self.create(spec, caller)
        except KeyConflict as exc:
            raise Problem(422, str(exc), errors=[{"pointer": "/key", "detail": str(exc)}]) from exc
        except InvalidTask as exc:
            raise invalid_input(str(exc)) from exc
        except TaskNotFound as exc:  # pruned between the create and the read: rare, and transient
            raise Problem(503, str(exc)) from exc
        task_id = task.id
        answer = task.as_status()
        watch = make_watch_token(self.api, task_id, self.clock())
        if watch is not None:
            answer["watch_token"] = watch
        headers = {"Location": f"/v1/tasks/{task_id}"} | ({} if created else {"Idempotent-Replayed": "true"})
        return JSONResponse(answer, status_code=201 if created else 200, headers=headers)

    async def get(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        caller = self.caller(request, task_id=task_id)
        return JSONResponse(view_for(caller, (await self.task(task_id)).as_status()))

    async def listing(self, request: Request) -> Response:
        self.caller(request, task_id="")  # not a watch token
        query = request.query_params
        limit = bounded_int(query.get("limit"), "limit", 50, 1, MAX_PAGE)
        if query.get("key"):
            try:
                tasks = [await run_in_threadpool(self.client.find, query["key"])]
            except TaskNotFound:
                tasks = []
            return JSONResponse({"tasks": [t.as_status() for t in tasks], "next_cursor": None})
        state = state_of(query.get("state"))
        after = cursor_of(query.get("cursor"))
        tasks, following = await run_in_threadpool(self.client.page, state, limit, after)
        return JSONResponse({"tasks": [t.as_status() for t in tasks], "next_cursor": cursor_text(following)})

    async def counts(self, request: Request) -> Response:
        self.caller(request, task_id="")
        return JSONResponse(await self._counts())

    async def _counts(self) -> dict[str, int]:
        counts = await run_in_threadpool(self.client.counts)
        return {state.value: n for state, n in counts.items()}

    async def retry(self, request: Request) -> Response:
        return await self._act(request, self.client.retry, "retried")

    async def cancel(self, request: Request) -> Response:
        return await self._act(request, self.client.cancel, "canceled")

    async def _act(self, request: Request, action: Callable[..., object], done: str) -> Response:
        """An operator's action on one task (recorded with the token's name): 404 when it is
        unknown, 409 when its state refuses."""
        task_id = request.path_params["task_id"]
        caller = self.caller(request, write=True)
        try:
            await run_in_threadpool(action, task_id, caller.name)
        except TaskNotFound as exc:
            raise Problem(404, str(exc)) from exc
        except (RetryRefused, CancelRefused) as exc:
            raise Problem(409, str(exc)) from exc
        log.info("api: task %s %s by %s", task_id, done, caller.name)
        return JSONResponse((await self.task(task_id)).as_status())

    async def task_events(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        caller = self.caller(request, task_id=task_id)
        await self.task(task_id)  # 404 before any stream

        async def snapshot() -> dict[str, Any]:
            return view_for(caller, (await self.task(task_id)).as_status())

        watcher = caller.task_id is not None
        return await self.streams.task(task_id, request.headers.get("last-event-id"), snapshot, watcher)

    async def all_events(self, request: Request) -> Response:
        self.caller(request, task_id="")
        return await self.streams.everything(request.headers.get("last-event-id"), self._counts)

    async def healthz(self, request: Request) -> Response:
        try:
            await self.redis.ping()
        except redis.RedisError as exc:
            raise Problem(503, f"Redis at HAUL_REDIS_URL does not answer ({type(exc).__name__})") from exc
        if not self.hub.alive:
            raise Problem(503, "the event stream reader stopped (see the log); restart haul api")
        return JSONResponse({"status": "ok"})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(document())

    async def docs(self, request: Request) -> Response:
        return docs_page()

    async def docs_js(self, request: Request) -> Response:
        return Response(DOCS_JS, media_type="text/javascript")

    async def close(self) -> None:
        await self.hub.stop()
        await self.redis.aclose(close_connection_pool=True)
        await run_in_threadpool(self.client.close)


# -- reading requests ---------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past ``limit`` bytes (read no further), 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"the body is {declared} bytes; at most {limit} (HAUL_API_MAX_BODY_BYTES)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"the body is larger than {limit} bytes (HAUL_API_MAX_BODY_BYTES)")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Problem(400, f"the body is not JSON ({exc})") from exc
    except RecursionError:
        raise Problem(400, "the body is JSON nested too deeply") from None


def idempotency_key(header: str | None) -> str | None:
    """The Idempotency-Key header's value: a plain string, or a quoted one (its quotes dropped)."""
    if header is None:
        return None
    value = header.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not value:
        raise Problem(422, "Idempotency-Key is empty", errors=[{"pointer": "", "detail": "Idempotency-Key is empty"}])
    return value


def spec_of(body: Any, header_key: str | None) -> TaskSpec:
    """A validated spec from a manifest or a ``{"urls": [...]}`` body, keyed by the header's
    key (which must agree with the body's)."""
    if not isinstance(body, dict):
        raise invalid_input("manifest: must be a JSON object with a 'files' list (or 'urls')")
    if header_key is not None and body.get("key") not in (None, header_key):
        detail = f"Idempotency-Key {header_key!r} differs from the body's key {body.get('key')!r}; send one key"
        raise Problem(422, detail, errors=[{"pointer": "/key", "detail": detail}])
    key = header_key if header_key is not None else body.get("key")
    try:
        if "urls" in body and "files" not in body:
            extra = set(body) - URLS_FIELDS
            if extra:
                raise InvalidTask(
                    f"manifest: unknown field(s) {sorted(extra)}; with urls, allowed are {sorted(URLS_FIELDS)}"
                )
            urls = body["urls"]
            if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
                raise InvalidTask("manifest.urls: must be a list of URL strings")
            return spec_from_urls(urls, name=body.get("name") or "", key=key, webhook=body.get("webhook"),
                                  accept=body.get("accept"))  # fmt: skip
        return spec_from_manifest({**body, "key": key} if key is not None else body)
    except InvalidTask as exc:
        raise invalid_input(str(exc)) from exc


def bounded_int(text: str | None, name: str, default: int, lowest: int, highest: int) -> int:
    if text is None or text == "":
        return default
    if not text.isdigit() or not lowest <= int(text) <= highest:
        detail = f"{name} must be a whole number from {lowest} to {highest}"
        raise Problem(422, detail, errors=[{"pointer": "", "detail": detail}])
    return int(text)


def state_of(text: str | None) -> State:
    try:
        return State(text or "")
    except ValueError:
        detail = f"state must be one of {', '.join(s.value for s in State)}"
        raise Problem(422, detail, errors=[{"pointer": "", "detail": detail}]) from None


def cursor_of(text: str | None) -> Cursor | None:
    if not text:
        return None
    try:
        at, task_id = json.loads(base64.urlsafe_b64decode(text.encode() + b"=" * (-len(text) % 4)))
        if not math.isfinite(float(at)):
            raise ValueError("not a time")
        return Cursor(float(at), str(task_id))
    except (ValueError, TypeError, binascii.Error):
        detail = "cursor is not one this API gave; start again without it"
        raise Problem(422, detail, errors=[{"pointer": "", "detail": detail}]) from None


def cursor_text(cursor: Cursor | None) -> str | None:
    if cursor is None:
        return None
    return base64.urlsafe_b64encode(json.dumps([cursor.at, cursor.task_id]).encode()).decode().rstrip("=")


# -- the application ----------------------------------------------------------------------


def create_app(settings: Settings, client: Client | None = None) -> Starlette:
    """The ASGI application for ``settings`` (a client of its own unless one is given)."""
    api = Api(settings, client or Client(settings))
    routes = [
        Route("/v1/tasks", api.submit, methods=["POST"]),
        Route("/v1/tasks", api.listing, methods=["GET"]),
        Route("/v1/tasks/{task_id}", api.get, methods=["GET"]),
        Route("/v1/tasks/{task_id}/retry", api.retry, methods=["POST"]),
        Route("/v1/tasks/{task_id}/cancel", api.cancel, methods=["POST"]),
        Route("/v1/tasks/{task_id}/events", api.task_events, methods=["GET"]),
        Route("/v1/events", api.all_events, methods=["GET"]),
        Route("/v1/counts", api.counts, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        Route("/docs", api.docs, methods=["GET"]),
        Route("/docs/static/docs.js", api.docs_js, methods=["GET"]),
        Mount("/docs/static", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path)),
        *Dashboard(
            settings,
            api.client,
            Sessions(api.redis, api.client.store.prefix, settings.api),
            BulkRetries(api.redis, api.client.store.prefix),
            LiveUpdates(
                api.hub,
                api.client,
                functools.partial(redact_text, secrets=secrets_of(settings)),
                settings.api.ui_idle_seconds,
            ),
        ).routes(),
    ]
    middleware = [Middleware(DashboardHeaders, prefix=settings.api.ui_prefix)]
    if settings.api.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.api.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["Location", "Idempotent-Replayed"],
        ))  # fmt: skip

    async def problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return exc.response(request.url.path)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = "no such route" if exc.status_code == 404 else str(exc.detail)
        return Problem(exc.status_code, detail, headers=dict(exc.headers or {})).response(request.url.path)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await api.hub.start()
        yield
        await api.close()

    async def unavailable(request: Request, exc: Exception) -> Response:
        return Problem(503, f"Redis at HAUL_REDIS_URL does not answer ({type(exc).__name__}); try again").response(
            request.url.path
        )

    app = Starlette(
        routes=routes, middleware=middleware, exception_handlers={
            Problem: problem, HTTPException: http_error, redis.RedisError: unavailable,
        },
        lifespan=lifespan,
    )  # fmt: skip
    app.state.api = api
    return app
