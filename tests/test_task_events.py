"""The event streams the store's scripts write as they change a task (issue 15): one event per
state change in the same step, progress at most once a second, a file.completed per file,
bounded retention that says when it lost something, and prune taking a task's stream along.
A real Dramatiq worker on the real Redis broker, a real origin and a real receiver."""

from __future__ import annotations

import os
import re
import time
from importlib import resources

from actors.events import EVENT_OF_STATE, Event, EventLog
from actors.manifest import spec_from_manifest, spec_from_urls
from actors.states import TRANSITIONS, RetryReply, State
from actors.store import TaskStore
from actors.store_base import text_of
from tests.conftest import InProcessWorker, end_task, small_stream_nodes, submit_spec, wait_for
from tests.servers import Fault, Origin, Receiver

MIB = 1024 * 1024


def states_of(events: list[Event]) -> list[str]:
    return [e.data["state"] for e in events if e.type not in ("task.progress", "file.completed")]


def assert_a_path_of_the_state_machine(events: list[Event]) -> None:
    """Each state event moves the task along an allowed transition, and says the state it
    entered with the name that state has (the retry's own name apart)."""
    previous: State | None = None
    for event in events:
        if event.type in ("task.progress", "file.completed"):
            continue
        state = State(event.data["state"])
        assert event.type == EVENT_OF_STATE[state] or (event.type, state) == ("task.retried", State.QUEUED)
        if previous is not None:
            assert state in TRANSITIONS[previous] and state is not previous, (previous, state)
        previous = state


def test_the_scripts_and_python_name_the_same_event_for_each_state() -> None:
    lua = (resources.files("actors") / "lua" / "_lib.lua").read_text()
    table = lua[lua.index("local EVENT_OF_STATE = {") : lua.index("}", lua.index("local EVENT_OF_STATE = {"))]
    named = dict(re.findall(r"(\w+) = '([\w.]+)'", table))
    assert named == {state.value: name for state, name in EVENT_OF_STATE.items()}


def test_a_course_tells_every_step_once_in_order(
    worker: InProcessWorker, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    files = {"lesson-1.mp4": os.urandom(2 * MIB), "notes.pdf": b"%PDF", "lesson-2.mp4": os.urandom(MIB)}
    entries = [{"url": origin.put(f"/{p}", d), "path": p} for p, d in files.items()]
    origin.rate = 4 * MIB  # side by side, the three end in the order of their sizes
    task_id = submit_spec(spec_from_manifest({"files": entries}), store)
    assert wait_for(store, task_id).state is State.DONE
    events = EventLog(store.client, store.prefix).of_task(task_id)
    assert states_of(events) == ["queued", "downloading", "finalizing", "done"]
    assert [e.type for e in events if e.type != "task.progress"] == [
        "task.queued", "task.started", "file.completed", "file.completed", "file.completed",
        "task.finalizing", "task.completed",
    ]  # fmt: skip
    completed = [e.data for e in events if e.type == "file.completed"]
    # Each names the file that finished, in the order they did (not the order of the task's list)
    assert [(c["index"], c["path"]) for c in completed] == [(1, "notes.pdf"), (2, "lesson-2.mp4"), (0, "lesson-1.mp4")]
    # The download's last figures come before the finalize; task.completed says where files went
    progress = [e for e in events if e.type == "task.progress"]
    assert progress and progress[0].data["bytes_done"] == sum(map(len, files.values()))
    assert progress[0].data["files_done"] == 3 and progress[0].data["state"] == "downloading"
    final = events[-1]
    assert final.final and [f["path"] for f in final.data["files"]] == list(files)
    assert all(f["location"] for f in final.data["files"])
    # The stream of all tasks holds the same events, each naming its entry in the task's stream
    everything = [e for batch in drain(EventLog(store.client, store.prefix)) for e in batch]
    assert [e.task_stream_id for e in everything if e.task_id == task_id] == [e.id for e in events]


def drain(log: EventLog) -> list[list[Event]]:
    batches: list[list[Event]] = []
    for batch in log.follow("0", block_ms=10):
        if not batch:
            return batches
        batches.append(batch)
    return batches


def test_a_failed_attempt_a_final_failure_and_an_operators_retry_are_each_one_event(
    worker: InProcessWorker, store: TaskStore, origin: Origin, receiver: Receiver
) -> None:
    data = os.urandom(3 * MIB)
    origin.put("/v.mp4", data)
    origin.fault("/v.mp4", Fault("drop", after=MIB))
    resumed = submit_spec(spec_from_urls([origin.url("/v.mp4")]), store)
    missing = submit_spec(spec_from_urls([origin.url("/missing.mp4")]), store)
    assert wait_for(store, resumed).state is State.DONE
    assert wait_for(store, missing).state is State.FAILED
    log = EventLog(store.client, store.prefix)
    # A dropped connection: queued again with the error, then a second run
    events = log.of_task(resumed)
    assert states_of(events) == ["queued", "downloading", "queued", "downloading", "finalizing", "done"]
    again = [e for e in events if e.type == "task.queued"][1]
    assert again.data["attempt"] == 1 and "broke after" in again.data["error"] and again.data["not_before"] > 0
    assert_a_path_of_the_state_machine(events)
    # A 404: failed, with its code and file; an operator's retry is task.retried
    failed = log.of_task(missing)[-1]
    assert failed.type == "task.failed" and failed.data["state"] == "failed"
    assert failed.data["error_code"] == "origin_404" and failed.data["error_file"] == "missing.mp4"
    origin.put("/missing.mp4", b"here now")
    assert store.retry(missing, now=time.time()) is RetryReply.OK
    worker.messages.claim(missing)
    assert wait_for(store, missing).state is State.DONE
    events = log.of_task(missing)
    assert states_of(events) == ["queued", "downloading", "failed", "queued", "downloading", "finalizing", "done"]
    assert [e.type for e in events if e.data["state"] == "queued"] == ["task.queued", "task.retried"]
    assert [e.data["run"] for e in events if e.type == "task.retried"] == [1]
    assert_a_path_of_the_state_machine(events)


def test_progress_is_at_most_once_a_second_with_a_speed(
    store: TaskStore, worker: InProcessWorker, origin: Origin, receiver: Receiver
) -> None:
    origin.rate = 2 * MIB  # 6 MiB in about 3 s
    task_id = submit_spec(spec_from_urls([origin.put("/slow.mp4", os.urandom(6 * MIB))]), store)
    assert wait_for(store, task_id).state is State.DONE
    everything = [e for batch in drain(EventLog(store.client, store.prefix)) for e in batch]
    progress = [e for e in everything if e.task_id == task_id and e.type == "task.progress"]
    downloading = [e for e in progress if e.data["state"] == "downloading"]
    assert len(downloading) >= 2
    gaps = [b.at - a.at for a, b in zip(downloading, downloading[1:], strict=False)]
    assert all(gap >= 990 for gap in gaps[:-1]), gaps  # the last is the download's closing figures
    assert [e.data["bytes_done"] for e in downloading] == sorted(e.data["bytes_done"] for e in downloading)
    assert any(0.5 * 2 * MIB < e.data["speed"] < 2 * 2 * MIB for e in downloading[1:-1]), downloading


def test_the_stream_of_all_tasks_is_bounded_and_a_tasks_own_is_not(store: TaskStore) -> None:
    log = EventLog(store.client, store.prefix)
    log.configure(retain=50)
    with small_stream_nodes(store.client):  # MAXLEN ~ trims whole nodes: small ones, a small test
        first = submit_spec(spec_from_urls(["https://cdn.example.com/a.mp4"]), store)
        for n in range(200):
            submit_spec(spec_from_urls([f"https://cdn.example.com/{n}.mp4"]), store)
    assert store.client.xlen(log.all_key) <= 50 + 4
    # A task's own stream is never trimmed: a replay from its start holds its first event
    assert log.of_task(first)[0].type == "task.queued"


def test_a_tasks_stream_keeps_one_progress_between_other_events(
    store: TaskStore, worker: InProcessWorker, origin: Origin, receiver: Receiver
) -> None:
    origin.rate = 2 * MIB  # about 3 s: several task.progress events, each replacing the last
    task_id = submit_spec(spec_from_urls([origin.put("/slow.mp4", os.urandom(6 * MIB))]), store)
    assert wait_for(store, task_id).state is State.DONE
    kept = [e.type for e in EventLog(store.client, store.prefix).of_task(task_id)]
    assert all(not (a == b == "task.progress") for a, b in zip(kept, kept[1:], strict=False)), kept
    # ... while the stream of all tasks had every one of them
    everything = [e for batch in drain(EventLog(store.client, store.prefix)) for e in batch if e.task_id == task_id]
    assert sum(e.type == "task.progress" for e in everything) > sum(t == "task.progress" for t in kept)


def test_prune_takes_a_tasks_event_stream_with_its_record(store: TaskStore) -> None:
    task_id = submit_spec(spec_from_urls(["https://cdn.example.com/a.mp4"]), store)
    end_task(store, task_id, State.FAILED, now=time.time() - 3600)
    store.client.zrem(f"{store.prefix}notify", task_id)  # the notice went out
    assert store.client.exists(f"{store.prefix}events:{task_id}")
    store.prune_batch(State.FAILED, cutoff=time.time(), limit=10)
    assert not store.client.exists(f"{store.prefix}events:{task_id}")


def test_a_tasks_state_changes_are_found_among_a_thousand_file_events_a_page_at_a_time(store: TaskStore) -> None:
    # Given a task's stream of 1,203 entries: a state change first, then one after 600 file
    # events and one after 1,200 (a course's stream; pages of STATE_PAGE = 500 entries)
    log = EventLog(store.client, store.prefix)
    key = log.task_key("t1")
    ids = []
    for n in range(1203):
        kind = "task.queued" if n in (0, 601, 1202) else "file.completed"
        ids.append(text_of(store.client.xadd(key, {"type": kind, "at": str(n), "state": "queued", "index": str(n)})))
    # Then the latest ones come oldest first, however far apart; after an id, the first ones
    assert [e.id for e in log.state_changes("t1", 10)] == [ids[0], ids[601], ids[1202]]
    assert [e.id for e in log.state_changes("t1", 2)] == [ids[601], ids[1202]]
    assert [e.id for e in log.state_changes("t1", 10, since=ids[0])] == [ids[601], ids[1202]]
    assert [e.id for e in log.state_changes("t1", 1, since=ids[0])] == [ids[601]]
    assert log.state_changes("t1", 10, since=ids[1202]) == []
