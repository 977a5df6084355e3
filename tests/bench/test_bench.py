"""`scripts/bench --quick` keeps working: it completes and reports a number for every figure.

Speed is never asserted here (the machine is shared); correctness of what the bench observed is:
every command got its outcome, every delivery reached the sink.
"""

from __future__ import annotations

import json
import subprocess
import sys
from numbers import Real
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import harness, postfix  # noqa: E402


def _number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@pytest.mark.slow
def test_quick_bench_reports_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([str(ROOT / "scripts" / "bench"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert out.exists(), done.stderr[-3000:]
    doc = json.loads(out.read_text())
    scenarios = doc["scenarios"]
    assert set(scenarios) == {"intake", "e2e", "latency", "fairness"}
    for name, res in scenarios.items():
        assert "error" not in res, (name, res, done.stderr[-3000:])
        assert _number(res["peak_rss_mb"]), name
        assert res["exit_code"] == 0, (name, res)
        assert 0.0 <= res["machine_steal_share"] <= res["machine_busy_share"] <= 1.0, (name, res)

    intake = scenarios["intake"]
    assert _number(intake["commands_per_s"]) and intake["commands_per_s"] > 0
    assert intake["outcomes_match"], intake

    e2e = scenarios["e2e"]
    for key in ("deliveries_per_s", "smtp_source_msgs_per_s", "ratio_to_smtp_source"):
        assert _number(e2e[key]) and e2e[key] > 0, (key, e2e)
    assert e2e["sent"] == e2e["deliveries"] == e2e["attempts_accepted"]
    assert e2e["sink_accepted"] >= e2e["deliveries"]

    latency = scenarios["latency"]
    loads = [k for k, v in latency.items() if isinstance(v, dict)]
    assert loads == [str(x) for x in doc["meta"]["sizes"]["loads"]]
    for load in loads:
        lr = latency[load]
        assert lr["missing"] == 0, (load, lr)
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            assert _number(lr[key]), (load, key, lr)
        assert lr["p50_ms"] <= lr["p95_ms"] <= lr["p99_ms"]

    fairness = scenarios["fairness"]
    assert fairness["missing"] == 0, fairness
    for key in ("auth_p50_ms", "auth_p99_ms", "notification_waiting_at_start"):
        assert _number(fairness[key]), (key, fairness)

    # the table names every scenario
    for name in scenarios:
        assert name in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(postfix.unavailable() is not None, reason=str(postfix.unavailable()))
def test_quick_mta_scenario_sends_everything_through_postfix(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([str(ROOT / "scripts" / "bench"), "--quick", "--scenarios", "mta", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert out.exists(), done.stderr[-3000:]
    doc = json.loads(out.read_text())
    mta = doc["scenarios"]["mta"]
    assert "error" not in mta, (mta, done.stderr[-3000:])
    n = doc["meta"]["sizes"]["mta"]
    # every delivery sent, its accepted attempt durable; the naive sender sent as many
    assert mta["deliveries"] == mta["sent"] == mta["attempts_accepted"] == n
    assert mta["smtplib_sent"] == n and mta["smtplib_errors"] == [], mta
    for key in ("deliveries_per_s", "smtplib_msgs_per_s", "ratio_to_smtplib", "peak_rss_mb"):
        assert _number(mta[key]) and mta[key] > 0, (key, mta)
    assert mta["exit_code"] == 0, mta
    assert "ratio mailtrio/smtplib" in done.stdout


def test_peer_result_line_is_read_as_numbers() -> None:
    line = ("post_office N=5000 queue_s=8.108 send_s=11.592 msgs_per_s=431.3 sink_count=5000 queue_fn=send "
            "processes=default sent_rows=5000 failed_rows=0 empty_cmd_s=0.606")
    res = harness.parse_peer_line(line)
    assert res["N"] == 5000 and res["sent_rows"] == 5000 and res["failed_rows"] == 0
    assert res["msgs_per_s"] == 431.3 and res["send_s"] == 11.592
    assert res["queue_fn"] == "send" and res["processes"] == "default"
    assert res["line"] == line


def test_peers_dir_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(harness.HarnessError, match=r"post_office/run\.sh missing"):
        harness.peers_dir(str(tmp_path))
