"""Fixtures of the outcome-event tests: the engine tests' SMTP server factory, and a private
redis-server with persistence that a test can stop and start again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.engine.conftest import smtp_factory
from tests.events.helpers import wait_until
from tests.support.serve import free_port

__all__ = ["persistent_redis", "smtp_factory"]


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of our own on a free port with an append-only file (fsync always), so a
    restart keeps what was added before it; stopped by PID."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (scripts/setup installs it)")
    port = free_port()
    directory = tmp_path / "redis"
    directory.mkdir()

    class Server:
        proc: subprocess.Popen[bytes] | None = None
        addr = f"127.0.0.1:{port}"

        def start(self) -> None:
            self.proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                 "--appendfsync", "always", "--dir", str(directory)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            client = self.client()
            wait_until(lambda: _pings(client), timeout=15, what="private redis up")
            client.close()

        def stop(self) -> None:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)

        def client(self) -> redis.Redis:
            return redis.Redis(port=port, socket_timeout=10)

    server = Server()
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
