"""The fault drill, small: three instances, SIGKILLs, a Redis and a PostgreSQL restart, an SMTP
server that defers and drops. Nothing lost, no duplicate without an interrupted attempt, nothing
left pending, every malformed command quarantined with its code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_small_drill_loses_nothing_and_duplicates_nothing_unexplained(tmp_path: Path) -> None:
    out = tmp_path / "drill.json"
    done = subprocess.run([str(ROOT / "scripts" / "drill"), "--small", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert out.exists(), done.stderr[-4000:]
    r = json.loads(out.read_text())
    summary = {k: v for k, v in r.items() if k not in ("events", "status_counts")}

    # the faults really happened
    events = [e["event"] for e in r["events"]]
    assert "SIGKILL" in events
    assert "redis: restarted from the AOF" in events
    assert "postgres: restarted (WAL recovery)" in events
    assert "SIGSTOP" in events and "SIGCONT" in events
    assert r["poison_commands"] > 0 and r["poison_final"] == r["poison_commands"], summary
    assert r["poison_sent_twice"] == 0, summary
    assert r["server"].get("deferred", 0) > 0, summary

    assert r["deliveries_expected"] > 0
    assert r["lost"] == 0, summary
    assert r["unexplained_duplicates"] == 0, summary
    assert r["pending"] == 0, summary
    assert r["delivered_exactly_once"] + r["duplicates"] == r["deliveries_expected"], summary
    assert r["malformed_recorded"] == r["malformed_expected"], summary
    assert r["malformed_wrong_code"] == 0 and r["well_formed_quarantined"] == 0, summary
    assert r["unexpected_at_server"] == 0 and r["message_id_changed_between_attempts"] == 0, summary
    assert r["scheduled_sent_early"] == 0, summary
    # a graceful stop is a clean exit; nothing but the deliberate kills ended an instance
    assert all(e["code"] == 0 for e in r["sigterm_exits"]), r["sigterm_exits"]
    assert r["alive_at_end"] and all(r["alive_at_end"].values()), summary
    assert r["unexpected_exits"] == [], summary
    assert r["ok"] and done.returncode == 0, summary
