"""Idempotency keys (issue 12, item 3): the same key with the same request returns the first
task; with a different request it is refused naming the first differing field; ``replace``
puts a corrected request under the key of a task that failed, died or was canceled."""

from __future__ import annotations

import json

import pytest

from actors.client import Client
from actors.manifest import spec_from_manifest
from actors.states import RetryReply, State
from actors.store import TaskStore
from actors.task import KeyConflict, Task
from tests.conftest import end_task
from tests.processes import haul_cli as haul

pytestmark = pytest.mark.fast

NOW = 1_700_000_000.0


def order(size: int = 3, **overrides: object) -> dict[str, object]:
    return {"key": "order-982", "name": "Course 12", "files": [{"url": "https://cdn.example.com/1.mp4",
            "path": "1.mp4", "size": size}]} | overrides  # fmt: skip


def ended(store: TaskStore, task_id: str, target: State) -> None:
    assert end_task(store, task_id, target, now=NOW + 1) is target


def test_the_same_key_with_a_different_request_is_refused_naming_the_field(store: TaskStore) -> None:
    # Given a task under order-982
    first, created = store.create(spec_from_manifest(order()), now=NOW)
    assert created
    # When the same request comes again, it is the same task (accept compared as a set)
    assert store.create(spec_from_manifest(order()), now=NOW + 1) == (first, False)
    # Then each different request is refused, naming the first field that differs
    for changed, field in (
        (order(size=4), "files[0].size"),
        (order(name="Course 13"), "name"),
        (order(webhook="https://backend.example.com/h"), "webhook"),
        (order(accept=["*/*"]), "accept"),
    ):
        with pytest.raises(KeyConflict, match=rf"{first}.*{field.replace('[', '.').replace(']', '.')} differs"):
            store.create(spec_from_manifest(changed), now=NOW + 2)
    assert store.counts()[State.QUEUED] == 1


def test_the_cli_exits_2_for_a_different_request_under_a_known_key(store: TaskStore) -> None:
    first = haul("submit", "https://cdn.example.com/a.mp4", "--name", "A", "--key", "order-5")
    assert first.returncode == 0, first.stderr
    again = haul("submit", "https://cdn.example.com/b.mp4", "--name", "A", "--key", "order-5")
    assert again.returncode == 2 and "files[0].url differs" in again.stderr and again.stdout == ""
    assert sum(store.counts().values()) == 1


def test_python_submit_raises_key_conflict(client: Client) -> None:
    task_id = client.submit(["https://cdn.example.com/a.mp4"], name="A", key="order-6")
    assert client.submit(["https://cdn.example.com/a.mp4"], name="A", key="order-6") == task_id
    with pytest.raises(KeyConflict, match="name differs"):
        client.submit(["https://cdn.example.com/a.mp4"], name="B", key="order-6")


@pytest.mark.parametrize("target", [State.FAILED, State.DEAD, State.CANCELED])
def test_replace_moves_the_key_of_an_ended_task_to_a_new_one(store: TaskStore, target: State) -> None:
    # Given an order whose task failed (a wrong size, say)
    old, _ = store.create(spec_from_manifest(order(size=4)), now=NOW)
    if target is State.CANCELED:
        store.cancel(old, NOW)
    else:
        ended(store, old, target)
    # When the corrected order is submitted with replace
    new, created = store.create(spec_from_manifest(order(size=3)), now=NOW + 5, replace=True)
    # Then a new task holds the key, and the old record stays as it was
    assert created and new != old and store.id_by_key("order-982") == new
    old_task = store.get(old)
    assert old_task is not None and old_task.state is target
    # And the key now answers with the new task for the corrected request
    assert store.create(spec_from_manifest(order(size=3)), now=NOW + 6) == (new, False)


@pytest.mark.parametrize("target", [None, State.DONE])
def test_replace_is_refused_for_a_task_that_has_not_ended_or_is_done(store: TaskStore, target: State | None) -> None:
    task_id, _ = store.create(spec_from_manifest(order()), now=NOW)
    if target is not None:
        ended(store, task_id, target)
    with pytest.raises(KeyConflict, match="has not ended" if target is None else "is done"):
        store.create(spec_from_manifest(order(size=9)), now=NOW + 1, replace=True)
    assert store.id_by_key("order-982") == task_id and sum(store.counts().values()) == 1


def test_haul_submit_replace(store: TaskStore) -> None:
    task_id = haul("submit", "https://cdn.example.com/a.mp4", "--key", "order-7").stdout.strip()
    refused = haul("submit", "https://cdn.example.com/b.mp4", "--key", "order-7", "--replace")
    assert refused.returncode == 2 and "has not ended" in refused.stderr
    assert haul("cancel", task_id).returncode == 0
    replaced = haul("submit", "https://cdn.example.com/b.mp4", "--key", "order-7", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    new_id = replaced.stdout.strip()
    assert new_id != task_id
    status = json.loads(haul("status", "--key", "order-7", "--json").stdout)
    assert status["id"] == new_id and status["files"][0]["url"] == "https://cdn.example.com/b.mp4"


def test_a_replace_retried_after_a_lost_answer_gets_the_task_it_made(store: TaskStore) -> None:
    # Given an order whose task failed, and its correction submitted with replace
    old, _ = store.create(spec_from_manifest(order(size=4)), now=NOW)
    ended(store, old, State.FAILED)
    new, created = store.create(spec_from_manifest(order(size=3)), now=NOW + 2, replace=True)
    assert created
    # When the backend, its answer lost, sends the same call again (also once that task failed)
    assert store.create(spec_from_manifest(order(size=3)), now=NOW + 3, replace=True) == (new, False)
    ended(store, new, State.FAILED)
    # Then it gets that task each time, never a KeyConflict or a third task
    assert store.create(spec_from_manifest(order(size=3)), now=NOW + 4, replace=True) == (new, False)


def test_a_different_request_whose_old_task_is_pruned_meanwhile_creates_a_task(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a key whose task ended long ago, its task.failed delivered
    first, _ = store.create(spec_from_manifest(order(size=4)), now=NOW)
    ended(store, first, State.FAILED)
    assert store.end_notice(first, 0)
    real_get = store.get

    def pruned_first(task_id: str) -> Task | None:  # prune runs between the script and this read
        store.prune_ended(cutoff=NOW + 100)
        return real_get(task_id)

    # When a different request under the key races that prune
    monkeypatch.setattr(store, "get", pruned_first)
    task_id, created = store.create(spec_from_manifest(order(size=3)), now=NOW + 200)
    # Then the key, free again, names a new task: the request is neither dropped nor refused
    assert created and task_id != first and store.id_by_key("order-982") == task_id


def test_a_replaced_task_is_not_retried_so_one_key_never_has_two_live_tasks(store: TaskStore) -> None:
    old, _ = store.create(spec_from_manifest(order(size=4)), now=NOW)
    ended(store, old, State.FAILED)
    new, _ = store.create(spec_from_manifest(order(size=3)), now=NOW + 2, replace=True)
    assert store.retry(old, NOW + 3) is RetryReply.REPLACED
    assert store.get(old).state is State.FAILED  # type: ignore[union-attr]
    answer = haul("retry", old)
    assert answer.returncode == 3 and f"replaced under key 'order-982' by task {new}" in answer.stderr
