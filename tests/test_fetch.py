"""The download engine against a real origin on 127.0.0.1: resume, restarts, classification."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from actors.errors import ChecksumMismatch, ForbiddenDestination, OriginRejected, OriginUnavailable, TooManyRedirects
from actors.fetch import Fetcher
from actors.httprules import parse_retry_after
from actors.netguard import DestinationPolicy
from actors.task import FileSpec
from tests.servers import Fault, Origin, _Quiet, _Running, free_port

MIB = 1024 * 1024


def make_fetcher(allow_private: bool = True) -> Fetcher:
    return Fetcher(DestinationPolicy(allow_private), connect_timeout=2, read_timeout=5)


def fetch(fetcher: Fetcher, spec: FileSpec, part: Path) -> int:
    positions: list[int] = []
    return fetcher.fetch(spec, part, task_id="t" * 32, on_progress=positions.append)


def test_a_dropped_body_resumes_with_range_and_if_range(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(5 * MIB)
    url = origin.put("/v.mp4", data)
    origin.fault("/v.mp4", Fault("drop", after=2 * MIB))
    fetcher, part = make_fetcher(), tmp_path / "0.part"
    spec = FileSpec(url=url, path="v.mp4", sha256=hashlib.sha256(data).hexdigest())
    # Given a connection cut after 2 MiB, the first attempt fails transiently and keeps its bytes
    with pytest.raises(OriginUnavailable):
        fetch(fetcher, spec, part)
    assert part.stat().st_size == 2 * MIB
    # When it is tried again, only the rest is asked for
    assert fetch(fetcher, spec, part) == len(data)
    second = origin.requests_for("/v.mp4")[1]
    assert second.headers["Range"] == f"bytes={2 * MIB}-" and second.headers["If-Range"].startswith('"')
    assert part.read_bytes() == data
    assert origin.served["/v.mp4"] == len(data)


def test_a_whole_part_a_run_left_unrenamed_is_kept_without_a_byte_asked_again(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(MIB)
    url = origin.put("/v.mp4", data)
    origin.fault("/v.mp4", Fault("drop", after=MIB // 2))
    fetcher, part = make_fetcher(), tmp_path / "0.part"
    spec = FileSpec(url=url, path="v.mp4", sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(OriginUnavailable):
        fetch(fetcher, spec, part)
    assert fetch(fetcher, spec, part) == len(data)  # whole now; as if the run died before renaming it
    # Asked again from its end, under If-Range: 416 with the size it has, so nothing is fetched
    assert fetch(fetcher, spec, part) == len(data)
    third = origin.requests_for("/v.mp4")[2]
    assert third.headers["Range"] == f"bytes={len(data)}-" and third.headers["If-Range"].startswith('"')
    assert origin.served["/v.mp4"] == len(data) and part.read_bytes() == data
    # A file that changed meanwhile (If-Range fails) is sent whole and replaces it
    changed = os.urandom(MIB)
    origin.put("/v.mp4", changed)
    assert fetch(fetcher, FileSpec(url=url, path="v.mp4"), part) == len(changed)
    assert part.read_bytes() == changed


def test_a_changed_file_restarts_instead_of_splicing(origin: Origin, tmp_path: Path) -> None:
    old, new = os.urandom(3 * MIB), os.urandom(3 * MIB)
    url = origin.put("/v.mp4", old)
    origin.fault("/v.mp4", Fault("drop", after=MIB, then=lambda: origin.put("/v.mp4", new)))
    fetcher, part = make_fetcher(), tmp_path / "0.part"
    spec = FileSpec(url=url, path="v.mp4")
    with pytest.raises(OriginUnavailable):
        fetch(fetcher, spec, part)
    # The origin's If-Range check fails, it sends the whole new file with 200
    assert fetch(fetcher, spec, part) == len(new)
    assert part.read_bytes() == new


def test_an_origin_ignoring_range_restarts_the_file(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(MIB)
    url = origin.put("/v.mp4", data)
    part = tmp_path / "0.part"
    part.write_bytes(b"x" * 1000)
    part.with_suffix(".part.json").write_text('{"etag": "\\"stale\\"", "last_modified": null}')
    assert fetch(make_fetcher(), FileSpec(url=url, path="v.mp4"), part) == len(data)
    assert part.read_bytes() == data


def test_a_large_file_with_sha256_arrives_whole(origin: Origin, tmp_path: Path) -> None:
    # Larger than a few write-back windows, so the kernel is asked to write back and drop
    # pages while the body is still arriving
    data = os.urandom(40 * MIB)
    url = origin.put("/v.mp4", data)
    part = tmp_path / "0.part"
    spec = FileSpec(url=url, path="v.mp4", sha256=hashlib.sha256(data).hexdigest())
    assert fetch(make_fetcher(), spec, part) == len(data)
    assert hashlib.sha256(part.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_a_content_coded_body_is_decoded_and_not_resumed(origin: Origin, tmp_path: Path) -> None:
    # Given an origin that gzips a subtitle file although haul asked for identity
    data = b"WEBVTT\n\n00:00.000 --> 00:01.000\nhello\n" * 2000
    url = origin.put("/sub.vtt", data)
    origin.fault("/sub.vtt", Fault("gzip"))
    part = tmp_path / "0.part"
    spec = FileSpec(url=url, path="sub.vtt", sha256=hashlib.sha256(data).hexdigest())
    # The file is stored decoded, and its version is not recorded: the coded length and
    # ranges say nothing about the decoded bytes, so a next attempt starts over
    assert fetch(make_fetcher(), spec, part) == len(data)
    assert part.read_bytes() == data
    assert '"etag": null' in part.with_suffix(".part.json").read_text()


def test_a_content_coded_answer_to_a_resume_restarts_from_zero(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(MIB)
    url = origin.put("/v.mp4", data)
    origin.fault("/v.mp4", Fault("drop", after=1000))
    fetcher, part = make_fetcher(), tmp_path / "0.part"
    with pytest.raises(OriginUnavailable):
        fetch(fetcher, FileSpec(url=url, path="v.mp4"), part)
    # Given the origin answers the resume (206, the rest) gzip-coded: those bytes cannot be
    # appended to the plain ones, so the file starts over and arrives whole
    origin.fault("/v.mp4", Fault("gzip"))
    assert fetch(fetcher, FileSpec(url=url, path="v.mp4"), part) == len(data)
    assert part.read_bytes() == data
    resumed, again = origin.requests_for("/v.mp4")[1:]
    assert resumed.headers["Range"] == "bytes=1000-" and "Range" not in again.headers


def test_a_sha256_mismatch_is_retried_once_from_zero_then_final(origin: Origin, tmp_path: Path) -> None:
    url = origin.put("/v.mp4", b"real bytes")
    spec = FileSpec(url=url, path="v.mp4", sha256="0" * 64)
    with pytest.raises(ChecksumMismatch, match="sha256"):
        fetch(make_fetcher(), spec, tmp_path / "0.part")
    assert len(origin.requests_for("/v.mp4")) == 2


def test_a_size_mismatch_is_refused_before_reading(origin: Origin, tmp_path: Path) -> None:
    url = origin.put("/v.mp4", b"12345")
    with pytest.raises(ChecksumMismatch, match="size 9"):
        fetch(make_fetcher(), FileSpec(url=url, path="v.mp4", size=9), tmp_path / "0.part")


@pytest.mark.parametrize(("code", "error"), [(404, OriginRejected), (410, OriginRejected), (403, OriginRejected)])
def test_final_statuses_are_permanent(origin: Origin, tmp_path: Path, code: int, error: type) -> None:
    origin.put("/v.mp4", b"x")
    origin.fault("/v.mp4", Fault("status", code=code))
    with pytest.raises(error, match=str(code)) as info:
        fetch(make_fetcher(), FileSpec(url=origin.url("/v.mp4"), path="v.mp4"), tmp_path / "0.part")
    assert origin.url("/v.mp4") in str(info.value)


@pytest.mark.parametrize("code", [500, 503, 429, 408])
def test_busy_statuses_are_transient_and_carry_retry_after(origin: Origin, tmp_path: Path, code: int) -> None:
    origin.put("/v.mp4", b"x")
    origin.fault("/v.mp4", Fault("status", code=code, retry_after="7"))
    with pytest.raises(OriginUnavailable) as info:
        fetch(make_fetcher(), FileSpec(url=origin.url("/v.mp4"), path="v.mp4"), tmp_path / "0.part")
    assert info.value.retry_after == 7


def test_retry_after_as_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None


def test_a_connection_refused_is_transient(tmp_path: Path) -> None:
    with pytest.raises(OriginUnavailable, match="request to"):
        fetch(make_fetcher(), FileSpec(url=f"http://127.0.0.1:{free_port()}/v", path="v"), tmp_path / "0.part")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/x", "http://169.254.169.254/latest/meta-data/", "http://localhost/"]
)
def test_private_destinations_are_refused_by_default(tmp_path: Path, url: str) -> None:
    with pytest.raises(ForbiddenDestination, match="not a public address"):
        fetch(make_fetcher(allow_private=False), FileSpec(url=url, path="x"), tmp_path / "0.part")


def test_redirects_are_rechecked_and_loops_end(origin: Origin, tmp_path: Path) -> None:
    origin.put("/final.mp4", b"payload")

    class Handler(_Quiet):
        def do_GET(self) -> None:
            target = {"/a": "/b", "/b": "/a", "/out": origin.url("/final.mp4")}[self.path]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    hops = _Running(Handler)
    try:
        base = f"http://127.0.0.1:{hops.port}"
        with pytest.raises(TooManyRedirects, match="redirect loop") as refused:
            fetch(make_fetcher(), FileSpec(url=base + "/a", path="x"), tmp_path / "0.part")
        assert refused.value.code == "too_many_redirects"
        assert fetch(make_fetcher(), FileSpec(url=base + "/out", path="x"), tmp_path / "1.part") == 7
    finally:
        hops.close()


@pytest.mark.parametrize("configured", ["HAUL_PROXY", "http_proxy"])
def test_downloads_go_through_a_configured_proxy(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, configured: str
) -> None:
    import urllib.request

    seen: list[str] = []
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    class Proxy(_Quiet):
        def do_GET(self) -> None:  # a forward proxy for http:// URLs
            seen.append(self.path)
            with direct.open(self.path) as upstream:
                body = upstream.read()
                self.send_response(upstream.status)
                for name in ("Content-Type", "ETag"):
                    if upstream.headers.get(name):
                        self.send_header(name, upstream.headers[name])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    proxy = _Running(Proxy)
    try:
        url = origin.put("/via-proxy.mp4", b"proxied bytes")
        policy = DestinationPolicy(True)
        address = f"http://127.0.0.1:{proxy.port}"
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        if configured == "http_proxy":  # the standard variable, read by requests per request
            monkeypatch.setenv("http_proxy", address)
            session = policy.session()
        else:
            session = policy.session(address)
        fetcher = Fetcher(policy, connect_timeout=2, read_timeout=5, session=session)
        assert fetch(fetcher, FileSpec(url=url, path="v.mp4"), tmp_path / "0.part") == len(b"proxied bytes")
        assert seen == [url]
    finally:
        proxy.close()


def test_without_proxy_variables_the_environment_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/custom.pem")
    session = DestinationPolicy(True).session()
    assert session.trust_env is False and session.verify == "/etc/ssl/certs/custom.pem"


def test_a_hashing_error_reaches_the_download_and_never_blocks_it() -> None:
    from actors.diskio import Hasher as _Hasher

    class Broken:
        def update(self, data: bytes) -> None:
            raise MemoryError("no room to hash")

    hasher = _Hasher(Broken())
    for _ in range(3 * _Hasher.QUEUE_CHUNKS):  # more than the queue holds: must not block
        hasher.update(b"x" * 1024)
    with pytest.raises(MemoryError, match="no room"):
        hasher.hexdigest()


def test_a_resumed_file_without_a_task_sha256_reports_the_sha256_of_all_its_bytes(
    origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(3 * MIB)
    url = origin.put("/v.mp4", data)
    origin.fault("/v.mp4", Fault("drop", after=MIB + 123))
    fetcher, part, spec = make_fetcher(), tmp_path / "0.part", FileSpec(url=url, path="v.mp4")
    digests: list[str] = []

    def run() -> int:
        return fetcher.fetch(spec, part, task_id="t" * 32, on_progress=lambda _: None, on_sha256=digests.append)

    # Given a first attempt cut after a MiB, which reports no digest
    with pytest.raises(OriginUnavailable):
        run()
    assert digests == []
    # When the rest is fetched, the digest covers the bytes kept on disk and the rest
    assert run() == len(data)
    assert origin.requests_for("/v.mp4")[1].headers["Range"] == f"bytes={MIB + 123}-"
    assert digests == [hashlib.sha256(data).hexdigest()]


def test_a_timeout_is_coded_timeout_and_a_busy_origin_never_promises_a_retry(origin: Origin, tmp_path: Path) -> None:
    url = origin.put("/v.mp4", b"video")
    origin.fault("/v.mp4", Fault("slow_headers", seconds=1.5), Fault("status", code=503))
    fetcher = Fetcher(DestinationPolicy(True), connect_timeout=2, read_timeout=0.5)
    spec = FileSpec(url=url, path="v.mp4")
    with pytest.raises(OriginUnavailable) as slow:
        fetch(fetcher, spec, tmp_path / "0.part")
    assert slow.value.code == "timeout"
    # The fetcher does not know whether attempts are left: its message only says what happened
    with pytest.raises(OriginUnavailable) as busy:
        fetch(fetcher, spec, tmp_path / "0.part")
    assert busy.value.code == "origin_unavailable" and "503" in str(busy.value)
    assert "retry" not in str(busy.value)
