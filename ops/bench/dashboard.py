"""Benchmarks of the operator dashboard (issue 18): the server time of its pages through one
``haul api`` process over 100,000 stored tasks, signed in as a browser is (the sign-in form,
its cookie, one keep-alive connection); and the main thread of a headless Chromium showing 200
downloading tasks whose progress moves once a second, through the lease keeper's real path.

The stored tasks are made by the real create script (pipelined, as the API runs it) and taken
to their states by the store's own calls, as a worker makes them, so the state sets, the
search indexes and the events are the real ones. The benchmarks use a database of their own.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import redis
import requests

from ops.bench.api import TOKEN, percentile, start_api
from ops.bench.harness import Bench, ratio_runs

if TYPE_CHECKING:
    from actors.states import State
    from actors.store import TaskStore
    from actors.task import TaskSpec

#: The database the dashboard benchmarks fill (and empty when they end).
DB = 5
#: Tasks stored for the page timings.
TASKS = 100_000
#: The newest tasks, still queued or downloading (the rest have ended).
QUEUED, DOWNLOADING = 300, 200
#: Of every 1,000 older tasks: failed, dead (attempts used) and canceled ones; the rest are done.
FAILED_PER_1000, DEAD_PER_1000, CANCELED_PER_1000 = 30, 20, 5
#: The stored tasks were created one after another over this long (seconds): a week.
SPAN_SECONDS = 7 * 86400
#: A course's lessons (a task each, named after its course); origin hosts, in turn.
LESSONS, HOSTS = 20, 10
#: Each task's one file (bytes), its size known from the order.
FILE_BYTES = 700 * 1024 * 1024
#: The searches timed: a name's start (casefolded, as the index keeps names) and a host.
NAME_QUERY, HOST_QUERY = "khóa học 12", "cdn3.example.com"
#: Creates per pipeline, and threads taking the tasks through their runs.
CREATE_BATCH, SEED_THREADS = 1000, 4
#: Requests timed per page (after WARM_UP untimed ones), the pages in turn.
REQUESTS, WARM_UP = 50, 5
#: The dashboard's target for a page's server time (ms).
TARGET_MS = 300
#: The live page: its tasks, and the share of the main thread it may take (TaskDuration / wall).
LIVE_TASKS, MAIN_THREAD_BUDGET = 200, 0.10
#: A long task, as the Long Tasks API reports them (ms; the API's own threshold).
LONG_TASK_MS = 50
#: The lease keeper's progress: a renewal a little over a second apart (task.progress is at
#: most one a second per task), each task this much further each time (bytes).
TICK_SECONDS, STEP_BYTES = 1.01, 5 * 1024 * 1024


def lesson_name(n: int) -> str:
    course, lesson = divmod(n, LESSONS)
    return f"Khóa học {course} - bài {lesson + 1:02d}"


def lesson_spec(n: int) -> TaskSpec:
    """Task ``n``: lesson ``n % LESSONS`` of course ``n // LESSONS``, one file of FILE_BYTES on
    host ``n % HOSTS``, under an idempotency key of its own."""
    from actors.manifest import spec_from_manifest

    course, lesson = divmod(n, LESSONS)
    path = f"lesson-{lesson + 1:02d}.mp4"
    return spec_from_manifest({
        "name": lesson_name(n),
        "key": f"order-{n}",
        "files": [{"url": f"https://cdn{n % HOSTS}.example.com/course/{course}/{path}", "path": path,
                   "size": FILE_BYTES}],
    })  # fmt: skip


def create_many(store: TaskStore, count: int, created: Callable[[int], float]) -> list[str]:
    """``count`` tasks made by create.lua, CREATE_BATCH to a pipeline, task ``n`` at ``created(n)``."""
    from actors.states import CreateReply
    from actors.store_base import text_of

    script = store.client.register_script(store.script_text("create"))
    ids: list[str] = []
    for start in range(0, count, CREATE_BATCH):
        pipe = store.client.pipeline(transaction=False)
        batch = [uuid.uuid4().hex for _ in range(start, min(count, start + CREATE_BATCH))]
        for n, task_id in enumerate(batch, start):
            keys, argv = store.create_call(lesson_spec(n), created(n), task_id)
            script(keys=keys, args=argv, client=pipe)
        for reply in pipe.execute():
            if CreateReply(text_of(reply[1])) is not CreateReply.CREATED:
                raise RuntimeError(f"create.lua answered {reply!r}")
        ids += batch
    return ids


def end_run(store: TaskStore, task_id: str, target: State, at: float) -> None:
    """Take a queued task created at ``at`` through one run of a minute into ``target`` (done,
    failed or dead), or cancel it before it runs, as a worker and an operator would."""
    from actors.states import State

    if target is State.CANCELED:
        store.cancel(task_id, at + 30, by="bench")
        return
    attempts = 1 if target is State.DEAD else 5  # dead: its last attempt ended queued
    run = store.claim(task_id, worker="bench:1", now=at + 1, lease_seconds=300, max_attempts=attempts,
                      start=State.DOWNLOADING)  # fmt: skip
    if target is State.DONE:
        store.finish_download(task_id, run.token, now=at + 60, lease_seconds=300,
                              progress=(FILE_BYTES, FILE_BYTES, 1), finalize_limit=0)  # fmt: skip
        stored = [{"path": "lesson.mp4", "size": FILE_BYTES, "location": f"/srv/media/{task_id}/lesson.mp4"}]
        reached = store.release(task_id, run.token, State.DONE, now=at + 65, max_attempts=attempts, stored=stored)
    elif target is State.FAILED:
        reached = store.release(task_id, run.token, State.FAILED, now=at + 5, max_attempts=attempts,
                                error="the origin answered 404 Not Found", code="origin_404",
                                file="lesson.mp4")  # fmt: skip
    else:
        reached = store.release(task_id, run.token, State.QUEUED, now=at + 40, max_attempts=attempts,
                                error="the origin answered 503 Service Unavailable",
                                code="origin_unavailable")  # fmt: skip
    if reached is not target:
        raise RuntimeError(f"task {task_id} ended {reached}, not {target}")


def downloading(store: TaskStore, task_ids: list[str], now: float) -> dict[str, int]:
    """Claim ``task_ids`` into ``downloading`` as a worker does (a lease longer than any
    benchmark); their tokens."""
    from actors.states import State

    claimed = {}
    for task_id in task_ids:
        run = store.claim(task_id, worker="bench:1", now=now, lease_seconds=3600, max_attempts=5,
                          start=State.DOWNLOADING)  # fmt: skip
        if not run.ok:
            raise RuntimeError(f"task {task_id} not claimed: {run.outcome} {run.detail}")
        claimed[task_id] = run.token
    return claimed


def write_progress(store: TaskStore, tokens: dict[str, int], done: int) -> None:
    """Every task ``done`` bytes along, through the lease keeper's call (one pipelined trip),
    its one file's figures as a downloading run reports them."""
    from actors.store import FilesProgress, Renewal

    files = FilesProgress(active=((0, done, FILE_BYTES, 1),))
    renewals = [Renewal(task_id, token, (done, FILE_BYTES, 0), files=files) for task_id, token in tokens.items()]
    if not all(store.renew_many(renewals, now=time.time(), lease_seconds=3600)):
        raise RuntimeError("a lease was lost during the benchmark")


def seed(store: TaskStore, now: float) -> dict[State, list[str]]:
    """TASKS tasks, one every few seconds over the last week, in the states they would have:
    the newest queued or downloading, the others done but for a few failed, dead and canceled."""
    from actors.states import State

    step = SPAN_SECONDS / TASKS

    def created(n: int) -> float:
        return now - SPAN_SECONDS + n * step

    ids = create_many(store, TASKS, created)
    ended = TASKS - QUEUED - DOWNLOADING
    cuts = ((FAILED_PER_1000, State.FAILED), (FAILED_PER_1000 + DEAD_PER_1000, State.DEAD),
            (FAILED_PER_1000 + DEAD_PER_1000 + CANCELED_PER_1000, State.CANCELED))  # fmt: skip

    def target(n: int) -> State:
        return next((state for cut, state in cuts if n % 1000 < cut), State.DONE)

    by_state: dict[State, list[str]] = {}
    for n in range(ended):
        by_state.setdefault(target(n), []).append(ids[n])
    with ThreadPoolExecutor(SEED_THREADS) as pool:
        list(pool.map(lambda n: end_run(store, ids[n], target(n), created(n)), range(ended), chunksize=500))
    by_state[State.QUEUED] = ids[ended : ended + QUEUED]
    by_state[State.DOWNLOADING] = ids[ended + QUEUED :]
    tokens = downloading(store, by_state[State.DOWNLOADING], now)
    write_progress(store, tokens, FILE_BYTES // 3)
    return by_state


@contextmanager
def quick_writes(client: redis.Redis) -> Iterator[None]:
    """appendfsync off while the store is filled (what is timed is the pages, not the filling);
    then the append-only file rewritten, so no rewrite runs while pages are timed."""
    before = str(client.config_get("appendfsync")["appendfsync"])
    client.config_set("appendfsync", "no")
    try:
        yield
    finally:
        client.config_set("appendfsync", before)
    client.bgrewriteaof()
    while True:
        persistence = client.info("persistence")
        if not persistence["aof_rewrite_in_progress"] and not persistence["aof_rewrite_scheduled"]:
            return
        time.sleep(0.2)


def signed_in(url: str) -> requests.Session:
    """A keep-alive session signed in through the dashboard's form, as a browser is (its
    ``Origin`` names the dashboard's own page)."""
    session = requests.Session()
    answer = session.post(f"{url}/ui/sign-in", data={"token": TOKEN}, headers={"Origin": url},
                          allow_redirects=False, timeout=10)  # fmt: skip
    if answer.status_code != 303 or not session.cookies:
        raise RuntimeError(f"sign-in answered {answer.status_code}: {answer.text[:200]}")
    return session


def figures(seconds: list[float]) -> dict[str, Any]:
    """p50 / p95 / max in ms, and whether the slowest request is under TARGET_MS."""
    ms = [s * 1000 for s in seconds]
    slowest = max(ms)
    return {
        "p50 / p95 / max ms": [round(statistics.median(ms), 1), round(percentile(ms, 0.95), 1), round(slowest, 1)],
        f"< {TARGET_MS} ms": "pass" if slowest < TARGET_MS else "FAIL",
    }


def bench_dashboard_pages(bench: Bench) -> dict[str, Any]:
    """18: server time of the dashboard's pages with 100,000 stored tasks: a state's first
    page and one halfway down it, 200 queued tasks, a name and a host search, the overview
    and a task's page; beside each, the store calls it makes (supervisor/api/ui.py), timed
    from here on the same Redis."""
    from actors.client import Client
    from actors.events import EventLog
    from actors.settings import Settings
    from actors.states import State
    from actors.store import Cursor, TaskStore

    client = redis.Redis(port=bench.redis_port, db=DB)
    client.flushdb()
    store = TaskStore(client)
    started = time.monotonic()
    with quick_writes(client):
        by_state = seed(store, time.time())
    seeded = time.monotonic() - started
    counts = store.counts()
    deep = len(by_state[State.DONE]) // 2
    found: Any = client.zrevrange(store.state_key(State.DONE), deep, deep, withscores=True)
    halfway = Cursor(float(found[0][1]), found[0][0].decode())
    done_id = by_state[State.DONE][-1]
    named = sum(1 for n in range(TASKS) if lesson_name(n).casefold().startswith(NAME_QUERY))
    redis_url = f"redis://127.0.0.1:{bench.redis_port}/{DB}"
    own = Client(Settings.from_env(bench.env(HAUL_REDIS_URL=redis_url)))
    events = EventLog(own.store.client, own.store.prefix)
    now = time.time()
    # name: (path, tasks it shows (None: not counted), the store calls it makes)
    pages: dict[str, tuple[str, int | None, dict[str, Callable[[], object]]]] = {
        "tasks, done, first page of 50": (
            "/ui/tasks?state=done", 50, {"page": lambda: own.page(State.DONE, 50), "counts": own.counts}),
        f"tasks, done, the page at {deep:,} (its cursor)": (
            "/ui/tasks?" + urlencode({"state": "done", "cursor": f"{halfway.at!r}:{halfway.task_id}"}), 50,
            {"page": lambda: own.page(State.DONE, 50, halfway), "counts": own.counts}),
        "tasks, queued, 200 a page": (
            "/ui/tasks?state=queued&per=200", 200, {"page": lambda: own.page(State.QUEUED, 200),
                                                    "counts": own.counts}),
        f"search by name ({NAME_QUERY!r}, {named:,} match)": (
            "/ui/tasks?" + urlencode({"by": "name", "q": NAME_QUERY}), 50,
            {"by_name": lambda: own.by_name(NAME_QUERY, 50)}),
        f"search by host ({HOST_QUERY}, {TASKS // HOSTS:,} match)": (
            "/ui/tasks?" + urlencode({"by": "host", "q": HOST_QUERY}), 50,
            {"by_host": lambda: own.by_host(HOST_QUERY, 50)}),
        "overview": (
            "/ui/", None,
            {"counts": own.store.counts, "throughput": lambda: own.store.throughput(now, 5),
             "slots_in_use": lambda: own.store.slots_in_use(now), "staged_bytes": own.store.staged_bytes,
             "supervisor_report": own.store.supervisor_report}),
        "a done task's page": (
            f"/ui/tasks/{done_id}", 1,
            {"get": lambda: own.get(done_id), "events": lambda: events.state_changes(done_id, 200)}),
    }  # fmt: skip
    api, port = start_api(bench, HAUL_REDIS_URL=redis_url)
    url = f"http://127.0.0.1:{port}"
    try:
        session = signed_in(url)

        def timed(path: str, rows: int | None) -> Callable[[], float]:
            def one() -> float:
                started = time.perf_counter()
                answer = session.get(url + path, timeout=30, allow_redirects=False)
                took = time.perf_counter() - started
                shown = answer.text.count("data-task=")
                if answer.status_code != 200 or (rows is not None and shown != rows):
                    raise RuntimeError(f"{path}: {answer.status_code}, {shown} tasks shown, not {rows}")
                return took

            return one

        sides = {name: timed(path, rows) for name, (path, rows, _) in pages.items()}
        for side in sides.values():
            for _ in range(WARM_UP):
                side()
        times = ratio_runs(REQUESTS, sides)
        store_ms = {
            name: {call: round(statistics.median(timing(made)) * 1000, 2) for call, made in calls.items()}
            for name, (_, _, calls) in pages.items()
        }
    finally:
        api.terminate()
        api.wait(30)
        own.close()
    client.flushdb()
    result: dict[str, Any] = {
        "tasks stored": sum(counts.values()),
        "by state": {state.value: n for state, n in counts.items() if n},
        "filled in s (create.lua pipelined, runs by the store's calls)": round(seeded),
        "requests timed a page (keep-alive, signed in; pages in turn)": REQUESTS,
    }
    for name, seconds in times.items():
        result[name] = {**figures(seconds), "store calls p50 ms": store_ms[name]}
    return result


def timing(call: Callable[[], object], count: int = 20) -> list[float]:
    """Seconds each of ``count`` calls took (after one untimed)."""
    call()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


#: Long tasks the page's main thread runs from now on, kept where the benchmark reads them.
OBSERVE_LONG_TASKS = """() => {
  window.__benchLongTasks = [];
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) window.__benchLongTasks.push({start: e.startTime, ms: e.duration});
  }).observe({type: "longtask", buffered: true});
  return performance.now();
}"""
BAR_VALUES = "bars => bars.map(bar => bar.value)"


def bench_dashboard_live(bench: Bench, seconds: float = 60) -> dict[str, Any]:
    """18: a tasks page of 200 downloading tasks open in headless Chromium while the lease
    keeper's path writes their progress once a second: the share of the page's main thread
    busy (CDP TaskDuration over the wall time), its long tasks, the frames received and the
    bars moved."""
    from actors.store import TaskStore
    from tests.browser import chromium
    from tests.browser import signed_in as browser_signed_in

    client = redis.Redis(port=bench.redis_port, db=DB)
    client.flushdb()
    store = TaskStore(client)
    now = time.time()
    ids = create_many(store, LIVE_TASKS, lambda n: now - LIVE_TASKS + n)
    tokens = downloading(store, ids, now)
    api, port = start_api(bench, HAUL_REDIS_URL=f"redis://127.0.0.1:{bench.redis_port}/{DB}")
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    written = [0]

    def keeper() -> None:
        while not stop.is_set():
            written[0] += STEP_BYTES
            write_progress(store, tokens, written[0])
            stop.wait(TICK_SECONDS)

    try:
        with chromium() as browser:
            page = browser_signed_in(browser, url, TOKEN)
            cdp = page.context.new_cdp_session(page)
            cdp.send("Performance.enable")
            cdp.send("Network.enable")  # for the frames of the live updates' EventSource
            frames: list[dict[str, Any]] = []

            def received(message: dict[str, Any]) -> None:
                frames.append(message)

            cdp.on("Network.eventSourceMessageReceived", received)  # (Playwright tags its handlers: not a builtin)
            page.goto(f"{url}/ui/tasks?state=downloading&per={LIVE_TASKS}")
            bars = page.locator('tr[data-task] progress[data-field="bar"]')
            if bars.count() != LIVE_TASKS:
                raise RuntimeError(f"the page shows {bars.count()} bars, not {LIVE_TASKS}")
            deadline = time.monotonic() + 10
            while not any(f["eventName"] == "tasks" for f in frames):  # the stream's snapshot
                if time.monotonic() > deadline:
                    raise RuntimeError("the page's live updates did not start")
                page.wait_for_timeout(50)
            page.wait_for_timeout(1000)
            window_start = page.evaluate(OBSERVE_LONG_TASKS)
            before_bars = bars.evaluate_all(BAR_VALUES)
            first = len(frames)
            before = metrics(cdp)
            producer = threading.Thread(target=keeper, daemon=True)
            producer.start()
            page.wait_for_timeout(seconds * 1000)
            after = metrics(cdp)
            stop.set()
            producer.join()
            window = frames[first:]
            page.wait_for_timeout(1500)  # the last progress written reaches the page
            after_bars = bars.evaluate_all(BAR_VALUES)
            long_tasks = [t["ms"] for t in page.evaluate("window.__benchLongTasks") if t["start"] >= window_start]
            loading = [t["ms"] for t in page.evaluate("window.__benchLongTasks") if t["start"] < window_start]
    finally:
        stop.set()
        api.terminate()
        api.wait(30)
    wall = after["Timestamp"] - before["Timestamp"]
    busy = after["TaskDuration"] - before["TaskDuration"]
    share = busy / wall
    patches = [len(json.loads(f["data"])) for f in window if f["eventName"] == "tasks"]
    moved = sum(1 for b, a in zip(before_bars, after_bars, strict=True) if a > b)
    at_last = sum(1 for a in after_bars if a == written[0])
    if moved != LIVE_TASKS:
        raise RuntimeError(f"only {moved} of {LIVE_TASKS} bars moved")
    client.flushdb()
    return {
        "tasks shown / progress writes": f"{LIVE_TASKS} / {written[0] // STEP_BYTES} each",
        "window s": round(wall, 1),
        "main thread busy % (TaskDuration / wall)": round(100 * share, 2),
        f"< {round(100 * MAIN_THREAD_BUDGET)} %": "pass" if share < MAIN_THREAD_BUDGET else "FAIL",
        "script / layout / style ms per s": [
            round(1000 * (after[name] - before[name]) / wall, 1)
            for name in ("ScriptDuration", "LayoutDuration", "RecalcStyleDuration")
        ],
        f"long tasks > {LONG_TASK_MS} ms in window / longest ms": [len(long_tasks), round(max(long_tasks, default=0))],
        "long tasks while loading / longest ms": [len(loading), round(max(loading, default=0))],
        "frames received (tasks) / tasks patched per frame (median)": [
            len(patches), round(statistics.median(patches)) if patches else 0],
        "bars moved / at the last progress written": f"{moved} / {at_last} of {LIVE_TASKS}",
    }  # fmt: skip


def metrics(cdp: Any) -> dict[str, float]:
    """The page's Performance metrics (CDP), by name."""
    return {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
