"""The contract between actors/states.py and the Lua scripts: every script, called from every
state with a live token and an expired one, moves a task only along TRANSITIONS, and every move
in TRANSITIONS is made by some script. Real scripts on a real redis-server; no stubs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from actors.manifest import spec_from_urls
from actors.states import ACTIVE_STATES, FINAL_STATES, RETRYABLE_STATES, TRANSITIONS, State, can_move
from actors.store import StageLimits, TaskStore

pytestmark = pytest.mark.fast

NOW = 1_700_000_000.0
LEASE = 30.0
LATER = NOW + 10 * LEASE  # every lease taken at NOW has run out
SPEC = spec_from_urls(["https://cdn.example.com/a.mp4"], name="contract")

Operation = Callable[[TaskStore, str, int], object]


def claim(start: State, now: float, attempts: int = 5, limits: StageLimits | None = None) -> Operation:
    def run(store: TaskStore, task_id: str, token: int) -> object:
        return store.claim(
            task_id, worker="w", now=now, lease_seconds=LEASE, max_attempts=attempts,
            limits=limits or StageLimits(), start=start,
        )  # fmt: skip

    return run


def release(target: State, attempts: int = 5) -> Operation:
    def run(store: TaskStore, task_id: str, token: int) -> object:
        return store.release(task_id, token, target, now=NOW + 1, error="e", max_attempts=attempts)

    return run


def advance(source: State, target: State) -> Operation:
    return lambda store, task_id, token: store.advance(task_id, token, source, target, now=NOW + 1, lease_seconds=LEASE)


#: Every script that writes a task's state, with the arguments that reach each of its branches;
#: the illegal requests (an advance or a release to a state a run cannot reach) are in it too.
OPERATIONS: dict[str, Operation] = {
    "claim": claim(State.CLAIMED, NOW + 1),
    "claim, downloading": claim(State.DOWNLOADING, NOW + 1),
    "claim after the lease": claim(State.CLAIMED, LATER),
    "claim after the lease, downloading": claim(State.DOWNLOADING, LATER),
    "claim after the lease, attempts used": claim(State.CLAIMED, LATER, attempts=1),
    "claim, stage full": claim(State.CLAIMED, NOW + 1, limits=StageLimits(downloads=1)),
    **{f"advance {a} -> {b}": advance(a, b) for a in ACTIVE_STATES for b in State},
    "finish download": lambda store, task_id, token: store.finish_download(
        task_id, token, now=NOW + 1, lease_seconds=LEASE, progress=(1, 1, 1), finalize_limit=0
    ),
    "finish download, finalize full": lambda store, task_id, token: store.finish_download(
        task_id, token, now=NOW + 1, lease_seconds=LEASE, progress=(1, 1, 1), finalize_limit=1
    ),
    "enter finalize": lambda store, task_id, token: store.enter_finalize(
        task_id, token, now=NOW + 1, lease_seconds=LEASE, limit=0, due=NOW + 5
    ),
    "park": lambda store, task_id, token: store.park(
        task_id, token, now=NOW + 1, due=NOW + 60, failing_since=NOW, error="receiver down"
    ),
    "announce": lambda store, task_id, token: store.announce(task_id, token, now=NOW + 1, lease_seconds=LEASE),
    **{f"release {target}": release(target) for target in State},
    "release queued, attempts used": release(State.QUEUED, attempts=1),
    "requeue expired": lambda store, task_id, token: store.requeue_expired([task_id], now=LATER, max_attempts=5),
    "requeue expired, attempts used": lambda store, task_id, token: store.requeue_expired(
        [task_id], now=LATER, max_attempts=1
    ),
    "cancel": lambda store, task_id, token: store.cancel(task_id, NOW + 1),
    "retry": lambda store, task_id, token: store.retry(task_id, NOW + 1),
    "heartbeat": lambda store, task_id, token: store.heartbeat(
        task_id, token, now=NOW + 1, lease_seconds=LEASE, bytes_done=1, bytes_total=1, files_done=0
    ),
}


def in_state(store: TaskStore, state: State) -> str:
    """A new task brought to ``state`` by the scripts themselves."""
    task_id, _ = store.create(SPEC, now=NOW)
    if state is State.QUEUED:
        return task_id
    if state is State.CANCELED:
        store.cancel(task_id, NOW)
        return task_id
    run = store.claim(task_id, worker="w", now=NOW, lease_seconds=LEASE, max_attempts=5, start=State.DOWNLOADING)
    if state is State.CLAIMED:
        store.release(task_id, run.token, State.QUEUED, now=NOW, max_attempts=5, refund=True)
        run = store.claim(task_id, worker="w", now=NOW, lease_seconds=LEASE, max_attempts=5)
    if state in (State.CLAIMED, State.DOWNLOADING):
        return task_id
    if state in (State.FAILED, State.DEAD):
        store.release(task_id, run.token, state, now=NOW, error="e", max_attempts=5)
        return task_id
    store.finish_download(task_id, run.token, now=NOW, lease_seconds=LEASE, progress=(1, 1, 1), finalize_limit=0)
    if state is State.DONE:
        store.release(task_id, run.token, State.DONE, now=NOW, max_attempts=5)
    return task_id


def observed_moves(store: TaskStore) -> dict[tuple[State, State], list[str]]:
    moves: dict[tuple[State, State], list[str]] = {}
    for source in State:
        for name, operation in OPERATIONS.items():
            store.client.flushdb()
            task_id = in_state(store, source)
            before = store.get(task_id)
            assert before is not None and before.state is source, (source, before)
            if name == "claim, stage full":  # another task holds the only download slot
                blocker, _ = store.create(SPEC, now=NOW)
                store.claim(blocker, worker="w", now=NOW, lease_seconds=LEASE, max_attempts=5,
                            limits=StageLimits(downloads=1))  # fmt: skip
            try:
                operation(store, task_id, before.token)
            except redis.ResponseError as exc:  # refused by the script: it must not have moved
                assert "is not a step of a run" in str(exc) or "cannot" in str(exc), exc
            after = store.get(task_id)
            assert after is not None
            made_a_move = after.state is not source or after.token != before.token
            if made_a_move:
                moves.setdefault((source, after.state), []).append(name)
    return moves


def test_the_scripts_move_tasks_exactly_along_transitions(store: TaskStore) -> None:
    moves = observed_moves(store)
    # Every move a script made is one the state machine allows ...
    illegal = {f"{a} -> {b}": names for (a, b), names in moves.items() if not can_move(a, b)}
    assert illegal == {}
    # ... and every move the state machine allows is one some script makes
    declared = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert declared - set(moves) == set()


def test_illegal_requests_are_refused_by_the_scripts_not_only_by_python(store: TaskStore) -> None:
    task_id = in_state(store, State.CLAIMED)
    token = store.get(task_id).token  # type: ignore[union-attr]
    with pytest.raises(redis.ResponseError, match="not a step of a run"):
        store.advance(task_id, token, State.CLAIMED, State.DONE, now=NOW + 1, lease_seconds=LEASE)
    with pytest.raises(redis.ResponseError, match="cannot be done before it is finalized"):
        store.release(task_id, token, State.DONE, now=NOW + 1, max_attempts=5)
    with pytest.raises(redis.ResponseError, match="cannot end canceled"):
        store.release(task_id, token, State.CANCELED, now=NOW + 1, max_attempts=5)
    assert store.get(task_id).state is State.CLAIMED  # type: ignore[union-attr]


def test_the_state_sets_of_the_lua_library_are_the_python_ones(redis_client: redis.Redis) -> None:
    library = (Path(__file__).parent.parent / "actors" / "lua" / "_lib.lua").read_text()
    for name, states in (("FINAL_STATES", FINAL_STATES), ("ACTIVE_STATES", ACTIVE_STATES),
                         ("RETRYABLE_STATES", RETRYABLE_STATES)):  # fmt: skip
        listed = redis_client.eval(library + f"\nreturn {name}", 0, "haul:")
        assert {item.decode() for item in listed} == {s.value for s in states}, name
