"""Staging sandboxes and storage on a real filesystem: path checks, commit, clean-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.errors import UnsafePath
from actors.paths import inside
from actors.sandbox import Sandbox
from actors.storage import LocalStorage
from actors.task import FileSpec

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
    (storage.task_dir(TASK)).mkdir(parents=True)
    (storage.task_dir(TASK) / ".v.mp4.haul-tmp").write_bytes(b"stray of a killed run")
    first = storage.commit(sandbox, specs)
    again = storage.commit(sandbox, specs)
    assert first == again and [f["size"] for f in first] == [len(b"v.mp4"), len(b"sub/w.vtt")]
    stored = sorted(p.relative_to(storage.task_dir(TASK)).as_posix() for p in storage.task_dir(TASK).rglob("*"))
    assert stored == ["sub", "sub/w.vtt", "v.mp4"]
    # Staging cleaned after the first commit: a late duplicate still finds the files stored
    sandbox.remove(specs)
    assert storage.commit(sandbox, specs) == first
