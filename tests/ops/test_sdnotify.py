"""systemd's notify protocol against the real `mailtrio serve`: a fake NOTIFY_SOCKET (a Unix
datagram socket of the test) receives READY=1 once the listener and every component have
started, then STOPPING=1 at shutdown, each with a STATUS= line."""

from __future__ import annotations

import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailtrio.sdnotify import Notifier
from tests.support.serve import ServeProcess


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # a short path: AF_UNIX paths are limited to about 100 bytes
    directory = Path(tempfile.mkdtemp(prefix="mt-notify-"))
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield sock, str(path)
    sock.close()
    path.unlink(missing_ok=True)
    directory.rmdir()


def receive(sock: socket.socket, within: float) -> dict[str, str]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        return dict(line.split("=", 1) for line in data.decode().splitlines())
    raise AssertionError(f"no notification within {within}s")


def test_ready_and_stopping_reach_notify_socket(service_env: dict[str, str],
                                                 notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    with ServeProcess(dict(service_env, NOTIFY_SOCKET=path)) as proc:
        ready = receive(sock, 30)
        # READY=1 comes once the listener answers and every component has said it started (the
        # log lines were written before the datagram was sent; the reader thread may lag a little)
        status, _ = proc.http("GET", "/api/v1/internal/schedule")
        assert status == 200
        for started in ("attempt worker pool started", "scheduler started", "command consumer started",
                        "sql retention worker started", "internal http listener started", "service ready"):
            proc.wait_for(started, timeout=5)
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith("ready: API on ") and "stub mode" in ready["STATUS"]
        proc.signal()
        stopping = receive(sock, 15)
        assert stopping == {"STOPPING": "1", "STATUS": "shutting down: draining attempts"}
        assert proc.wait(30) == 0
        assert "shutdown started" in proc.events()


def test_notifier_paths_and_absence() -> None:
    assert Notifier(None).notify("READY=1") is False
    name = f"mt-notify-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)  # the abstract namespace, which systemd passes as @name
        sock.settimeout(5)
        assert Notifier("@" + name).status("line one\nline two") is True
        assert sock.recv(4096) == b"STATUS=line one line two"
    # nobody listening: reported as not sent, never raised
    assert Notifier("@" + name).ready("x") is False
