"""The HTTP API over a real ``haul api`` process (issue 15): submit, idempotency, every refusal
as problem+json, tokens and watch tokens, listing with cursors, the OpenAPI document, and the
Server-Sent Events of a task and of all tasks, with a real worker process doing the work."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from actors.events import EventLog
from actors.states import State
from actors.store import TaskStore
from supervisor.api.sse import task_sse_id
from tests.apiserver import FULL, READ, Api, api_env, running_api, sse, start_api
from tests.conftest import small_stream_nodes
from tests.processes import running
from tests.redisserver import RedisServer
from tests.servers import Origin, Receiver

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(tmp_path: Path, redis_url: str, receiver: Receiver) -> dict[str, str]:
    return api_env(tmp_path, redis_url, receiver.url)


@pytest.fixture
def api(tmp_path: Path, env: dict[str, str]) -> Iterator[Api]:
    with running_api(tmp_path, env) as started:
        yield started


def test_submit_is_idempotent_on_the_key_and_refusals_are_problem_details(api: Api, store: TaskStore) -> None:
    manifest = {"name": "Course 7", "files": [{"url": "https://cdn.example.com/a.mp4", "path": "a.mp4"}]}
    first = api.call("POST", "/v1/tasks", json=manifest, headers={"Idempotency-Key": '"order-7"'})
    assert first.status_code == 201, first.text
    task = first.json()
    assert first.headers["Location"] == f"/v1/tasks/{task['id']}" and task["key"] == "order-7"
    assert task["state"] == "queued" and task["watch_token"].startswith("w1.")
    again = api.call("POST", "/v1/tasks", json=manifest, headers={"Idempotency-Key": "order-7"})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == task["id"] and store.counts()[State.QUEUED] == 1
    # The same key with another request, or a header that contradicts the body: 422
    other = {**manifest, "name": "Course 8"}
    conflict = api.call("POST", "/v1/tasks", json=other, headers={"Idempotency-Key": "order-7"})
    assert conflict.status_code == 422 and conflict.headers["Content-Type"] == "application/problem+json"
    assert "name" in conflict.json()["detail"]
    mismatch = api.call("POST", "/v1/tasks", json={**manifest, "key": "a"}, headers={"Idempotency-Key": "b"})
    assert mismatch.status_code == 422 and mismatch.json()["errors"][0]["pointer"] == "/key"
    # Bad input points at the field; nothing is enqueued
    bad = {"files": [{"url": "https://cdn.example.com/a.mp4", "path": "a.mp4"},
                     {"url": "https://cdn.example.com/b.mp4", "path": "../../etc/passwd"}]}  # fmt: skip
    refused = api.call("POST", "/v1/tasks", json=bad)
    assert refused.status_code == 422
    [error] = refused.json()["errors"]
    assert error["pointer"] == "/files/1/path" and "'..'" in error["detail"]
    urls = api.call("POST", "/v1/tasks", json={"urls": ["https://cdn.example.com/x.mp4", "ftp://nope"]})
    assert urls.status_code == 422 and urls.json()["errors"][0]["pointer"] == "/urls/1"
    too_big = api.call("POST", "/v1/tasks", data=b"{" + b" " * (1024 * 1024) + b"}",
                       headers={"Content-Type": "application/json"})  # fmt: skip
    assert too_big.status_code == 413 and too_big.json()["status"] == 413
    assert store.counts()[State.QUEUED] == 1
    # Unknown ids, states that refuse the action, tokens that may not act
    assert api.call("GET", "/v1/tasks/nope").status_code == 404
    assert api.call("POST", f"/v1/tasks/{task['id']}/retry").status_code == 409
    unauthorized = api.call("GET", "/v1/counts", token=None)
    assert unauthorized.status_code == 401 and unauthorized.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.call("GET", "/v1/counts", token="not-a-token-at-all-really").status_code == 401
    reader = api.call("POST", "/v1/tasks", token=READ, json=manifest)
    assert reader.status_code == 403 and reader.headers["Content-Type"] == "application/problem+json"
    assert api.call("GET", "/v1/counts", token=READ).json()["queued"] == 1
    canceled = api.call("POST", f"/v1/tasks/{task['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["state"] == "canceled"
    assert api.call("POST", f"/v1/tasks/{task['id']}/cancel").status_code == 409
    [event] = [e for e in EventLog(store.client, store.prefix).of_task(task["id"]) if e.type == "task.canceled"]
    assert event.data["by"] == "backend"  # the token's name, recorded on the task
    # No token ever reaches the log
    assert FULL not in api.process.output() and READ not in api.process.output()


def test_while_redis_is_down_a_submit_is_a_503_and_once_it_is_back_submits_and_streams_go_on(
    tmp_path: Path, receiver: Receiver
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    client = redis.Redis.from_url(server.url)
    course = {"urls": ["https://cdn.example.com/a.mp4"]}
    try:
        api = start_api(tmp_path, api_env(tmp_path, server.url, receiver.url))
        with running(api.process), api.call("GET", "/v1/events", token=READ, stream=True) as stream:
            events = sse(stream)
            assert api.call("POST", "/v1/tasks", json=course).status_code == 201
            assert next(events)[1] == "task.queued"
            server.kill()
            down = api.call("POST", "/v1/tasks", json=course)
            assert down.status_code == 503 and down.headers["Content-Type"] == "application/problem+json"
            assert "HAUL_REDIS_URL" in down.json()["detail"]
            server.start()
            again = api.call("POST", "/v1/tasks", json=course)
            assert again.status_code == 201
            # The stream open across the restart goes on where it was
            assert next(events)[2]["id"] == again.json()["id"]
        # Each task with its claim message, and no message without its task
        assert len(client.zrange("haul:state:queued", 0, -1)) == 2 == client.llen("dramatiq:claim")
        assert "submitted by API token 'backend'" in api.process.output()
    finally:
        client.close()
        server.stop()


def test_a_watch_token_reads_its_task_and_nothing_else(api: Api) -> None:
    one = api.call("POST", "/v1/tasks", json={"urls": ["https://cdn.example.com/1.mp4"]}).json()
    two = api.call("POST", "/v1/tasks", json={"urls": ["https://cdn.example.com/2.mp4"]}).json()
    watch = {"watch_token": one["watch_token"]}
    assert api.call("GET", f"/v1/tasks/{one['id']}", token=None, params=watch).json()["id"] == one["id"]
    assert api.call("GET", f"/v1/tasks/{two['id']}", token=None, params=watch).status_code == 403
    assert api.call("GET", "/v1/tasks", token=None, params={**watch, "state": "queued"}).status_code == 403
    assert api.call("GET", "/v1/events", token=None, params=watch).status_code == 403
    assert api.call("POST", f"/v1/tasks/{one['id']}/cancel", token=None, params=watch).status_code == 403
    forged = one["watch_token"].rsplit(".", 1)[0] + "." + "0" * 64
    assert api.call("GET", f"/v1/tasks/{one['id']}", token=None, params={"watch_token": forged}).status_code == 401
    stretched = one["watch_token"].split(".")
    stretched[2] = str(int(stretched[2]) + 3600)
    assert api.call("GET", f"/v1/tasks/{one['id']}", token=None,
                    params={"watch_token": ".".join(stretched)}).status_code == 401  # fmt: skip
    with api.call("GET", f"/v1/tasks/{one['id']}/events", token=None, params=watch, stream=True) as stream:
        assert stream.status_code == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        first = next(sse(stream))
        assert first[1] == "task.queued" and first[2]["id"] == one["id"]


def test_listing_pages_through_a_state_without_skipping_or_repeating(api: Api, store: TaskStore) -> None:
    ids = {api.call("POST", "/v1/tasks", json={"urls": [f"https://cdn.example.com/{n}.mp4"]}).json()["id"]
           for n in range(23)}  # fmt: skip
    seen: list[str] = []
    cursor = None
    while True:
        page = api.call(
            "GET", "/v1/tasks", params={"state": "queued", "limit": 5, **({"cursor": cursor} if cursor else {})}
        )
        assert page.status_code == 200
        seen += [t["id"] for t in page.json()["tasks"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 23
    assert api.call("GET", "/v1/tasks", params={"state": "sleeping"}).status_code == 422
    assert api.call("GET", "/v1/tasks", params={"state": "queued", "cursor": "garbage"}).status_code == 422
    assert api.call("GET", "/v1/tasks", params={"state": "queued", "limit": "0"}).status_code == 422


def assert_nothing_missed_or_repeated(received: list[tuple[str, str]], kept: list[str]) -> None:
    """A live client got every event the task's stream keeps, in order, none twice; the others
    it got are task.progress events that a later one replaced in the stream."""
    ids = [event_id for event_id, _ in received]
    assert len(ids) == len(set(ids)), ids
    assert [i for i in ids if i in set(kept)] == kept
    assert all(kind == "task.progress" for event_id, kind in received if event_id not in set(kept))


def test_the_openapi_document_validates_and_lists_exactly_the_routes(api: Api) -> None:
    from openapi_spec_validator import validate
    from starlette.routing import Route

    from actors.settings import Settings
    from supervisor.api.app import create_app

    document = api.call("GET", "/openapi.json", token=None).json()
    validate(document)
    app = create_app(Settings())
    routes = {
        (r.path, m.lower())
        for r in app.routes if isinstance(r, Route) and r.include_in_schema  # the dashboard's pages are not the API
        for m in r.methods or () if m != "HEAD"
    }  # fmt: skip
    documented = {
        (path, method) for path, item in document["paths"].items() for method in item if method != "parameters"
    }
    assert documented == routes - {("/docs/static/docs.js", "get")}
    docs = api.call("GET", "/docs", token=None)
    assert docs.status_code == 200 and "frame-ancestors 'none'" in docs.headers["Content-Security-Policy"]
    assert api.call("GET", "/docs/static/swagger-ui-bundle.js", token=None).status_code == 200


def test_a_task_is_followed_to_the_end_and_a_reconnect_misses_nothing(
    tmp_path: Path, api: Api, env: dict[str, str], origin: Origin, receiver: Receiver, store: TaskStore
) -> None:
    from tests.processes import worker

    origin.rate = 1024 * 1024
    files = [{"url": origin.put(f"/{n}.mp4", bytes([n]) * 700_000), "path": f"{n}.mp4"} for n in range(3)]
    task = api.call("POST", "/v1/tasks", json={"files": files}).json()
    events: list[tuple[str, str, Any]] = []
    with running(worker(env, tmp_path / "worker.log")):
        # Follow until two events came, drop the connection, reconnect with the last id
        with api.call("GET", f"/v1/tasks/{task['id']}/events", stream=True) as stream:
            for event in sse(stream):
                events.append(event)
                if len(events) == 2:
                    break
        with api.call("GET", f"/v1/tasks/{task['id']}/events", stream=True,
                      headers={"Last-Event-ID": events[-1][0]}) as stream:  # fmt: skip
            assert stream.status_code == 200
            events += list(sse(stream))  # the server closes after the final event
    assert events[-1][1] == "task.completed" and events[-1][2]["state"] == "done"
    assert sorted(e[2]["path"] for e in events if e[1] == "file.completed") == ["0.mp4", "1.mp4", "2.mp4"]
    # Exactly the task's stream, in order: nothing missed, nothing twice
    from actors.events import EventLog

    kept = EventLog(store.client, store.prefix).of_task(task["id"])
    assert_nothing_missed_or_repeated([(i, t) for i, t, _ in events], [task_sse_id(task["id"], e.id) for e in kept])
    # A reconnect at the final event gets 204 (an EventSource stops there)
    done = api.call("GET", f"/v1/tasks/{task['id']}/events", headers={"Last-Event-ID": events[-1][0]})
    assert done.status_code == 204
    # An id of another stream, or one trimmed away, gets a reset with the task's state
    with api.call("GET", f"/v1/tasks/{task['id']}/events", stream=True,
                  headers={"Last-Event-ID": "A" + events[0][0][1:]}) as stream:  # fmt: skip
        reset = next(sse(stream))
    assert reset[1] == "reset" and reset[2]["state"] == "done"


def test_every_tasks_events_from_now_on(api: Api, store: TaskStore) -> None:
    with api.call("GET", "/v1/events", token=READ, stream=True) as stream:
        assert stream.headers["Cache-Control"] == "no-cache" and stream.headers["X-Accel-Buffering"] == "no"
        made = api.call("POST", "/v1/tasks", json={"urls": ["https://cdn.example.com/v.mp4"]}).json()
        event_id, name, data = next(sse(stream))
    assert name == "task.queued" and data["id"] == made["id"] and event_id.startswith("A")
    # The stream goes on from a Last-Event-ID of its own
    api.call("POST", f"/v1/tasks/{made['id']}/cancel")
    with api.call("GET", "/v1/events", token=READ, stream=True, headers={"Last-Event-ID": event_id}) as stream:
        _, name, data = next(sse(stream))
    assert name == "task.canceled" and data["id"] == made["id"]
    # A Last-Event-ID trimmed away since is a reset with the counts, never a silent gap
    store.client.hset("haul:config", "events_retain", 20)
    with small_stream_nodes(store.client):  # MAXLEN ~ trims whole nodes
        for n in range(60):
            api.call("POST", "/v1/tasks", json={"urls": [f"https://cdn.example.com/{n}.mp4"]})
    assert store.client.xlen("haul:events") < 30
    with api.call("GET", "/v1/events", token=READ, stream=True, headers={"Last-Event-ID": event_id}) as stream:
        _, name, data = next(sse(stream))
    assert name == "reset" and data["counts"]["queued"] == 60


def test_what_a_hostile_page_or_input_sends_is_refused_without_a_500(api: Api, tmp_path: Path, redis_url: str) -> None:
    manifest = json.dumps({"urls": ["https://cdn.example.com/v.mp4"]})
    # A form a page of another site posts (no preflight: text/plain), or any other origin's call
    plain = api.call("POST", "/v1/tasks", data=manifest, headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415
    other = api.call("POST", "/v1/tasks", data=manifest, headers={"Content-Type": "application/json",
                                                                    "Origin": "https://evil.example"})  # fmt: skip
    assert other.status_code == 403 and "HAUL_API_CORS_ORIGINS" in other.json()["detail"]
    # Tokens and ids that are not text the API expects: 401 or 422, never a 500
    task = api.call("POST", "/v1/tasks", json={"urls": ["https://cdn.example.com/v.mp4"]}).json()
    odd = task["watch_token"].rsplit(".", 1)[0] + ".é"
    assert api.call("GET", f"/v1/tasks/{task['id']}", token=None, params={"watch_token": odd}).status_code == 401
    digits = task["watch_token"].split(".")
    digits[2] = "²" * 3
    assert api.call("GET", f"/v1/tasks/{task['id']}", token=None,
                    params={"watch_token": ".".join(digits)}).status_code == 401  # fmt: skip
    nan = base64.urlsafe_b64encode(b'[NaN, "x"]').decode().rstrip("=")
    assert api.call("GET", "/v1/tasks", params={"state": "queued", "cursor": nan}).status_code == 422
    deep = api.call("POST", "/v1/tasks", data="[" * 100_000, headers={"Content-Type": "application/json"})
    assert deep.status_code == 400
    # What a watch token's holder sees leaves out the webhook, the source URLs and the worker
    secret_url = {"url": "https://cdn.example.com/a.mp4?sig=s3cret", "path": "a.mp4"}
    made = api.call("POST", "/v1/tasks", json={"files": [secret_url], "webhook": "https://backend.example/h?k=1"})
    seen = api.call("GET", f"/v1/tasks/{made.json()['id']}", token=None,
                    params={"watch_token": made.json()["watch_token"]}).json()  # fmt: skip
    assert "webhook" not in seen and "url" not in seen["files"][0] and "s3cret" not in json.dumps(seen)
    # Without tokens (loopback only), a Host that is not the API's own is refused (DNS rebinding)
    env = api_env(tmp_path, redis_url, "http://127.0.0.1:9/")
    for name in ("HAUL_API_TOKENS", "HAUL_API_READ_TOKENS"):
        del env[name]
    (tmp_path / "open").mkdir()
    open_api = start_api(tmp_path / "open", env)
    with running(open_api.process):
        rebound = requests.get(f"{open_api.url}/v1/counts", headers={"Host": "attacker.example"}, timeout=5)
        assert rebound.status_code == 403
        assert requests.get(f"{open_api.url}/v1/counts", timeout=5).status_code == 200


def test_a_reset_on_an_ended_task_closes_and_an_id_of_another_task_is_a_reset(api: Api, store: TaskStore) -> None:
    one = api.call("POST", "/v1/tasks", json={"urls": ["https://cdn.example.com/1.mp4"]}).json()
    two = api.call("POST", "/v1/tasks", json={"urls": ["https://cdn.example.com/2.mp4"]}).json()
    api.call("POST", f"/v1/tasks/{one['id']}/cancel")
    with api.call("GET", f"/v1/tasks/{two['id']}/events", stream=True) as stream:
        first_of_two = next(sse(stream))[0]
    # An id of task two given to task one: reset with its state; it ended, so the stream closes
    with api.call("GET", f"/v1/tasks/{one['id']}/events", stream=True,
                  headers={"Last-Event-ID": first_of_two}) as stream:  # fmt: skip
        frames = list(sse(stream))
    assert [name for _, name, _ in frames] == ["reset"] and frames[0][2]["state"] == "canceled"
    # Many subscribers of one task all get its next event once (one reader of Redis fans out)
    streams = [api.call("GET", f"/v1/tasks/{two['id']}/events", stream=True) for _ in range(20)]
    try:
        readers = [sse(s) for s in streams]
        assert all(next(r)[1] == "task.queued" for r in readers)
        api.call("POST", f"/v1/tasks/{two['id']}/cancel")
        assert all(next(r)[1] == "task.canceled" for r in readers)
    finally:
        for s in streams:
            s.close()


def test_a_replay_whose_final_event_ends_a_full_page_still_closes(api: Api, store: TaskStore) -> None:
    # 195 files: queued, started, 195 file.completed, the last progress, finalizing, completed:
    # 200 entries, one full page of the replay, the final event its last
    files = [{"url": f"https://cdn.example.com/{n}.mp4", "path": f"{n}.mp4", "size": 1} for n in range(195)]
    task_id = api.call("POST", "/v1/tasks", json={"files": files}).json()["id"]
    now = time.time()
    claim = store.claim(task_id, worker="w", now=now, lease_seconds=60, max_attempts=5, start=State.DOWNLOADING)
    store.finish_download(task_id, claim.token, now=now, lease_seconds=60, progress=(195, 195, 195), finalize_limit=0)
    assert store.release(task_id, claim.token, State.DONE, now=now, max_attempts=5) is State.DONE
    assert store.client.xlen(f"{store.prefix}events:{task_id}") == 200
    # The server ends the stream after the final event (a read past it would time out instead)
    with requests.get(f"{api.url}/v1/tasks/{task_id}/events", headers={"Authorization": f"Bearer {FULL}"},
                      stream=True, timeout=(5, 3)) as stream:  # fmt: skip
        frames = list(sse(stream))
    assert len(frames) == 200 and frames[-1][1] == "task.completed"


def test_a_page_of_an_allowed_origin_may_call_and_others_may_not(tmp_path: Path, redis_url: str) -> None:
    env = api_env(tmp_path, redis_url, "http://127.0.0.1:9/") | {"HAUL_API_CORS_ORIGINS": "https://shop.example"}
    started = start_api(tmp_path, env)
    with running(started.process):
        preflight = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"}  # fmt: skip
        allowed = requests.options(f"{started.url}/v1/tasks", headers=preflight, timeout=5)
        assert allowed.status_code == 200
        assert allowed.headers["Access-Control-Allow-Origin"] == "https://shop.example"
        other = requests.options(f"{started.url}/v1/tasks", headers=preflight | {"Origin": "https://evil.example"},
                                 timeout=5)  # fmt: skip
        assert other.status_code == 400 and "Access-Control-Allow-Origin" not in other.headers
        read = started.call("GET", "/v1/counts", headers={"Origin": "https://shop.example"})
        assert read.status_code == 200 and read.headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert started.call("GET", "/v1/counts", headers={"Origin": "https://evil.example"}).status_code == 403


def test_the_id_of_a_replaced_progress_event_is_a_place_to_go_on_from(api: Api, store: TaskStore) -> None:
    from actors.events import EventLog
    from tests.test_task_events import drain

    task_id = api.call("POST", "/v1/tasks", json={"urls": ["https://cdn.example.com/v.mp4"]}).json()["id"]
    now = time.time()
    claim = store.claim(task_id, worker="w", now=now, lease_seconds=60, max_attempts=5, start=State.DOWNLOADING)
    for n in (1, 2):  # two progress events; the second replaces the first in the task's stream
        store.heartbeat(task_id, claim.token, now=now + 2 * n, lease_seconds=60, bytes_done=n, bytes_total=9,
                        files_done=0)  # fmt: skip
    everything = [e for batch in drain(EventLog(store.client, store.prefix)) for e in batch if e.task_id == task_id]
    first, second = [e.task_stream_id for e in everything if e.type == "task.progress"]
    kept = [e.id for e in EventLog(store.client, store.prefix).of_task(task_id)]
    assert first not in kept and second in kept
    # A client whose last event was the replaced one goes on with what replaced it, no reset
    with api.call("GET", f"/v1/tasks/{task_id}/events", stream=True,
                  headers={"Last-Event-ID": task_sse_id(task_id, first)}) as stream:  # fmt: skip
        event_id, name, data = next(sse(stream))
    assert name == "task.progress" and event_id == task_sse_id(task_id, second) and data["bytes_done"] == 2
