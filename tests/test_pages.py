"""Page files (issue 17): a page resolved by yt-dlp when its file downloads, every request
through haul's destination policy, the choice recorded on the task, failures explained. A real
site and a real origin on 127.0.0.1, an in-process worker on the real broker, no internet."""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import lanes
from actors.client import Client
from actors.errors import InvalidTask, PageUnresolvable
from actors.events import EventLog
from actors.hls import MAX_FRAGMENTS, Stream
from actors.manifest import spec_from_manifest, spec_from_urls
from actors.sandbox import Sandbox
from actors.settings import Settings
from actors.states import State
from actors.store import TaskStore
from actors.task import files_from_json, first_difference, request_hash
from tests.conftest import in_process_worker, wait_for
from tests.media import dash_on, dash_with_video_file, duration_of, kinds_of_streams, make_dash, make_hls, probe, serve
from tests.processes import wait_until
from tests.servers import Fault, Origin, Receiver, Site

KIB = 1024


def lesson_page(media_url: str, title: str = "Lesson 1: Intro") -> str:
    """A course page as a site serves it: a <video>, and Open Graph tags naming the same file."""
    return f"""<!doctype html><html><head><title>{title}</title>
<meta property="og:title" content="{title}">
<meta property="og:video" content="{media_url}">
<meta property="og:video:type" content="video/mp4">
</head><body><h1>{title}</h1><video src="{media_url}" controls></video></body></html>"""


@pytest.fixture
def site() -> Iterator[Site]:
    server = Site()
    yield server
    server.close()


def submit_page(client: Client, page: str, **extra: str) -> str:
    return client.submit([{"page": page, "path": "lesson-1.mp4", **extra}])


def test_a_page_with_a_video_resolves_and_its_file_downloads(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin
) -> None:
    data = os.urandom(300 * KIB)
    media = origin.put("/media/lesson-1.mp4", data)
    page = site.page("/course/lesson-1", lesson_page(media))
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, submit_page(client, page))
    assert task.state is State.DONE and task.attempts == 1
    assert (settings.storage_dir / task.id / "lesson-1.mp4").read_bytes() == data
    [entry] = task.as_status()["files"]
    assert entry["page"] == page and "url" not in entry  # the page as given; never the media's URL
    assert entry["resolved"]["extractor"] and entry["resolved"]["host"] == "127.0.0.1"
    assert entry["resolved"]["title"].startswith("Lesson 1: Intro")
    # The media was asked for as yt-dlp would: with the page as Referer
    [asked] = origin.requests_for("/media/lesson-1.mp4")
    assert asked.headers.get("Referer") == page
    resolved = [e.data for e in EventLog(store.client, store.prefix).of_task(task.id) if e.type == "file.resolved"]
    assert len(resolved) == 1 and resolved[0]["index"] == 0 and resolved[0]["host"] == "127.0.0.1"


def test_a_media_url_dead_on_arrival_is_resolved_again_within_the_attempt(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin
) -> None:
    """The first resolution hands out a signed URL that has already expired: the origin
    answers 403, and the worker goes back to the page instead of failing the file."""
    data = os.urandom(200 * KIB)
    media = origin.put("/media/lesson-1.mp4", data)
    origin.expiring.add("/media/lesson-1.mp4")
    renders = itertools.count()
    page = site.url("/course/lesson-1")
    site.dynamic["/course/lesson-1"] = lambda: lesson_page(
        f"{media}?expires={time.time() + (-10 if next(renders) == 0 else 60):.3f}"
    )
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, submit_page(client, page))
    assert task.state is State.DONE and task.attempts == 1
    assert (settings.storage_dir / task.id / "lesson-1.mp4").read_bytes() == data
    assert origin.expired == 1 and len(site.requests) == 2
    events = EventLog(store.client, store.prefix).of_task(task.id)
    assert [e.type for e in events].count("file.resolved") == 2


def test_a_page_files_media_on_another_host_counts_against_that_host(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin
) -> None:
    """One connection per host: the page is on 127.0.0.1, its media on ``localhost`` (a CDN), as
    is a direct file's; the two downloads from ``localhost`` take turns."""
    origin.rate = 512 * KIB
    for name in ("lesson.mp4", "notes.pdf"):
        origin.put(f"/{name}", os.urandom(1024 * KIB))
    cdn = f"http://localhost:{origin.port}"
    page = site.page("/course/lesson", lesson_page(f"{cdn}/lesson.mp4"))
    with in_process_worker(settings.replace(download_per_host=1), store, threads=2):
        ids = [submit_page(client, page)]
        wait_until(lambda: origin.in_flight["/lesson.mp4"] > 0, 30, "the page's media downloading")
        ids.append(client.submit([{"url": f"{cdn}/notes.pdf", "path": "notes.pdf"}]))
        tasks = [wait_for(store, task_id, timeout=60) for task_id in ids]
    assert [t.state for t in tasks] == [State.DONE, State.DONE], [t.error for t in tasks]
    assert origin.max_active == 1


def test_a_page_file_whose_media_host_stays_full_waits_queued_with_its_attempt_given_back(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Its lane holds the page's host while it waits for the media's: it waits only so long
    (two tasks could each hold the host the other waits for), then the task waits queued."""
    monkeypatch.setattr(lanes, "HOST_PATIENCE_SECONDS", 0.5)
    origin.rate = 512 * KIB
    origin.put("/long.pdf", os.urandom(2048 * KIB))
    data = origin.put("/lesson.mp4", os.urandom(64 * KIB))
    cdn = f"http://localhost:{origin.port}"
    page = site.page("/course/lesson", lesson_page(data.replace(origin.url(""), f"{cdn}/")))
    with in_process_worker(settings.replace(download_per_host=1), store, threads=2):
        first = client.submit([{"url": f"{cdn}/long.pdf", "path": "long.pdf"}])
        wait_until(lambda: origin.in_flight["/long.pdf"] > 0, 30, "the long download from localhost")
        task_id = submit_page(client, page)
        tasks = [wait_for(store, first, timeout=60), wait_for(store, task_id, timeout=60)]
    assert [t.state for t in tasks] == [State.DONE, State.DONE], [t.error for t in tasks]
    assert tasks[1].attempts == 1  # handed back while localhost was busy, none of it counted
    said = json.dumps([e.payload() for e in EventLog(store.client, store.prefix).of_task(task_id)])
    assert "had no connection slot free" in said, said
    assert origin.max_active == 1


def test_a_page_files_media_waits_for_its_own_tasks_file_on_that_host_without_handing_the_task_back(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A lane waiting for a slot another lane of its own task holds waits as long as it takes."""
    monkeypatch.setattr(lanes, "HOST_PATIENCE_SECONDS", 0.5)
    origin.rate = 1024 * KIB
    cdn = f"http://localhost:{origin.port}"
    origin.put("/notes.pdf", os.urandom(3 * 1024 * KIB))
    origin.put("/lesson.mp4", os.urandom(1024 * KIB))
    files = [
        {"url": f"{cdn}/notes.pdf", "path": "notes.pdf"},
        {"page": site.page("/course/lesson", lesson_page(f"{cdn}/lesson.mp4")), "path": "lesson.mp4"},
    ]
    with in_process_worker(settings.replace(download_per_host=1), store, threads=1):
        task = wait_for(store, client.submit(files), timeout=60)
    assert task.state is State.DONE and task.attempts == 1, task.error
    assert origin.max_active == 1
    said = json.dumps([e.payload() for e in EventLog(store.client, store.prefix).of_task(task.id)])
    assert "had no connection slot free" not in said and "task.queued" not in said.replace('"task.queued"', "", 1)


def test_a_retry_resolves_the_page_afresh_and_resumes_the_file(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin
) -> None:
    """Each resolution's URL works for 1.5 s; the first attempt is cut after 2 s, when its URL
    is dead. The retry never asks with it: it resolves the page again and goes on from the
    bytes the first attempt kept."""
    data = os.urandom(600 * KIB)
    media = origin.put("/media/lesson-1.mp4", data)
    origin.expiring.add("/media/lesson-1.mp4")
    origin.rate = 200 * KIB  # 3 s for the file
    origin.fault("/media/lesson-1.mp4", Fault("drop", after=400 * KIB))
    page = site.url("/course/lesson-1")
    site.dynamic["/course/lesson-1"] = lambda: lesson_page(f"{media}?expires={time.time() + 1.5:.3f}")
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, submit_page(client, page))
    assert task.state is State.DONE and task.attempts == 2
    assert (settings.storage_dir / task.id / "lesson-1.mp4").read_bytes() == data
    assert origin.expired == 0 and len(site.requests) == 2
    first, second = origin.requests_for("/media/lesson-1.mp4")
    assert second.headers.get("Range") == f"bytes={400 * KIB}-" and second.headers.get("If-Range")
    assert origin.served["/media/lesson-1.mp4"] <= len(data) * 1.05


def test_pages_of_one_host_take_turns_across_workers(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin
) -> None:
    """Four pages in two tasks, two workers, both files of a task at once: the site is asked for
    a page once a second (HAUL_HOST_MIN_INTERVAL_SECONDS' default). The turns are exact (Redis
    hands them out); a request follows its turn once the threads of two in-process workers let
    it, so a gap may lose a few tenths of a second under load, never most of the turn."""
    media = origin.put("/media/clip.mp4", os.urandom(KIB))
    paced = settings.replace(host_min_interval_seconds=1.0)
    with in_process_worker(paced, store, threads=1), in_process_worker(paced, store, threads=1):
        ids = [
            client.submit([{"page": site.page(f"/course/{t}-{n}", lesson_page(media)), "path": f"{n}.mp4"}
                           for n in range(2)])
            for t in range(2)
        ]  # fmt: skip
        assert all(wait_for(store, task_id).state is State.DONE for task_id in ids)
    asked = sorted(r.at for r in site.requests)
    assert len(asked) == 4
    assert min(b - a for a, b in zip(asked, asked[1:], strict=False)) >= 0.7, asked  # unpaced: all at once
    assert asked[-1] - asked[0] >= 3 * 1.0 - 0.3, asked


@pytest.mark.parametrize("status", [404, 410])
def test_a_page_that_is_gone_fails_at_once_naming_it(
    settings: Settings, store: TaskStore, client: Client, site: Site, status: int
) -> None:
    page = site.page("/course/removed", "<html><body>gone</body></html>", status=status)
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, submit_page(client, page))
    assert task.state is State.FAILED and task.attempts == 1
    assert task.error_code == f"origin_{status}" and task.error_file == "lesson-1.mp4"
    assert f"the page {page} answered {status}" in task.error


def test_a_page_without_media_fails_with_the_reason(
    settings: Settings, store: TaskStore, client: Client, site: Site
) -> None:
    page = site.page("/blog/post", "<html><head><title>Post</title></head><body>Only text.</body></html>")
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, submit_page(client, page))
    assert task.state is State.FAILED and task.attempts == 1
    assert task.error_code == "page_unresolvable" and "found no video on" in task.error


def test_a_media_url_the_policy_refuses_is_refused_before_any_connection(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin
) -> None:
    """Private networks off, only the site's own port allowed: the page resolves, but the
    loopback port its video points at is never connected to."""
    media = origin.put("/media/lesson-1.mp4", os.urandom(KIB))
    page = site.page("/course/lesson-1", lesson_page(media))
    strict = settings.replace(allow_private_networks=False, allow_hosts=frozenset({f"127.0.0.1:{site.port}"}))
    with in_process_worker(strict, store, threads=1):
        task = wait_for(store, submit_page(client, page))
    assert task.state is State.FAILED and task.error_code == "forbidden_destination"
    assert "not a public address" in task.error and origin.requests == []


def test_a_page_redirecting_to_the_metadata_address_is_refused_before_it_is_asked(
    settings: Settings, store: TaskStore, client: Client, site: Site
) -> None:
    page = site.url("/share/abc")
    site.redirects["/share/abc"] = "http://169.254.169.254/latest/meta-data/"
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, submit_page(client, page))
    assert task.state is State.FAILED and task.error_code == "forbidden_destination"
    assert "169.254.169.254" in task.error and "cloud metadata" in task.error


def test_a_page_that_drips_is_cut_at_the_resolution_deadline(
    settings: Settings, store: TaskStore, client: Client, site: Site
) -> None:
    """A byte a second never lets a read time out: the resolution's deadline shuts its socket."""
    site.dripping.add("/course/slow")
    limited = settings.replace(resolve_timeout_seconds=2, max_attempts=1)
    started = time.monotonic()
    with in_process_worker(limited, store, threads=1):
        task = wait_for(store, submit_page(client, site.url("/course/slow")), timeout=30)
    assert task.state is State.DEAD and task.error_code == "timeout"
    assert "was cut: it took longer than HAUL_RESOLVE_TIMEOUT_SECONDS" in task.error
    assert time.monotonic() - started < 15


def test_a_format_selector_yt_dlp_cannot_read_fails_the_task_naming_it(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin
) -> None:
    page = site.page("/course/lesson-1", lesson_page(origin.put("/media/a.mp4", os.urandom(KIB))))
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, submit_page(client, page, format="b[height<=720"))
    assert task.state is State.FAILED and task.error_code == "page_unresolvable"
    assert "'b[height<=720' is not a format selector yt-dlp understands" in task.error


def test_the_signed_media_url_appears_in_no_error(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin
) -> None:
    """Signed in its path, as some CDNs sign: the error names the page, never the media's URL."""
    media = origin.url("/media/exp=1999999999~hmac=0123abcd/lesson-1.mp4")  # nothing there: 404
    page = site.page("/course/lesson-1", lesson_page(media))
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, submit_page(client, page))
    assert task.state is State.FAILED and task.error_code == "origin_404"
    assert "hmac" not in task.error and f"the media of the page {page}" in task.error


def test_bytes_kept_of_another_format_are_dropped(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path, "0" * 32)
    sandbox.prepare()
    part = sandbox.claim_part(0, 1)
    sandbox.keep_format(0, part, "720p")
    part.write_bytes(b"x" * 100)
    sandbox.keep_format(0, part, "720p")  # the same format: kept
    assert part.read_bytes() == b"x" * 100
    sandbox.keep_format(0, part, "1080p")  # another: never appended to
    assert not part.exists()


def test_a_page_file_is_refused_at_submit_when_no_worker_can_resolve_pages(
    client: Client, store: TaskStore, site: Site
) -> None:
    with pytest.raises(InvalidTask, match=r"no running worker can resolve pages; install the extra.*haul\[resolve\]"):
        submit_page(client, site.url("/course/lesson-1"))
    assert store.client.keys(f"{store.prefix}task:*") == []  # nothing stored


def test_a_page_file_submitted_again_under_its_key_gets_its_task_while_no_worker_runs(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin
) -> None:
    """A backend retrying its call while the workers restart is answered with the task it made."""
    page = site.page("/course/lesson-1", lesson_page(origin.put("/media/a.mp4", os.urandom(KIB))))
    manifest = {"key": "order-42", "files": [{"page": page, "path": "lesson-1.mp4"}]}
    with in_process_worker(settings, store, threads=1):
        first = client.submit_spec(spec_from_manifest(manifest))
        assert wait_for(store, first).state is State.DONE
    assert client.submit_spec(spec_from_manifest(manifest)) == first
    with pytest.raises(InvalidTask, match="no running worker can resolve pages"):
        client.submit_spec(spec_from_manifest({**manifest, "key": "order-43"}))


def test_a_page_file_is_a_manifest_entry_of_its_own() -> None:
    spec = spec_from_manifest({"files": [
        {"page": "https://example.com/watch/1", "path": "a.mp4", "format": "b[height<=720]"},
        {"url": "https://cdn.example.com/b.mp4", "path": "b.mp4"},
    ]})  # fmt: skip
    page, plain = spec.files
    assert page.page and page.format == "b[height<=720]" and not plain.page
    assert files_from_json([f.to_json() for f in spec.files]) == spec.files  # stored and read back alike
    other = spec_from_manifest({"files": [
        {"page": "https://example.com/watch/1", "path": "a.mp4", "format": "b"},
        {"url": "https://cdn.example.com/b.mp4", "path": "b.mp4"},
    ]})  # fmt: skip
    assert request_hash(other) != request_hash(spec) and first_difference(spec, other) == "files[0].format"
    pages = spec_from_urls([], pages=["https://example.com/watch/lesson-2"], format="b")
    assert pages.files[0].page and pages.files[0].path == "lesson-2" and pages.files[0].format == "b"


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ({"url": "https://a.example/x.mp4", "page": "https://a.example/x", "path": "x.mp4"}, "either url"),
        ({"path": "x.mp4"}, "either url"),
        ({"url": "https://a.example/x.mp4", "path": "x.mp4", "format": "b"}, "only a page has formats"),
        ({"page": "https://a.example/x", "path": "x.mp4", "format": ""}, "format selector of 1 to 200"),
        ({"page": "https://a.example/x", "path": "x.mp4", "format": "b\u202e"}, "invisible formatting"),
        ({"page": "file:///etc/passwd", "path": "x.mp4"}, "is not an http"),
    ],
)
def test_a_bad_page_entry_is_refused_at_submit_naming_the_field(entry: dict[str, str], said: str) -> None:
    with pytest.raises(InvalidTask, match="manifest.files\\[0\\]") as refused:
        spec_from_manifest({"files": [entry]})
    assert said in str(refused.value)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10 s recording as HLS: a playlist and ten 1 s MPEG-TS fragments."""
    folder = tmp_path_factory.mktemp("hls")
    make_hls(folder)
    return folder


def test_a_stream_cut_half_way_resumes_fetching_only_the_missing_fragments(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin, recording: Path
) -> None:
    serve(origin, recording, "/hls")
    origin.fault("/hls/seg-005.ts", Fault("drop", after=2 * KIB))
    page = site.page("/course/stream", lesson_page(origin.url("/hls/index.m3u8")))
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, submit_page(client, page), timeout=60)
    assert task.state is State.DONE and task.attempts == 2, task.error
    joined = settings.storage_dir / task.id / "lesson-1.mp4"
    assert abs(duration_of(joined) - 10.0) <= 0.1
    for n in range(10):  # each fragment whole once; the one cut, once more
        size = (recording / f"seg-{n:03}.ts").stat().st_size
        assert origin.served[f"/hls/seg-{n:03}.ts"] <= size + (2 * KIB if n == 5 else 0), n
    assert task.as_status()["files"][0]["resolved"]["format_id"] == "hls"
    assert not list((settings.staging_dir / task.id).glob(".parts/*.hls"))  # the fragments went with the join


@pytest.fixture(scope="module")
def presentation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8 s DASH presentation of separate video and audio (1 s fMP4 fragments), and its
    picture as one file."""
    folder = tmp_path_factory.mktemp("dash")
    make_dash(folder)
    return folder


def dash_page(manifest: str) -> str:
    """A page whose player is given a DASH manifest (yt-dlp's generic extractor reads it)."""
    return (
        "<!doctype html><html><head><title>Lesson 2: DASH</title></head><body><video controls>"
        f'<source src="{manifest}" type="application/dash+xml"></video></body></html>'
    )


def test_separate_video_and_audio_over_dash_are_joined_after_a_cut_fetching_only_missing_fragments(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin, presentation: Path
) -> None:
    serve(origin, presentation, "/dash")
    origin.fault("/dash/chunk-stream0-00004.m4s", Fault("drop", after=2 * KIB))
    page = site.page("/course/dash", dash_page(origin.url("/dash/manifest.mpd")))
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, submit_page(client, page), timeout=60)
    assert task.state is State.DONE and task.attempts == 2, task.error
    assert task.as_status()["files"][0]["resolved"]["format_id"] == "0+1"  # the default's best video + best audio
    joined = settings.storage_dir / task.id / "lesson-1.mp4"
    assert kinds_of_streams(joined) == ["Video", "Audio"]
    assert abs(duration_of(joined) - 8.0) <= 0.1
    assert "mov,mp4" in probe(joined)
    fragments = [p for p in presentation.iterdir() if p.suffix == ".m4s"]
    for fragment in fragments:  # each whole once; the one cut, once more
        cut = fragment.name == "chunk-stream0-00004.m4s"
        assert origin.served[f"/dash/{fragment.name}"] <= fragment.stat().st_size + (2 * KIB if cut else 0)
    assert not list((settings.staging_dir / task.id).glob(".parts/*.hls"))


def test_a_page_of_a_live_dash_stream_fails_at_once(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin, presentation: Path
) -> None:
    manifest = (presentation / "manifest.mpd").read_text().replace('type="static"', 'type="dynamic"')
    origin.put("/live/manifest.mpd", manifest.encode())
    page = site.page("/course/live", dash_page(origin.url("/live/manifest.mpd")))
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, submit_page(client, page))
    assert task.state is State.FAILED and task.attempts == 1, task.error
    assert task.error_code == "page_unresolvable" and "live stream" in task.error, task.error


def test_tracks_are_each_kept_across_attempts_and_joined_into_the_container_the_name_asks_for(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin, presentation: Path
) -> None:
    """The video one file (cut mid-body), the audio DASH fragments (one cut): each attempt asks
    only for what is missing, the finished video file never again."""
    serve(origin, presentation, "/mixed")
    manifest = dash_with_video_file((presentation / "manifest.mpd").read_text(), "video.mp4")
    origin.put("/mixed/manifest.mpd", manifest.encode())
    video = (presentation / "video.mp4").stat().st_size
    origin.fault("/mixed/video.mp4", Fault("drop", after=video // 2))
    origin.fault("/mixed/chunk-stream1-00003.m4s", Fault("drop", after=KIB))
    page = site.page("/course/mixed", dash_page(origin.url("/mixed/manifest.mpd")))
    with in_process_worker(settings, store, threads=1):
        task_id = client.submit([{"page": page, "path": "lesson-2.mkv"}])
        task = wait_for(store, task_id, timeout=60)
    assert task.state is State.DONE and task.attempts == 3, task.error
    assert task.as_status()["files"][0]["resolved"]["format_id"] == "v+1"
    joined = settings.storage_dir / task.id / "lesson-2.mkv"
    assert "matroska" in probe(joined) and kinds_of_streams(joined) == ["Video", "Audio"]
    assert abs(duration_of(joined) - 8.0) <= 0.1
    # The video resumed where the cut left it, then was found whole (416 from its end)
    assert origin.served["/mixed/video.mp4"] == video
    ranges = [r.headers.get("Range") for r in origin.requests_for("/mixed/video.mp4")]
    assert ranges == [None, f"bytes={video // 2}-", f"bytes={video}-"]
    for fragment in presentation.glob("chunk-stream1-*.m4s"):
        cut = fragment.name == "chunk-stream1-00003.m4s"
        assert origin.served[f"/mixed/{fragment.name}"] <= fragment.stat().st_size + (KIB if cut else 0)


def test_media_the_container_cannot_hold_fails_with_what_to_do_and_keeps_nothing(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin, presentation: Path
) -> None:
    serve(origin, presentation, "/dash")
    page = site.page("/course/webm", dash_page(origin.url("/dash/manifest.mpd")))
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, client.submit([{"page": page, "path": "lesson.webm"}]))
    assert task.state is State.FAILED and task.attempts == 1, task.error
    assert task.error_code == "page_unresolvable" and "as webm" in task.error and "name it .mkv" in task.error
    assert not list((settings.staging_dir / task.id).glob(".parts/*.hls/track-*"))  # a retry starts over


def test_bytes_ffmpeg_refuses_are_downloaded_once_more_then_fail_the_task_with_its_words(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin, presentation: Path
) -> None:
    """A fragment may come whole but wrong: the first refusal drops the tracks and the next
    attempt downloads them afresh; the same refusal of fresh bytes is the media's, final."""
    serve(origin, presentation, "/bad")
    origin.put("/bad/init-stream0.m4s", b"\x00" + os.urandom(2 * KIB))  # an init section that is not one
    page = site.page("/course/bad", dash_page(origin.url("/bad/manifest.mpd")))
    with in_process_worker(settings, store, threads=1):
        task = wait_for(store, submit_page(client, page), timeout=60)
    assert task.state is State.FAILED and task.attempts == 2, task.error
    assert task.error_code == "page_unresolvable" and "downloaded twice" in task.error, task.error
    size = (presentation / "chunk-stream0-00001.m4s").stat().st_size
    assert origin.served["/bad/chunk-stream0-00001.m4s"] == 2 * size
    assert not list((settings.staging_dir / task.id).glob(".parts/*.hls/track-*"))


def test_fragments_on_another_host_get_its_cookies_and_an_error_page_among_them_fails_the_task(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin, presentation: Path
) -> None:
    cdn = Origin()
    try:
        serve(cdn, presentation, "/v")
        cdn.required = ("Cookie", f"session={COOKIE_VALUE}")  # a CDN's signed cookie
        manifest = dash_on((presentation / "manifest.mpd").read_text(), cdn.url("/v/"))
        origin.put("/dash/manifest.mpd", manifest.encode())
        page = site.page("/course/cdn", dash_page(origin.url("/dash/manifest.mpd")))
        with in_process_worker(settings, store, threads=1):
            task = wait_for(store, client.submit_spec(spec_from_manifest(signed_in([{"page": page, "path": "a.mp4"}]))))
            assert task.state is State.DONE, task.error
            assert all("X-Course-Token" not in r.headers for r in cdn.requests)  # the site's credential stays
            cdn.types["/v/chunk-stream0-00002.m4s"] = "text/html"  # an "access denied" page
            again = spec_from_manifest(signed_in([{"page": site.url("/course/cdn"), "path": "b.mp4"}]))
            failed = wait_for(store, client.submit_spec(again))
        assert failed.state is State.FAILED and failed.error_code == "unexpected_content", failed.error
        assert "'text/html'" in failed.error and "fragment 3 of" in failed.error
    finally:
        cdn.close()


VIDEO = {"format_id": "v", "protocol": "https", "url": "https://cdn.example/v.mp4", "vcodec": "avc1", "acodec": "none"}


@pytest.mark.parametrize(
    ("info", "said"),
    [
        ({**VIDEO, "is_live": True}, "live"),
        ({**VIDEO, "live_status": "is_upcoming"}, "live"),
        ({"format_id": "v+a", "requested_formats": [VIDEO, {**VIDEO, "format_id": "a", "has_drm": True}]}, "DRM"),
        ({**VIDEO, "protocol": "rtmp"}, "streamed over rtmp"),
        ({**VIDEO, "protocol": "http_dash_segments", "fragments": []}, "DASH without fragments"),
        ({**VIDEO, "protocol": "http_dash_segments", "fragments": [{"url": "a", "byte_range": {"start": 0}}]},
         "byte ranges"),
        ({**VIDEO, "protocol": "http_dash_segments", "fragments": [{"path": "a"}] * (MAX_FRAGMENTS + 1)},
         f"more than {MAX_FRAGMENTS}"),
        ({"_type": "playlist", "entries": [VIDEO, VIDEO]}, "holds 2 videos"),
    ],
)  # fmt: skip
def test_a_format_haul_must_not_download_is_refused_with_the_reason(info: dict[str, object], said: str) -> None:
    from actors.ytdlp import _chosen

    with pytest.raises(PageUnresolvable, match=said):
        _chosen(info, "task t, file 'a.mp4'")


def test_a_merged_format_is_its_tracks_each_with_what_it_carries() -> None:
    from actors.pages import TrackKind
    from actors.ytdlp import _chosen

    dash = {"format_id": "a", "protocol": "http_dash_segments", "url": "https://cdn.example/m.mpd", "vcodec": "none",
            "acodec": "mp4a", "fragment_base_url": "https://cdn.example/a/",
            "fragments": [{"path": "init.mp4"}, {"url": "https://cdn2.example/1.m4s", "duration": 2}]}  # fmt: skip
    found = _chosen({"format_id": "v+a", "requested_formats": [VIDEO, dash], "duration": 2}, "t")
    assert found.single_file is None and found.format_id == "v+a"
    video, audio = found.tracks
    assert (video.kind, video.has_video, video.has_audio) == (TrackKind.FILE, True, False)
    assert (audio.kind, audio.has_video, audio.has_audio) == (TrackKind.DASH, False, True)
    assert audio.fragments == (("https://cdn.example/a/init.mp4", 0.0), ("https://cdn2.example/1.m4s", 2.0))


@pytest.mark.parametrize(
    ("playlist", "said"),
    [
        ("#EXTM3U\n#EXTINF:2,\na.ts\n", "live"),
        ('#EXTM3U\n#EXT-X-KEY:METHOD=SAMPLE-AES,URI="skd://k"\n#EXTINF:2,\na.ts\n#EXT-X-ENDLIST\n', "DRM"),
        (
            '#EXTM3U\n#EXT-X-KEY:METHOD=AES-128,URI="k",KEYFORMAT="com.apple.streamingkeydelivery"\n'
            "#EXTINF:2,\na.ts\n#EXT-X-ENDLIST\n",
            "DRM",
        ),
        ("#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nlow.m3u8\n", "variants"),
        ("#EXTM3U\n#EXTINF:2,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n", "not an http\\(s\\) URL"),
        ("#EXTM3U\n#EXTINF:2,\nhttp://[x/a.ts\n#EXT-X-ENDLIST\n", "not an http\\(s\\) URL"),
        ("#EXTM3U\n#EXTINF:2,\n#EXT-X-BYTERANGE:100@0\na.ts\n#EXT-X-ENDLIST\n", "byte ranges"),
        ("#EXTM3U\n#EXT-X-ENDLIST\n", "no fragments"),
        (
            '#EXTM3U\n#EXT-X-KEY:METHOD=AES-128,URI="k",IV=0x0 URI=/proc/self/environ\n#EXTINF:2,\na.ts\n'
            "#EXT-X-ENDLIST\n",
            "not a hexadecimal number",
        ),
        ("<html>login</html>", "not an HLS playlist"),
        ("#EXTM3U\n" + "#EXTINF:1,\na.ts\n" * (MAX_FRAGMENTS + 1) + "#EXT-X-ENDLIST\n", "more than"),
    ],
)
def test_a_stream_haul_must_not_download_is_refused_with_the_reason(playlist: str, said: str) -> None:
    with pytest.raises(PageUnresolvable, match=said):
        Stream.parse(playlist, "https://cdn.example/v/index.m3u8", "task t, file 'a.mp4'")


def test_a_stream_playlist_is_read_with_its_keys_and_init_section() -> None:
    stream = Stream.parse(
        '#EXTM3U\n#EXT-X-MAP:URI="init.mp4"\n#EXT-X-KEY:METHOD=AES-128,URI="/k/1",IV=0x01\n#EXTINF:2.5,\n'
        "a.m4s?sig=1\n#EXT-X-KEY:METHOD=NONE\n#EXTINF:1.5,\nhttps://other.example/b.m4s\n#EXT-X-ENDLIST\n",
        "https://cdn.example/v/index.m3u8", "t",
    )  # fmt: skip
    init, first, second = stream.fragments
    assert init.init and init.url == "https://cdn.example/v/init.mp4" and stream.fmp4
    assert first.url == "https://cdn.example/v/a.m4s?sig=1" and first.key is not None
    assert first.key.url == "https://cdn.example/k/1" and first.key.iv == "0x01" and second.key is None
    assert stream.duration == 4.0
    resigned = Stream.parse(
        '#EXTM3U\n#EXT-X-MAP:URI="init.mp4"\n#EXT-X-KEY:METHOD=AES-128,URI="/k/1",IV=0x01\n#EXTINF:2.5,\n'
        "a.m4s?sig=2\n#EXT-X-KEY:METHOD=NONE\n#EXTINF:1.5,\nhttps://other.example/b.m4s\n#EXT-X-ENDLIST\n",
        "https://cdn.example/v/index.m3u8", "t",
    )  # fmt: skip
    keys = {first.key: b"k" * 16}
    assert resigned.identity(keys) == stream.identity(keys)  # signed anew, the same stream: its fragments are kept
    assert stream.identity({first.key: b"x" * 16}) != stream.identity(keys)  # another key: another stream


COOKIE_VALUE = "SECRETcookie0x5eed"
TOKEN_VALUE = "SECREThdr0xcafe"


def signed_in(files: list[dict[str, str]]) -> dict[str, object]:
    """A manifest for a site behind a sign-in: its session cookie and a token header."""
    return {
        "files": files,
        "headers": {"X-Course-Token": TOKEN_VALUE},
        "cookies": f"# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tsession\t{COOKIE_VALUE}\n",
    }


def assert_shown_nowhere(store: TaskStore, task_id: str, receiver: Receiver, logs: str) -> None:
    """The task's cookie and header are in no status, event, webhook or log."""
    task = store.get(task_id)
    assert task is not None
    events = EventLog(store.client, store.prefix).of_task(task_id)
    texts = [json.dumps(task.as_status()), json.dumps([e.payload() for e in events]), logs]
    texts += [repr(d.headers) + d.body.decode() for d in receiver.deliveries]
    for text in texts:
        assert COOKIE_VALUE not in text and TOKEN_VALUE not in text, text[:500]


def test_a_page_behind_a_sign_in_works_with_the_tasks_cookie_and_header_shown_nowhere(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin, receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    data = os.urandom(100 * KIB)
    page = site.page("/course/lesson-1", lesson_page(origin.put("/media/lesson-1.mp4", data)))
    site.required = ("Cookie", f"session={COOKIE_VALUE}")  # the page without the session: 403
    origin.required = ("Cookie", f"session={COOKIE_VALUE}")  # and the media
    with in_process_worker(settings, store, threads=1):
        task_id = client.submit_spec(spec_from_manifest(signed_in([{"page": page, "path": "lesson-1.mp4"}])))
        task = wait_for(store, task_id)
    assert task.state is State.DONE, task.error
    assert (settings.storage_dir / task.id / "lesson-1.mp4").read_bytes() == data
    assert all(r.headers.get("X-Course-Token") == TOKEN_VALUE for r in site.requests)
    # The media's host (another port) gets its cookie, not the token given for the site
    assert origin.requests and all("X-Course-Token" not in r.headers for r in origin.requests)
    assert_shown_nowhere(store, task_id, receiver, caplog.text)


def test_a_share_link_redirecting_to_another_host_leaves_the_tasks_header_behind(
    settings: Settings, store: TaskStore, client: Client, site: Site, origin: Origin
) -> None:
    data = os.urandom(20 * KIB)
    other = Site()
    try:
        site.redirects["/s/abc"] = other.page("/watch", lesson_page(origin.put("/media/v.mp4", data)))
        manifest = signed_in([{"page": site.url("/s/abc"), "path": "v.mp4"}])
        with in_process_worker(settings, store, threads=1):
            task = wait_for(store, client.submit_spec(spec_from_manifest(manifest)))
        assert task.state is State.DONE, task.error
        [asked] = site.requests
        assert asked.headers.get("X-Course-Token") == TOKEN_VALUE
        assert other.requests and all("X-Course-Token" not in r.headers for r in other.requests)
        assert all("X-Course-Token" not in r.headers for r in origin.requests)
    finally:
        other.close()


def test_a_files_credentials_go_to_its_host_and_no_further(
    settings: Settings, store: TaskStore, client: Client, origin: Origin, receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A direct file gets the task's header and cookie; a redirect to another host gets
    neither."""
    caplog.set_level(logging.DEBUG)
    other = Origin()
    try:
        data = os.urandom(50 * KIB)
        origin.put("/here.mp4", data)
        origin.redirects["/moved.mp4"] = other.put("/there.mp4", data)
        origin.required = ("Cookie", f"session={COOKIE_VALUE}")
        files = [
            {"url": origin.url("/here.mp4"), "path": "here.mp4"},
            {"url": origin.url("/moved.mp4"), "path": "moved.mp4"},
        ]
        with in_process_worker(settings, store, threads=1):
            task_id = client.submit_spec(spec_from_manifest(signed_in(files)))
            task = wait_for(store, task_id)
        assert task.state is State.DONE, task.error
        [there] = other.requests_for("/there.mp4")
        assert "Cookie" not in there.headers and "X-Course-Token" not in there.headers
        assert there.headers.get("Range") is None and "User-Agent" in there.headers
    finally:
        other.close()
    assert_shown_nowhere(store, task_id, receiver, caplog.text)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({"headers": {"Host": "evil.example"}}, "is not a header a task may set"),
        ({"headers": {"Range": "bytes=0-"}}, "is not a header a task may set"),
        ({"headers": {"X-Token": "a\r\nX-Injected: 1"}}, "without control characters"),
        ({"headers": {"bad name": "x"}}, "is not a header a task may set"),
        ({"cookies": "example.com\tTRUE\t/\tsecret-but-broken"}, "line 1 is not a cookie"),
    ],
)
def test_bad_headers_or_cookies_are_refused_without_repeating_them(extra: dict[str, object], said: str) -> None:
    with pytest.raises(InvalidTask, match=said) as refused:
        spec_from_manifest({"files": [{"url": "https://a.example/x.mp4", "path": "x.mp4"}], **extra})
    assert "secret-but-broken" not in str(refused.value) and "X-Injected" not in str(refused.value)
