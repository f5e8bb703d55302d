"""Storing into an S3 bucket, against a real S3 server (``rclone serve s3``): the whole pipeline
in process, uploads that resume from the parts the service has, the fence before an object
appears, refusals that wait in finalizing, and the settings that choose a bucket."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from actors.client import Client
from actors.errors import InvalidTask, LeaseLost, StorageUnavailable
from actors.lease import LeaseKeeper
from actors.manifest import spec_from_manifest
from actors.redact import secrets_of
from actors.s3client import s3_client
from actors.s3parts import MAX_PARTS, MIB, multipart_etag, part_size_for
from actors.s3storage import S3Storage
from actors.settings import Settings, SettingsError
from actors.states import State
from actors.storagetarget import S3Access, StorageTarget
from actors.store import TaskStore
from actors.store_uploads import Abandoned, UploadLedger, UploadRecord, drop_uploads
from tests.conftest import ClaimsOnly, dramatiq_supervisor, in_process_worker, staged, submit_spec, wait_for
from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server
from tests.servers import FailingPartsProxy, Origin, Receiver


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path / "s3")
    server.start()
    yield server
    server.resume()
    server.stop()


class Ledger:
    """An upload ledger kept in memory (the Redis one, fenced by the token, is tested below)."""

    def __init__(self) -> None:
        self.records: dict[int, UploadRecord] = {}

    def get(self, index: int) -> UploadRecord | None:
        return self.records.get(index)

    def keep(self, index: int, record: UploadRecord) -> bool:
        self.records[index] = record
        return True

    def forget(self, index: int) -> bool:
        self.records.pop(index, None)
        return True


class Counting:
    """The real boto3 client, counting the parts it sends (for what a resume sent again)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.parts: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def upload_part(self, **params: Any) -> Any:
        self.parts.append(int(params["PartNumber"]))
        return self.client.upload_part(**params)


def bucket_storage(s3: S3Server, client: Any = None, **options: Any) -> S3Storage:
    return S3Storage(s3.target("shop"), s3.access(), key_template="{task_id}/{path}", client=client or s3.client(),
                     part_bytes=5 * MIB, **options)  # fmt: skip


def test_a_course_is_stored_in_the_bucket_under_the_key_template_and_announced(
    s3: S3Server, store: TaskStore, origin: Origin, receiver: Receiver, settings: Settings
) -> None:
    files = {"lesson-01/intro.mp4": os.urandom(12 * MIB + 5), "notes.pdf": b"%PDF small", "a b/ü.mp4": os.urandom(MIB)}
    bucket = settings.replace(
        object_storage=s3.target("shop"),
        s3=s3.access(),
        storage_key="orders/{key}/{path}",
        s3_part_bytes=5 * MIB,
        storage_link_seconds=600,
    )
    entries = [{"url": origin.put(f"/f{n}", data), "path": path} for n, (path, data) in enumerate(files.items())]
    with in_process_worker(bucket, store, threads=2):
        task_id = submit_spec(spec_from_manifest({"files": entries, "key": "order-7"}), store)
        task = wait_for(store, task_id)
    assert task.state is State.DONE, task.error
    client = s3.client()
    for path, data in files.items():
        key = f"shop/orders/order-7/{path}"
        got = client.get_object(Bucket="media", Key=key)
        assert got["Body"].read() == data
        assert {k.lower(): v for k, v in got["Metadata"].items()} == {"haul-task-id": task_id}
        assert got["ContentType"] == "video/mp4"  # the origin's, for the PDF too (the origin says so)
        assert got["ContentDisposition"].startswith("attachment; filename=")
    [delivery] = receiver.accepted()
    listed = {f["path"]: f for f in delivery.event["data"]["files"]}
    assert listed["lesson-01/intro.mp4"]["location"] == "s3://media/shop/orders/order-7/lesson-01/intro.mp4"
    assert {f["verified"] for f in listed.values()} == {"etag"}
    assert listed["notes.pdf"]["sha256"] == hashlib.sha256(b"%PDF small").hexdigest()
    # Each file's link downloads it, under its name, until it expires
    for path, data in files.items():
        answer = requests.get(listed[path]["link"], timeout=10)
        assert answer.status_code == 200 and answer.content == data
        assert answer.headers["Content-Disposition"].startswith("attachment")
    expires = datetime.fromisoformat(listed["notes.pdf"]["link_expires_at"])
    assert 590 <= expires.timestamp() - time.time() <= 600
    assert requests.get(listed["notes.pdf"]["link"] + "0", timeout=10).status_code == 403  # tampered
    # `haul status ID --json` shows each file where task.completed put it, with the same link
    shown = {f["path"]: f for f in task.as_status()["files"]}
    assert all(f.pop("state") == "done" for f in shown.values())  # status says how far each file is
    assert {p: f | {"url": None} for p, f in shown.items()} == {p: f | {"url": None} for p, f in listed.items()}
    assert not (bucket.staging_dir / task_id).exists()  # staging goes only after the announcement
    # Nothing is left half-uploaded
    assert not client.list_multipart_uploads(Bucket="media").get("Uploads")


def test_an_interrupted_upload_sends_only_the_parts_the_service_lacks(s3: S3Server, tmp_path: Path) -> None:
    data = os.urandom(26 * MIB)  # five parts of 5 MiB and one of 1 MiB
    sandbox, [spec] = staged(tmp_path, {"big.mp4": data})
    ledger, first = Ledger(), Counting(s3.client())
    steps = 0

    def crash_after_three_parts(seconds: float) -> None:
        nonlocal steps
        steps += 1
        if len(first.parts) >= 3:
            raise LeaseLost("the worker died here")

    # Given a first run that dies after three of the seven parts went up
    with pytest.raises(LeaseLost):
        bucket_storage(s3, first, concurrency=1).commit(sandbox, [spec], step=crash_after_three_parts, ledger=ledger)
    assert ledger.records, "the upload was recorded before its parts went up"
    # When the next run commits: only the missing parts go up, and the object is whole
    second = Counting(s3.client())
    [entry] = bucket_storage(s3, second).commit(sandbox, [spec], ledger=ledger)
    assert sorted(second.parts) == [n for n in range(1, 7) if n not in first.parts]
    assert len(first.parts) + len(second.parts) <= 6 + 1  # at most the part in flight at the crash, again
    assert entry["verified"] == "etag" and entry["location"] == f"s3://media/shop/{sandbox.task_id}/big.mp4"
    assert s3.client().get_object(Bucket="media", Key=f"shop/{sandbox.task_id}/big.mp4")["Body"].read() == data
    assert ledger.records == {}


def test_an_upload_whose_staged_bytes_changed_starts_over(s3: S3Server, tmp_path: Path) -> None:
    data = os.urandom(11 * MIB)
    sandbox, [spec] = staged(tmp_path, {"v.mp4": data})
    ledger, first = Ledger(), Counting(s3.client())

    def stop_after_one(seconds: float) -> None:
        if first.parts:
            raise LeaseLost("stopped")

    with pytest.raises(LeaseLost):
        bucket_storage(s3, first, concurrency=1).commit(sandbox, [spec], step=stop_after_one, ledger=ledger)
    # The staged file differs now where the uploaded part stands for it
    changed = bytes([data[0] ^ 0xFF]) + data[1:]
    sandbox.file(spec).write_bytes(changed)
    second = Counting(s3.client())
    bucket_storage(s3, second).commit(sandbox, [spec], ledger=ledger)
    assert sorted(second.parts) == [1, 2, 3]  # a new upload, every part: never a splice of old and new bytes
    assert s3.client().get_object(Bucket="media", Key=f"shop/{sandbox.task_id}/v.mp4")["Body"].read() == changed


def test_an_upload_the_service_forgot_starts_over(s3: S3Server, tmp_path: Path) -> None:
    data = os.urandom(7 * MIB)
    sandbox, [spec] = staged(tmp_path, {"v.mp4": data})
    ledger = Ledger()
    ledger.keep(0, UploadRecord(f"shop/{sandbox.task_id}/v.mp4", "an-upload-that-is-gone", 5 * MIB))
    [entry] = bucket_storage(s3).commit(sandbox, [spec], ledger=ledger)
    assert entry["verified"] == "etag"
    assert s3.client().get_object(Bucket="media", Key=f"shop/{sandbox.task_id}/v.mp4")["Body"].read() == data


def test_a_file_stored_by_a_run_that_died_before_saying_so_is_not_sent_again(s3: S3Server, tmp_path: Path) -> None:
    sandbox, specs = staged(tmp_path, {"a.mp4": os.urandom(6 * MIB), "b.pdf": b"b"})
    bucket_storage(s3).commit(sandbox, specs)
    again = Counting(s3.client())
    entries = bucket_storage(s3, again).commit(sandbox, specs)
    assert again.parts == [] and [e["size"] for e in entries] == [6 * MIB, 1]
    assert [e["verified"] for e in entries] == ["etag", "etag"]
    # ... but an object of the same task and size with other bytes is replaced, never announced
    changed = os.urandom(6 * MIB)
    sandbox.file(specs[0]).write_bytes(changed)
    bucket_storage(s3).commit(sandbox, specs)
    assert s3.client().get_object(Bucket="media", Key=f"shop/{sandbox.task_id}/a.mp4")["Body"].read() == changed


def test_the_fence_stops_a_holder_before_the_object_appears(s3: S3Server, tmp_path: Path) -> None:
    sandbox, specs = staged(tmp_path, {"big.mp4": os.urandom(6 * MIB), "small.txt": b"s"})

    def lost() -> None:
        raise LeaseLost("canceled meanwhile")

    for spec in specs:
        with pytest.raises(LeaseLost):
            bucket_storage(s3).commit(sandbox, [spec], fence=lost)
    assert not s3.client().list_objects_v2(Bucket="media").get("Contents")


def test_a_wrong_secret_is_a_storage_error_that_names_the_fix(s3: S3Server, tmp_path: Path) -> None:
    sandbox, specs = staged(tmp_path, {"a.mp4": b"a"})
    storage = S3Storage(
        s3.target(), s3.access("not-the-secret"), key_template="{task_id}/{path}", client=s3.client("not-the-secret")
    )
    with pytest.raises(StorageUnavailable) as raised:
        storage.commit(sandbox, specs)
    # A refused HEAD says only 403: the error names the reason the service gives for a GET
    assert "SignatureDoesNotMatch" in str(raised.value) and "AWS_SECRET_ACCESS_KEY" in str(raised.value)
    assert raised.value.code == "s3_signaturedoesnotmatch"
    assert "not-the-secret" not in str(raised.value)


def test_a_paused_service_keeps_the_task_finalizing_until_it_answers(
    s3: S3Server, store: TaskStore, origin: Origin, receiver: Receiver, settings: Settings
) -> None:
    bucket = settings.replace(object_storage=s3.target(), s3=s3.access(), read_timeout_seconds=1.0)
    s3.pause()
    with in_process_worker(bucket, store, threads=2):
        task_id = submit_spec(spec_from_manifest({"files": [{"url": origin.put("/v", b"video"), "path": "v.mp4"}]}),
                              store)  # fmt: skip
        deadline = time.monotonic() + 20
        while (task := store.get(task_id)) is not None and not task.error and time.monotonic() < deadline:
            time.sleep(0.05)
        assert task is not None and task.state is State.FINALIZING, task
        assert (bucket.staging_dir / task_id).exists()  # the file waits in staging
        s3.resume()
        done = wait_for(store, task_id, timeout=60)
    assert done.state is State.DONE and done.attempts == 1
    assert s3.client().get_object(Bucket="media", Key=f"{task_id}/v.mp4")["Body"].read() == b"video"


def test_only_the_run_holding_the_task_records_an_upload(store: TaskStore) -> None:
    spec = spec_from_manifest({"files": [{"url": "https://cdn.example.com/v.mp4", "path": "v.mp4"}]})
    task_id, _ = store.create(spec, now=1000.0)
    claim = store.claim(task_id, worker="w", now=1001.0, lease_seconds=30, max_attempts=3)
    record = UploadRecord("k", "u1", 5 * MIB)
    assert not UploadLedger(store, task_id, claim.token).keep(0, record)  # downloading: not yet
    assert store.advance(task_id, claim.token, State.CLAIMED, State.DOWNLOADING, now=1002.0, lease_seconds=30)
    reply, token = store.finish_download(
        task_id, claim.token, now=1003.0, lease_seconds=30, progress=(1, 1, 1), finalize_limit=0
    )
    holder = UploadLedger(store, task_id, token)
    assert holder.keep(0, record) and holder.get(0) == record
    assert not UploadLedger(store, task_id, token - 1).keep(0, UploadRecord("k", "u2", 5 * MIB))
    assert holder.get(0) == record
    assert not UploadLedger(store, task_id, token - 1).forget(0) and holder.get(0) == record
    assert holder.forget(0) and holder.get(0) is None
    # Pruning the task takes its records with it
    holder.keep(1, record)
    store.cancel(task_id, now=1004.0)
    notice = store.begin_notice(task_id, None, busy_until=1005.0)  # its task.canceled, delivered
    assert store.end_notice(task_id, notice.run)
    store.prune_ended(cutoff=1004.0 + 10)
    assert not store.client.exists(f"{store.prefix}uploads:{task_id}")


def test_part_sizes_stay_under_the_part_limit() -> None:
    assert part_size_for(10 * MIB, 8 * MIB) == 8 * MIB
    assert part_size_for(4 * 1024**4, 8 * MIB) * MAX_PARTS >= 4 * 1024**4
    assert part_size_for(4 * 1024**4, 8 * MIB) % MIB == 0
    assert multipart_etag([hashlib.md5(b"a").digest()]).endswith("-1")


def test_a_bucket_is_chosen_with_the_standard_aws_variables(tmp_path: Path) -> None:
    env = {
        "HAUL_STORAGE_URL": "s3://media/shop/", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY_FILE": str(tmp_path / "secret"), "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "https://s3.example.com", "HAUL_STORAGE_KEY": "{key}/{path}",
    }  # fmt: skip
    (tmp_path / "secret").write_text(SECRET_KEY + "\n")
    settings = Settings.from_env(env)
    assert settings.object_storage is not None and settings.object_storage.describe() == "s3://media/shop"
    assert settings.s3.region == "eu-west-1" and settings.s3.secret_access_key == SECRET_KEY
    assert SECRET_KEY in secrets_of(settings) and SECRET_KEY not in repr(settings)
    assert Settings.from_env({**env, "AWS_REGION": "us-east-2"}).s3.region == "us-east-2"


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"HAUL_STORAGE_URL": "s3://media/x", "HAUL_STORAGE_DIR": "/srv"}, "keep one"),
        ({"HAUL_STORAGE_URL": "s3://AKIA:secret@media/x"}, "credentials"),
        ({"HAUL_STORAGE_URL": "s3://No_Such/x"}, "bucket name"),
        ({"HAUL_STORAGE_URL": "s3://media/a/../b"}, "'..'"),
        ({"HAUL_STORAGE_URL": "ftp://media/x"}, "s3://BUCKET/PREFIX"),
        ({"HAUL_STORAGE_URL": "file://relative/x"}, "absolute path"),
        ({"HAUL_STORAGE_KEY": "{path}"}, "must name the task"),
        ({"HAUL_STORAGE_KEY": "{task_id}/{name}/{path}"}, "it takes"),
        ({"HAUL_STORAGE_KEY": "{task_id}/{path}/x"}, "end with {path}"),
        ({"HAUL_STORAGE_KEY": "{task_id:.4}/{path}"}, "no format specs"),
        ({"HAUL_STORAGE_KEY": "{key!r}/{path}"}, "no format specs"),
        ({"HAUL_STORAGE_KEY": "{key}{path}"}, "each followed by '/'"),
        ({"HAUL_STORAGE_URL": "s3://media/x", "HAUL_S3_PART_BYTES": str(6 * 1024**3)}, "5 GiB"),
        ({"HAUL_STORAGE_URL": "s3://media/x", "HAUL_STORAGE_LINK_SECONDS": "60", "AWS_SESSION_TOKEN": "t"}, "session"),
        ({"HAUL_STORAGE_URL": "s3://media/x", "AWS_ENDPOINT_URL": "http://u:SECRET@h"}, "no credentials"),
        ({"HAUL_STORAGE_URL": "s3://media/x", "AWS_ACCESS_KEY_ID": "AKIA"}, "go together"),
        ({"HAUL_STORAGE_URL": "s3://media/x", "HAUL_STORAGE_LINK_SECONDS": "604801"}, "a week"),
        ({"HAUL_STORAGE_LINK_SECONDS": "60"}, "a local folder has no links"),
    ],
)
def test_a_bad_storage_setting_is_refused_at_start(env: dict[str, str], says: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)
    assert says in str(raised.value)


def test_a_file_url_is_the_same_as_the_storage_dir(tmp_path: Path) -> None:
    settings = Settings.from_env({"HAUL_STORAGE_URL": f"file://{tmp_path}/store"})
    assert settings.object_storage is None and settings.storage_dir == tmp_path / "store"


def test_object_keys_that_cannot_work_are_refused_at_submit(settings: Settings, store: TaskStore) -> None:
    bucket = settings.replace(
        object_storage=StorageTarget("s3", bucket="media", prefix="p"), storage_key="{key}/{path}"
    )
    client = Client(bucket, store=store, messages=ClaimsOnly())
    before = store.counts()
    url = "https://cdn.example.com/v.mp4"
    for files, key, says in (
        ([url], None, "has none; give it a key"),
        ([url], "a/b", "may not hold '/'"),
        ([{"url": url, "path": "d/" * 520 + "v.mp4"}], "k", "at most 1024"),
        ([url], ".haul-probe", "haul's own probes"),
    ):
        with pytest.raises(InvalidTask) as raised:
            client.submit(files, key=key)
        assert says in str(raised.value)
    assert store.counts() == before  # nothing stored, nothing queued
    assert client.submit([url], key="order-1")  # a plain key goes through


def finalizing(store: TaskStore) -> tuple[str, int]:
    """A task in finalizing, held by a run: its id and token."""
    spec = spec_from_manifest({"files": [{"url": "https://cdn.example.com/v.mp4", "path": "v.mp4"}]})
    task_id, _ = store.create(spec, now=time.time())
    claim = store.claim(task_id, worker="w", now=time.time(), lease_seconds=30, max_attempts=3)
    store.advance(task_id, claim.token, State.CLAIMED, State.DOWNLOADING, now=time.time(), lease_seconds=30)
    _, token = store.finish_download(
        task_id, claim.token, now=time.time(), lease_seconds=30, progress=(1, 1, 1), finalize_limit=0
    )
    return task_id, token


def test_the_supervisor_aborts_the_uploads_of_tasks_that_ended_without_finishing_them(
    s3: S3Server, store: TaskStore, settings: Settings
) -> None:
    bucket = settings.replace(object_storage=s3.target(), s3=s3.access())
    client = s3.client()
    uploads = {}
    # Given two finalizes that each started an upload and sent a part, one of whose tasks is
    # then canceled
    for task_id, token in (finalizing(store), finalizing(store)):
        key = f"{task_id}/v.mp4"
        upload = client.create_multipart_upload(Bucket="media", Key=key)["UploadId"]
        client.upload_part(Bucket="media", Key=key, UploadId=upload, PartNumber=1, Body=b"x" * MIB)
        assert UploadLedger(store, task_id, token).keep(0, UploadRecord(key, upload, 5 * MIB))
        uploads[task_id] = (token, upload)
    ended, live = list(uploads)
    store.cancel(ended, now=time.time())
    # When the supervisor's sweep runs: the ended task's upload is aborted and forgotten, the
    # live one's kept
    sup = dramatiq_supervisor(bucket, store, node_id="s")
    sup.elect()
    sup.jobs.abort_uploads()
    sup.jobs.close()
    left = [u["UploadId"] for u in client.list_multipart_uploads(Bucket="media").get("Uploads", [])]
    assert left == [uploads[live][1]]
    assert UploadLedger(store, ended, uploads[ended][0]).get(0) is None
    assert UploadLedger(store, live, uploads[live][0]).get(0) is not None
    assert store.client.smembers(f"{store.prefix}uploading") == {live.encode()}
    # A task retried after the sweep read it as ended keeps its records: they are a live run's now
    retried, token = finalizing(store)
    record = UploadRecord(f"{retried}/v.mp4", "u-9", 5 * MIB)
    assert UploadLedger(store, retried, token).keep(0, record)
    raw = store.client.hget(f"{store.prefix}uploads:{retried}", "0")
    assert raw is not None
    assert not drop_uploads(store, retried, [Abandoned("0", raw.decode() if isinstance(raw, bytes) else raw, record)])
    assert UploadLedger(store, retried, token).get(0) == record
    # ... and a local folder has no such sweep
    assert "abort_uploads" not in dramatiq_supervisor(settings, store, node_id="t").jobs.by_name()


def test_a_wrong_secret_is_reported_by_the_supervisor_before_any_task_runs(
    s3: S3Server, store: TaskStore, settings: Settings
) -> None:
    wrong = settings.replace(object_storage=s3.target("shop"), s3=s3.access("not-the-secret"))
    problems = dramatiq_supervisor(wrong, store, node_id="s").check_config()
    [storage] = [p for p in problems if "HAUL_STORAGE_URL" in p]
    assert "s3://media/shop" in storage and "SignatureDoesNotMatch" in storage and "AWS_SECRET_ACCESS_KEY" in storage
    assert "not-the-secret" not in storage
    right = settings.replace(object_storage=s3.target("shop"), s3=s3.access())
    assert not [p for p in dramatiq_supervisor(right, store, node_id="s").check_config() if "HAUL_STORAGE_URL" in p]
    assert not s3.client().list_objects_v2(Bucket="media").get("Contents")  # the probe cleaned up


def test_parts_the_service_refuses_once_are_sent_again_and_the_object_is_whole(s3: S3Server, tmp_path: Path) -> None:
    proxy = FailingPartsProxy(s3.port, {2, 3})
    try:
        data = os.urandom(16 * MIB)  # three parts of 5 MiB and one of 1 MiB
        sandbox, [spec] = staged(tmp_path, {"v.mp4": data})
        through = S3Access(region="us-east-1", endpoint_url=f"http://127.0.0.1:{proxy.port}",
                           access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)  # fmt: skip
        client = s3_client(through, 5, 30, 4)
        try:
            [entry] = S3Storage(s3.target(), through, key_template="{task_id}/{path}", part_bytes=5 * MIB,
                                client=client).commit(sandbox, [spec])  # fmt: skip
        finally:
            client.close()
        assert sorted(proxy.refused) == [2, 3] and entry["verified"] == "etag"
        assert s3.client().get_object(Bucket="media", Key=f"{sandbox.task_id}/v.mp4")["Body"].read() == data
    finally:
        proxy.close()


def test_status_shows_the_bytes_an_upload_has_stored(
    s3: S3Server, store: TaskStore, origin: Origin, receiver: Receiver, settings: Settings
) -> None:
    # While it runs: what the storage reports goes out with each renewal of the lease
    task_id, token = finalizing(store)
    keeper = LeaseKeeper(store, 30)
    with keeper.hold(task_id, token, since=time.monotonic(), stored=lambda: 12 * MIB):
        assert keeper.renew_due() == 1
    keeper.stop()
    task = store.get(task_id)
    assert task is not None and task.bytes_stored == 12 * MIB and task.bytes_done == 1  # download figures kept
    # Once done: all of it
    data = os.urandom(12 * MIB)
    bucket = settings.replace(object_storage=s3.target(), s3=s3.access(), s3_part_bytes=5 * MIB)
    with in_process_worker(bucket, store, threads=2):
        task_id = submit_spec(spec_from_manifest({"files": [{"url": origin.put("/v", data), "path": "v.mp4"}]}), store)
        done = wait_for(store, task_id)
    assert done.state is State.DONE and done.as_status()["bytes_stored"] == len(data)
