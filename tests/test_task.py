"""The task model: transitions, backoff and what submit accepts (pure, no Redis)."""

from __future__ import annotations

import random

import pytest

from actors.errors import InvalidTask
from actors.httprules import content_type_accepted
from actors.manifest import (
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    check_relative_path,
    name_from_url,
    spec_from_manifest,
    spec_from_urls,
)
from actors.states import State, can_move
from actors.task import DEFAULT_ACCEPT, backoff_seconds, first_difference, request_hash

pytestmark = pytest.mark.fast


def manifest(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "Course",
        "key": "order-1",
        "files": [{"url": "https://cdn.example.com/a.mp4", "path": "lesson-01/a.mp4"}],
    }
    data.update(overrides)
    return data


def test_final_states_only_leave_through_an_operator_retry() -> None:
    assert not can_move(State.DONE, State.QUEUED)
    for state in (State.FAILED, State.DEAD, State.CANCELED):
        assert can_move(state, State.QUEUED)
        assert not can_move(state, State.CLAIMED)
    assert can_move(State.DOWNLOADING, State.QUEUED)
    assert not can_move(State.QUEUED, State.FINALIZING)  # a run starts claimed or downloading


def test_backoff_grows_exponentially_within_bounds() -> None:
    rng = random.Random(7)
    draws = {attempt: [backoff_seconds(attempt, 2, 60, rng) for _ in range(200)] for attempt in (1, 3, 10)}
    assert all(2 <= d <= 2 for d in draws[1])
    assert all(2 <= d <= 8 for d in draws[3]) and max(draws[3]) > 5
    assert all(2 <= d <= 60 for d in draws[10]) and max(draws[10]) > 30


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/etc/passwd", "absolute"),
        ("../../etc/passwd", "'..'"),
        ("a/../../b", "'..'"),
        ("a//b", "empty"),
        ("a\x00b", "control"),
        ("a\\b", "backslash"),
        ("CON.txt", "reserved"),
        ("x" * 300, "longer than"),
        ("\u0436" * 130 + ".mp4", "264 bytes in UTF-8, longer than the 255 bytes"),
        ("/".join(["\u0436" * 120] * 13), "3132 bytes long in UTF-8; at most 3072 bytes"),
        ("a\x85b.mp4", "control"),  # C1 NEXT LINE
        ("a\u2028b.mp4", "control"),  # LINE SEPARATOR
        ("a\u2029b.mp4", "control"),  # PARAGRAPH SEPARATOR
        ("evil\u202e4pm.exe", "control"),  # RIGHT-TO-LEFT OVERRIDE
        ("a\u200bb.mp4", "control"),  # ZERO WIDTH SPACE
        ("\ufeffa.mp4", "control"),  # BOM / ZERO WIDTH NO-BREAK SPACE
        ("a\ud800.mp4", "control"),  # a lone surrogate: not even encodable
    ],
)
def test_unsafe_manifest_paths_are_refused_naming_the_path(path: str, reason: str) -> None:
    with pytest.raises(InvalidTask, match=reason) as info:
        spec_from_manifest(manifest(files=[{"url": "https://cdn.example.com/a", "path": path}]))
    assert "manifest.files[0].path" in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "JSON object"),
        (manifest(files=[]), "non-empty list"),
        (manifest(files=[{"url": "ftp://x/a", "path": "a"}]), "not an http"),
        (manifest(files=[{"url": "https://x/a", "path": "a"}, {"url": "https://x/b", "path": "A"}]), "unique"),
        (manifest(files=[{"url": "https://x/a", "path": "a"}, {"url": "https://x/b", "path": "a/b"}]), "folder"),
        (manifest(files=[{"url": "https://x/a", "path": "a", "size": -1}]), "size"),
        (manifest(files=[{"url": "https://x/a", "path": "a", "sha256": "abc"}]), "sha256"),
        (manifest(name=5), "manifest.name"),
        (manifest(colour="red"), "unknown field"),
    ],
)
def test_malformed_manifests_name_the_field(data: object, message: str) -> None:
    with pytest.raises(InvalidTask, match=message):
        spec_from_manifest(data)


def test_urls_become_unique_sanitized_names() -> None:
    spec = spec_from_urls(
        ["https://x/v/clip.mp4?sig=1", "https://x/w/clip.mp4", "https://x/", "https://x/a%2F..%2Fb"], name="n"
    )
    paths = [f.path for f in spec.files]
    assert paths[:3] == ["clip.mp4", "clip-2.mp4", "download"]
    assert "/" not in paths[3] and ".." not in paths[3].split("/")
    assert name_from_url("https://x/%00evil.mp4") == "_evil.mp4"


def test_paths_are_limited_in_bytes_not_characters() -> None:
    longest_name = "\u0436" * 125 + ".mp4"  # 254 bytes, 129 characters
    assert check_relative_path(longest_name, "w") == longest_name
    assert check_relative_path("a" * MAX_NAME_BYTES, "w") == "a" * MAX_NAME_BYTES
    longest_path = "/".join(["a" * 254] * 12) + "/" + "b" * (MAX_PATH_BYTES - 12 * 255)
    assert len(longest_path.encode()) == MAX_PATH_BYTES
    assert check_relative_path(longest_path, "w") == longest_path
    with pytest.raises(InvalidTask, match=f"manifest.files\\[0\\].path: .* at most {MAX_PATH_BYTES} bytes"):
        spec_from_manifest(manifest(files=[{"url": "https://x/a", "path": longest_path + "b"}]))


@pytest.mark.parametrize(
    "segment",
    ["%D0%B6" * 130 + ".mp4", "%D0%B6" * 300, "a" * 600 + ".mp4", "x" * 250 + "%D0%B6" * 5 + ".mp4"],
)
def test_names_from_urls_fit_255_bytes_whole_characters_and_their_extension(segment: str) -> None:
    name = name_from_url(f"https://x/{segment}")
    encoded = name.encode()  # raises if a UTF-8 sequence had been cut
    assert 200 < len(encoded) <= MAX_NAME_BYTES
    assert name.endswith(".mp4") == segment.endswith(".mp4")
    assert check_relative_path(name, "w") == name


def test_long_derived_names_stay_unique_within_the_byte_limit() -> None:
    urls = ["https://x/a/" + "v" * 300 + ".mp4", "https://x/b/" + "v" * 300 + ".mp4", "https://x/" + "w" * 400]
    spec = spec_from_urls([*urls, urls[2] + "?again"])
    paths = [f.path for f in spec.files]
    assert len({p.casefold() for p in paths}) == 4
    assert all(len(p.encode()) <= MAX_NAME_BYTES for p in paths)
    assert paths[1].endswith("-2.mp4") and paths[3].endswith("-2")


def test_invisible_and_control_characters_are_sanitized_out_of_derived_names() -> None:
    name = name_from_url("https://x/a%C2%85b%E2%80%AEc%E2%80%8Bd%E2%80%A8e%E2%80%A9f%EF%BB%BF.mp4")
    assert name == "a_b_c_d_e_f_.mp4"
    assert check_relative_path(name, "w") == name


def test_derived_names_are_unique_case_insensitively_like_manifest_paths() -> None:
    spec = spec_from_urls(["http://h/A.mp4", "http://h/a.mp4", "http://h/x/A.MP4"])
    assert [f.path for f in spec.files] == ["A.mp4", "a-2.mp4", "A-3.MP4"]


@pytest.mark.parametrize(
    "content_type",
    [
        "application/pdf", "text/vtt", "application/x-subrip", "text/srt", "application/zip",
        "application/x-7z-compressed", "application/x-rar-compressed", "application/gzip", "application/x-tar",
        "application/vnd.apple.mpegurl", "application/x-mpegURL", "application/dash+xml", "video/mp4",
        "audio/mpeg", "image/jpeg", "application/octet-stream", "binary/octet-stream", "application/mp4",
    ],
)  # fmt: skip
def test_the_default_accepts_what_courses_ship(content_type: str) -> None:
    assert content_type_accepted(content_type, DEFAULT_ACCEPT)
    assert spec_from_urls(["https://x.example/a"]).accept == DEFAULT_ACCEPT


def test_the_default_still_refuses_html() -> None:
    assert not content_type_accepted("text/html; charset=utf-8", DEFAULT_ACCEPT)
    # An accept list given to spec_from_urls replaces the default
    assert spec_from_urls(["https://x.example/a"], accept=["text/html"]).accept == ("text/html",)


def test_the_request_hash_ignores_the_key_and_accept_order_and_names_the_first_difference() -> None:
    base = manifest(accept=["video/*", "application/pdf"])
    same = manifest(key="other", accept=["application/pdf", "video/*"])
    assert request_hash(spec_from_manifest(base)) == request_hash(spec_from_manifest(same))
    changed = manifest(name="Another")
    assert request_hash(spec_from_manifest(base)) != request_hash(spec_from_manifest(changed))
    assert first_difference(spec_from_manifest(manifest()), spec_from_manifest(changed)) == "name"
