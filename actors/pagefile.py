"""A page file's download within a task's run: its page resolved (:mod:`actors.pages`), then
its media downloaded, as one file through the fetcher or as tracks joined by ffmpeg
(:mod:`actors.tracks`); a media URL refused as expired sends it back to the page.

The page's host had a connection slot taken at the claim (HAUL_DOWNLOAD_PER_HOST); media on
another host (a CDN) takes a slot of that host while it downloads.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis

from actors.diskio import hash_file, sync_file
from actors.errors import ChecksumMismatch, LeaseLost, OriginRejected, ResolverMissing, Stopping
from actors.filerun import FileRun
from actors.hls import StreamTransfer
from actors.lease import DISK_STEP_SECONDS
from actors.messages import CLAIM_QUEUE
from actors.pages import NO_RESOLVER, RESOLVE_EXTRA, Resolved, Track, resolve, resolver_works
from actors.progress import guard_lease
from actors.redact import display_url
from actors.registry import WorkerRegistry
from actors.runtime import Runtime
from actors.split import Connection, SplitPlan
from actors.task import FileSpec, Task
from actors.tracks import download_tracks, haul_errors_only, muxer_for

log = logging.getLogger(__name__)

#: Beyond HAUL_RESOLVE_TIMEOUT_SECONDS, how long the lane waits for a resolution to end on its own.
RESOLVE_MARGIN_SECONDS = 10.0
#: What a resolved media URL answers once its signature expired.
EXPIRED_STATUSES = frozenset({401, 403, 410})


def fetch_page_file(run: FileRun) -> int:
    """Page file ``run.index`` into its ``.part``: resolved, downloaded, resolved again (up to
    HAUL_RESOLVE_RETRIES times) when its media URL expired; its size."""
    spec = run.spec
    for resolutions in itertools.count(1):
        found = _resolve_page(run)
        try:
            run.sandbox.keep_format(run.index, run.part, found.format_id)  # bytes of another format: not kept
            single = found.single_file
            if single is None:
                return _fetch_tracks(run, found)
            with run.hold(single.url):
                return run.fetch(dataclasses.replace(spec, url=single.url, page=False, format=None), single.headers,
                                 _hidden(spec))  # fmt: skip
        except OriginRejected as exc:  # a signed media URL that expired: the page gives a new one
            if not (exc.status in EXPIRED_STATUSES and resolutions <= run.rt.settings.resolve_retries):
                raise
            log.info("task %s: %s: %s; resolving its page again", run.task.id, spec.path, exc)
    raise AssertionError("unreachable")


def require_resolver(rt: Runtime, task: Task) -> None:
    """Before any file of ``task`` (which has page files) is fetched: this worker can resolve
    pages, else it hands the task on (to a worker that can, if one is registered)."""
    if not resolver_works():
        exc = ResolverMissing(f"task {task.id}: {NO_RESOLVER}")
        exc.handback = _resolvers_elsewhere(rt)
        raise exc


def _resolve_page(run: FileRun) -> Resolved:
    """What the page resolves to now (recorded on the task)."""
    rt, task, spec, lane = run.rt, run.task, run.spec, run.lane
    s = rt.settings
    where = f"task {task.id}, file {spec.path!r} from the page {display_url(spec.url)}"
    # The resolution cuts itself at HAUL_RESOLVE_TIMEOUT_SECONDS; the lane's deadline is the backstop
    lane.step(s.resolve_timeout_seconds + RESOLVE_MARGIN_SECONDS, f"resolving the page of {spec.path!r}")

    def turn() -> None:
        _wait_turn(run)
        lane.step(s.resolve_timeout_seconds + RESOLVE_MARGIN_SECONDS, f"resolving the page of {spec.path!r}")

    found = resolve(  # require_resolver judged before any file whether this worker can
        spec, s.resolve_format, rt.policy, where=where, timeout=s.read_timeout_seconds,
        limit=s.resolve_timeout_seconds, before=turn,
        guard=functools.partial(guard_lease, rt, lane), proxy=s.proxy, request=task.spec.request,
    )  # fmt: skip
    if not rt.store.record_resolved(task.id, run.token, run.index, found.record(), now=rt.clock()):
        raise LeaseLost(f"task {task.id}: lease lost while resolving the page of {spec.path!r}")
    log.info("task %s: %s resolved by %s to format %s on %s", task.id, spec.path, found.extractor, found.format_id,
             found.record()["host"])  # fmt: skip
    return found


def _resolvers_elsewhere(rt: Runtime) -> bool:
    """Whether a registered worker can resolve pages (one that cannot hands a page file over)."""
    try:
        return WorkerRegistry(rt.store.client, rt.store.prefix).have(
            RESOLVE_EXTRA, CLAIM_QUEUE, rt.clock(), rt.worker_id
        )
    except redis.RedisError:
        return False  # the attempt counts, as any failure's


def _wait_turn(run: FileRun) -> None:
    """Wait for this page's turn at its host (HAUL_HOST_MIN_INTERVAL_SECONDS, across workers)."""
    rt = run.rt
    interval = rt.settings.host_min_interval_seconds
    if not interval:
        return
    host = urlsplit(run.spec.url).hostname or ""
    run.lane.step(rt.settings.connect_timeout_seconds, f"taking a turn to ask {host} for a page")
    wait = rt.store.page_turn(host, interval, now=rt.clock())
    if wait > 0:
        run.lane.step(wait + 1, f"waiting its turn to ask {host} for a page (HAUL_HOST_MIN_INTERVAL_SECONDS)")
        if rt.stopper.wait(wait):
            raise Stopping(f"task {run.task.id}: the worker is stopping; handing the task back")


def _fetch_tracks(run: FileRun, found: Resolved) -> int:
    """A page's stream, or its format's tracks, into the ``.part``, joined (:mod:`actors.tracks`);
    its size, once hashed and synced."""
    rt, spec, file = run.rt, run.spec, run.file
    where = f"task {run.task.id}, file {spec.path!r}, the media of its page"
    # The fragments' connection: its plan, headers and home URL are each track's (download_tracks)
    main = Connection(ranges=rt.fetcher, tick=file.on_progress, step=file.step, wake=_nothing, guard=file.guard)
    transfer = StreamTransfer(main, None, run.rules(), {}, file.on_received, where, run.token, _hidden(spec), "",
                              found.cookies)  # fmt: skip
    with haul_errors_only(where):
        folder = run.sandbox.claim_fragments(run.index, run.token)
    joined = download_tracks(found, folder, run.part, transfer, _TrackConnections(run), muxer_for(spec.path))
    size = run.part.stat().st_size
    digest = hash_file(run.part, size, lambda: file.step(DISK_STEP_SECONDS)).hexdigest()
    if spec.sha256 and digest != spec.sha256:
        raise ChecksumMismatch(f"{where}: the joined file's sha256 is {digest}, the task says {spec.sha256}")
    if rt.settings.file_hash == "sha256":
        run.sandbox.record_sha256(run.part, digest)
    file.step(DISK_STEP_SECONDS)
    sync_file(run.part, where)
    log.info("task %s: %s joined from %d track(s), %d fragment(s), %d bytes downloaded, into %d bytes", run.task.id,
             spec.path, joined.tracks, joined.fragments, joined.size, size)  # fmt: skip
    return size


@dataclass(frozen=True)
class _TrackConnections:
    """What :func:`actors.tracks.download_tracks` asks of the file's run."""

    run: FileRun

    def hold(self, url: str) -> AbstractContextManager[None]:
        return self.run.hold(url)

    def plan(self, url: str) -> SplitPlan | None:
        return self.run.plan(url)

    def fetch_file(self, track: Track, into: Path, base: int) -> int:
        media = FileSpec(url=track.url, path=self.run.spec.path)
        return self.run.fetch(media, track.headers, _hidden(self.run.spec), into=into, base=base)


def _hidden(spec: FileSpec) -> Callable[[str], str]:
    """How the URLs a page resolved to appear in messages: not at all (they are signed, a
    credential while they last), only the page they came from."""
    page = display_url(spec.url)
    return lambda url: f"the media of the page {page}"


def _nothing() -> None:
    """A connection with nothing to wake."""
