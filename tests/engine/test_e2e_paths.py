"""Rendering, addressing, stub mode and connection failures end to end through `mailtrio serve`."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from pathlib import Path

from tests.engine import helpers as h
from tests.engine.conftest import smtp_env
from tests.support.serve import ServeProcess
from tests.support.smtpserver import SmtpTestServer, make_certs


def test_render_failure_fails_the_delivery_and_sends_nothing(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory()
    env = smtp_env(service_env, server)
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    h.insert(dsn, [
        h.delivery("undefined-var", template_id="newsletter", variables={"title": "T"}),  # no `intro`
        h.delivery("blank-subject", mode="rendered", subject="   ", text="body"),
        h.delivery("fine", template_id="newsletter", variables={"title": "T", "intro": "I"}),
    ])
    with ServeProcess(env) as proc:
        proc.wait_ready()
        rows = h.wait_status(dsn, ["undefined-var", "blank-subject", "fine"])
        assert proc.stop() == 0
    assert rows["fine"]["status"] == "sent"
    for did in ("undefined-var", "blank-subject"):
        assert rows[did]["status"] == "failed", rows[did]
        assert rows[did]["status_reason"].startswith("render_failed: ")
        assert h.attempts(dsn, did) == []
    assert "intro" in rows["undefined-var"]["status_reason"]
    assert [e["rcpt_tos"] for e in server.accepted()] == [["someone@example.com"]]
    failed_lines = proc.find("delivery failed: render failed")
    assert {line["delivery_id"] for line in failed_lines} == {"undefined-var", "blank-subject"}


def test_message_shape_at_the_server(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory()
    env = smtp_env(service_env, server)
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    h.insert(dsn, [
        h.delivery(
            "shaped", mode="rendered", subject="Hello Zoë", text="Plain ✓", html="<p>Rich ✓</p>",
            to=[{"email": "to@example.com", "name": "Zoë T"}], cc=["cc@example.com"], bcc=["hidden@example.com"],
            reply_to={"email": "reply@example.com", "name": "Support"},
            headers={"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@example.com>"}, locale="fr-CA",
        ),
        h.delivery("fallback", template_id="login-code", locale="pt-BR", variables={"code": "777"}),
        h.delivery("fallback-default", template_id="login-code", locale="de-AT", variables={"code": "888"}),
    ])
    with ServeProcess(env) as proc:
        proc.wait_ready()
        rows = h.wait_status(dsn, ["shaped", "fallback", "fallback-default"])
        assert proc.stop() == 0
    assert {r["status"] for r in rows.values()} == {"sent"}
    by_mid = server.accepted_by_message_id()
    [shaped] = by_mid[rows["shaped"]["message_id"]]
    assert sorted(shaped["rcpt_tos"]) == ["cc@example.com", "hidden@example.com", "to@example.com"]
    assert shaped["mail_from"] == "no-reply@mailtrio.test"
    raw = shaped["data"].encode("utf-8", "surrogateescape")
    assert b"hidden@example.com" not in raw
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == "Hello Zoë"
    assert msg["Message-ID"] == rows["shaped"]["message_id"]
    assert msg["Content-Language"] == "fr-CA"
    assert msg["Cc"] == "cc@example.com" and msg["Reply-To"] == "Support <reply@example.com>"
    assert msg["X-Campaign"] == "spring" and msg["List-Unsubscribe"] == "<mailto:u@example.com>"
    assert msg["Date"] is not None and msg.get_content_type() == "multipart/alternative"
    assert [p.get_content().strip() for p in msg.iter_parts()] == ["Plain ✓", "<p>Rich ✓</p>"]
    # locale fallback: pt-BR exists; de-AT -> de -> default en
    assert rows["fallback"]["resolved_locale"] == "pt-BR" and rows["fallback-default"]["resolved_locale"] == "en"
    [pt] = by_mid[rows["fallback"]["message_id"]]
    pt_msg = email.message_from_bytes(pt["data"].encode("utf-8", "surrogateescape"), policy=email.policy.default)
    assert pt_msg["Subject"] == "Seu código de acesso: 777" and pt_msg["Content-Language"] == "pt-BR"
    # the content is stored once, as sent
    stored = h.query(dsn, "SELECT * FROM mail.payloads WHERE delivery_id = 'shaped'")[0]
    assert (stored["subject"], stored["text_body"], stored["html_body"]) == ("Hello Zoë", "Plain ✓", "<p>Rich ✓</p>")
    assert stored["headers"] == {"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@example.com>"}


def test_stub_mode(service_env: dict[str, str]) -> None:
    dsn = service_env["MAIL_POSTGRES_PRIMARY_DSN"]
    h.insert(dsn, [h.delivery("stub-auth", source="authsession"), h.delivery("stub-note", source="notification")])
    with ServeProcess(service_env) as proc:
        proc.wait_ready()
        rows = h.wait_status(dsn, ["stub-auth", "stub-note"])
        assert proc.stop() == 0
    assert rows["stub-auth"]["status"] == "suppressed"
    assert rows["stub-note"]["status"] == "sent" and rows["stub-note"]["status_reason"] is None
    [auth] = h.attempts(dsn, "stub-auth")
    [note] = h.attempts(dsn, "stub-note")
    assert auth["status"] == "suppressed" and rows["stub-auth"]["status_reason"] == auth["provider_summary"]
    assert note["status"] == "provider_accepted" and note["provider_summary"] == "stub"


def test_tls_verification_failure_and_bad_credentials_are_retried_transport_failures(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer], tmp_path: Path
) -> None:
    server = smtp_factory()
    wrong_ca = make_certs(tmp_path / "wrong", "wrong").ca_file
    for case, overrides in (
        ("tls", {"MAIL_SMTP_CA_FILE": str(wrong_ca)}),
        ("auth", {"MAIL_SMTP_PASSWORD": "not-the-password"}),
    ):
        env = smtp_env(service_env, server, MAIL_RETRY_LADDER="50ms,50ms", **overrides)
        dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
        did = f"conn-{case}"
        h.insert(dsn, [h.delivery(did)])
        with ServeProcess(env) as proc:
            proc.wait_ready()
            row = h.wait_status(dsn, [did])[did]
            assert proc.stop() == 0
        atts = h.attempts(dsn, did)
        assert row["status"] == "dead_letter", row
        assert [a["status"] for a in atts] == ["transport_failed"] * 3  # retried on the ladder
        assert all(f"during {case}" in a["provider_summary"] for a in atts)
        assert "not-the-password" not in str(atts) and "not-the-password" not in "\n".join(proc.raw)
    assert server.accepted() == []
