"""Turn a stage's Outcome into the next message. Actors are looked up by name, so the three
actor modules need not import each other."""

from __future__ import annotations

import dramatiq

from actors.stages import Next, Outcome


def dispatch(task_id: str, outcome: Outcome) -> None:
    broker = dramatiq.get_broker()
    if outcome.next is Next.FINALIZE:
        broker.get_actor("finalize").send_with_options(
            args=(task_id, outcome.token, outcome.failing_since), delay=int(outcome.delay_seconds * 1000) or None
        )
    elif outcome.next is Next.RETRY:
        broker.get_actor("claim").send_with_options(args=(task_id,), delay=int(outcome.delay_seconds * 1000))
    elif outcome.next is Next.NOTIFY:
        enqueue_notify(task_id)


def enqueue_claim(task_id: str) -> None:
    """Ask a worker to pick the task up (used by submit, operator commands, the supervisor)."""
    dramatiq.get_broker().get_actor("claim").send(task_id)


def enqueue_finalize(task_id: str, token: int, failing_since: float = 0.0) -> None:
    """Ask a worker to go on finalizing a resting task (the supervisor re-sending a lost message)."""
    dramatiq.get_broker().get_actor("finalize").send(task_id, token, failing_since)


def enqueue_notify(task_id: str, seq: int | None = None) -> None:
    """Ask a worker to deliver the task.failed or task.canceled an ended task owes: without
    ``seq`` the notice's first try (sent as the task ends; a duplicate does nothing), with it
    the try its chain waits for (the supervisor re-sending a lost message)."""
    dramatiq.get_broker().get_actor("notify").send(task_id, seq)
