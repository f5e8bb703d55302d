"""Webhook signing and delivery against a real receiver: rotation, stable ids, the verify command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.errors import ForbiddenDestination, WebhookUndelivered
from actors.manifest import spec_from_urls
from actors.netguard import DestinationPolicy
from actors.store import TaskStore
from actors.webhook import COMPLETED, WebhookSender, make_event
from tests.conftest import WEBHOOK_SECRET
from tests.servers import Receiver

pytestmark = pytest.mark.fast

NEW_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="


def event_for(store: TaskStore) -> tuple[str, object]:
    task_id, _ = store.create(spec_from_urls(["https://cdn.example.com/a.mp4"], name="A"), now=time.time())
    task = store.get(task_id)
    assert task is not None
    return task_id, make_event(task, COMPLETED, [], None, time.time())


def test_rotation_signs_with_every_secret_so_either_verifies(store: TaskStore) -> None:
    task_id, event = event_for(store)
    for receiver_secret in (WEBHOOK_SECRET, NEW_SECRET):
        receiver = Receiver(receiver_secret)
        try:
            sender = WebhookSender((WEBHOOK_SECRET, NEW_SECRET), DestinationPolicy(True), timeout=(2, 5))
            sender.deliver(receiver.url, event, now=time.time(), task_id=task_id)  # type: ignore[arg-type]
            [delivery] = receiver.accepted()
            assert len(delivery.headers["webhook-signature"].split(" ")) == 2
            assert WEBHOOK_SECRET not in repr(delivery.headers) + delivery.body.decode()
        finally:
            receiver.close()


def test_retries_keep_the_id_and_give_up_with_a_clear_error(store: TaskStore, receiver: Receiver) -> None:
    task_id, event = event_for(store)
    receiver.statuses.extend([500] * 10)
    sender = WebhookSender((WEBHOOK_SECRET,), DestinationPolicy(True), timeout=(2, 5), backoff_seconds=0.01)
    with pytest.raises(WebhookUndelivered, match="answered 500") as info:
        sender.deliver(receiver.url, event, now=time.time(), task_id=task_id)  # type: ignore[arg-type]
    assert len(receiver.deliveries) == 5 and len({d.id for d in receiver.deliveries}) == 1
    assert WEBHOOK_SECRET not in str(info.value)


def test_a_webhook_to_a_private_address_is_refused(store: TaskStore) -> None:
    task_id, event = event_for(store)
    sender = WebhookSender((WEBHOOK_SECRET,), DestinationPolicy(False), timeout=(2, 5))
    with pytest.raises(ForbiddenDestination):
        sender.deliver("http://169.254.169.254/hook", event, now=time.time(), task_id=task_id)  # type: ignore[arg-type]


def test_haul_webhook_verify(store: TaskStore, receiver: Receiver, tmp_path: Path) -> None:
    task_id, event = event_for(store)
    sender = WebhookSender((WEBHOOK_SECRET,), DestinationPolicy(True), timeout=(2, 5))
    sender.deliver(receiver.url, event, now=time.time(), task_id=task_id)  # type: ignore[arg-type]
    [delivery] = receiver.deliveries
    body = tmp_path / "body.json"
    body.write_bytes(delivery.body)
    headers = [f"{k}: {delivery.headers[k]}" for k in ("webhook-id", "webhook-timestamp", "webhook-signature")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAUL_WEBHOOK")}

    def verify(secret: str, body_path: Path) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "supervisor.cli", "webhook", "verify", "--body", str(body_path)]
        for header in headers:
            argv += ["--header", header]
        return subprocess.run(argv, env={**env, "HAUL_WEBHOOK_SECRET": secret}, capture_output=True, text=True)

    good = verify(f"{NEW_SECRET} {WEBHOOK_SECRET}", body)
    assert good.returncode == 0 and "secret #2" in good.stdout
    tampered = tmp_path / "tampered.json"
    tampered.write_bytes(delivery.body.replace(b'"A"', b'"B"'))
    bad = verify(WEBHOOK_SECRET, tampered)
    assert bad.returncode == 1 and "No matching signature" in bad.stderr
    assert WEBHOOK_SECRET not in bad.stderr + good.stdout


def test_a_receiver_dripping_its_answer_body_cannot_hold_the_thread(store: TaskStore) -> None:
    import socket
    import threading

    from actors.interrupt import Interrupter, interruptible

    # Given a receiver that accepts (200) and then drips a long body a byte every 0.2 s ...
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            for _ in range(100):
                try:
                    conn.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.2)

    threading.Thread(target=serve, daemon=True).start()
    sender = WebhookSender((WEBHOOK_SECRET,), DestinationPolicy(True), timeout=(2, 5))
    _, event = event_for(store)
    stop = Interrupter()
    threading.Timer(1.0, stop.fire).start()
    started = time.monotonic()
    try:
        # When the run's guard fires (a stop, a lost lease, a step past its deadline) ...
        with interruptible(stop.guard):
            sender.deliver(f"http://127.0.0.1:{port}/hook", event, now=time.time(), task_id="t")  # type: ignore[arg-type]
    finally:
        server.close()
    # ... the delivery, accepted by its status, returns at once instead of after 20 s of drip
    assert time.monotonic() - started < 5
