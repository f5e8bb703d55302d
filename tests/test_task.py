"""The task model: transitions, backoff and what submit accepts (pure, no Redis)."""

from __future__ import annotations

import random

import pytest

from actors.errors import InvalidTask
from actors.task import State, backoff_seconds, can_move, name_from_url, spec_from_manifest, spec_from_urls


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
    assert not can_move(State.QUEUED, State.DOWNLOADING)


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
