"""A local Sentry endpoint: accepts envelopes on 127.0.0.1 and keeps them for tests to read."""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from typing import Any

from tests.servers import _Quiet, _Running


class SentrySink(_Running):
    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.items: list[tuple[dict[str, Any], Any]] = []
        self.lock = threading.Lock()
        super().__init__(_SinkHandler)

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.port}/1"

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [payload for header, payload in self.items if header.get("type") == "event"]

    def check_ins(self) -> list[dict[str, Any]]:
        with self.lock:
            return [payload for header, payload in self.items if header.get("type") == "check_in"]

    def all_bytes(self) -> bytes:
        with self.lock:
            return b"\n".join(self.raw)


class _SinkHandler(_Quiet):
    def do_POST(self) -> None:
        sink: SentrySink = self.server.owner  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        lines = body.split(b"\n")
        items = []
        index = 1
        while index < len(lines):
            if not lines[index].strip():
                index += 1
                continue
            header = json.loads(lines[index])
            payload_line = lines[index + 1] if index + 1 < len(lines) else b"{}"
            try:
                payload = json.loads(payload_line)
            except ValueError:
                payload = payload_line
            items.append((header, payload))
            index += 2
        with sink.lock:
            sink.raw.append(body)
            sink.items.extend(items)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
