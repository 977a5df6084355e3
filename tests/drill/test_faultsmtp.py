"""The drill's SMTP server does what the drill counts on: 451 on a first attempt when told to,
250 on the retry of the same Message-ID, a dropped connection after DATA, and a record of each."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.support.serve import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "scripts" / "benchlib" / "faultsmtp.py"


def _message(delivery_id: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "drill@example.com"
    msg["To"] = "reader@example.com"
    msg["Subject"] = "hello"
    msg["Message-ID"] = f"<{delivery_id}.abc@example.com>"
    msg["X-Drill-Delivery"] = delivery_id
    msg.set_content("body")
    return msg


def _server(tmp_path: Path, *flags: str) -> Iterator[tuple[int, Path]]:
    port = free_port()
    record = tmp_path / f"record-{port}.jsonl"
    proc = subprocess.Popen([sys.executable, str(SERVER), "--port", str(port), "--record", str(record), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "listening" in line, line
        yield port, record
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def deferring(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    yield from _server(tmp_path, "--defer-first", "100", "--drop", "0")


@pytest.fixture
def dropping(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    yield from _server(tmp_path, "--defer-first", "0", "--drop", "100")


def _records(path: Path) -> list[dict[str, object]]:
    deadline = time.monotonic() + 5
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_first_attempt_deferred_retry_accepted(deferring: tuple[int, Path]) -> None:
    port, record = deferring
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.send_message(_message("d-1"))
        assert info.value.smtp_code == 451
        client.rset()
        client.send_message(_message("d-1"))  # same Message-ID: not a first attempt any more
    kinds = [(r["kind"], r["delivery_id"]) for r in _records(record)]
    assert kinds == [("deferred", "d-1"), ("accepted", "d-1")]


def test_connection_dropped_after_data_is_not_a_delivery(dropping: tuple[int, Path]) -> None:
    port, record = dropping
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    try:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.send_message(_message("d-2"))
    finally:
        client.close()
    assert [r["kind"] for r in _records(record)] == ["dropped"]
