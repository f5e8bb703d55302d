"""Real HTTP peers on 127.0.0.1 for tests: an origin with Range/ETag/If-Range and scripted
faults, and a webhook receiver that verifies signatures with the standardwebhooks library.
Past 300 lines: each peer's scripted faults (drops, stalls, changed files, slow answers) are
what the failure tests drive, and they are shared with ops/bench."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from standardwebhooks import Webhook


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connections that tests cut on purpose are not errors


def wait_port(port: int, what: str, *, timeout: float = 15, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something listens on 127.0.0.1:``port``; ``what`` names it in the error (a
    server ``process`` that exited fails at once)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def free_port() -> int:
    """A TCP port nothing listens on right now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Running:
    """Runs a server on a free 127.0.0.1 port in a thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = _Server(("127.0.0.1", 0), handler)
        # A connection reset between the server's select and its accept (a SIGKILLed worker's)
        # would leave a blocking accept waiting for the next client, and shutdown() with it.
        self.server.socket.settimeout(1.0)
        self.server.owner = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def signed_until(url: str) -> float:
    """When a signed URL's ``expires`` says it stops working (0 when it says nothing)."""
    values = parse_qs(urlsplit(url).query).get("expires", ["0"])
    try:
        return float(values[0])
    except ValueError:
        return 0.0


def etag_of(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:20] + '"'


@dataclass
class Fault:
    """One scripted answer. kind: 'status' (code, retry_after), 'drop' (after n body bytes),
    'stall' (after n body bytes, pause ``seconds``, then go on), 'html' (a 200 login page),
    'nolength' (the body without Content-Length, ended by closing the connection),
    'gzip' (the body gzip-coded although the client asked for identity),
    'slow_headers' (pause ``seconds`` before the status line, then the normal answer);
    to a range request, 'short' (``after`` bytes of the range, the Content-Range saying so),
    'shifted' (the range from ``after`` bytes further on, and a Content-Range saying so),
    'resized' (a Content-Range naming a size ``after`` bytes larger), 'unversioned' (no ETag);
    ``then`` runs after the answer was sent; ``midway`` runs once the body reaches ``after``
    bytes, before they go out (with 'drop': when the body is cut), e.g. to put a new version
    of the file on the origin while an old one is being sent. A ``ranged`` fault waits in the
    queue for the first request with a Range header."""

    kind: str
    code: int = 0
    after: int = 0
    seconds: float = 0.0
    retry_after: str | None = None
    then: Callable[[], object] | None = None
    midway: Callable[[], None] | None = None
    ranged: bool = False


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    method: str = "GET"
    #: When it came (epoch seconds; recorded by the test site).
    at: float = 0.0


class Origin(_Running):
    """Files by path, with strong ETags; honours Range and If-Range like nginx does."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        #: Every version ever put at each path, oldest first (bytes objects shared with ``files``).
        self.versions: dict[str, list[bytes]] = defaultdict(list)
        #: ETags of the versions whose body (whole or from an offset) was sent at least once.
        self.served_etags: dict[str, set[str]] = defaultdict(set)
        #: Bodies being sent right now, per path.
        self.in_flight: Counter[str] = Counter()
        self.redirects: dict[str, str] = {}
        self.faults: dict[str, deque[Fault]] = defaultdict(deque)
        self.served: Counter[str] = Counter()
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        #: Bytes per second each response is throttled to (None: as fast as possible); with
        #: ``shared_rate``, what all the bodies of one path get together (a link, not a cap).
        self.rate: float | None = None
        self.shared_rate = False
        #: Whether Range requests are honoured (``Accept-Ranges: bytes``).
        self.ranges = True
        #: Paths served only to a URL signed until later (``?expires=<epoch seconds>``), as a
        #: CDN's signed URLs: 403 once that time passed.
        self.expiring: set[str] = set()
        #: Requests answered 403 as expired.
        self.expired = 0
        #: A header every file request must carry (name, a text its value holds), else 403: a
        #: site behind a sign-in.
        self.required: tuple[str, str] | None = None
        #: Content types by path (else video/mp4).
        self.types: dict[str, str] = {}
        #: Bodies being sent right now, and the most at any one time.
        self.active = 0
        self.max_active = 0
        #: Random trouble for every file request: (share cut mid-body, share 503, share 429).
        self.chaos: tuple[float, float, float] | None = None
        self.rng = random.Random(7)
        super().__init__(_OriginHandler)

    def put(self, path: str, data: bytes) -> str:
        with self.lock:
            self.files[path] = data
            if not self.versions[path] or self.versions[path][-1] != data:
                self.versions[path].append(data)
        return self.url(path)

    def paths_in_flight(self) -> list[str]:
        """Paths whose body is being sent right now."""
        with self.lock:
            return sorted(path for path, n in self.in_flight.items() if n > 0)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def fault(self, path: str, *faults: Fault) -> None:
        with self.lock:
            self.faults[path].extend(faults)

    def random_fault(self, size: int) -> Fault | None:
        """Draw this request's trouble from ``chaos`` (called with the lock held)."""
        assert self.chaos is not None
        cut, unavailable, throttled = self.chaos
        draw = self.rng.random()
        if draw < cut:
            return Fault("drop", after=self.rng.randrange(0, max(1, size)))
        if draw < cut + unavailable:
            return Fault("status", code=503)
        if draw < cut + unavailable + throttled:
            return Fault("status", code=429, retry_after="1")
        return None

    def requests_for(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


class _OriginHandler(_Quiet):
    def do_HEAD(self) -> None:
        """Recorded, then refused as a signed URL refuses it: haul must never send one."""
        origin: Origin = self.server.owner  # type: ignore[attr-defined]
        with origin.lock:
            origin.requests.append(Request(self.path.split("?", 1)[0], dict(self.headers.items()), "HEAD"))
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        origin: Origin = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        with origin.lock:
            origin.requests.append(Request(path, dict(self.headers.items())))
            queued = origin.faults[path]
            ranged = "Range" in self.headers
            fault = queued.popleft() if queued and (ranged or not queued[0].ranged) else None
            data = origin.files.get(path)
            if fault is None and origin.chaos is not None and data is not None:
                fault = origin.random_fault(len(data))
        if fault is not None and fault.kind == "slow_headers":
            time.sleep(fault.seconds)  # nothing sent yet: the client waits for the status line
        if origin.required and origin.required[1] not in self.headers.get(origin.required[0], ""):
            self._status(403)
        elif path in origin.expiring and signed_until(self.path) < time.time():
            with origin.lock:
                origin.expired += 1
            self._status(403)
        elif path in origin.redirects:
            self.send_response(302)
            self.send_header("Location", origin.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif fault is not None and fault.kind == "status":
            self._status(fault.code, fault.retry_after)
        elif data is None:
            self._status(404)
        elif fault is not None and fault.kind == "html":
            page = b"<html><body>Please log in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        else:
            self._file(origin, path, data, fault)
        if fault is not None and fault.then is not None:
            fault.then()

    def _status(self, code: int, retry_after: str | None = None) -> None:
        body = f"status {code}".encode()
        self.send_response(code)
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, origin: Origin, path: str, data: bytes, fault: Fault | None) -> None:
        etag = etag_of(data)
        start, end, status = 0, len(data), 200
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        condition = self.headers.get("If-Range")
        if origin.ranges and wanted and condition in (None, etag):
            start = int(wanted[1])
            end = min(len(data), int(wanted[2]) + 1) if wanted[2] else len(data)
            if start >= len(data) or end <= start:  # as nginx answers: the size it has
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
            if fault is not None and fault.kind == "short":
                end = min(end, start + fault.after)
            elif fault is not None and fault.kind == "shifted":
                start = min(start + fault.after, end - 1)
        body = data[start:end]
        if fault is not None and fault.kind == "gzip":
            body = gzip.compress(body)
        self.send_response(status)
        self.send_header("Content-Type", origin.types.get(path, "video/mp4"))
        if fault is None or fault.kind != "unversioned":
            self.send_header("ETag", etag)
        if origin.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if fault is not None and fault.kind == "gzip":
            self.send_header("Content-Encoding", "gzip")
        if fault is not None and fault.kind == "nolength":
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        if status == 206:
            size = len(data) + (fault.after if fault is not None and fault.kind == "resized" else 0)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if fault is not None and fault.kind == "drop":
            body = body[: fault.after]
        with origin.lock:
            origin.active += 1
            origin.max_active = max(origin.max_active, origin.active)
            origin.in_flight[path] += 1
            origin.served_etags[path].add(etag)
        sending = [True]

        def ended() -> None:  # before the body's last byte: a client cannot start another before
            if sending.pop() if sending else False:
                with origin.lock:
                    origin.active -= 1
                    origin.in_flight[path] -= 1

        try:
            self._send_body(origin, path, body, fault, ended)
        finally:
            ended()

    def _send_body(
        self, origin: Origin, path: str, body: bytes, fault: Fault | None, ended: Callable[[], None]
    ) -> None:
        view = memoryview(body)
        step = 64 * 1024 if origin.rate else 256 * 1024
        midway = fault.midway if fault is not None else None
        for offset in range(0, len(view), step):
            if midway is not None and fault is not None and offset + step > fault.after:
                call, midway = midway, None
                call()
            if fault is not None and fault.kind == "stall" and offset <= fault.after < offset + step:
                time.sleep(fault.seconds)
            chunk = view[offset : offset + step]
            if origin.rate:  # pause before, not after, the chunk: the body ends with its last byte
                sharing = origin.in_flight[path] if origin.shared_rate else 1
                time.sleep(len(chunk) * sharing / origin.rate)
            if offset + step >= len(view):
                ended()
            try:
                self.wfile.write(chunk)
            except OSError:
                return  # the client went away (killed, or gave up)
            with origin.lock:
                origin.served[path] += len(chunk)
        if midway is not None:  # the body ended (or was cut) before ``after``
            midway()
        if fault is not None and fault.kind == "drop":
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)


class Site(_Running):
    """Pages by path (``pages[path] = (status, content type, body)``; ``dynamic[path]()`` makes
    a page's HTML afresh for each request), redirects by path; every request recorded (path and
    headers)."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[int, str, bytes]] = {}
        self.dynamic: dict[str, Callable[[], str]] = {}
        #: Paths whose page comes a byte a second, for ever (a peer that never lets a read time out).
        self.dripping: set[str] = set()
        #: A header every request must carry (name, a text its value holds), else 403.
        self.required: tuple[str, str] | None = None
        self.redirects: dict[str, str] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        super().__init__(_SiteHandler)

    def page(self, path: str, html: str, status: int = 200) -> str:
        self.pages[path] = (status, "text/html; charset=utf-8", html.encode())
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class _SiteHandler(_Quiet):
    def do_GET(self) -> None:
        site: Site = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        with site.lock:
            site.requests.append(Request(path, dict(self.headers.items()), at=time.time()))
        if path in site.redirects:
            self.send_response(302)
            self.send_header("Location", site.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if site.required and site.required[1] not in self.headers.get(site.required[0], ""):
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path in site.dripping:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(600):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(1)
            except OSError:
                return  # the client gave up
            return
        if path in site.dynamic:
            site.pages[path] = (200, "text/html; charset=utf-8", site.dynamic[path]().encode())
        status, content_type, body = site.pages.get(path, (404, "text/html", b"<html>not found</html>"))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    verified: bool
    answered: int
    at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def event(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


class Receiver(_Running):
    """A backend's webhook endpoint: verifies each delivery, answers scripted statuses."""

    def __init__(self, secret: str) -> None:
        self.webhook = Webhook(secret)
        self.deliveries: list[Delivery] = []
        self.statuses: deque[int] = deque()
        self.on_delivery: Callable[[Delivery], None] | None = None
        #: Random 500s (share of deliveries), and an outage: 503 until this time.
        self.fail_share = 0.0
        self.down_until = 0.0
        #: The body of every answer (a receiver that explains its refusals, or echoes too much).
        self.answer_body = b""
        #: Seconds between the answer body's bytes (0: all at once): a receiver that drips it.
        self.drip_seconds = 0.0
        self.rng = random.Random(11)
        self.lock = threading.Lock()
        super().__init__(_ReceiverHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/haul"

    def accepted(self) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.verified and 200 <= d.answered < 300]

    def received(self) -> list[Delivery]:
        """Every delivery so far, whatever it was answered."""
        with self.lock:
            return list(self.deliveries)


class _ReceiverHandler(_Quiet):
    def do_POST(self) -> None:
        receiver: Receiver = self.server.owner  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            receiver.webhook.verify(body, headers)
            verified = True
        except Exception:
            verified = False
        with receiver.lock:
            if receiver.statuses:
                answer = receiver.statuses.popleft()
            elif not verified:
                answer = 401
            elif time.time() < receiver.down_until:
                answer = 503
            elif receiver.rng.random() < receiver.fail_share:
                answer = 500
            else:
                answer = 204
        delivery = Delivery(headers, body, verified, answer)
        if receiver.on_delivery is not None:
            receiver.on_delivery(delivery)
        with receiver.lock:
            receiver.deliveries.append(delivery)
        body = b"" if answer in (204, 304) else receiver.answer_body  # those answers have no body
        self.send_response(answer)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not receiver.drip_seconds:
            self.wfile.write(body)
            return
        self.wfile.flush()
        try:
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(receiver.drip_seconds)
        except OSError:  # the sender stopped reading
            pass


def _end(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port``. Subclasses look at each chunk a
    client sends (:meth:`passes`) and may stop the connection there, leaving it open."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def passes(self, data: bytes) -> bool:
        """Whether a chunk a client sent goes on; False stops forwarding on that connection,
        both ways, while it stays open."""
        return True

    def answer(self, data: bytes) -> bytes | None:
        """A reply to send the client instead of forwarding ``data`` (the connection then
        closes), or None to forward it."""
        return None

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            stalled = threading.Event()
            threading.Thread(target=self._pump, args=(client, upstream, stalled, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, stalled, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, stalled: threading.Event, requests: bool) -> None:
        while True:
            try:
                data = source.recv(1 << 20)
            except OSError:  # reset (a killed process's socket): the other side learns it too
                _end(sink, socket.SHUT_RDWR)
                return
            if stalled.is_set():
                return
            if not data:  # closed: passed on, as a direct connection would pass it
                _end(sink, socket.SHUT_WR)
                return
            if requests and not self.passes(data):
                stalled.set()
                return
            reply = self.answer(data) if requests else None
            if reply is not None:
                stalled.set()
                try:
                    source.sendall(reply)
                finally:
                    source.close()
                    sink.close()
                return
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


class CountingProxy(TcpProxy):
    """Counts the bytes clients send through it (what the server receives, headers included)."""

    def __init__(self, target_port: int) -> None:
        self.sent = 0
        self._lock = threading.Lock()
        super().__init__(target_port)

    def passes(self, data: bytes) -> bool:
        with self._lock:
            self.sent += len(data)
        return True


class FailingPartsProxy(TcpProxy):
    """In front of an S3 server: answers ``503 Slow Down`` to the first try of each of the
    multipart upload's parts ``numbers`` (the retry goes through)."""

    def __init__(self, target_port: int, numbers: set[int]) -> None:
        self.numbers = set(numbers)
        self.refused: list[int] = []
        super().__init__(target_port)

    def answer(self, data: bytes) -> bytes | None:
        for number in list(self.numbers):
            if re.search(rb"PUT [^ ]*[?&]partNumber=%d[& ]" % number, data):
                self.numbers.discard(number)
                self.refused.append(number)
                body = b"<Error><Code>SlowDown</Code><Message>try again</Message></Error>"
                return (
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
        return None
