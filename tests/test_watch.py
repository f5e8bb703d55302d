"""``haul watch`` (issue 15): a task followed from the event stream to its end, as bars on a
terminal and as plain lines in a pipe, with a failure shown with its reason. A real in-process
worker, a real origin, the real CLI for the plain lines."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from actors.client import Client
from actors.manifest import spec_from_manifest, spec_from_urls
from actors.settings import Settings
from actors.store import TaskStore
from supervisor.watch import EXIT_ALL_DONE, EXIT_SOME_NOT_DONE, watch
from tests.conftest import InProcessWorker, submit_spec
from tests.processes import REPO, base_env
from tests.servers import Origin, Receiver

MIB = 1024 * 1024


def test_plain_lines_follow_a_task_to_the_end_through_the_cli(
    worker: InProcessWorker, store: TaskStore, origin: Origin, receiver: Receiver, settings: Settings
) -> None:
    origin.rate = 2 * MIB
    files = [{"url": origin.put(f"/{n}.mp4", os.urandom(MIB)), "path": f"lesson-{n}.mp4"} for n in range(2)]
    task_id = submit_spec(spec_from_manifest({"name": "Course 3", "files": files}), store)
    watched = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "watch", task_id], cwd=REPO, capture_output=True, text=True,
        timeout=60, env=base_env(HAUL_REDIS_URL=settings.redis_url),
    )  # fmt: skip
    assert watched.returncode == EXIT_ALL_DONE, watched.stderr
    lines = watched.stdout.splitlines()
    assert all(f"{task_id} Course 3:" in line for line in lines), lines
    said = [line.split(": ", 1)[1] for line in lines]
    assert "file lesson-0.mp4 downloaded" in said and "file lesson-1.mp4 downloaded" in said
    assert said[-1] == "task.completed" and "task.finalizing" in said


def test_bars_on_a_terminal_and_a_failure_in_red_with_its_reason(
    worker: InProcessWorker, store: TaskStore, origin: Origin, receiver: Receiver, settings: Settings
) -> None:
    origin.rate = MIB  # three lessons side by side, about 2 s: a bar for each while it downloads
    lessons = [origin.put(f"/good-{n}.mp4", os.urandom(2 * MIB)) for n in range(3)]
    good = submit_spec(spec_from_urls(lessons, name="Good order"), store)
    bad = submit_spec(spec_from_urls([origin.url("/missing.mp4")], name="Bad order"), store)
    screen = io.StringIO()
    ended = watch(Client(settings, store=store), [good, bad], out=screen, tty=True)
    assert ended == EXIT_SOME_NOT_DONE  # one of them failed
    shown = screen.getvalue()
    assert "Good order" in shown and "Bad order" in shown and "3/3 files" in shown
    assert all(f"good-{n}.mp4" in shown for n in range(3))
    assert "\x1b[" in shown  # drawn for a terminal, with colours
    assert "404" in shown and "failed" in shown
