"""The API client's address rules and output helpers (no network)."""

from __future__ import annotations

import io

import pytest

from mailtrio.ops import output
from mailtrio.ops.client import UsageError, base_url


@pytest.mark.parametrize(("addr", "url"), [
    ("127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("0.0.0.0:9000", "http://127.0.0.1:9000"),
    ("[::]:9000", "http://[::1]:9000"),
    ("[::1]:8080", "http://[::1]:8080"),
    ("api.internal:80", "http://api.internal:80"),
    ("https://mail.example.com/", "https://mail.example.com"),
])
def test_base_url(addr: str, url: str) -> None:
    assert base_url(addr) == url


def test_bad_address_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        base_url("8080")


def test_table_aligns_and_shortens() -> None:
    out = io.StringIO()
    output.table(["id", "status"], [["a", "sent"], ["bbbb", None], ["c", "x" * 100]], out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "ID    STATUS"
    assert lines[1] == "a     sent"
    assert lines[2] == "bbbb  -"
    assert lines[3] == "c     " + "x" * 69 + "..."
    assert output.recipients({"to": [{"email": "a@x.org", "name": "A"}], "cc": ["b@x.org"], "bcc": []}) == "a@x.org +1"
    assert output.when("2026-11-29T18:20:05.123Z") == "2026-11-29 18:20:05Z"
    assert output.age_ms(0) == "0s" and output.age_ms(1500) == "1.5s" and output.age_ms(125_000) == "2m5s"
