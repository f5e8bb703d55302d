"""The dashboard in a real headless Chromium (issue 18), over a real ``haul api`` process and a
real worker process: sign in, a task's bar moving to done with no reload, a dead task retried to
done, a running task canceled, a search by key, a read token without buttons, forged posts
refused, hostile names as text, and a phone-width page. Each test leaves a screenshot in
ARTIFACTS/screenshots (``tests/browser.py``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Dialog, Page

from actors.states import State
from actors.store import TaskStore
from tests.apiserver import FULL, READ, Api, api_env, running_api, start_api
from tests.browser import PHONE, chromium, screenshot, signed_in
from tests.conftest import end_task
from tests.processes import running, wait_until, worker
from tests.redisserver import RedisServer
from tests.servers import Origin, Receiver, Site

pytestmark = pytest.mark.e2e

#: Longest the tests wait for what a page shows (milliseconds).
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as started:
        yield started


@pytest.fixture(autouse=True)
def fresh_contexts(browser: Browser) -> Iterator[None]:
    """Each test's browser contexts closed after it: an open page would go on asking a port a
    later test's API may have."""
    yield
    for context in browser.contexts:
        context.close()


@pytest.fixture
def env(tmp_path: Path, redis_url: str, receiver: Receiver) -> dict[str, str]:
    return api_env(tmp_path, redis_url, receiver.url) | {"HAUL_MAX_ATTEMPTS": "1"}


@pytest.fixture
def api(tmp_path: Path, env: dict[str, str], store: TaskStore) -> Iterator[Api]:
    with running_api(tmp_path, env) as started:
        yield started


@pytest.fixture
def workers(tmp_path: Path, env: dict[str, str], api: Api) -> Iterator[None]:
    with running(worker(env, tmp_path / "worker.log")):
        yield


def submit(api: Api, origin: Origin, name: str, size: int, key: str | None = None, path: str = "lesson.mp4") -> str:
    url = origin.put(f"/{name.encode().hex()}.mp4", bytes(range(256)) * (size // 256))
    headers = {"Idempotency-Key": key} if key else {}
    answer = api.call("POST", "/v1/tasks", json={"name": name, "files": [{"url": url, "path": path}]}, headers=headers)
    assert answer.status_code == 201, answer.text
    task_id: str = answer.json()["id"]
    return task_id


def shown(page: Page, field: str) -> str:
    """A task's figure as its page shows it now (not its files')."""
    return page.locator(f'article > dl [data-field="{field}"]').inner_text()


def wait_for_state(page: Page, state: str) -> None:
    page.wait_for_function(
        "state => document.querySelector('article > dl [data-field=\"state\"]').textContent === state",
        arg=state, timeout=WAIT_MS,
    )  # fmt: skip


def bar_of(page: Page) -> dict[str, Any]:
    figures: dict[str, Any] = page.locator('article > dl [data-field="bar"]').evaluate(
        "bar => ({value: bar.value, max: bar.max})"
    )
    return figures


def test_a_tasks_bar_moves_to_done_and_the_counts_follow_without_a_reload(
    browser: Browser, api: Api, origin: Origin, workers: None
) -> None:
    origin.rate = 512 * 1024  # 3 MiB: about six seconds of progress, reported once a second
    overview = signed_in(browser, api.url, FULL)
    done_before = int(overview.locator('[data-count="done"]').inner_text())
    task_id = submit(api, origin, "Course 1, lesson 1", 3 * 1024 * 1024)
    page = overview.context.new_page()
    page.goto(f"{api.url}/ui/tasks/{task_id}")
    page.evaluate("window.haulMarker = 1")  # gone if the page reloads
    seen = []
    deadline = time.monotonic() + WAIT_MS / 1000
    while shown(page, "state") != "done" and time.monotonic() < deadline:
        figures = bar_of(page)
        if figures["max"] > 1 and 0 < figures["value"] < figures["max"]:
            seen.append(figures["value"])
        time.sleep(0.1)
    assert shown(page, "state") == "done"
    assert len(set(seen)) >= 2, f"the bar was seen part-way at {seen}: it did not move"
    assert seen == sorted(seen)
    final = bar_of(page)
    assert final["value"] == final["max"] == 3 * 1024 * 1024
    assert page.locator('[data-file="0"] [data-field="state"]').inner_text() == "done"
    # Every state change once, those between the page's render and its stream included
    kinds = page.locator('[data-field="history"] tr td:nth-child(2)').all_inner_texts()
    assert kinds[0] == "task.queued" and kinds[-2:] == ["task.finalizing", "task.completed"]
    assert "task.started" in kinds and len(kinds) == len(set(kinds))
    page.wait_for_function(  # the webhook's try, read again every few seconds
        "() => document.querySelector('table[data-table=\"deliveries\"] tbody').textContent.includes('task.completed')",
        timeout=WAIT_MS,
    )
    answer = page.locator('table[data-table="deliveries"] tbody tr td').last.inner_text()
    assert answer.startswith("delivered, 2"), answer
    assert page.evaluate("window.haulMarker") == 1
    overview.wait_for_function(
        "n => document.querySelector('[data-count=\"done\"]').textContent === String(n)",
        arg=done_before + 1, timeout=WAIT_MS,
    )  # fmt: skip
    overview.wait_for_function(  # the throughput table, read again every few seconds
        "() => [...document.querySelectorAll('table[data-table=\"throughput\"] tbody tr td:nth-child(2)')]"
        ".reduce((n, cell) => n + Number(cell.textContent), 0) >= 1",
        timeout=WAIT_MS,
    )
    assert overview.evaluate("performance.getEntriesByType('navigation').length") == 1
    screenshot(page, "task-done")
    screenshot(overview, "overview")


def test_a_dead_task_is_retried_and_completes_and_a_running_one_is_canceled(
    browser: Browser, api: Api, origin: Origin, store: TaskStore, workers: None
) -> None:
    dead = store_dead_task(store, origin)
    page = signed_in(browser, api.url, FULL)
    page.goto(f"{api.url}/ui/tasks/{dead}")
    assert shown(page, "state") == "dead"
    assert page.locator('form[data-offer="cancel"]').is_hidden()
    page.click('form[data-offer="retry"] button')
    wait_for_state(page, "done")
    assert page.locator("form[data-offer]:visible").count() == 0
    history = page.locator('[data-field="history"]').inner_text()
    assert "task.retried" in history and "by: ui:backend" in history
    screenshot(page, "task-retried")

    origin.rate = 100 * 1024  # 8 MiB: over a minute, canceled long before
    running_id = submit(api, origin, "Canceled lesson", 8 * 1024 * 1024)
    page.goto(f"{api.url}/ui/tasks/{running_id}")
    wait_for_state(page, "downloading")
    page.click('form[data-offer="cancel"] button')
    wait_for_state(page, "canceled")
    assert page.locator('form[data-offer="retry"]').is_visible()
    assert page.locator('form[data-offer="cancel"]').is_hidden()
    wait_until_state(store, running_id, State.CANCELED)
    screenshot(page, "task-canceled")


def store_dead_task(store: TaskStore, origin: Origin) -> str:
    """A task that died (its attempts used up) whose file the origin now serves."""
    from actors.manifest import spec_from_manifest

    url = origin.put("/dead.mp4", b"d" * 200_000)
    spec = spec_from_manifest({"name": "Dead lesson", "files": [{"url": url, "path": "dead.mp4"}]})
    task_id, _ = store.create(spec, now=time.time())
    assert end_task(store, task_id, State.DEAD, now=time.time(), max_attempts=1) is State.DEAD
    return task_id


def wait_until_state(store: TaskStore, task_id: str, state: State) -> State:
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        task = store.get(task_id)
        if task is not None and task.state is state:
            return state
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not become {state.value}")


def test_search_by_key_and_a_read_token_sees_no_buttons_and_forged_posts_are_refused(
    browser: Browser, api: Api, origin: Origin, store: TaskStore
) -> None:
    task_id = submit(api, origin, "Order 1234", 1024, key="order-1234")  # no worker: it stays queued
    reader = signed_in(browser, api.url, READ)
    reader.goto(f"{api.url}/ui/tasks")
    reader.fill("#q", "order-1234")
    reader.click("form.search button")
    reader.wait_for_url(f"{api.url}/ui/tasks/{task_id}")
    reader.goto(f"{api.url}/ui/tasks")
    reader.select_option("#by", "name")
    reader.fill("#q", "order 12")
    reader.click("form.search button")
    assert reader.locator("tr[data-task]").evaluate_all("rows => rows.map(r => r.dataset.task)") == [task_id]
    reader.goto(f"{api.url}/ui/tasks/{task_id}")
    assert shown(reader, "state") == "queued"
    assert reader.locator("form[data-offer]").count() == 0
    assert reader.get_by_role("button").all_inner_texts() == ["Sign out"]
    screenshot(reader, "read-only")

    operator = signed_in(browser, api.url, FULL)
    operator.goto(f"{api.url}/ui/tasks/{task_id}")
    # From the dashboard's own page, but without the session's CSRF token
    status = operator.evaluate(
        "url => fetch(url, {method: 'POST', body: new URLSearchParams({csrf: 'forged'})}).then(r => r.status)",
        f"{api.url}/ui/tasks/{task_id}/cancel",
    )
    assert status == 403
    # From another origin's page (same site: 127.0.0.1), an auto-submitting form that even
    # carries the session's real CSRF token (leaked, say): only its origin gives it away
    token = operator.locator('input[name="csrf"]').first.get_attribute("value")
    attacker = Site()
    try:
        evil = attacker.page(
            "/win",
            f'<form id="f" method="post" action="{api.url}/ui/tasks/{task_id}/cancel">'
            f'<input type="hidden" name="csrf" value="{token}"></form>'
            "<script>document.getElementById('f').submit()</script>",
        )
        operator.goto(evil)
        operator.wait_for_url(f"{api.url}/ui/**")
        # Same site (127.0.0.1), so the strict cookie went along: refused as a post from another origin
        assert operator.title() == "Refused · haul"
    finally:
        attacker.close()
    task = store.get(task_id)
    assert task is not None and task.state is State.QUEUED


def test_hostile_names_and_paths_render_as_text_and_the_pages_fit_a_phone(
    browser: Browser, api: Api, origin: Origin
) -> None:
    # A path with U+202E is refused at submit (what it would show is not what it stores), so
    # the reversal goes in the name, which is free text
    reversed_path = {"url": origin.put("/x.mp4", b"x"), "path": "a\u202e.mp4"}
    refused = api.call("POST", "/v1/tasks", json={"files": [reversed_path]})
    assert refused.status_code == 422 and "U+202E" in refused.json()["detail"]
    name = "<script>alert(1)</script> lesson\u202egpj.exe"
    path = "<img src=x onerror=alert(2)>.mp4"
    task_id = submit(api, origin, name, 1024, path=path)
    page = signed_in(browser, api.url, FULL, viewport=PHONE)
    dialogs: list[str] = []

    def refuse(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", refuse)
    page.goto(f"{api.url}/ui/tasks?state=queued")
    assert page.get_by_role("link", name=name).count() == 1
    page.goto(f"{api.url}/ui/tasks/{task_id}")
    assert page.locator("article h1").inner_text() == name
    assert page.locator('[data-file="0"] td').first.inner_text() == path
    assert page.evaluate("[...document.scripts].map(s => s.src)") == [f"{api.url}/ui/static/ui.js"]
    wide = page.evaluate(
        "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > innerWidth)"
        ".map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))"
    )
    screenshot(page, "phone-task")
    assert wide == []
    for shown_page in ("/ui/tasks?state=queued", "/ui/", "/ui/workers"):
        page.goto(api.url + shown_page)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], shown_page
    assert dialogs == []
    screenshot(page, "phone-tasks")


def test_an_open_page_goes_on_after_redis_restarts(browser: Browser, tmp_path: Path, receiver: Receiver) -> None:
    # Given an overview open on a stack whose Redis keeps an append-only file
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    try:
        started = start_api(tmp_path, api_env(tmp_path, server.url, receiver.url))
        with running(started.process):
            page = signed_in(browser, started.url, FULL)
            page.evaluate("window.haulMarker = 1")
            course = {"urls": ["https://cdn.example.com/a.mp4"]}
            assert started.call("POST", "/v1/tasks", json=course).status_code == 201
            queued = '[data-count="queued"]'
            page.wait_for_function(f"() => document.querySelector('{queued}').textContent === '1'", timeout=WAIT_MS)
            # When Redis dies under it (the stream breaks, its reconnects are answered 503) and comes back
            server.kill()
            wait_until(lambda: "cannot read the event stream" in started.process.output(), 20, "the hub to lose Redis")
            time.sleep(2)  # the page's stream broken, and its reconnects refused meanwhile
            server.start()
            assert started.call("POST", "/v1/tasks", json=course).status_code == 201
            # Then the same page, never reloaded, shows the new task, and does not say it was signed out
            page.wait_for_function(f"() => document.querySelector('{queued}').textContent === '2'", timeout=WAIT_MS)
            assert page.evaluate("window.haulMarker") == 1 and page.locator("[data-live-ended]").is_hidden()
            screenshot(page, "after-redis-restart")
    finally:
        server.stop()
