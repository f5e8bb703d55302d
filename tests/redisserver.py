"""A throwaway redis-server on a free port, for the suite and for tests that restart, roll back
or replicate one."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.servers import free_port


class RedisServer:
    """A throwaway redis-server in a temporary folder."""

    def __init__(
        self, folder: Path, *, appendonly: bool = False, password: str | None = None, port: int | None = None
    ) -> None:
        self.folder = folder
        self.appendonly = appendonly
        self.password = password
        self.port = port or free_port()  # an explicit port: restart another process's Redis data
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed; run ops/setup (apt-get install redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "always",
                *(["--requirepass", self.password] if self.password else []),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, password=self.password)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the append-only file already holds survives."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def snapshot(self, dest: Path) -> Path:
        """Copy the data as it stands now into ``dest`` (for :meth:`restore`): the append-only
        folder, or with RDB only a fresh SAVE. Every write acknowledged before the call is in it
        (appendfsync always); a write racing the copy may be in it or not, never half of one
        (Redis drops a truncated tail on load)."""
        client = redis.Redis(port=self.port, password=self.password)
        try:
            if not self.appendonly:
                client.save()
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.folder / "dump.rdb", dest / "dump.rdb")
                return dest
            folder = self.folder / "appendonlydir"
            manifest = folder / "appendonly.aof.manifest"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                # An AOF rewrite replaces the files and then deletes the old ones: copy between two.
                if not self._rewriting(client):
                    listed = manifest.read_bytes()
                    shutil.rmtree(dest, ignore_errors=True)
                    try:
                        shutil.copytree(folder, dest / "appendonlydir")
                    except (OSError, shutil.Error):
                        pass  # a file went away mid-copy: a rewrite ended; copy again
                    else:
                        if manifest.read_bytes() == listed and not self._rewriting(client):
                            return dest
                time.sleep(0.05)
            raise RuntimeError(f"no copy of {folder} between two AOF rewrites in 30s")
        finally:
            client.close()

    @staticmethod
    def _rewriting(client: redis.Redis) -> bool:
        info = client.info("persistence")
        return bool(info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"])

    def restore(self, copy: Path) -> None:
        """SIGKILL the server and start it again, on the same port, from ``copy`` (made by
        :meth:`snapshot`): every write since the copy is lost, as when a host crashes with
        AOF everysec, Redis restarts from an older backup or RDB snapshot, or a replica that
        had not caught up is promoted."""
        self.kill()
        for name in ("appendonlydir", "dump.rdb"):
            path = self.folder / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        for item in copy.iterdir():
            if item.is_dir():
                shutil.copytree(item, self.folder / item.name)
            else:
                shutil.copy2(item, self.folder / item.name)
        self.start()
