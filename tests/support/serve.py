"""Run the real `mailtrio serve` process in tests: start, read its JSON log, signal, wait."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port free now, for a server started later. Taken below the kernel's ephemeral
    range: a port from bind(0) comes from that range, where any outgoing connection made meanwhile
    (to PostgreSQL, Redis, a proxy) may take it before the server binds it."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randint(10000, max(10001, low - 1))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(**overrides: str) -> dict[str, str]:
    """The parent environment without any MAIL_* or OTEL_* variable, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAIL_", "OTEL_"))}
    env.update(overrides)
    return env


class ServeProcess:
    """One `python -m mailtrio <args>` process with its stdout parsed as JSON log lines."""

    def __init__(self, env: Mapping[str, str], args: tuple[str, ...] = ("serve",), *,
                 command: tuple[str, ...] = (sys.executable, "-m", "mailtrio"), cwd: Path = ROOT) -> None:
        self.env = dict(env)
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [*command, *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(cwd),
        )
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.raw.append(line.rstrip("\n"))
                try:
                    parsed = json.loads(line)
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict):
                    self.lines.append(parsed)
                self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.stderr += line
                self._cond.notify_all()

    @property
    def http_addr(self) -> str:
        return self.env.get("MAIL_INTERNAL_HTTP_ADDR", "127.0.0.1:8080")

    def events(self) -> list[str]:
        with self._cond:
            return [str(line.get("event")) for line in self.lines]

    def find(self, event: str) -> list[dict[str, Any]]:
        with self._cond:
            return [line for line in self.lines if line.get("event") == event]

    def wait_for(self, event: str, timeout: float = 15.0, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if line.get("event") == event]
                if len(found) >= count:
                    return found[count - 1]
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"process exited ({self.proc.returncode}) before {event!r}; "
                        f"stderr: {self.stderr[-2000:]}; log tail: {self.raw[-20:]}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting for {event!r}; log tail: {self.raw[-20:]}")
                self._cond.wait(min(remaining, 0.2))

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the listener is bound and every service has started."""
        self.wait_for("service ready", timeout)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        self._err_reader.join(5)
        return code

    def stop(self, timeout: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def http(self, method: str, path: str, body: Any = None,
             headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> tuple[int, Any]:
        """One HTTP request to the internal API; returns (status, parsed JSON or text)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://{self.http_addr}{path}", data=data, method=method,
                                     headers=dict(headers or {}))
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload.decode(errors="replace")

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, exc_type: object = None, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if exc_type is not None:
            # A failing test shows what the service said last (pytest prints captured output).
            with self._cond:
                tail, err = self.raw[-400:], self.stderr[-4000:]
            print(f"--- service log, last {len(tail)} lines ---", *tail, "--- service stderr ---", err, sep="\n")
