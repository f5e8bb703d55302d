"""The search indexes brought up to date once, after an upgrade from a haul without them: in the
background of the leader's sweeps (the ``backfill_indexes`` job), or in the foreground with
``haul reindex``. The walks of :mod:`actors.store_backfill` run one after the other, a few
batches at a time, the position saved in Redis after each batch, so a restart, a new leader or
an operator's command goes on where the last batch stopped. Once over it is marked done, and
the job's run costs one HGET.

Two runs at once (the job and ``haul reindex``) do some batches twice, which is harmless:
every write is idempotent, and a position saved late only sends the other back.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from actors.store import TaskStore
from actors.store_backfill import Backfill, Phase

log = logging.getLogger(__name__)

#: Keys one batch looks at: the COUNT of its SCAN or ZSCAN step (a few milliseconds of Redis).
DEFAULT_BACKFILL_BATCH = 1000
#: Batches a run of the supervisor's job does: about 5,000 keys a sweep interval, so the walk
#: never competes with the sweeps that matter; ``haul reindex`` does them all at once.
DEFAULT_BACKFILL_BATCHES = 5

_PHASES = list(Phase)


def advance(store: TaskStore, now: float, *, batches: int, batch: int = DEFAULT_BACKFILL_BATCH) -> Backfill | None:
    """Up to ``batches`` batches of ``batch`` keys, the position saved after each; the state
    reached, or None when the backfill had finished before (then this was one HGET)."""
    if store.backfill_done_at() is not None:
        return None
    state, server = store.backfill(), store.server_run_id()
    if state.started_at is None:
        log.info("index backfill: starting; tasks stored before the search indexes go in, entries of gone ones out")
        state = replace(state, started_at=now)
    elif state.server != server:  # Redis restarted: its cursors no longer say where the walk was
        log.info("index backfill: Redis restarted; the %s walk starts over", state.phase.value)
        state = replace(state, cursor=0, pending=())
    state = replace(state, server=server)
    for _ in range(batches):
        state = step(store, state, batch)
        if state.done:
            state = replace(state, done_at=now)
        store.save_backfill(state)
        if state.done:
            log.info(
                "index backfill: done in %.0fs; %d task(s) indexed, %d entr(ies) of gone tasks dropped",
                now - (state.started_at or now), state.indexed, state.dropped,
            )  # fmt: skip
            break
    return state


def step(store: TaskStore, state: Backfill, count: int) -> Backfill:
    """One batch of ``state``'s phase, counted; the next phase's start once its walk is over."""
    if state.phase is Phase.TASKS:
        cursor, indexed = store.reindex_batch(state.cursor, count)
        return _moved(replace(state, cursor=cursor, indexed=state.indexed + indexed), over=cursor == 0)
    if state.phase is Phase.NAMES:
        cursor, dropped = store.drop_dangling_names(state.cursor, count)
        return _moved(replace(state, cursor=cursor, dropped=state.dropped + dropped), over=cursor == 0)
    if state.phase is Phase.HOSTS:
        cursor, pending, dropped = store.drop_dangling_hosts(state.cursor, state.pending, count)
        moved = replace(state, cursor=cursor, pending=tuple(pending), dropped=state.dropped + dropped)
        return _moved(moved, over=cursor == 0 and not pending)
    return state


def _moved(state: Backfill, *, over: bool) -> Backfill:
    """``state``, or the start of the next phase when its walk is ``over``."""
    if not over:
        return state
    return replace(state, phase=_PHASES[_PHASES.index(state.phase) + 1], cursor=0, pending=())
