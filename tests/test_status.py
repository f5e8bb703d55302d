"""``haul status`` (issue 12, item 6): why a task waits and until when, ISO 8601 times, a look-up
by idempotency key, lists with key, age, attempts and error, and byte totals that say when they
are only a lower bound. The real CLI against a real redis-server."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from actors.manifest import spec_from_manifest, spec_from_urls
from actors.settings import Settings
from actors.states import State
from actors.store import StageLimits, TaskStore
from tests.conftest import in_process_worker, wait_for
from tests.processes import haul_cli as haul
from tests.processes import wait_until
from tests.servers import Origin

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
MIB = 1 << 20


def status_json(*args: str) -> Any:
    result = haul("status", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def new_task(store: TaskStore, key: str | None = None, url: str = "https://cdn.example.com/a.mp4") -> str:
    return store.create(spec_from_urls([url], name="Course 12", key=key), now=NOW)[0]


def claimed(store: TaskStore, task_id: str, now: float = NOW, **limits: int) -> Any:
    return store.claim(task_id, worker="w1", now=now, lease_seconds=30, max_attempts=3, limits=StageLimits(**limits))


def test_times_are_iso_8601_utc_strings(store: TaskStore) -> None:
    task_id = new_task(store)
    status = status_json(task_id)
    assert status["created_at"] == "2023-11-14T22:13:20.000Z"
    assert status["lease_until"] is None and status["waiting"] is None


def test_a_task_is_found_by_its_key(store: TaskStore) -> None:
    task_id = new_task(store, key="order-982")
    assert status_json("--key", "order-982")["id"] == task_id
    assert task_id in haul("status", "--key", "order-982").stdout
    missing = haul("status", "--key", "order-0")
    assert missing.returncode == 1 and "order-0" in missing.stderr


def test_a_queued_task_in_backoff_shows_its_error_and_its_next_attempt(store: TaskStore) -> None:
    # Given a run that ended with a transient error and a backoff of a minute
    task_id = new_task(store)
    claim = claimed(store, task_id)
    store.release(task_id, claim.token, State.QUEUED, now=NOW + 1, error="origin answered 503", not_before=NOW + 60,
                  max_attempts=3)  # fmt: skip
    # Then status says what it waits for, until when, and the error
    status = status_json(task_id)
    assert status["waiting"] == {"for": "backoff", "until": "2023-11-14T22:14:20.000Z"}
    assert status["not_before"] == "2023-11-14T22:14:20.000Z" and status["error"] == "origin answered 503"
    text = haul("status", task_id).stdout
    assert "backoff" in text and "2023-11-14T22:14:20.000Z" in text and "origin answered 503" in text


def test_a_queued_task_refused_a_slot_says_since_when_it_waits(store: TaskStore) -> None:
    first, second = new_task(store), new_task(store)
    assert claimed(store, first, downloads=1).ok
    assert claimed(store, second, now=NOW + 2, downloads=1).outcome == "full"
    assert status_json(second)["waiting"] == {
        "for": "stage_slot",
        "limit": "download",
        "since": "2023-11-14T22:13:22.000Z",
    }
    assert "HAUL_DOWNLOAD_CONCURRENCY" in haul("status", second).stdout


def test_a_task_waiting_for_its_host_says_which_host_and_stops_saying_it_once_claimed(store: TaskStore) -> None:
    # Given two tasks from the same host, and one download per host
    first, second = new_task(store), new_task(store)
    held = claimed(store, first, downloads_per_host=1)
    assert held.ok
    assert claimed(store, second, now=NOW + 2, downloads_per_host=1).outcome == "full"
    # Then the second says which host's limit holds it
    waiting = status_json(second)["waiting"]
    assert waiting["limit"] == "download_per_host" and waiting["host"] == "cdn.example.com"
    text = haul("status", second).stdout
    assert "cdn.example.com" in text and "HAUL_DOWNLOAD_PER_HOST" in text
    # When the first ends and the second is claimed, it waits for nothing
    store.release(first, held.token, State.FAILED, now=NOW + 3, error="origin answered 404", max_attempts=3)
    assert claimed(store, second, now=NOW + 4, downloads_per_host=1).ok
    assert status_json(second)["waiting"] is None
    assert store.client.hmget(f"haul:task:{second}", "waiting_on", "waiting_host") == [None, None]


def downloaded(store: TaskStore, task_id: str, finalize_limit: int) -> tuple[str, int]:
    claim = claimed(store, task_id)
    assert store.advance(task_id, claim.token, State.CLAIMED, State.DOWNLOADING, now=NOW, lease_seconds=30)
    return store.finish_download(
        task_id, claim.token, now=NOW + 1, lease_seconds=30, progress=(3, 3, 1), finalize_limit=finalize_limit
    )


def test_a_finalizing_task_parked_for_an_outage_says_so_with_the_error(store: TaskStore) -> None:
    # Given a finished download whose receiver is down
    task_id = new_task(store)
    outcome, token = downloaded(store, task_id, finalize_limit=0)
    assert outcome == "ok"
    assert store.park(task_id, token, now=NOW + 2, due=NOW + 300, failing_since=NOW + 2, error="receiver: 502")
    # Then status names the outage, the next try and the error
    status = status_json(task_id)
    assert status["waiting"] == {"for": "outage", "until": "2023-11-14T22:18:20.000Z"}
    assert status["error"] == "receiver: 502"
    assert "down" in haul("status", task_id).stdout


def test_a_finalizing_task_waiting_for_a_finalize_slot_says_so(store: TaskStore) -> None:
    holder, waiting = new_task(store), new_task(store)
    assert downloaded(store, holder, finalize_limit=1)[0] == "ok"
    assert downloaded(store, waiting, finalize_limit=1)[0] == "full"
    status = status_json(waiting)
    assert status["waiting"]["for"] == "finalize_slot" and status["waiting"]["until"].endswith("Z")


@pytest.mark.parametrize(("sizes", "words"), [((3, None), "of at least 3 B"), ((3, 4), "of 7 B")])
def test_the_byte_total_is_a_lower_bound_while_sizes_are_unknown(
    store: TaskStore, sizes: tuple[int | None, ...], words: str
) -> None:
    files = [{"url": f"https://cdn.example.com/{n}.mp4", "path": f"{n}.mp4"} | ({"size": s} if s else {})
             for n, s in enumerate(sizes)]  # fmt: skip
    task_id = store.create(spec_from_manifest({"files": files}), now=NOW)[0]
    assert words in haul("status", task_id).stdout
    assert status_json(task_id)["bytes_total_known"] is (None not in sizes)


def test_a_state_list_shows_key_age_attempts_and_error(store: TaskStore) -> None:
    task_id = new_task(store, key="order-982")
    claim = claimed(store, task_id)
    store.release(task_id, claim.token, State.QUEUED, now=NOW + 1, error="origin answered 503", max_attempts=3)
    lines = haul("status", "--state", "queued").stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "STATE", "KEY", "AGE", "TRIES"]
    row = lines[1].split()
    assert row[:3] == [task_id, "queued", "order-982"] and row[3].endswith("d") and row[4] == "1"
    assert "origin answered 503" in lines[1]


def test_a_file_without_a_size_adds_its_content_length_once_its_get_answers(
    settings: Settings, store: TaskStore, origin: Origin
) -> None:
    # Given a course of two files without sizes, the first arriving slowly, one at a time
    origin.rate = 512 * 1024
    first, second = os.urandom(MIB), b"subtitles"
    files = [{"url": origin.put("/01.mp4", first), "path": "01.mp4"},
             {"url": origin.put("/01.vtt", second), "path": "01.vtt"}]  # fmt: skip
    task_id = store.create(spec_from_manifest({"files": files}), now=NOW)[0]
    with in_process_worker(settings.replace(task_parallel_files=1), store, threads=1) as running:
        running.messages.claim(task_id)
        # While the first downloads, its size is in the total, which is still only a lower bound

        def first_sized() -> bool:
            task = store.get(task_id)
            return task is not None and task.state is State.DOWNLOADING and task.bytes_total == MIB

        wait_until(first_sized, 10, "the first file's size in the total")
        status = status_json(task_id)
        assert status["bytes_total"] == MIB and status["bytes_total_known"] is False
        assert "of at least 1.0 MiB" in haul("status", task_id).stdout
        done = wait_for(store, task_id)
    assert done.state is State.DONE and done.bytes_total == MIB + len(second)
    # And no HEAD was ever sent (a signed URL signs the method; HEAD would be refused)
    assert [r.method for r in origin.requests] == ["GET", "GET"]
