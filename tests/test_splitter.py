"""The split engine (:mod:`actors.split`) through :meth:`Fetcher.fetch`, without Redis: the
connections beside the first on threads of the test's own (as a worker's lanes open them, host
slots apart), a real origin on 127.0.0.1 that caps each connection. Pieces asked in order, the
ramp, every refusal of a range's answer, a range cut short or cut off, the speed floor, and a
resume that asks only for what is missing."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import pytest

from actors.errors import OriginUnavailable
from actors.fetch import Fetcher
from actors.httprules import NO_RULES, FetchRules
from actors.lease import no_step
from actors.netguard import DestinationPolicy
from actors.split import Connection, SpanMap, SplitPlan
from actors.task import FileSpec
from tests.servers import Fault, Origin

MIB = 1024 * 1024
SIZE = 40 * MIB


class Beside:
    """Opens connections beside a file's first, each on a thread and a session of its own."""

    def __init__(self, width: int = 4, *, wait_for_bytes: bool = False) -> None:
        self.width = width
        self.policy = DestinationPolicy(allow_private_networks=True)
        self.pool = futures.ThreadPoolExecutor(width)
        self.fetchers: list[Fetcher] = []
        self.opened: list[futures.Future[None]] = []
        self.counts: list[int] = []
        #: Return from ``open`` only once the new connection wrote its first bytes (the ramp
        #: must count a connection that delivers before its opener hears back).
        self.wait_for_bytes = wait_for_bytes

    def fetcher(self) -> Fetcher:
        fetcher = Fetcher(self.policy, connect_timeout=2, read_timeout=5)
        self.fetchers.append(fetcher)
        return fetcher

    def open(self, work: Callable[[Connection], None]) -> futures.Future[None]:
        delivered, ticks = threading.Event(), itertools.count(1)

        def tick(done: int) -> None:  # before each chunk: the second comes after the first was counted
            if next(ticks) == 2:
                delivered.set()

        conn = Connection(ranges=self.fetcher(), tick=tick, step=no_step, wake=lambda: None)
        future = self.pool.submit(work, conn)
        self.opened.append(future)
        if self.wait_for_bytes:
            delivered.wait(5)
        return future

    def plan(self) -> SplitPlan:
        return SplitPlan(self.width, 8 * MIB, self.open, self.counts.append, lambda: None)

    def all_stopped(self) -> bool:
        return all(future.done() for future in self.opened)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fetcher in self.fetchers:
            fetcher.session.close()


@pytest.fixture
def beside() -> Iterator[Beside]:
    opened = Beside()
    yield opened
    opened.close()


@pytest.fixture
def capped(origin: Origin) -> Origin:
    """8 MiB/s per connection: 40 MiB take 5 s on one, worth splitting."""
    origin.rate = 8 * MIB
    return origin


def fetch(beside: Beside, url: str, part: Path, rules: FetchRules = NO_RULES) -> str:
    """Download ``url`` into ``part`` split over ``beside``; the sha256 it was hashed to."""
    digests: list[str] = []
    fetcher = beside.fetcher()
    fetcher.fetch(
        FileSpec(url=url, path="lecture.mp4"), part, task_id="t1", on_progress=lambda position: None,
        rules=rules, on_sha256=digests.append, split=beside.plan(),
    )  # fmt: skip
    [digest] = digests
    return digest


def range_starts(origin: Origin, path: str) -> list[tuple[int, int]]:
    """The ranges asked for, ``(first, last)`` byte, in the order they came."""
    ranges = []
    for request in origin.requests_for(path):
        asked = request.headers.get("Range", "")
        if asked.startswith("bytes="):
            first, _, last = asked[6:].partition("-")
            ranges.append((int(first), int(last)))
    return ranges


def test_pieces_are_asked_in_order_so_the_sha256_follows_the_transfer(
    capped: Origin, beside: Beside, tmp_path: Path
) -> None:
    data = os.urandom(SIZE)
    part = tmp_path / "lecture.mp4.part"
    digest = fetch(beside, capped.put("/lecture.mp4", data), part)
    assert part.read_bytes() == data and digest == hashlib.sha256(data).hexdigest()
    assert capped.max_active == 4 and max(beside.counts) == 4  # 1, 2, then the rest at once (capped)
    ranges = range_starts(capped, "/lecture.mp4")
    stolen = [r for r in ranges if any(f < r[0] <= last for f, last in ranges)]  # second halves, at the end
    pieces = sorted(r for r in ranges if r not in stolen)
    assert len(pieces) >= 4 and pieces[-1][1] == SIZE - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(pieces, pieces[1:], strict=False)), pieces  # the file, in pieces
    for n, (first, _) in enumerate(ranges):  # handed out in order; the connections race to the origin
        if (first, _) not in stolen:
            assert all(first > f for f, _ in ranges[: max(0, n - beside.width + 1)]), (n, ranges)
    assert all(r.headers.get("If-Range") for r in capped.requests_for("/lecture.mp4")[1:])
    assert capped.served["/lecture.mp4"] <= SIZE * 1.05


def test_a_connection_that_delivers_before_its_opener_hears_back_is_still_waited_for(
    capped: Origin, tmp_path: Path
) -> None:
    """The ramp measures a step once its connections deliver; one that delivered before it
    was counted once left the ramp waiting for it for ever, on two connections."""
    opened = Beside(wait_for_bytes=True)
    try:
        data = os.urandom(SIZE)
        fetch(opened, capped.put("/lecture.mp4", data), tmp_path / "lecture.mp4.part")
    finally:
        opened.close()
    assert capped.max_active == 4


def test_a_range_answered_short_is_asked_again_for_the_rest(capped: Origin, beside: Beside, tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    url = capped.put("/lecture.mp4", data)
    capped.fault("/lecture.mp4", Fault("short", after=MIB, ranged=True))
    part = tmp_path / "lecture.mp4.part"
    assert fetch(beside, url, part) == hashlib.sha256(data).hexdigest()
    assert part.read_bytes() == data
    [short] = [first for first, _ in range_starts(capped, "/lecture.mp4")[:1]]
    assert (short + MIB) in [first for first, _ in range_starts(capped, "/lecture.mp4")]


@pytest.mark.parametrize(
    ("kind", "said"),
    [("resized", "the file changed on the origin (size"), ("unversioned", "without the version asked for")],
)
def test_a_range_of_another_size_or_version_restarts_the_file_whole(
    capped: Origin, beside: Beside, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, said: str
) -> None:
    data = os.urandom(SIZE)
    url = capped.put("/lecture.mp4", data)
    capped.fault("/lecture.mp4", Fault(kind, after=7, ranged=True))
    part = tmp_path / "lecture.mp4.part"
    assert fetch(beside, url, part) == hashlib.sha256(data).hexdigest()
    assert part.read_bytes() == data
    assert said in caplog.text and "downloading the file again from zero" in caplog.text
    whole = [r for r in capped.requests_for("/lecture.mp4") if "Range" not in r.headers]
    assert len(whole) == 2  # the first answer, and the restart: never a splice of two versions


def test_a_range_from_the_wrong_byte_fails_the_attempt_and_the_next_asks_only_for_what_is_missing(
    capped: Origin, beside: Beside, tmp_path: Path
) -> None:
    data = os.urandom(SIZE)
    url = capped.put("/lecture.mp4", data)
    capped.fault("/lecture.mp4", Fault("shifted", after=MIB, ranged=True))
    part = tmp_path / "lecture.mp4.part"
    with pytest.raises(OriginUnavailable, match=r"answered 206 with Content-Range 'bytes \d+-"):
        fetch(beside, url, part)
    assert_resumes_only_what_is_missing(capped, beside, url, part, data)


def test_a_range_cut_off_mid_body_stops_every_connection_and_keeps_what_came(
    capped: Origin, beside: Beside, tmp_path: Path
) -> None:
    data = os.urandom(SIZE)
    url = capped.put("/lecture.mp4", data)
    capped.fault("/lecture.mp4", Fault("drop", after=2 * MIB, ranged=True))
    part = tmp_path / "lecture.mp4.part"
    with pytest.raises(OriginUnavailable, match="a range ended at byte|transfer broke"):
        fetch(beside, url, part)
    assert beside.all_stopped()  # waited for: none writes after the attempt ended
    assert_resumes_only_what_is_missing(capped, beside, url, part, data)


def test_a_range_slower_than_the_floor_is_cut(capped: Origin, beside: Beside, tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    url = capped.put("/lecture.mp4", data)
    capped.fault("/lecture.mp4", Fault("stall", after=MIB, seconds=3, ranged=True))
    rules = FetchRules(lowest_speed_bytes=MIB, lowest_speed_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(OriginUnavailable, match="below HAUL_LOWEST_SPEED_BYTES"):
        fetch(beside, url, tmp_path / "lecture.mp4.part", rules)
    assert time.monotonic() - started < 5.0  # cut at the floor, not at the read timeout
    assert beside.all_stopped()


def test_a_connection_slower_than_the_floor_is_cut_though_each_piece_is_short(
    origin: Origin, beside: Beside, tmp_path: Path
) -> None:
    """Each 4 MiB piece takes 2 s at 2 MiB/s, under the floor's 3 s window: the floor counts
    a connection's pieces together, or no piece would ever be judged."""
    origin.rate = 2 * MIB
    url = origin.put("/lecture.mp4", os.urandom(SIZE))
    rules = FetchRules(lowest_speed_bytes=3 * MIB, lowest_speed_seconds=3.0)
    with pytest.raises(OriginUnavailable, match="below HAUL_LOWEST_SPEED_BYTES"):
        fetch(beside, url, tmp_path / "lecture.mp4.part", rules)
    assert beside.all_stopped()


def assert_resumes_only_what_is_missing(origin: Origin, beside: Beside, url: str, part: Path, data: bytes) -> None:
    """The failed attempt's record lists what is missing; the next attempt asks for that only."""
    spans = SpanMap.load(part)
    assert spans is not None and 0 < spans.missing < len(data)
    kept = len(data) - spans.missing
    served = origin.served["/lecture.mp4"]
    assert fetch(beside, url, part) == hashlib.sha256(data).hexdigest()
    assert part.read_bytes() == data
    assert origin.served["/lecture.mp4"] - served <= (len(data) - kept) * 1.05 + MIB
