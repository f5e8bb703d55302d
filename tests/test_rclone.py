"""Storing onto rclone remotes, through the real rclone binary: a ``local`` remote, a WebDAV
remote served by ``rclone serve webdav``, and an ``s3`` remote pointed at ``rclone serve s3``
(the one of the three that makes links)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from actors.errors import LeaseLost, StorageUnavailable
from actors.manifest import spec_from_manifest
from actors.rclonestorage import RcloneStorage, rclone_binary
from actors.settings import Settings, SettingsError
from actors.states import State
from actors.storagetarget import StorageTarget
from actors.store import TaskStore
from tests.conftest import dramatiq_supervisor, in_process_worker, staged, submit_spec, wait_for
from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server
from tests.servers import Origin, Receiver, free_port, wait_port

MIB = 1024 * 1024


@pytest.fixture
def remotes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``loc`` remote (rclone's local backend), configured the way rclone users do: by
    RCLONE_CONFIG_<NAME>_* variables, which rclone inherits. Returns the remote's folder."""
    monkeypatch.setenv("RCLONE_CONFIG", str(tmp_path / "rclone.conf"))
    monkeypatch.setenv("RCLONE_CONFIG_LOC_TYPE", "local")
    folder = tmp_path / "remote"
    folder.mkdir()
    return folder


class WebDav:
    """``rclone serve webdav`` over a folder, on a port of its own (kept across restarts)."""

    def __init__(self, folder: Path, config: Path) -> None:
        self.folder, self.config, self.port = folder, config, free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(exist_ok=True)

    def start(self) -> None:
        env = {**os.environ, "RCLONE_CONFIG": str(self.config)}
        self.process = subprocess.Popen(
            [rclone_binary(), "serve", "webdav", "--addr", f"127.0.0.1:{self.port}", str(self.folder)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port, "rclone serve webdav", process=self.process)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def dav(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDav]:
    """A WebDAV server, and a ``dav`` remote pointed at it."""
    server = WebDav(tmp_path / "dav", tmp_path / "none.conf")
    server.start()
    monkeypatch.setenv("RCLONE_CONFIG", str(tmp_path / "rclone.conf"))
    monkeypatch.setenv("RCLONE_CONFIG_DAV_TYPE", "webdav")
    monkeypatch.setenv("RCLONE_CONFIG_DAV_URL", f"http://127.0.0.1:{server.port}")
    monkeypatch.setenv("RCLONE_CONFIG_DAV_VENDOR", "other")
    yield server
    server.kill()


def test_a_course_lands_on_a_remote_under_the_key_template_and_is_announced(
    remotes: Path, store: TaskStore, origin: Origin, receiver: Receiver, settings: Settings
) -> None:
    files = {"lesson-01/intro.mp4": os.urandom(3 * MIB), "notes.pdf": b"%PDF", "a b/ü.mp4": os.urandom(1000)}
    remote = settings.replace(
        object_storage=StorageTarget("rclone", remote="loc", prefix=f"{remotes}/courses"),
        storage_key="{key}/{path}",
    )
    entries = [{"url": origin.put(f"/f{n}", data), "path": path} for n, (path, data) in enumerate(files.items())]
    with in_process_worker(remote, store, threads=2):
        task_id = submit_spec(spec_from_manifest({"files": entries, "key": "order-9"}), store)
        task = wait_for(store, task_id)
    assert task.state is State.DONE, task.error
    for path, data in files.items():
        assert (remotes / "courses" / "order-9" / path).read_bytes() == data
    [delivery] = receiver.accepted()
    listed = {f["path"]: f for f in delivery.event["data"]["files"]}
    assert listed["notes.pdf"]["location"] == f"rclone:loc:{remotes}/courses/order-9/notes.pdf"
    assert {f["verified"] for f in listed.values()} == {"checksum"}  # the local backend keeps hashes
    assert not (remote.staging_dir / task_id).exists()


def test_a_file_already_on_the_remote_is_not_copied_again(remotes: Path, tmp_path: Path) -> None:
    sandbox, specs = staged(tmp_path, {"v.mp4": os.urandom(MIB)})
    storage = RcloneStorage(StorageTarget("rclone", remote="loc", prefix=str(remotes)), key_template="{task_id}/{path}")
    storage.commit(sandbox, specs)
    stored = remotes / sandbox.task_id / "v.mp4"
    before = stored.stat().st_ino
    [entry] = storage.commit(sandbox, specs)
    assert stored.stat().st_ino == before and entry["verified"] == "checksum"  # same size and hash: skipped


def test_the_fence_stops_a_holder_before_the_file_reaches_the_remote(remotes: Path, tmp_path: Path) -> None:
    sandbox, specs = staged(tmp_path, {"v.mp4": b"v"})
    storage = RcloneStorage(StorageTarget("rclone", remote="loc", prefix=str(remotes)), key_template="{task_id}/{path}")

    def lost() -> None:
        raise LeaseLost("canceled meanwhile")

    with pytest.raises(LeaseLost):
        storage.commit(sandbox, specs, fence=lost)
    assert not [p for p in remotes.rglob("*") if p.is_file()]  # nothing placed, and its own copy deleted


def test_a_webdav_remote_stores_and_a_dead_one_is_a_storage_error(dav: WebDav, tmp_path: Path) -> None:
    webdav = dav.folder
    data = os.urandom(2 * MIB)
    sandbox, specs = staged(tmp_path, {"v.mp4": data})
    storage = RcloneStorage(StorageTarget("rclone", remote="dav", prefix="media"), key_template="{task_id}/{path}")
    assert storage.probe("w1") == ([], [])
    [entry] = storage.commit(sandbox, specs)
    assert (webdav / "media" / sandbox.task_id / "v.mp4").read_bytes() == data
    assert entry["verified"] in ("checksum", "size") and entry["location"].startswith("rclone:dav:media/")
    assert not (webdav / "media" / ".haul-probe" / "w1").exists()  # the probe cleaned up
    # A remote nothing answers for: the error says which file, where, and what rclone said
    dead = RcloneStorage(StorageTarget("rclone", remote="nosuch", prefix="x"), key_template="{task_id}/{path}")
    with pytest.raises(StorageUnavailable) as raised:
        dead.commit(sandbox, specs)
    assert "failed (exit" in str(raised.value) and "rclone:nosuch:x/" in str(raised.value)
    assert "didn't find section in config file" in str(raised.value)
    [problem] = dead.probe("w1")[0]
    assert "HAUL_STORAGE_URL=rclone:nosuch:x" in problem


def test_an_s3_remote_gives_links_that_download_the_file_until_they_expire(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = S3Server(tmp_path / "s3")
    s3.start()
    try:
        for name, value in {
            "TYPE": "s3", "PROVIDER": "Other", "ENDPOINT": s3.endpoint, "ACCESS_KEY_ID": ACCESS_KEY,
            "SECRET_ACCESS_KEY": SECRET_KEY, "FORCE_PATH_STYLE": "true", "REGION": "us-east-1",
        }.items():  # fmt: skip
            monkeypatch.setenv(f"RCLONE_CONFIG_BUCKET_{name}", value)
        monkeypatch.setenv("RCLONE_CONFIG", str(tmp_path / "rclone.conf"))
        sandbox, specs = staged(tmp_path, {"v.mp4": b"the video"})
        storage = RcloneStorage(
            StorageTarget("rclone", remote="bucket", prefix="media/shop"), key_template="{task_id}/{path}",
            link_seconds=600,
        )  # fmt: skip
        [entry] = storage.commit(sandbox, specs)
        assert requests.get(entry["link"], timeout=10).content == b"the video"
        assert entry["link_expires_at"] is not None
    finally:
        s3.stop()


def test_the_supervisor_says_when_the_remote_cannot_be_written(store: TaskStore, settings: Settings) -> None:
    unknown = settings.replace(object_storage=StorageTarget("rclone", remote="nosuch", prefix="media"))
    problems = dramatiq_supervisor(unknown, store, node_id="s").check_config()
    assert [p for p in problems if "HAUL_STORAGE_URL=rclone:nosuch:media" in p and "rclone rcat failed" in p], problems


@pytest.mark.parametrize(
    "url", ["rclone::s3,secret_access_key=TOPSECRET:bucket", "rclone:dav,pass=TOPSECRET:x", "rclone:nopath"]
)
def test_a_connection_string_is_refused_without_showing_it(url: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"HAUL_STORAGE_URL": url})
    assert "TOPSECRET" not in str(raised.value) and "rclone" in str(raised.value)


def test_a_remote_is_chosen_by_its_url() -> None:
    settings = Settings.from_env({"HAUL_STORAGE_URL": "rclone:gdrive:Courses/2026/", "HAUL_STORAGE_LINK_SECONDS": "60"})
    assert settings.object_storage == StorageTarget("rclone", remote="gdrive", prefix="Courses/2026")
    assert settings.storage_link_seconds == 60


def test_an_error_from_rclone_never_shows_the_remote_s_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RCLONE_CONFIG", str(tmp_path / "rclone.conf"))
    monkeypatch.setenv("RCLONE_CONFIG_BAD_TYPE", "webdav")
    monkeypatch.setenv("RCLONE_CONFIG_BAD_URL", f"http://127.0.0.1:{free_port()}/token-TOPSECRET123")
    sandbox, specs = staged(tmp_path, {"v.mp4": b"v"})
    storage = RcloneStorage(StorageTarget("rclone", remote="bad", prefix="x"), key_template="{task_id}/{path}")
    with pytest.raises(StorageUnavailable) as raised:
        storage.commit(sandbox, specs)
    assert "TOPSECRET123" not in str(raised.value) and "failed (exit" in str(raised.value)


def test_a_webdav_server_killed_mid_copy_keeps_the_task_waiting_then_it_completes(
    dav: WebDav, store: TaskStore, origin: Origin, receiver: Receiver, settings: Settings
) -> None:
    data = os.urandom(200 * MIB)
    remote = settings.replace(object_storage=StorageTarget("rclone", remote="dav", prefix="media"))
    with in_process_worker(remote, store, threads=2):
        task_id = submit_spec(spec_from_manifest({"files": [{"url": origin.put("/v", data), "path": "v.mp4"}]}), store)
        # Given the copy under way (its own .partial name on the remote), the server is killed
        deadline = time.monotonic() + 60
        while not any(dav.folder.rglob("*.partial")):
            assert time.monotonic() < deadline, "the copy did not start"
            time.sleep(0.005)
        dav.kill()
        # Then the task waits in finalizing, its file in staging, and says why
        deadline = time.monotonic() + 60
        while not ((task := store.get(task_id)) and (task.error or task.state is State.DONE)):
            assert time.monotonic() < deadline, f"no storage error: {task}"
            time.sleep(0.05)
        assert task.state is State.FINALIZING and "rclone:dav:media/" in task.error, task
        assert (remote.staging_dir / task_id).exists()
        # When the server is back, the task completes on its first attempt
        dav.start()
        done = wait_for(store, task_id, timeout=120)
    assert done.state is State.DONE and done.attempts == 1, done.error
    assert (dav.folder / "media" / task_id / "v.mp4").read_bytes() == data
    [delivery] = receiver.accepted()
    assert delivery.event["data"]["files"][0]["verified"] in ("checksum", "size")
