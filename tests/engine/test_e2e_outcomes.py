"""Each classification path end to end: `mailtrio serve` against the real SMTP test server."""

from __future__ import annotations

from collections.abc import Callable

from tests.engine import helpers as h
from tests.engine.conftest import SMTP_PASSWORD, smtp_env
from tests.support.serve import ServeProcess
from tests.support.smtpserver import SmtpTestServer

RULES = [
    {"match": r"^defer@", "action": "defer"},
    {"match": r"^reject@", "action": "reject"},
    {"match": r"^suppress@", "action": "suppress"},
    {"match": r"^full@", "action": "rcpt552"},
    {"match": r"^data-defer@", "action": "data_defer"},
    {"match": r"^data-reject@", "action": "data_reject"},
    {"match": r"^data-suppress@", "action": "data_suppress"},
    {"match": r"^stall@", "action": "stall", "stall_s": 5},
    {"match": r"^drop@", "action": "drop"},
]


def test_every_outcome_path_through_serve(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory(rules=RULES)
    env = smtp_env(service_env, server, MAIL_SMTP_TIMEOUT="1s", MAIL_RETRY_LADDER="100ms")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    cases = {
        "ok": ("ok@example.com", "sent", "provider_accepted"),
        "defer": ("defer@example.com", "dead_letter", "provider_deferred"),
        "reject": ("reject@example.com", "failed", "provider_rejected"),
        "suppress": ("suppress@example.com", "suppressed", "provider_rejected"),
        "full": ("full@example.com", "dead_letter", "provider_deferred"),
        "data-defer": ("data-defer@example.com", "dead_letter", "provider_deferred"),
        "data-reject": ("data-reject@example.com", "failed", "provider_rejected"),
        "data-suppress": ("data-suppress@example.com", "suppressed", "provider_rejected"),
        "stall": ("stall@example.com", "dead_letter", "timed_out"),
        "drop": ("drop@example.com", "dead_letter", "transport_failed"),
    }
    h.insert(dsn, [h.delivery(f"case-{name}", to=[addr]) for name, (addr, _, _) in cases.items()])
    with ServeProcess(env) as proc:
        proc.wait_ready()
        rows = h.wait_status(dsn, [f"case-{n}" for n in cases], timeout=30)
        for name, (_addr, status, attempt_status) in cases.items():
            row = rows[f"case-{name}"]
            atts = h.attempts(dsn, f"case-{name}")
            assert row["status"] == status, (name, row["status"], row["status_reason"], atts)
            assert atts and atts[-1]["status"] == attempt_status, (name, atts)
            assert [a["attempt_no"] for a in atts] == list(range(1, len(atts) + 1))
            assert row["attempt_count"] == len(atts)
            if status == "sent":
                assert row["status_reason"] is None and len(atts) == 1
            else:
                assert row["status_reason"] == atts[-1]["provider_summary"]
            if status == "dead_letter":
                assert len(atts) == 2  # one retry on a one-step ladder, then the dead letter
                dl = h.query(dsn, "SELECT * FROM mail.dead_letters WHERE delivery_id = %s", [f"case-{name}"])
                assert len(dl) == 1 and atts[-1]["provider_summary"] in dl[0]["reason"]
            if attempt_status == "timed_out":
                # the server stalls after the message: the attempt says where it was cut short
                # and that the server may hold the message (RFC 1047)
                for a in atts:
                    assert a["details"]["phase"] == "message" and a["details"]["handed_over"] is True, a
                    assert "the server may have accepted it" in a["provider_summary"], a
            else:
                assert all("handed_over" not in (a["details"] or {}) for a in atts), (name, atts)
            for a in atts:
                assert SMTP_PASSWORD not in (a["provider_summary"] or "")
                assert a["instance_id"] == env["MAIL_INSTANCE_ID"]
                assert a["finished_at"] >= a["started_at"]
        assert proc.stop() == 0
    accepted = server.accepted_by_message_id()
    ok = h.deliveries(dsn, ["case-ok"])["case-ok"]
    assert len(accepted[ok["message_id"]]) == 1
