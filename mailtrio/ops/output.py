"""Human-readable output: aligned tables, durations, timestamps; and JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from mailtrio.config import format_duration


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None) -> None:
    """Columns aligned on the widest cell, two spaces apart, headers in capitals."""
    out = out or sys.stdout
    cells = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(t.ljust(w) for t, w in zip(row, widths, strict=True)).rstrip())
    out.write("\n".join(lines) + "\n")


def cell(value: Any) -> str:
    if value is None:
        return "-"
    text = " ".join(str(value).split())
    return text if len(text) <= 72 else text[:69] + "..."


def emit_json(value: Any, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def address(value: Any) -> str:
    """A recipient as the API gives it (`{"email", "name"}`) or a plain string, as its address."""
    if isinstance(value, dict):
        return str(value.get("email") or "")
    return str(value)


def recipients(value: dict[str, list[Any]] | None) -> str:
    addresses = [address(a) for part in ("to", "cc", "bcc") for a in (value or {}).get(part, [])]
    if not addresses:
        return "-"
    return addresses[0] + (f" +{len(addresses) - 1}" if len(addresses) > 1 else "")


def when(value: str | None) -> str:
    """An RFC 3339 timestamp shortened to seconds, UTC (`2026-11-29 18:20:05Z`)."""
    if not value:
        return "-"
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return value
    return ts.strftime("%Y-%m-%d %H:%M:%SZ")


def age_ms(ms: int | float | None) -> str:
    if not ms:
        return "0s"
    return format_duration(round(ms / 1000.0, 0 if ms >= 60_000 else 1))
