"""Fixtures of the foundation tests: TCP stand-ins for unreachable or hanging servers, broken
catalogs, databases without schema `mail`, and a helper that runs the CLI to completion."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import pg
from tests.support.serve import ROOT, TEMPLATES, base_env


class TcpSink:
    """A TCP listener that accepts connections and never says a word: a hung server.

    It also counts connections, which proves that a process did (or did not) touch the network.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def count(self) -> int:
        return len(self.connections)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in self.connections:
            conn.close()
        self.sock.close()


@pytest.fixture
def tcp_sink() -> Iterator[TcpSink]:
    sink = TcpSink()
    yield sink
    sink.close()


def closed_addr() -> str:
    """`127.0.0.1:port` where nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Completed:
    code: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_cli(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    timeout: float = 30.0,
    cwd: Path | None = None,
    command: Sequence[str] = (sys.executable, "-m", "mailtrio"),
) -> Completed:
    """Run `mailtrio ARGS` to completion and measure its wall time."""
    started = time.monotonic()
    proc = subprocess.run(
        [*command, *args], env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=str(cwd or ROOT)
    )
    return Completed(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def offline_env(**overrides: str) -> dict[str, str]:
    """A complete, valid stub-mode environment whose servers are nowhere (for pre-I/O checks)."""
    env = base_env(
        MAIL_REDIS_MASTER_ADDR=closed_addr(),
        MAIL_POSTGRES_PRIMARY_DSN=f"postgresql://mailservice@{closed_addr()}/mailtrio",
        MAIL_TEMPLATE_DIR=str(TEMPLATES),
        MAIL_SMTP_MODE="stub",
    )
    env.update(overrides)
    return env


@pytest.fixture
def broken_catalog(tmp_path: Path) -> tuple[Path, str]:
    """A copy of the sample catalog with a syntax error on line 3 of one file: (root, file)."""
    root = tmp_path / "templates"
    shutil.copytree(TEMPLATES, root)
    bad = root / "newsletter" / "fr" / "body.html.j2"
    lines = bad.read_text(encoding="utf-8").splitlines()
    lines[2] = "<body>{% for item in %}"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, str(bad)


@pytest.fixture
def schemaless_database() -> Iterator[str]:
    """DSN of a fresh database without schema `mail`."""
    name = f"mt_{uuid.uuid4().hex[:16]}"
    dsn = pg.create_empty(name, with_schema=False)
    yield dsn
    pg.drop(name)
