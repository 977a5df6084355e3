"""Per-recipient outcomes end to end (mailtrio serve against the SMTP test server): a deferred
recipient is retried alone with the same Message-ID while an accepted one is never sent the
message twice; a refused one beside an accepted one is named; the delivery is final only when
every recipient is; the API shows each recipient's outcome, also when listing by recipient; an
operator's retry goes to the recipients not accepted only."""

from __future__ import annotations

from collections.abc import Callable

from tests.engine import helpers as h
from tests.engine.conftest import smtp_env
from tests.support.serve import ServeProcess
from tests.support.smtpserver import SmtpTestServer

API = "/api/v1/internal"


def test_each_recipient_has_its_own_outcome(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory(rules=[
        {"match": "^later@", "action": "defer", "times": 1},
        {"match": "^never@", "action": "defer"},
        {"match": "^unknown@", "action": "reject"},
    ])
    env = smtp_env(service_env, server, MAIL_RETRY_LADDER="200ms,200ms")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    h.insert(dsn, [
        h.delivery("mix-defer", to=["first@example.com"], cc=["later@example.com"]),
        h.delivery("mix-reject", to=["first@example.com", "unknown@example.com"]),
        h.delivery("mix-dead", to=["first@example.com"], bcc=["never@example.com"]),
        h.delivery("all-refused", to=["unknown@example.com", "never@example.com"]),
        h.delivery("single", to=["solo@example.com"]),
    ])
    with ServeProcess(env) as proc:
        proc.wait_ready()
        rows = h.wait_status(dsn, ["mix-defer", "mix-reject", "mix-dead", "all-refused", "single"])
        _, defer_json = proc.http("GET", f"{API}/deliveries/mix-defer")
        _, dead_json = proc.http("GET", f"{API}/deliveries/mix-dead")
        _, single_json = proc.http("GET", f"{API}/deliveries/single")
        _, listing = proc.http("GET", f"{API}/deliveries?recipient=NEVER@example.com")
        # an operator's retry of the dead letter goes to the recipient not accepted, alone
        server_before = len(server.events())
        status, _ = proc.http("POST", f"{API}/deliveries/mix-dead/retry")
        assert status == 202
        retried = h.wait_status(dsn, ["mix-dead"], statuses=("dead_letter",), timeout=30)
        assert proc.stop() == 0

    by_mid: dict[str, list[list[str]]] = {}
    for e in server.accepted():
        by_mid.setdefault(e["message_id"], []).append(e["rcpt_tos"])

    # 250 + 450: the deferred recipient alone is retried with the same Message-ID, then sent
    assert rows["mix-defer"]["status"] == "sent" and rows["mix-defer"]["status_reason"] is None
    assert by_mid[rows["mix-defer"]["message_id"]] == [["first@example.com"], ["later@example.com"]]
    assert [a["status"] for a in h.attempts(dsn, "mix-defer")] == ["provider_accepted", "provider_accepted"]
    assert [(o["email"], o["status"], o["attempt_no"]) for o in defer_json["recipient_outcomes"]] == [
        ("first@example.com", "accepted", 1), ("later@example.com", "accepted", 2)]

    # 250 + 550: sent, the refused recipient named, one attempt
    assert rows["mix-reject"]["status"] == "sent"
    assert rows["mix-reject"]["status_reason"] == ("1 of 2 recipients accepted; refused: unknown@example.com "
                                                   "(550 5.1.1 User unknown)")
    assert len(h.attempts(dsn, "mix-reject")) == 1
    assert [o["status"] for o in rows["mix-reject"]["recipient_outcomes"]] == ["accepted", "rejected"]

    # 250 + always 450: the ladder runs out for the deferred one; the accepted one got it once
    assert dead_json["status"] == "dead_letter" and dead_json["dead_letter"] is not None
    assert [(o["email"], o["status"]) for o in dead_json["recipient_outcomes"]] == [
        ("first@example.com", "accepted"), ("never@example.com", "dead_letter")]
    assert dead_json["recipient_outcomes"][1]["reply"] == "451 4.3.0 Temporary local problem, try again later"
    assert dead_json["dead_letter"]["reason"].startswith("retry ladder exhausted after 3 attempts: 1 of 2 recipients "
                                                         "accepted; not delivered: never@example.com (451 ")
    mid = rows["mix-dead"]["message_id"]
    assert by_mid.get(mid) == [["first@example.com"]]

    # nobody accepted; a deferral among the refusals keeps it on the ladder until that runs out
    assert rows["all-refused"]["status"] == "dead_letter"
    assert [o["status"] for o in rows["all-refused"]["recipient_outcomes"]] == ["rejected", "dead_letter"]

    # one recipient accepted at once: nothing stored, the API derives it
    assert rows["single"]["status"] == "sent" and rows["single"]["recipient_outcomes"] is None
    assert single_json["recipient_outcomes"] == [
        {"email": "solo@example.com", "status": "accepted", "reply": None, "attempt_no": 1}]

    # the listing by recipient shows what became of that recipient
    items = {i["delivery_id"]: i for i in listing["items"]}
    assert set(items) == {"mix-dead", "all-refused"}
    assert {o["email"]: o["status"] for o in items["mix-dead"]["recipient_outcomes"]}["never@example.com"] \
        == "dead_letter"

    # the operator's retry: never@ tried again on a fresh ladder, first@ never sent it again
    assert retried["mix-dead"]["status"] == "dead_letter" and retried["mix-dead"]["attempt_count"] == 6
    later = [e for e in server.events()[server_before:] if e.get("address") == "never@example.com"]
    assert len(later) == 3
    assert by_mid.get(mid) == [["first@example.com"]]
