"""Staging sandboxes and storage on a real filesystem: path checks, commit, clean-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.errors import StorageUnavailable, UnsafePath
from actors.paths import inside
from actors.sandbox import Sandbox
from actors.storage import LocalStorage
from actors.task import FileSpec

pytestmark = pytest.mark.fast

TASK = "ab" * 16


def spec(path: str) -> FileSpec:
    return FileSpec(url=f"https://cdn.example.com/{path}", path=path)


def finished(sandbox: Sandbox, *paths: str) -> list[FileSpec]:
    sandbox.prepare()
    specs = [spec(p) for p in paths]
    for s in specs:
        target = sandbox.file(s)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s.path.encode())
    return specs


def test_inside_keeps_paths_under_their_folder_and_follows_no_symlink_out(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    (root / TASK / "files").mkdir(parents=True)
    assert inside(root, "a/b.mp4", under=f"{TASK}/files", what="t") == root.resolve() / TASK / "files" / "a" / "b.mp4"
    with pytest.raises(UnsafePath, match="outside"):
        inside(root, "../../x", under=f"{TASK}/files", what="t")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / TASK / "files" / "a").symlink_to(outside)
    with pytest.raises(UnsafePath, match="outside"):
        inside(root, "a/b.mp4", under=f"{TASK}/files", what="t")
    # A symlink that stays inside is followed, and the real path returned
    (root / TASK / "files" / "real").mkdir()
    (root / TASK / "files" / "alias").symlink_to(root / TASK / "files" / "real")
    assert inside(root, "alias/v.mp4", under=f"{TASK}/files", what="t").parent.name == "real"


@pytest.mark.parametrize("paths", [("v.mp4",), ("v.mp4", "sub/dir/w.vtt")])
def test_remove_takes_the_whole_sandbox(tmp_path: Path, paths: tuple[str, ...]) -> None:
    sandbox = Sandbox(tmp_path, TASK)
    specs = finished(sandbox, *paths)
    (sandbox.parts_dir / "9.part").write_bytes(b"left over")
    sandbox.remove(specs)
    assert list(tmp_path.iterdir()) == []


def test_remove_never_deletes_through_a_planted_symlink(tmp_path: Path) -> None:
    staging, outside = tmp_path / "staging", tmp_path / "outside"
    outside.mkdir()
    (outside / "v.mp4").write_bytes(b"someone else's")
    sandbox = Sandbox(staging, TASK)
    sandbox.prepare()
    sandbox.files_dir.symlink_to(outside)
    sandbox.remove([spec("v.mp4")])
    assert not sandbox.root.exists() and (outside / "v.mp4").read_bytes() == b"someone else's"


def test_commit_twice_keeps_one_copy_and_survives_a_stray_temporary(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path / "staging", TASK)
    specs = finished(sandbox, "v.mp4", "sub/w.vtt")
    storage = LocalStorage(tmp_path / "storage")
    storage.temporary_dir.mkdir(parents=True)
    (storage.temporary_dir / f"{TASK}-0123").write_bytes(b"stray of a killed run")
    first = storage.commit(sandbox, specs)
    again = storage.commit(sandbox, specs)
    assert first == again and [f["size"] for f in first] == [len(b"v.mp4"), len(b"sub/w.vtt")]
    stored = sorted(p.relative_to(storage.task_dir(TASK)).as_posix() for p in storage.task_dir(TASK).rglob("*"))
    assert stored == ["sub", "sub/w.vtt", "v.mp4"]
    # Staging cleaned after the first commit: a late duplicate still finds the files stored
    sandbox.remove(specs)
    assert storage.commit(sandbox, specs) == first


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "path",
    ["a/../../x", "missing/../../../etc/passwd", "a/b/../../../../../escape.mp4", "x/..", "a/./../b", "a/.."],
)
@pytest.mark.parametrize("existing", [False, True])
def test_inside_refuses_dot_dot_anywhere_even_below_missing_folders(tmp_path: Path, path: str, existing: bool) -> None:
    root = tmp_path / "staging"
    (root / TASK / "files").mkdir(parents=True)
    if existing:
        (root / TASK / "files" / "a" / "b").mkdir(parents=True)
    before = tree(tmp_path)
    with pytest.raises(UnsafePath, match=rf"task {TASK}: path .* has a '\.\.' component"):
        inside(root, path, under=f"{TASK}/files", what=f"task {TASK}")
    assert tree(tmp_path) == before


def test_a_spec_that_skipped_validation_writes_nothing_outside(tmp_path: Path) -> None:
    """A path written to the store directly (no submit check) meets inside() before any write."""
    sandbox = Sandbox(tmp_path / "staging", TASK)
    sandbox.prepare()
    part = sandbox.claim_part(0, token=1)
    part.write_bytes(b"payload")
    climbing = FileSpec(url="https://cdn.example.com/v.mp4", path="missing/../../../../escape.mp4")
    with pytest.raises(UnsafePath, match="'..'"):
        sandbox.promote(part, climbing)
    with pytest.raises(UnsafePath, match="'..'"):
        sandbox.finished_size(climbing)
    with pytest.raises(UnsafePath, match="'..'"):
        LocalStorage(tmp_path / "storage").commit(sandbox, [climbing])
    assert tree(tmp_path) == [
        "staging", f"staging/{TASK}", f"staging/{TASK}/.parts", f"staging/{TASK}/.parts/0.1.part",
        "storage", f"storage/{TASK}",
    ]  # fmt: skip


def test_a_name_too_long_for_the_filesystem_is_a_permanent_unsafe_path(tmp_path: Path) -> None:
    """264 bytes of UTF-8 in 134 characters: ENAMETOOLONG never heals, so it is no storage outage."""
    sandbox = Sandbox(tmp_path / "staging", TASK)
    sandbox.prepare()
    part = sandbox.claim_part(0, token=1)
    part.write_bytes(b"payload")
    long_name = FileSpec(url="https://cdn.example.com/v.mp4", path="\u0436" * 130 + ".mp4")
    with pytest.raises(UnsafePath, match=rf"task {TASK}: path '\u0436+\.mp4' is too long for the filesystem"):
        sandbox.promote(part, long_name)
    assert part.read_bytes() == b"payload"
    with pytest.raises(UnsafePath, match="too long for the filesystem"):  # the next run's first look
        sandbox.finished_size(long_name)


def test_a_run_takes_over_the_bytes_an_earlier_run_left_under_its_own_name(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path / "staging", TASK)
    sandbox.prepare()
    # Given runs 3 and 4 were killed, leaving bytes (and a validator for run 4's) ...
    (sandbox.parts_dir / "0.3.part").write_bytes(b"ab")
    (sandbox.parts_dir / "0.4.part").write_bytes(b"abcd")
    (sandbox.parts_dir / "0.4.part.json").write_text('{"etag": "\\"v1\\""}')
    # When run 7 claims file 0, it takes the most bytes, with their validator, under its name
    mine = sandbox.claim_part(0, 7)
    assert mine.name == "0.7.part" and mine.read_bytes() == b"abcd"
    assert (sandbox.parts_dir / "0.7.part.json").exists()
    assert sandbox.claim_part(0, 7) == mine
    # ... and run 4, waking up late, finds no file of its own to truncate, replace or delete
    assert not (sandbox.parts_dir / "0.4.part").exists()


def test_a_run_that_lost_the_task_while_hashing_cannot_replace_its_successors_digest(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path, TASK)
    sandbox.prepare()
    lesson = spec("lesson.mp4")
    # Given run 1 downloading the file, then paused; run 2 takes its bytes over and finishes
    first = sandbox.claim_part(0, 1)
    first.write_bytes(b"old version")
    second = sandbox.claim_part(0, 2)
    second.write_bytes(b"new version")
    sandbox.record_sha256(second, "2" * 64)
    sandbox.promote(second, lesson)
    # When run 1 wakes up, records the digest of what it hashed and tries to place its part
    sandbox.record_sha256(first, "1" * 64)
    with pytest.raises(StorageUnavailable):  # its part was renamed away by run 2
        sandbox.promote(first, lesson)
    # Then the file and its digest are run 2's
    assert sandbox.file(lesson).read_bytes() == b"new version"
    assert sandbox.sha256(0) == "2" * 64
