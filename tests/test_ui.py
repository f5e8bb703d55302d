"""The dashboard over a real ``haul api`` process (issue 18): an API token becomes a
server-side session in a strict cookie, every action needs the session's CSRF token, a session
ends on sign-out, when idle and when its token is removed, every page carries a strict
Content-Security-Policy; the tasks pages, search, retry and cancel; hostile input as text."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from actors.deliveries import Delivery, DeliveryOutcome
from actors.events import EventLog
from actors.manifest import spec_from_manifest
from actors.registry import WorkerInfo, WorkerRegistry
from actors.states import State
from actors.store import TaskStore
from supervisor.api.sessions import digest
from tests.apiserver import FULL, READ, Api, api_env, running_api, sse
from tests.conftest import end_task
from tests.servers import Receiver

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(tmp_path: Path, redis_url: str, receiver: Receiver) -> dict[str, str]:
    return api_env(tmp_path, redis_url, receiver.url) | {"HAUL_UI_IDLE_SECONDS": "3"}


@pytest.fixture
def api(tmp_path: Path, env: dict[str, str], store: TaskStore) -> Iterator[Api]:
    with running_api(tmp_path, env) as started:  # on an empty Redis (``store`` flushes it)
        yield started


def sign_in(api: Api, token: str, **headers: str) -> tuple[requests.Session, requests.Response]:
    browser = requests.Session()
    answer = browser.post(f"{api.url}/ui/sign-in", data={"token": token}, headers=headers, allow_redirects=False,
                          timeout=5)  # fmt: skip
    return browser, answer


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found[1]


def signed_in(browser: requests.Session, api: Api) -> bool:
    answer = browser.get(f"{api.url}/ui/", allow_redirects=False, timeout=5)
    return answer.status_code == 200


def test_a_token_signs_in_to_a_strict_cookie_and_every_page_forbids_inline_code_and_framing(
    api: Api, redis_url: str
) -> None:
    assert requests.get(f"{api.url}/ui/", allow_redirects=False, timeout=5).headers["Location"] == "/ui/sign-in"
    bare = requests.get(f"{api.url}/ui", allow_redirects=False, timeout=5)  # a path, never a URL from Host
    assert bare.status_code == 303 and bare.headers["Location"] == "/ui/"
    missing = requests.get(f"{api.url}/ui/no-such-page", timeout=5)
    assert missing.status_code == 404 and "frame-ancestors 'none'" in missing.headers["Content-Security-Policy"]
    # As a browser posts from the dashboard's page; X-Forwarded-Proto from a proxy it does not trust
    browser, answer = sign_in(api, FULL, **{"Sec-Fetch-Site": "same-origin", "X-Forwarded-Proto": "https"})
    assert answer.status_code == 303 and answer.headers["Location"] == "/ui/"
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain http, and X-Forwarded-Proto is believed from trusted proxies only
    page = browser.get(f"{api.url}/ui/", timeout=5)
    assert page.status_code == 200 and "backend (may act)" in page.text
    assert '<th scope="row"><bdi>queued</bdi></th><td data-count="queued">0</td>' in page.text
    policy = page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff" and page.headers["Cache-Control"] == "no-store"
    # A page without referrers would make the browser send "Origin: null" with its own forms
    assert page.headers["Referrer-Policy"] == "same-origin"
    assert browser.get(f"{api.url}/ui/static/ui.css", timeout=5).headers["Content-Type"].startswith("text/css")
    # Redis keeps the session under a digest of its id: what it holds signs no one in
    session_id = browser.cookies["haul_session"]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = list(client.scan_iter(f"*ui:session:{digest(session_id)}"))
    assert len(keys) == 1 and session_id not in keys[0]
    assert FULL not in str(client.hgetall(keys[0]))
    client.close()


def test_a_wrong_token_or_a_sign_in_posted_by_another_site_gets_no_session(api: Api) -> None:
    _, wrong = sign_in(api, "not-a-token-of-this-api-at-all")
    assert wrong.status_code == 401 and "Set-Cookie" not in wrong.headers
    assert "not one of this API" in wrong.text and "not-a-token" not in wrong.text
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site", "Origin": "null"}):
        _, forged = sign_in(api, FULL, **headers)
        assert forged.status_code == 403 and "Set-Cookie" not in forged.headers
    stuffed = requests.post(f"{api.url}/ui/sign-in", data="&".join(f"f{n}=1" for n in range(40)), timeout=5,
                            headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert stuffed.status_code == 401  # not a 500


def test_sign_out_needs_the_sessions_csrf_token_and_ends_the_session(api: Api) -> None:
    browser, _ = sign_in(api, FULL)
    page = browser.get(f"{api.url}/ui/", timeout=5).text
    forged = browser.post(f"{api.url}/ui/sign-out", data={"csrf": "guessed"}, allow_redirects=False, timeout=5)
    assert forged.status_code == 403 and signed_in(browser, api)
    other_site = browser.post(f"{api.url}/ui/sign-out", data={"csrf": csrf_of(page)},
                              headers={"Origin": "https://evil.example"}, allow_redirects=False, timeout=5)  # fmt: skip
    assert other_site.status_code == 403 and signed_in(browser, api)
    out = browser.post(f"{api.url}/ui/sign-out", data={"csrf": csrf_of(page)}, allow_redirects=False, timeout=5)
    assert out.status_code == 303 and out.headers["Location"] == "/ui/sign-in"
    assert not signed_in(browser, api)


def test_a_session_ends_when_idle_and_when_its_token_is_removed(tmp_path: Path, api: Api, env: dict[str, str]) -> None:
    replaced, _ = sign_in(api, FULL)
    earlier = replaced.cookies["haul_session"]
    answer = replaced.post(f"{api.url}/ui/sign-in", data={"token": FULL}, allow_redirects=False, timeout=5)
    assert answer.status_code == 303 and replaced.cookies["haul_session"] != earlier
    assert (
        requests.get(f"{api.url}/ui/", cookies={"haul_session": earlier}, allow_redirects=False, timeout=5).status_code
        == 303
    )  # signing in again ended the browser's earlier session
    idle, _ = sign_in(api, FULL)
    kept, _ = sign_in(api, FULL)
    reader, _ = sign_in(api, READ)
    assert "dashboard (read only)" in reader.get(f"{api.url}/ui/", timeout=5).text
    for _ in range(3):  # each use renews a session; the one left alone runs out
        time.sleep(1.2)
        assert signed_in(kept, api)
    assert not signed_in(idle, api)
    # The read token is taken away: the API restarts without it, and its session ends
    api.process.terminate()
    (tmp_path / "again").mkdir()
    with running_api(tmp_path / "again", {k: v for k, v in env.items() if k != "HAUL_API_READ_TOKENS"}) as without:
        assert not signed_in(reader, without)
        assert signed_in(kept, without)


def test_behind_a_trusted_proxy_the_cookie_is_secure_and_forms_of_the_public_host_are_taken(
    tmp_path: Path, env: dict[str, str]
) -> None:
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "haul.example", "Origin": "https://haul.example"}
    with running_api(tmp_path, env | {"HAUL_API_TRUSTED_PROXIES": "127.0.0.1/32"}) as behind:
        browser, answer = sign_in(behind, FULL, **proxied)
        assert answer.status_code == 303 and "Secure" in answer.headers["Set-Cookie"]
        _, other = sign_in(behind, FULL, **(proxied | {"Origin": "https://evil.example"}))
        assert other.status_code == 403


def test_without_tokens_the_dashboard_is_off(tmp_path: Path, env: dict[str, str]) -> None:
    open_env = {k: v for k, v in env.items() if k not in {"HAUL_API_TOKENS", "HAUL_API_READ_TOKENS"}}
    with running_api(tmp_path, open_env) as started:
        answer = requests.get(f"{started.url}/ui/", timeout=5)
        assert answer.status_code == 403 and "HAUL_API_TOKENS" in answer.text


def make_tasks(store: TaskStore, count: int, **manifest: object) -> list[str]:
    """``count`` queued tasks (never claimed: no worker runs here), oldest first."""
    ids = []
    for n in range(count):
        files = [{"url": f"https://cdn.example/{n}.mp4", "path": f"{n}.mp4"}]
        task_id, _ = store.create(spec_from_manifest({"files": files, **manifest}), now=time.time() + n / 1000)
        ids.append(task_id)
    return ids


def test_the_tasks_page_goes_through_a_state_a_page_at_a_time_and_finds_a_task_by_id_or_key(
    api: Api, store: TaskStore
) -> None:
    ids = make_tasks(store, 55)
    time.sleep(0.1)  # after the others' times
    keyed = make_tasks(store, 1, key="order-1234")[0]
    browser, _ = sign_in(api, READ)
    first = browser.get(f"{api.url}/ui/tasks", params={"state": "queued"}, timeout=5)
    assert first.status_code == 200 and 'queued</bdi> (<span data-count="queued">56</span>)' in first.text
    older = re.search(r'href="([^"]+)" rel="next"', first.text)
    assert older, first.text
    second = browser.get(api.url + older[1].replace("&amp;", "&"), timeout=5)
    shown = re.findall(r'href="/ui/tasks/([0-9a-f]{32})"', first.text + second.text)
    assert len(shown) == 56 and set(shown) == {*ids, keyed}  # none skipped, none twice
    assert shown[0] == keyed  # newest first
    for wanted in (keyed, "order-1234"):
        found = browser.get(f"{api.url}/ui/tasks", params={"q": wanted}, allow_redirects=False, timeout=5)
        assert found.status_code == 303 and found.headers["Location"] == f"/ui/tasks/{keyed}"
    missing = browser.get(f"{api.url}/ui/tasks", params={"q": "<b>nothing</b>"}, timeout=5)
    assert "No task has the id or key" in missing.text and "<b>nothing</b>" not in missing.text


def test_tasks_are_found_by_the_start_of_their_name_and_by_their_origin_host(api: Api, store: TaskStore) -> None:
    def create(name: str, url: str) -> str:
        created.append(time.time() + len(created) / 100)  # one after the other
        task_id, _ = store.create(spec_from_manifest({"name": name, "files": [{"url": url, "path": "a.mp4"}]}),
                                  now=created[-1])  # fmt: skip
        return task_id

    created: list[float] = []
    first = create("Khóa học 1", "https://media.example/1.mp4")
    second = create("KHÓA HỌC 2", "https://cdn.example/2.mp4")
    other = create("Other <b>course</b>", "https://cdn.example:8443/3.mp4")
    browser, _ = sign_in(api, READ)

    def found(by: str, wanted: str) -> list[str]:
        page = browser.get(f"{api.url}/ui/tasks", params={"q": wanted, "by": by}, timeout=5)
        assert page.status_code == 200
        return re.findall(r'<tr data-task="([0-9a-f]{32})"', page.text)

    assert found("name", "khóa học") == [first, second]  # in name order, any case
    assert found("name", "Other <b>") == [other]
    assert found("name", "nothing") == []
    assert found("host", "CDN.example") == [other, second]  # newest first; the port is not the host's
    assert found("host", "media.example") == [first]
    assert found("host", "169.254.169.254") == []


def test_the_overview_shows_throughput_slots_staged_bytes_and_the_supervisors_report(
    api: Api, store: TaskStore
) -> None:
    browser, _ = sign_in(api, READ)
    page = browser.get(f"{api.url}/ui/", timeout=5).text
    assert "none: no supervisor reported lately" in page  # none runs here
    now = time.time()
    for task_id in make_tasks(store, 2):
        end_task(store, task_id, State.DONE, now=now)
    assert store.hold_leadership("node-a", 30)
    problem = "HAUL_LEASE_SECONDS=5 is shorter than <b>the</b> renewal"
    assert store.publish_report("node-a", ttl_seconds=60, last_sweep=now - 3, checked_at=now - 3, problems=[problem])
    page = browser.get(f"{api.url}/ui/", timeout=5).text
    minute = time.strftime("%H:%M", time.gmtime(now))
    assert f'<tr><th scope="row"><bdi>{minute}</bdi></th><td><bdi>2</bdi></td><td><bdi>0</bdi></td>' in page
    assert '<tr><th scope="row"><bdi>download</bdi></th><td><bdi>0</bdi></td><td><bdi>no limit</bdi></td>' in page
    assert '<th scope="row"><bdi>staged bytes</bdi></th><td><bdi>0 B</bdi></td>' in page
    assert '<th scope="row"><bdi>leader</bdi></th><td><bdi>node-a</bdi></td>' in page
    age = re.search(r'<th scope="row"><bdi>last sweep</bdi></th><td><bdi>([0-9]+)s ago</bdi></td>', page)
    assert age and 3 <= int(age[1]) <= 3 + time.time() - now
    assert "&lt;b&gt;the&lt;/b&gt; renewal" in page and "<b>the</b>" not in page


def test_hostile_names_and_errors_render_as_text(api: Api, store: TaskStore) -> None:
    [task_id] = make_tasks(store, 1, name="<script>alert(1)</script> lesson\u202egpj.exe")
    store.client.hset(store.task_key(task_id), "error", "origin said <img src=x onerror=alert(2)>")
    hostile = "400 Bad Request: <img src=x onerror=alert(2)>"
    answered = Delivery(at=time.time(), type="task.failed", url="https://hooks.example/in", attempt=1,
                        outcome=DeliveryOutcome.FAILED, status=400, detail=hostile)  # fmt: skip
    store.record_delivery(task_id, answered, secrets=())
    browser, _ = sign_in(api, FULL)
    page_of_task = browser.get(f"{api.url}/ui/tasks/{task_id}", timeout=5)
    for page in (page_of_task,
                 browser.get(f"{api.url}/ui/tasks", params={"state": "queued"}, timeout=5)):  # fmt: skip
        assert "<script>alert(1)</script>" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert "<img src=x" not in page.text and "&lt;img src=x onerror=alert(2)&gt;" in page.text
        # its direction isolated: the U+202E cannot reorder what follows it
        assert "<bdi>&lt;script&gt;alert(1)&lt;/script&gt; lesson\u202egpj.exe</bdi>" in page.text
    assert "failed, 400: 400 Bad Request: &lt;img src=x onerror=alert(2)&gt;" in page_of_task.text


def test_retry_and_cancel_are_buttons_for_a_full_token_only_each_needing_the_csrf_token(
    api: Api, store: TaskStore
) -> None:
    [task_id] = make_tasks(store, 1)
    page_url = f"{api.url}/ui/tasks/{task_id}"
    reader, _ = sign_in(api, READ)
    read_page = reader.get(page_url, timeout=5).text
    assert "<button" in read_page and "Cancel</button>" not in read_page  # sign-out only
    refused = reader.post(f"{page_url}/cancel", data={"csrf": csrf_of(read_page)}, allow_redirects=False, timeout=5)
    assert refused.status_code == 403 and "read token" in refused.text
    operator, _ = sign_in(api, FULL)
    page = operator.get(page_url, timeout=5).text
    assert 'data-offer="cancel"><input' in page and 'data-offer="retry" hidden><input' in page
    forged = operator.post(f"{page_url}/cancel", data={}, allow_redirects=False, timeout=5)
    assert forged.status_code == 403 and store.get(task_id).state is State.QUEUED  # type: ignore[union-attr]
    done = operator.post(f"{page_url}/cancel", data={"csrf": csrf_of(page)}, allow_redirects=False, timeout=5)
    assert done.status_code == 303 and store.get(task_id).state is State.CANCELED  # type: ignore[union-attr]
    page = operator.get(page_url, timeout=5).text
    assert 'data-offer="retry"><input' in page and 'data-offer="cancel" hidden><input' in page
    assert "task.canceled" in page
    assert "by: ui:backend" in page  # who canceled it, recorded on the task
    again = operator.post(f"{page_url}/retry", data={"csrf": csrf_of(page)}, allow_redirects=False, timeout=5)
    assert again.status_code == 303 and store.get(task_id).state is State.QUEUED  # type: ignore[union-attr]
    events = EventLog(store.client, store.prefix).of_task(task_id)
    assert [(e.type, e.data.get("by")) for e in events if e.type in {"task.canceled", "task.retried"}] == [
        ("task.canceled", "ui:backend"),
        ("task.retried", "ui:backend"),
    ]


def test_the_workers_page_shows_each_worker_its_heartbeat_and_the_tasks_it_holds(api: Api, store: TaskStore) -> None:
    registry = WorkerRegistry(store.client, store.prefix)
    now = time.time()
    for host, pid in (("worker-a", 101), ("<b>worker-b</b>", 202)):
        info = WorkerInfo(id=f"{host}:{pid}", host=host, pid=pid, queues=("claim", "finalize"), threads=4,
                          started=now - 7200, extras=("resolve",))  # fmt: skip
        registry.register(info, now - 3)
    [task_id] = make_tasks(store, 1)
    store.claim(task_id, worker="worker-a:101", now=time.time(), lease_seconds=30, max_attempts=3,
                start=State.DOWNLOADING)  # fmt: skip
    browser, _ = sign_in(api, READ)
    page = browser.get(f"{api.url}/ui/workers", timeout=5).text
    row_a = re.search(r"<tr><td><bdi>worker-a</bdi>.*?</tr>", page)
    assert row_a and "<td>101</td>" in row_a[0] and "resolve" in row_a[0] and f"/ui/tasks/{task_id}" in row_a[0]
    assert "3s</bdi> ago" in row_a[0] and "2h" in row_a[0]
    assert "&lt;b&gt;worker-b&lt;/b&gt;" in page and "<b>worker-b</b>" not in page


def failed_tasks(store: TaskStore, count: int) -> list[str]:
    ids = make_tasks(store, count)
    for task_id in ids:
        end_task(store, task_id, State.FAILED, now=time.time())
    return ids


def confirmation_of(page: str) -> str:
    found = re.search(r'name="confirm" value="([^"]+)"', page)
    assert found, page
    return found[1]


def test_a_bulk_retry_takes_exactly_the_tasks_counted_at_its_confirmation_once(api: Api, store: TaskStore) -> None:
    counted = failed_tasks(store, 3)
    reader, _ = sign_in(api, READ)
    read_page = reader.get(f"{api.url}/ui/tasks", params={"state": "failed"}, timeout=5).text
    assert "Retry all" not in read_page
    refused = reader.post(f"{api.url}/ui/bulk/confirm", data={"csrf": csrf_of(read_page), "state": "failed"},
                          timeout=5)  # fmt: skip
    assert refused.status_code == 403
    operator, _ = sign_in(api, FULL)
    page = operator.get(f"{api.url}/ui/tasks", params={"state": "failed"}, timeout=5).text
    assert "Retry all <bdi>failed</bdi>" in page
    confirm = operator.post(f"{api.url}/ui/bulk/confirm", data={"csrf": csrf_of(page), "state": "failed"}, timeout=5)
    assert confirm.status_code == 200 and "Retry 3 <bdi>failed</bdi> tasks?" in confirm.text
    assert all(store.get(t).state is State.FAILED for t in counted)  # type: ignore[union-attr]
    [later] = make_tasks(store, 1)  # fails after the count: not taken
    end_task(store, later, State.FAILED, now=time.time())
    form = {"csrf": csrf_of(page), "confirm": confirmation_of(confirm.text)}
    done = operator.post(f"{api.url}/ui/bulk/retry", data=form, timeout=5)
    assert done.status_code == 200 and "3 retried" in done.text
    assert all(store.get(t).state is State.QUEUED for t in counted)  # type: ignore[union-attr]
    assert store.get(later).state is State.FAILED  # type: ignore[union-attr]
    again = operator.post(f"{api.url}/ui/bulk/retry", data=form, timeout=5)
    assert again.status_code == 409  # a confirmation is used once
    events = EventLog(store.client, store.prefix).of_task(counted[0])
    assert [e.data.get("by") for e in events if e.type == "task.retried"] == ["ui:backend"]


def test_a_bulk_retry_of_one_hosts_failures_takes_only_those(api: Api, store: TaskStore) -> None:
    def failed_on(host: str) -> str:
        manifest = {"files": [{"url": f"https://{host}/a.mp4", "path": "a.mp4"}]}
        task_id, _ = store.create(spec_from_manifest(manifest), now=time.time())
        end_task(store, task_id, State.FAILED, now=time.time())
        return task_id

    down = [failed_on("cdn3.example.com") for _ in range(3)]
    elsewhere = failed_on("cdn4.example.com")
    [dead] = make_tasks(store, 1, files=[{"url": "https://cdn3.example.com/b.mp4", "path": "b.mp4"}])
    end_task(store, dead, State.DEAD, now=time.time(), max_attempts=1)
    operator, _ = sign_in(api, FULL)
    page = operator.get(f"{api.url}/ui/tasks", params={"q": "CDN3.example.com", "by": "host"}, timeout=5).text
    assert "Retry all <bdi>failed</bdi> from <bdi>cdn3.example.com</bdi>" in page
    form = {"csrf": csrf_of(page), "state": "failed", "host": "cdn3.example.com"}
    confirm = operator.post(f"{api.url}/ui/bulk/confirm", data=form, timeout=5)
    assert "Retry 3 <bdi>failed</bdi> tasks with a file on <bdi>cdn3.example.com</bdi>?" in confirm.text
    done = operator.post(f"{api.url}/ui/bulk/retry", data={"csrf": form["csrf"],
                         "confirm": confirmation_of(confirm.text)}, timeout=5)  # fmt: skip
    assert "3 retried" in done.text
    assert [store.get(t).state for t in down] == [State.QUEUED] * 3  # type: ignore[union-attr]
    assert store.get(elsewhere).state is State.FAILED and store.get(dead).state is State.DEAD  # type: ignore[union-attr]
    odd = operator.post(f"{api.url}/ui/bulk/confirm", data=form | {"host": "<b>x</b>"}, timeout=5)
    assert odd.status_code == 400
    none = operator.post(f"{api.url}/ui/bulk/confirm", data=form | {"state": "canceled"}, timeout=5)
    assert "No task is <bdi>canceled</bdi> with a file on <bdi>cdn3.example.com</bdi> now." in none.text
    assert "Retry these" not in none.text


def test_a_session_older_than_twelve_hours_ends_however_much_it_is_used(api: Api, redis_url: str) -> None:
    browser, _ = sign_in(api, FULL)
    assert signed_in(browser, api)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    [key] = client.scan_iter(f"*ui:session:{digest(browser.cookies['haul_session'])}")
    client.hset(key, "started", str(time.time() - 13 * 3600))
    assert not signed_in(browser, api) and not client.exists(key)
    client.close()


def test_what_cannot_be_done_is_refused_with_a_page_not_a_500(api: Api, store: TaskStore) -> None:
    [queued] = make_tasks(store, 1)
    operator, _ = sign_in(api, FULL)
    page = operator.get(f"{api.url}/ui/tasks/{queued}", timeout=5).text
    csrf = {"csrf": csrf_of(page)}
    assert operator.get(f"{api.url}/ui/tasks/{'f' * 32}", timeout=5).status_code == 404
    assert operator.post(f"{api.url}/ui/tasks/{queued}/delete", data=csrf, timeout=5).status_code == 404
    assert operator.post(f"{api.url}/ui/tasks/{'f' * 32}/cancel", data=csrf, timeout=5).status_code == 404
    not_ended = operator.post(f"{api.url}/ui/tasks/{queued}/retry", data=csrf, timeout=5)
    assert not_ended.status_code == 409 and "has not ended" in not_ended.text
    assert operator.post(f"{api.url}/ui/bulk/confirm", data=csrf | {"state": "queued"}, timeout=5).status_code == 400
    big = requests.post(f"{api.url}/ui/sign-in", data={"token": FULL + "x" * 5000}, timeout=5)
    assert big.status_code == 401  # past MAX_FORM_BYTES nothing is read
    odd = operator.get(f"{api.url}/ui/tasks", params={"state": "queued", "cursor": "nan:zz"}, timeout=5)
    assert odd.status_code == 200 and f"/ui/tasks/{queued}" in odd.text  # the first page


def test_a_bulk_confirmation_is_its_sessions_only_and_says_what_it_could_not_retry(api: Api, store: TaskStore) -> None:
    counted = failed_tasks(store, 2)
    first, _ = sign_in(api, FULL)
    page = first.get(f"{api.url}/ui/tasks", params={"state": "failed"}, timeout=5).text
    confirm = first.post(f"{api.url}/ui/bulk/confirm", data={"csrf": csrf_of(page), "state": "failed"}, timeout=5)
    other, _ = sign_in(api, FULL)
    other_page = other.get(f"{api.url}/ui/", timeout=5).text
    stolen_form = {"csrf": csrf_of(other_page), "confirm": confirmation_of(confirm.text)}
    stolen = other.post(f"{api.url}/ui/bulk/retry", data=stolen_form, timeout=5)
    assert stolen.status_code == 409  # and the confirmation is spent
    again = first.post(f"{api.url}/ui/bulk/confirm", data={"csrf": csrf_of(page), "state": "failed"}, timeout=5)
    store.retry(counted[0], time.time())  # someone else retried one meanwhile
    done = first.post(f"{api.url}/ui/bulk/retry", data={"csrf": csrf_of(page), "confirm": confirmation_of(again.text)},
                      timeout=5)  # fmt: skip
    assert done.status_code == 200 and "1 retried" in done.text and "1 no longer ended" in done.text


def live(browser: requests.Session, api: Api, **query: str | list[str]) -> requests.Response:
    return browser.get(f"{api.url}/ui/live", params=query, stream=True, timeout=10)


def test_live_updates_need_a_session_do_not_keep_it_alive_and_end_with_it(api: Api, store: TaskStore) -> None:
    [task_id] = make_tasks(store, 1)
    assert requests.get(f"{api.url}/ui/live", params={"task": task_id}, timeout=5).status_code == 204
    browser, _ = sign_in(api, READ)
    assert browser.get(f"{api.url}/ui/live", params={"probe": "1"}, timeout=5).status_code == 200
    with live(browser, api, task=task_id, counts="1") as stream:
        assert stream.status_code == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        frames = sse(stream)
        _, name, data = next(frames)
        assert name == "tasks" and data[task_id]["state"] == "queued"
        assert next(frames)[1] == "counts"
        started = time.monotonic()
        # HAUL_UI_IDLE_SECONDS is 3 here: the stream is no use of the session, which ends
        assert next(name for _, name, _ in frames if name == "ended")
        assert time.monotonic() - started < 8
    # The page's script asks whether to open its stream again: not once the session ended
    assert browser.get(f"{api.url}/ui/live", params={"probe": "1"}, timeout=5).status_code == 401
    assert not signed_in(browser, api)


def test_a_task_pages_stream_sends_each_change_after_its_render_once_and_a_retry_clears_the_error(
    api: Api, store: TaskStore
) -> None:
    [task_id] = make_tasks(store, 1)
    [queued] = EventLog(store.client, store.prefix).state_changes(task_id, 10)
    browser, _ = sign_in(api, READ)
    # The page was rendered with task.queued; the task starts before its stream opens
    run = store.claim(task_id, worker="w", now=time.time(), lease_seconds=30, max_attempts=1,
                      start=State.DOWNLOADING)  # fmt: skip
    assert run.ok
    with live(browser, api, task=task_id, since=queued.id) as stream:
        frames = sse(stream)
        _, name, snapshot = next(frames)
        assert name == "tasks" and [entry["type"] for entry in snapshot[task_id]["history"]] == ["task.started"]
        assert snapshot[task_id]["files"] == {"0": {"state": "waiting", "bytes_done": 0, "bytes_total": 0}}
        store.release(task_id, run.token, State.FAILED, now=time.time(), max_attempts=1,
                      error="origin said https://cdn.example/a.mp4?X-Amz-Signature=s3cr3t is gone")  # fmt: skip
        store.retry(task_id, time.time(), "backend")
        patches = [snapshot[task_id]]
        for _, name, data in frames:
            if name == "tasks":
                patches.append(data[task_id])
                if data[task_id].get("state") == "queued":
                    break
    history = [entry for patch in patches for entry in patch.get("history", [])]
    assert [entry["type"] for entry in history] == ["task.started", "task.failed", "task.retried"]
    assert len({entry["tid"] for entry in history}) == 3 and history[1]["said"].endswith("?[redacted] is gone")
    assert "s3cr3t" not in str(patches)
    last = patches[-1]
    assert last["error"] == "" and last["files"] == {"~": {"state": "waiting"}}


def test_a_stored_files_link_is_offered_when_it_is_a_web_address_only(api: Api, store: TaskStore) -> None:
    [task_id] = make_tasks(store, 1, files=[{"url": "https://cdn.example/0.mp4", "path": "a.mp4"},
                                            {"url": "https://cdn.example/1.mp4", "path": "b.mp4"}])  # fmt: skip
    end_task(store, task_id, State.DONE, now=time.time())
    stored = [{"path": "a.mp4", "location": "s3://bucket/a.mp4", "link": "https://bucket.example/a.mp4?sig=1"},
              {"path": "b.mp4", "location": "s3://bucket/b.mp4", "link": "javascript:alert(3)"}]  # fmt: skip
    store.client.set(f"{store.prefix}stored:{task_id}", json.dumps(stored))
    browser, _ = sign_in(api, READ)
    page = browser.get(f"{api.url}/ui/tasks/{task_id}", timeout=5).text
    assert '<a href="https://bucket.example/a.mp4?sig=1" rel="noreferrer noopener" target="_blank">link</a>' in page
    assert "javascript:" not in page and page.count(">link</a>") == 1
