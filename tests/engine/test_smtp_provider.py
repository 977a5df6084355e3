"""The SMTP provider against the real SMTP test server: TLS modes, AUTH, pipelining or lockstep,
per-recipient replies, connection reuse and recovery, timeouts, never a credential in a summary."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from mailtrio.config import Settings
from mailtrio.providers.base import AttemptStatus, Envelope, Phase
from mailtrio.providers.smtp import SmtpProvider, SmtpSession
from tests.engine.conftest import SMTP_PASSWORD, SMTP_USER
from tests.support.serve import TEMPLATES, free_port
from tests.support.smtpserver import SmtpTestServer, make_certs

RULES = [
    {"match": r"^defer@", "action": "defer"},
    {"match": r"^reject@", "action": "reject"},
    {"match": r"^suppress@", "action": "suppress"},
    {"match": r"^stall@", "action": "stall", "stall_s": 3},
    {"match": r"^drop@", "action": "drop"},
    {"match": r"^data-reject@", "action": "data_reject"},
]
MSG = b"From: no-reply@mailtrio.test\r\nTo: x@example.com\r\nSubject: t\r\nMessage-ID: <m1@t>\r\n\r\nbody\r\n.dot\r\n"


def provider(server: SmtpTestServer | None, *, addr: str | None = None, ca: Path | None = None,
             tls: str | None = None, user: str | None = SMTP_USER, password: str | None = SMTP_PASSWORD,
             ) -> SmtpProvider:
    env = {
        "MAIL_REDIS_MASTER_ADDR": "127.0.0.1:6379",
        "MAIL_POSTGRES_PRIMARY_DSN": "postgresql://u@127.0.0.1/db",
        "MAIL_TEMPLATE_DIR": str(TEMPLATES),
        "MAIL_SMTP_MODE": "smtp",
        "MAIL_SMTP_ADDR": addr or (server.addr if server else "127.0.0.1:1"),
        "MAIL_SMTP_FROM": "Mail <no-reply@mailtrio.test>",
        "MAIL_SMTP_TLS": tls or (server.config["tls"] if server else "none"),
        "MAIL_SMTP_TIMEOUT": "2s",
    }
    if ca is not None or (server is not None and server.certs is not None):
        env["MAIL_SMTP_CA_FILE"] = str(ca or server.ca_file)  # type: ignore[union-attr]
    if user and password and env["MAIL_SMTP_TLS"] != "none":
        env.update(MAIL_SMTP_USERNAME=user, MAIL_SMTP_PASSWORD=password)
    return SmtpProvider(Settings.from_env(env))


def envelope(*rcpts: str, mid: str = "<m1@t>") -> Envelope:
    return Envelope("no-reply@mailtrio.test", list(rcpts), "notification", "d1", mid)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_outcomes_over_starttls_with_auth(
    smtp_factory: Callable[..., SmtpTestServer], pipelining: bool
) -> None:
    server = smtp_factory(rules=RULES, pipelining=pipelining)
    session = provider(server).session()
    ok = await session.send(envelope("ok@example.com"), MSG)
    assert ok.status == AttemptStatus.PROVIDER_ACCEPTED and ok.summary == "250 2.0.0 Ok: queued"
    assert ok.reply is not None and ok.reply.enhanced == "2.0.0"
    deferred = await session.send(envelope("defer@example.com"), MSG)
    assert deferred.status == AttemptStatus.PROVIDER_DEFERRED and deferred.phase == Phase.RCPT
    rejected = await session.send(envelope("reject@example.com"), MSG)
    assert rejected.status == AttemptStatus.PROVIDER_REJECTED and not rejected.suppressed
    assert rejected.summary == "550 5.1.1 User unknown"
    suppressed = await session.send(envelope("suppress@example.com"), MSG)
    assert suppressed.status == AttemptStatus.PROVIDER_REJECTED and suppressed.suppressed
    data_rejected = await session.send(envelope("data-reject@example.com"), MSG)
    assert data_rejected.status == AttemptStatus.PROVIDER_REJECTED and data_rejected.phase == Phase.MESSAGE
    mixed = await session.send(envelope("a@example.com", "reject@example.com", "defer@example.com"), MSG)
    assert mixed.status == AttemptStatus.PROVIDER_ACCEPTED
    assert mixed.summary.endswith("(1 of 3 recipients accepted)")
    details = mixed.details()
    assert [(r["address"], r["code"]) for r in details["recipients"]] == [
        ("a@example.com", 250), ("reject@example.com", 550), ("defer@example.com", 451)]
    again = await session.send(envelope("ok2@example.com", mid="<m2@t>"), MSG.replace(b"<m1@t>", b"<m2@t>"))
    assert again.status == AttemptStatus.PROVIDER_ACCEPTED
    await session.close()
    # one connection for every transaction (refusals reset with RSET), over TLS, authenticated
    assert server.connections() == 1
    accepted = server.accepted()
    assert [e["rcpt_tos"] for e in accepted] == [["ok@example.com"], ["a@example.com"], ["ok2@example.com"]]
    assert all(e["tls"] and e["auth"] for e in accepted)
    # dot-stuffing: the body line ".dot" arrives intact
    assert "\r\n.dot\r\n" in accepted[0]["data"]


async def test_implicit_tls_and_plain_modes(smtp_factory: Callable[..., SmtpTestServer]) -> None:
    implicit = smtp_factory(tls="tls")
    report = await provider(implicit).session().send(envelope("ok@example.com"), MSG)
    assert report.status == AttemptStatus.PROVIDER_ACCEPTED, report
    assert implicit.accepted()[0]["tls"]
    plain = smtp_factory(tls="none", auth=None)
    report = await provider(plain, user=None, password=None).session().send(envelope("ok@example.com"), MSG)
    assert report.status == AttemptStatus.PROVIDER_ACCEPTED
    assert not plain.accepted()[0]["tls"]


async def test_tls_verification_failure_is_a_transport_failure(
    smtp_factory: Callable[..., SmtpTestServer], tmp_path: Path
) -> None:
    server = smtp_factory()
    other_ca = make_certs(tmp_path / "other", "other").ca_file
    report = await provider(server, ca=other_ca).session().send(envelope("ok@example.com"), MSG)
    assert report.status == AttemptStatus.TRANSPORT_FAILED and report.phase == Phase.TLS
    assert "CERTIFICATE_VERIFY_FAILED" in report.summary
    assert server.accepted() == []


async def test_starttls_required_but_not_offered(smtp_factory: Callable[..., SmtpTestServer]) -> None:
    server = smtp_factory(tls="none", auth=None)
    report = await provider(server, tls="starttls", ca=make_certs(server.directory / "c").ca_file,
                            user=None).session().send(envelope("ok@example.com"), MSG)
    assert report.status == AttemptStatus.TRANSPORT_FAILED and report.phase == Phase.TLS
    assert "STARTTLS" in report.summary


async def test_bad_credentials_are_a_transport_failure_without_the_secret(
    smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory()
    secret = "wrong-Secret-value-42"
    report = await provider(server, password=secret).session().send(envelope("ok@example.com"), MSG)
    assert report.status == AttemptStatus.TRANSPORT_FAILED and report.phase == Phase.AUTH
    assert "535" in report.summary
    assert secret not in report.summary and secret not in str(report.details())
    assert server.accepted() == []


async def test_connection_refused() -> None:
    report = await provider(None, addr=f"127.0.0.1:{free_port()}").session().send(envelope("ok@example.com"), MSG)
    assert report.status == AttemptStatus.TRANSPORT_FAILED and report.phase == Phase.CONNECT


async def test_drop_after_data_then_the_session_recovers(smtp_factory: Callable[..., SmtpTestServer]) -> None:
    server = smtp_factory(rules=RULES)
    session = provider(server).session()
    dropped = await session.send(envelope("drop@example.com"), MSG)
    assert dropped.status == AttemptStatus.TRANSPORT_FAILED and dropped.phase == Phase.MESSAGE
    ok = await session.send(envelope("ok@example.com"), MSG)
    assert ok.status == AttemptStatus.PROVIDER_ACCEPTED
    assert server.connections() == 2


async def test_stall_is_bounded_by_the_cancel_scope(smtp_factory: Callable[..., SmtpTestServer]) -> None:
    server = smtp_factory(rules=RULES)
    session = provider(server).session()
    with trio.move_on_after(0.5) as scope:
        await session.send(envelope("stall@example.com"), MSG)
    assert scope.cancelled_caught
    await session.abort()
    ok = await session.send(envelope("ok@example.com"), MSG)
    assert ok.status == AttemptStatus.PROVIDER_ACCEPTED
    assert server.connections() == 2


async def test_a_connection_closed_by_the_server_is_reopened_transparently(
    smtp_factory: Callable[..., SmtpTestServer], tmp_path: Path
) -> None:
    first = smtp_factory(tls="none", auth=None)
    session: SmtpSession = provider(first, user=None).session()
    assert (await session.send(envelope("ok@example.com"), MSG)).status == AttemptStatus.PROVIDER_ACCEPTED
    port = first.port
    first.stop()  # the server goes away (as after an idle timeout) and comes back on the same port
    second = SmtpTestServer(tmp_path / "second", tls="none", port=port).start()
    try:
        report = await session.send(envelope("ok@example.com"), MSG)
        assert report.status == AttemptStatus.PROVIDER_ACCEPTED, report
        assert len(second.accepted()) == 1
    finally:
        second.stop()


def test_scrub_removes_every_form_of_the_password() -> None:
    p = provider(None, tls="starttls", user="u", password="hunter2-pass")
    for form in ("hunter2-pass", base64.b64encode(b"hunter2-pass").decode(),
                 base64.b64encode(b"\0u\0hunter2-pass").decode()):
        assert "hunter2" not in p.scrub(f"server said {form} back")
