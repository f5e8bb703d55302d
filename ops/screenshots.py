"""Regenerates the dashboard screenshots README.md shows (docs/screenshots/*.png), from a live
stack on 127.0.0.1: a throwaway redis-server, a throttled origin, ``haul api``, a supervisor
and a worker process, and a few courses in every state. Run by hand (``ops/screenshots``),
never by the tests or CI, which must not rewrite tracked files; the tests leave their own
screenshots in .artifacts/ instead."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from actors.manifest import spec_from_manifest
from actors.states import State
from actors.store import TaskStore
from tests.apiserver import FULL, Api, api_env, running_api
from tests.browser import PHONE, chromium, screenshot, signed_in
from tests.conftest import WEBHOOK_SECRET, end_task
from tests.processes import running, supervisor, wait_until, worker
from tests.redisserver import RedisServer
from tests.servers import Origin, Receiver

FOLDER = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
LESSONS = ["Welcome", "Setting up", "First steps", "Going further", "Wrapping up"]


def scene(store: TaskStore, origin: Origin, api: Api) -> tuple[str, str]:
    """Courses in every state: some stored, two downloading slowly, one dead, one canceled; the
    ids of a downloading course and of the dead one."""

    def files(course: int, size: int) -> list[dict[str, str]]:
        body = bytes(range(256)) * (size // 256)
        return [{"url": origin.put(f"/c{course}/{n}.mp4", body), "path": f"{n + 1:02d} {title}.mp4"}
                for n, title in enumerate(LESSONS)]  # fmt: skip

    def create(name: str, course: int, size: int, key: str) -> str:
        spec = spec_from_manifest({"name": name, "key": key, "files": files(course, size)})
        return store.create(spec, now=time.time())[0]

    for course in range(1, 4):
        manifest = {"name": f"Photography basics, cohort {course}", "files": files(course, 64 * 1024)}
        key = {"Idempotency-Key": f"order-10{course}"}
        api.call("POST", "/v1/tasks", json=manifest, headers=key).raise_for_status()
    wait_until(lambda: store.counts()[State.DONE] == 3, 60, "the first courses to be stored")
    dead = create("Watercolour for beginners", 4, 64 * 1024, "order-204")
    end_task(store, dead, State.DEAD, now=time.time(), max_attempts=1)
    store.client.hset(store.task_key(dead), "error", "origin answered 503 Service Unavailable for 03 First steps.mp4")
    canceled = create("Bread baking (refunded)", 5, 64 * 1024, "order-205")
    store.cancel(canceled, time.time(), "ui:backend")
    downloading = ""
    for course, name in ((6, "Italian for travellers"), (7, "Guitar chords in a week")):
        manifest = {"name": name, "files": files(course, 6 * 1024 * 1024)}
        answer = api.call("POST", "/v1/tasks", json=manifest, headers={"Idempotency-Key": f"order-30{course}"})
        answer.raise_for_status()
        downloading = downloading or answer.json()["id"]
    return downloading, dead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--to", type=Path, default=FOLDER, help=f"where the PNGs go (default {FOLDER})")
    folder = parser.parse_args().to
    with tempfile.TemporaryDirectory(prefix="haul-screenshots-") as temporary:
        tmp = Path(temporary)
        redis_server = RedisServer(tmp / "redis", appendonly=True)
        redis_server.start()
        origin, receiver = Origin(), Receiver(WEBHOOK_SECRET)
        origin.rate, origin.shared_rate = 200 * 1024, True  # a file's connections share 200 KiB/s
        env = api_env(tmp, redis_server.url, receiver.url) | {"HAUL_SWEEP_SECONDS": "2"}
        store = TaskStore.from_url(redis_server.url)
        try:
            processes = (supervisor(env, tmp / "supervisor.log"), worker(env, tmp / "worker.log", threads=2))
            with running_api(tmp, env) as api, running(*processes):
                wait_until(lambda: store.supervisor_report() is not None, 30, "the supervisor's first report")
                downloading, dead = scene(store, origin, api)
                with chromium() as browser:
                    wait_until(lambda: (t := store.get(downloading)) is not None and t.bytes_done > 8 << 20, 60,
                               "the course to be part-way")  # fmt: skip
                    page = signed_in(browser, api.url, FULL)
                    page.goto(f"{api.url}/ui/tasks?state=downloading")
                    time.sleep(2)
                    screenshot(page, "tasks", folder)
                    page.goto(f"{api.url}/ui/tasks/{downloading}")
                    time.sleep(2)
                    screenshot(page, "task", folder)
                    page.goto(f"{api.url}/ui/")
                    time.sleep(6)  # the overview's tables are read again every 5 s
                    screenshot(page, "overview", folder)
                    page.goto(f"{api.url}/ui/tasks/{dead}")
                    screenshot(page, "dead-task", folder)
                    page.goto(f"{api.url}/ui/workers")
                    screenshot(page, "workers", folder)
                    phone = signed_in(browser, api.url, FULL, viewport=PHONE)
                    phone.goto(f"{api.url}/ui/tasks?state=done")
                    screenshot(phone, "phone", folder)
        finally:
            store.client.close()
            origin.close()
            receiver.close()
            redis_server.stop()
    print(f"ops/screenshots: wrote {', '.join(sorted(p.name for p in folder.glob('*.png')))} in {folder}")


if __name__ == "__main__":
    main()
