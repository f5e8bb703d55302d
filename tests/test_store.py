"""TaskStore on a real redis-server: idempotent create, claim gate, fencing, counts."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from dramatiq import Message

from actors.manifest import spec_from_urls
from actors.messages import CLAIM_QUEUE, Messages, redis_broker
from actors.settings import Settings
from actors.states import CancelReply, State, StepReply
from actors.store import Claim, StageLimits, TaskStore
from actors.store_base import text_of
from actors.task import KeyConflict

pytestmark = pytest.mark.fast

SPEC = spec_from_urls(["https://cdn.example.com/a.mp4"], name="A", key="order-7")
NOW = 1_700_000_000.0


def claim(
    store: TaskStore,
    task_id: str,
    now: float = NOW,
    *,
    start: State = State.CLAIMED,
    worker: str = "w1",
    max_attempts: int = 3,
) -> Claim:
    return store.claim(task_id, worker=worker, now=now, lease_seconds=30, max_attempts=max_attempts, start=start)


def test_create_is_idempotent_on_key(store: TaskStore) -> None:
    first, created = store.create(SPEC, now=NOW)
    again, created_again = store.create(SPEC, now=NOW + 5)
    assert created and not created_again and first == again
    unkeyed = spec_from_urls(["https://cdn.example.com/a.mp4"])
    assert store.create(unkeyed, now=NOW)[0] != store.create(unkeyed, now=NOW)[0]
    assert store.counts()[State.QUEUED] == 3


def test_a_new_task_and_its_claim_message_are_written_in_one_step(store: TaskStore, redis_url: str) -> None:
    broker = redis_broker(Settings(redis_url=redis_url))
    sender = Messages(broker)
    try:
        queue = f"{broker.namespace}:{CLAIM_QUEUE}"
        sent = sender.queued_claim("t1")
        first, created = store.create(SPEC, now=NOW, task_id="t1", claim=sent)
        [queued] = [text_of(i) for i in store.client.lrange(queue, 0, -1)]
        body = store.client.hget(f"{queue}.msgs", queued)
        assert created and isinstance(body, bytes)
        message = Message.decode(body)
        assert (message.actor_name, tuple(message.args), message.options["redis_message_id"]) == (
            "claim",
            ("t1",),
            queued,
        )
        # A key seen before, or one used for another request, queues nothing: its task was queued once
        assert store.create(SPEC, now=NOW, task_id="t2", claim=sender.queued_claim("t2")) == ("t1", False)
        other = spec_from_urls(["https://cdn.example.com/b.mp4"], key="order-7")
        with pytest.raises(KeyConflict):
            store.create(other, now=NOW, task_id="t3", claim=sender.queued_claim("t3"))
        assert store.client.llen(queue) == 1 and store.client.hlen(f"{queue}.msgs") == 1
        # The same call resent (redis-py retries a command whose reply was lost) once a worker
        # runs the task: answered as created, and neither the task nor the queue change
        running = claim(store, "t1")
        keys, argv = store.create_call(SPEC, NOW, "t1", claim=sent)
        assert store.client.evalsha(store._scripts["create"].sha, len(keys), *keys, *argv)[1] == b"created"
        again = store.get("t1")
        assert again is not None and (again.state, again.token) == (State.CLAIMED, running.token)
        assert store.client.llen(queue) == 1 and store.counts()[State.QUEUED] == 0
    finally:
        broker.close()


def test_claim_gives_a_lease_and_skips_live_or_final_tasks(store: TaskStore) -> None:
    task_id, _ = store.create(SPEC, now=NOW)
    first = claim(store, task_id, start=State.DOWNLOADING)
    assert first.ok and first.token > 0 and first.attempts == 1
    # Given a live lease, a duplicate claim message does nothing
    assert claim(store, task_id, now=NOW + 10).outcome == "busy"
    # When the run ends done, later duplicates are skipped too
    store.finish_download(task_id, first.token, now=NOW + 11, lease_seconds=30, progress=(1, 1, 1), finalize_limit=0)
    assert store.release(task_id, first.token, State.DONE, now=NOW + 11, max_attempts=3) is State.DONE
    assert claim(store, task_id, now=NOW + 12).outcome == "final"
    assert claim(store, "0" * 32).outcome == "missing"


def test_a_claim_can_enter_the_download_and_returns_the_task(store: TaskStore) -> None:
    task_id, _ = store.create(SPEC, now=NOW)
    c = claim(store, task_id, start=State.DOWNLOADING)
    assert c.ok and c.task is not None
    assert c.task.state is State.DOWNLOADING and c.task.token == c.token and c.task.attempts == 1
    assert c.task.spec == store.get(task_id).spec  # type: ignore[union-attr]
    assert c.task.worker == "w1" and c.task.lease_until == NOW + 30
    assert store.counts()[State.DOWNLOADING] == 1 and store.counts()[State.CLAIMED] == 0
    # A record whose spec was lost is claimed without a task to run (its lease then runs out)
    lost, _ = store.create(SPEC.__class__(files=SPEC.files), now=NOW)
    store.client.delete(store.spec_key(lost))
    assert claim(store, lost, start=State.DOWNLOADING).task is None


def test_expired_lease_is_taken_over_and_the_old_token_is_fenced(store: TaskStore) -> None:
    task_id, _ = store.create(SPEC, now=NOW)
    old = claim(store, task_id)
    assert store.advance(task_id, old.token, State.CLAIMED, State.DOWNLOADING, now=NOW + 1, lease_seconds=30)
    # When the lease runs out, another worker takes the task with a new token
    new = claim(store, task_id, now=NOW + 40, worker="w2")
    assert new.ok and new.token > old.token and new.attempts == 2
    # Then every write of the old holder is refused
    progress = {"lease_seconds": 30, "bytes_done": 5, "bytes_total": 9, "files_done": 0}
    assert not store.heartbeat(task_id, old.token, now=NOW + 41, **progress)
    assert not store.advance(task_id, old.token, State.CLAIMED, State.DOWNLOADING, now=NOW + 41, lease_seconds=30)
    assert store.release(task_id, old.token, State.DONE, now=NOW + 41, max_attempts=3) is None
    task = store.get(task_id)
    assert task is not None and task.state is State.CLAIMED and task.worker == "w2" and task.bytes_done == 0
    assert store.heartbeat(task_id, new.token, now=NOW + 41, **progress)


def test_transient_release_queues_with_backoff_then_dies(store: TaskStore) -> None:
    task_id, _ = store.create(SPEC, now=NOW)
    for attempt in (1, 2):
        c = claim(store, task_id, now=NOW + attempt * 100)
        reached = store.release(
            task_id, c.token, State.QUEUED, now=NOW + attempt * 100, error="503", not_before=NOW + attempt * 100 + 5,
            max_attempts=3,
        )  # fmt: skip
        assert reached is State.QUEUED
        # An early duplicate message waits for the backoff
        assert claim(store, task_id, now=NOW + attempt * 100 + 1).outcome == "wait"
    last = claim(store, task_id, now=NOW + 400)
    assert last.attempts == 3
    assert store.release(task_id, last.token, State.QUEUED, now=NOW + 401, error="503", max_attempts=3) is State.DEAD
    assert store.ids(State.DEAD) == [task_id]
    assert store.client.zscore(store.notify_key, task_id) is not None


def test_expired_lease_with_no_attempts_left_is_dead(store: TaskStore) -> None:
    task_id, _ = store.create(SPEC, now=NOW)
    claim(store, task_id, max_attempts=1)
    result = claim(store, task_id, now=NOW + 100, max_attempts=1)
    task = store.get(task_id)
    assert result.outcome == "dead" and task is not None and task.state is State.DEAD
    assert "lease expired" in task.error


def test_cancel_fences_the_worker_and_retry_revives(store: TaskStore) -> None:
    task_id, _ = store.create(SPEC, now=NOW)
    c = claim(store, task_id)
    assert store.cancel(task_id, NOW + 1) == "ok"
    assert store.release(task_id, c.token, State.DONE, now=NOW + 2, max_attempts=3) is None
    assert store.cancel(task_id, NOW + 2) == "final"
    assert store.retry(task_id, NOW + 3) == "ok"
    task = store.get(task_id)
    assert task is not None and task.state is State.QUEUED and task.attempts == 0 and task.run == 1
    assert store.retry(task_id, NOW + 4) == "not_ended"
    assert store.counts()[State.QUEUED] == 1 and store.counts()[State.CANCELED] == 0


def finalizing(store: TaskStore, now: float = NOW, **kw: Any) -> tuple[str, int]:
    """A task whose download just finished: ``finalizing``, its token held."""
    task_id, _ = store.create(SPEC.__class__(files=SPEC.files), now=now)
    c = claim(store, task_id, now=now, start=State.DOWNLOADING, **kw)
    entry = store.finish_download(
        task_id, c.token, now=now + 1, lease_seconds=30, progress=(5, 5, 1), finalize_limit=0
    )  # fmt: skip
    assert entry == ("ok", c.token)
    return task_id, c.token


def test_a_cancel_before_the_announcement_wins_and_owes_task_canceled(store: TaskStore) -> None:
    task_id, token = finalizing(store)
    assert store.cancel(task_id, NOW + 2) is CancelReply.OK
    # The worker that stored the files may not announce them: task.completed is never sent
    assert not store.announce(task_id, token, now=NOW + 3, lease_seconds=30)
    task = store.get(task_id)
    assert task is not None and task.state is State.CANCELED
    assert store.client.zscore(store.notify_key, task_id) == NOW + 2  # task.canceled is owed, due now


def test_a_cancel_after_the_announcement_started_is_refused(store: TaskStore) -> None:
    task_id, token = finalizing(store)
    assert store.announce(task_id, token, now=NOW + 2, lease_seconds=30)
    assert store.get(task_id).lease_until == NOW + 32  # type: ignore[union-attr]
    assert store.cancel(task_id, NOW + 3) is CancelReply.ANNOUNCING
    task = store.get(task_id)
    assert task is not None and task.state is State.FINALIZING and task.token == token
    assert store.release(task_id, token, State.DONE, now=NOW + 4, max_attempts=3) is State.DONE
    assert store.cancel(task_id, NOW + 5) is CancelReply.FINAL
    assert store.client.zcard(store.notify_key) == 0
    # A stale holder cannot announce
    other, other_token = finalizing(store)
    assert not store.announce(other, other_token + 1, now=NOW + 2, lease_seconds=30)


def test_a_lease_lost_while_announcing_queues_the_task_again_however_many_attempts(store: TaskStore) -> None:
    # Given tasks on their last attempt whose task.completed delivery has started ...
    swept, token = finalizing(store, max_attempts=1)
    claimed, claimed_token = finalizing(store, max_attempts=1)
    for task_id, held in ((swept, token), (claimed, claimed_token)):
        assert store.announce(task_id, held, now=NOW + 2, lease_seconds=30)
    # ... when their worker dies, neither the supervisor nor a duplicate claim ends them dead
    assert store.requeue_expired([swept], now=NOW + 40, max_attempts=1) == ["queued"]
    task = store.get(swept)
    assert task is not None and task.state is State.QUEUED and "announced" in task.error
    assert store.cancel(swept, NOW + 41) is CancelReply.ANNOUNCING  # still: the backend may know
    assert claim(store, claimed, now=NOW + 40, max_attempts=1).ok
    # The successor announces the same run again and ends it done; nothing else is owed
    again = claim(store, swept, now=NOW + 41, max_attempts=1, start=State.DOWNLOADING)
    assert again.ok and again.task is not None and again.task.run == 0
    assert store.finish_download(swept, again.token, now=NOW + 42, lease_seconds=30, progress=(5, 5, 1),
                                 finalize_limit=0)[0] == "ok"  # fmt: skip
    assert store.announce(swept, again.token, now=NOW + 43, lease_seconds=30)
    assert store.release(swept, again.token, State.DONE, now=NOW + 44, max_attempts=1) is State.DONE
    assert store.client.zcard(store.notify_key) == 0 and store.counts()[State.DEAD] == 0
    # Without an announcement the last attempt still ends dead
    plain, _ = finalizing(store, max_attempts=1)
    assert store.requeue_expired([plain], now=NOW + 40, max_attempts=1) == ["dead"]


def test_retry_starts_a_new_run_that_is_not_announced(store: TaskStore) -> None:
    task_id, token = finalizing(store)
    assert store.announce(task_id, token, now=NOW + 2, lease_seconds=30)
    store.release(task_id, token, State.FAILED, now=NOW + 3, error="storage refused", max_attempts=3)
    assert store.retry(task_id, NOW + 4) == "ok"
    assert store.client.hget(store.task_key(task_id), "announcing") is None
    assert store.client.zscore(store.notify_key, task_id) is None  # the old run's notice is dropped
    assert store.cancel(task_id, NOW + 5) is CancelReply.OK


def test_a_retry_after_a_cancel_waits_for_the_old_holders_fence(store: TaskStore) -> None:
    # Given a run holding its lease until NOW + 31 that an operator cancels ...
    task_id, token = finalizing(store)
    assert store.cancel(task_id, NOW + 2) is CancelReply.OK
    # ... and retries at once: the new run may not start while the old holder may still write
    assert store.retry(task_id, NOW + 3) == "ok"
    early = claim(store, task_id, now=NOW + 4)
    assert early.outcome == "wait" and float(early.detail) == NOW + 31
    assert claim(store, task_id, now=NOW + 31.5).ok


def test_a_parked_finalize_holds_no_lease_and_its_message_holds_the_task(store: TaskStore) -> None:
    # Given a finalize parked for 900 s while its receiver is down ...
    task_id, token = finalizing(store)
    parked = store.park(task_id, token, now=NOW + 2, due=NOW + 902, failing_since=NOW + 2, error="503")
    assert parked is not None and parked != token
    # ... a renewal of the run that parked it, already on its way, is refused: no lease again
    assert not store.heartbeat(task_id, token, now=NOW + 2, lease_seconds=30, bytes_done=5, bytes_total=5, files_done=1)
    # However late its message comes, nothing expires it, a stray claim does not take it, and
    # only the token the message carries enters
    assert store.expired(NOW + 5000) == []
    assert claim(store, task_id, now=NOW + 5000).outcome == "busy"
    assert store.enter_finalize(task_id, token, now=NOW + 5000, lease_seconds=30, limit=0, due=0)[0] == "stale"
    entered, run_token = store.enter_finalize(task_id, parked, now=NOW + 5000, lease_seconds=30, limit=0, due=0)
    assert entered == "ok" and store.get(task_id).attempts == 1  # type: ignore[union-attr]
    assert store.client.zcard(f"{store.prefix}resting") == 0 and store.client.zcard(f"{store.prefix}parked") == 0


def test_the_announcement_time_is_the_first_one_of_the_run(store: TaskStore) -> None:
    task_id, token = finalizing(store)
    assert store.announce(task_id, token, now=NOW + 2, lease_seconds=30) == NOW + 2
    # a successor announcing the same run again sends the same body: the same timestamp
    assert store.announce(task_id, token, now=NOW + 9, lease_seconds=30) == NOW + 2
    assert store.get(task_id).announced  # type: ignore[union-attr]


def test_cancel_retry_cancel_retry_keeps_the_first_holders_fence(store: TaskStore) -> None:
    task_id, token = finalizing(store)  # its holder may write until NOW + 31
    for now in (NOW + 2, NOW + 4):
        assert store.cancel(task_id, now) is CancelReply.OK
        assert store.retry(task_id, now + 1) == "ok"
    early = claim(store, task_id, now=NOW + 6)
    assert early.outcome == "wait" and float(early.detail) == NOW + 31


def test_a_run_announced_by_an_older_release_gets_its_announcement_time(store: TaskStore) -> None:
    # Given a task announced before announcement times were kept ...
    task_id, token = finalizing(store)
    store.client.hset(store.task_key(task_id), "announcing", "0")
    # ... the next announcement records one, instead of failing every run after it
    assert store.announce(task_id, token, now=NOW + 5, lease_seconds=30) == NOW + 5


def test_the_error_of_a_run_ending_queued_says_what_the_store_did(store: TaskStore) -> None:
    notes = ("; will retry (attempt 3 of 3)", "; all 3 attempts are used")
    # A last attempt ends dead, and its error says the attempts are used
    ended, _ = store.create(SPEC, now=NOW)
    store.claim(ended, worker="w", now=NOW, lease_seconds=30, max_attempts=1)
    run = store.get(ended)
    assert run is not None
    reached = store.release(ended, run.token, State.QUEUED, now=NOW + 1, error="503", max_attempts=1, notes=notes)
    dead = store.get(ended)
    assert reached is State.DEAD and dead is not None and dead.error == "503; all 3 attempts are used"
    # An announced last attempt (its run may not know: the reply was lost) stays queued, and says so
    other = spec_from_urls(["https://cdn.example.com/b.mp4"])
    announced, _ = store.create(other, now=NOW)
    claimed = store.claim(announced, worker="w", now=NOW, lease_seconds=30, max_attempts=1, start=State.DOWNLOADING)
    store.finish_download(announced, claimed.token, now=NOW, lease_seconds=30, progress=(1, 1, 1), finalize_limit=0)
    assert store.announce(announced, claimed.token, now=NOW, lease_seconds=30) is not None
    reached = store.release(announced, claimed.token, State.QUEUED, now=NOW + 1, error="reset", max_attempts=1,
                            notes=notes)  # fmt: skip
    kept = store.get(announced)
    assert reached is State.QUEUED and kept is not None and kept.error == "reset; will retry (attempt 3 of 3)"


def test_connection_slots_beside_the_claim_are_fenced_limited_renewed_and_freed(store: TaskStore) -> None:
    host_slots = f"{store.prefix}slots:host:cdn.example.com"
    task_id, _ = store.create(SPEC, now=NOW)
    run = store.claim(task_id, worker="w1", now=NOW, lease_seconds=30, max_attempts=3, start=State.DOWNLOADING,
                      limits=StageLimits(downloads_per_host=3))  # fmt: skip
    take = functools.partial(store.connection, task_id, limit=3, now=NOW, take=True)
    assert take(run.token, "cdn.example.com", 1) is StepReply.OK
    assert take(run.token, "cdn.example.com", 2) is StepReply.OK
    assert take(run.token, "cdn.example.com", 3) is StepReply.FULL  # the claim's slot and two more: 3
    assert take(run.token + 1, "cdn.example.com", 4) is StepReply.STALE  # another run's token
    # Renewed with the lease, given back one by one, and all freed when the run leaves the download
    store.heartbeat(task_id, run.token, now=NOW + 10, lease_seconds=30, bytes_done=0, bytes_total=0, files_done=0)
    assert store.client.zscore(host_slots, f"{task_id}#1") == NOW + 40
    assert store.connection(task_id, run.token, "cdn.example.com", 1, limit=3, now=NOW, take=False) is StepReply.OK
    assert store.client.zcard(host_slots) == 2
    store.release(task_id, run.token, State.QUEUED, now=NOW + 11, max_attempts=3)
    assert store.client.zcard(host_slots) == 0 and not store.client.hget(store.task_key(task_id), "conns")
    assert store.connection(task_id, run.token, "cdn.example.com", 2, limit=3, now=NOW, take=False) is StepReply.STALE
