"""The SMTP provider against the real SMTP test server: TLS modes, AUTH, pipelining or lockstep,
per-recipient replies, connection reuse and recovery, 421, SMTPUTF8, the EHLO name, timeouts,
never a credential in a summary; and the client's wire forms against smtplib's (EHLO parse,
dot-stuffing and line ends, AUTH encoding)."""

from __future__ import annotations

import base64
import smtplib
import socket
from collections.abc import Callable
from email.base64mime import body_encode
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from mailtrio.config import Settings, helo_name_valid
from mailtrio.message import wire_address
from mailtrio.providers.base import AttemptStatus, Envelope, Phase
from mailtrio.providers.smtp import (
    SmtpProvider,
    SmtpSession,
    auth_plain_token,
    data_payload,
    default_helo_name,
    parse_ehlo,
)
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
             **extra: str) -> SmtpProvider:
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
    env.update(extra)
    return SmtpProvider(Settings.from_env(env))


def envelope(*rcpts: str, mid: str = "<m1@t>", smtputf8: bool = False) -> Envelope:
    return Envelope("no-reply@mailtrio.test", list(rcpts), "notification", "d1", mid, smtputf8=smtputf8)


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


# -- EHLO name ----------------------------------------------------------------------------------------


async def test_ehlo_says_the_configured_helo_name(smtp_factory: Callable[..., SmtpTestServer]) -> None:
    server = smtp_factory(record_ehlo=True)
    session = provider(server, MAIL_SMTP_HELO_NAME="mta1.mailtrio.example").session()
    assert (await session.send(envelope("ok@example.com"), MSG)).status == AttemptStatus.PROVIDER_ACCEPTED
    await session.close()
    # before and after STARTTLS
    assert server.ehlo_names() == ["mta1.mailtrio.example", "mta1.mailtrio.example"]


def test_default_helo_name_is_the_fqdn_else_the_sender_domain() -> None:
    fqdn = socket.getfqdn()
    usable = helo_name_valid(fqdn) and not fqdn.lower().startswith("localhost.")
    for sender, domain in (("Mail <no-reply@mailtrio.test>", "mailtrio.test"),
                           ("x@bücher.example", "xn--bcher-kva.example"),
                           # the envelope's A-label of the same domain (IDNA 2008: xn--fa-hia)
                           ("x@faß.example", wire_address("x@faß.example").rpartition("@")[2])):
        name = default_helo_name(sender)
        assert name == (fqdn.rstrip(".") if usable else domain)
        assert helo_name_valid(name)
        assert provider(None, MAIL_SMTP_FROM=sender).local_hostname == name
    assert provider(None, MAIL_SMTP_HELO_NAME="[192.0.2.7]").local_hostname == "[192.0.2.7]"


# -- SMTPUTF8 -----------------------------------------------------------------------------------------

UTF8_MSG = ("From: no-reply@mailtrio.test\r\nTo: üser@example.com\r\nSubject: Grüße\r\n"
            "Message-ID: <m1@t>\r\n\r\nbody\r\n").encode()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_non_ascii_local_part_goes_out_with_smtputf8(
    smtp_factory: Callable[..., SmtpTestServer], pipelining: bool
) -> None:
    server = smtp_factory(pipelining=pipelining)
    report = await provider(server).session().send(envelope("üser@example.com", smtputf8=True), UTF8_MSG)
    assert report.status == AttemptStatus.PROVIDER_ACCEPTED, report
    [accepted] = server.accepted()
    assert accepted["rcpt_tos"] == ["üser@example.com"]
    assert "SMTPUTF8" in accepted["mail_options"] and "BODY=8BITMIME" in accepted["mail_options"]


async def test_smtputf8_not_offered_fails_permanently_and_sends_nothing(
    smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory(smtputf8=False)
    session = provider(server).session()
    report = await session.send(envelope("ok@example.com", "üser@example.com", smtputf8=True), UTF8_MSG)
    assert report.status == AttemptStatus.PROVIDER_REJECTED and not report.suppressed
    assert report.summary == ("smtputf8_unsupported: the server does not offer SMTPUTF8, "
                              "needed for üser@example.com")
    # the session stays usable for the next (ASCII) message, on the same connection
    assert (await session.send(envelope("ok@example.com"), MSG)).status == AttemptStatus.PROVIDER_ACCEPTED
    await session.close()
    assert [e["rcpt_tos"] for e in server.accepted()] == [["ok@example.com"]]
    assert server.connections() == 1


# -- 421, AUTH=, 354 with no recipient ------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_421_reconnects_and_retries_once_within_the_attempt(
    smtp_factory: Callable[..., SmtpTestServer], pipelining: bool
) -> None:
    server = smtp_factory(mail421=1, pipelining=pipelining)
    session = provider(server).session()
    report = await session.send(envelope("ok@example.com"), MSG)
    assert report.status == AttemptStatus.PROVIDER_ACCEPTED, report
    assert server.connections() == 2 and len(server.accepted()) == 1
    await session.close()


async def test_a_second_421_defers_the_attempt_and_closes_the_connection(
    smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory(mail421=3)
    session = provider(server).session()
    report = await session.send(envelope("ok@example.com"), MSG)
    assert report.status == AttemptStatus.PROVIDER_DEFERRED and report.phase == Phase.MAIL
    assert report.summary.startswith("421 4.7.0 ")
    assert server.connections() == 2  # one retry, not more
    # a 421 closed the connection: the next attempt opens a new one (and gets the third 421)
    again = await session.send(envelope("ok@example.com"), MSG)
    assert again.status == AttemptStatus.PROVIDER_ACCEPTED, again
    assert server.connections() == 4 and len(server.accepted()) == 1


async def test_a_421_to_rcpt_reconnects_and_the_transaction_is_repeated(
    smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory(rules=[{"match": "^closing@", "action": "close421", "times": 1}])
    session = provider(server).session()
    report = await session.send(envelope("a@example.com", "closing@example.com"), MSG)
    assert report.status == AttemptStatus.PROVIDER_ACCEPTED, report
    assert [r.reply.code for r in report.recipients] == [250, 250]
    # the first transaction was abandoned before DATA; the message went out once, to both
    assert [e["rcpt_tos"] for e in server.accepted()] == [["a@example.com", "closing@example.com"]]
    assert server.connections() == 2


async def test_auth_equals_advertisement_is_understood(smtp_factory: Callable[..., SmtpTestServer]) -> None:
    server = smtp_factory(auth_oldstyle=True)
    report = await provider(server).session().send(envelope("ok@example.com"), MSG)
    assert report.status == AttemptStatus.PROVIDER_ACCEPTED, report
    assert server.accepted()[0]["auth"]


async def test_a_354_with_no_accepted_recipient_drops_the_connection(
    smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory(rules=RULES, data_without_rcpt=True)
    session = provider(server).session()
    report = await session.send(envelope("reject@example.com", "suppress@example.com"), MSG)
    assert report.status == AttemptStatus.PROVIDER_REJECTED and report.phase == Phase.RCPT
    ok = await session.send(envelope("ok@example.com"), MSG)
    assert ok.status == AttemptStatus.PROVIDER_ACCEPTED
    await session.close()
    events = server.events()
    assert not [e for e in events if e["event"] == "empty_data"]  # never fed an empty message
    assert [e["received"] for e in events if e["event"] == "dropped_after_354"] == [""]
    assert server.connections() == 2


# -- the wire forms against smtplib ------------------------------------------------------------------


def _smtplib_ehlo(reply: bytes) -> dict[str, str]:
    client = smtplib.SMTP()
    client.putcmd = lambda *args: None  # type: ignore[method-assign]
    client.getreply = lambda: (250, reply)  # type: ignore[method-assign]
    client.ehlo("client.example.com")
    return client.esmtp_features


EHLO_REPLIES = [
    b"mx.example.com Hello\nPIPELINING\nSIZE 35882577\nAUTH PLAIN LOGIN\nSTARTTLS\n8BITMIME\nSMTPUTF8",
    b"mx.example.com\nAUTH=PLAIN LOGIN\nAUTH LOGIN CRAM-MD5\nENHANCEDSTATUSCODES",
    b"mx.example.com\nauth=login\nsize\nX-EXPS GSSAPI NTLM\nDSN",
    b"mx.example.com\nAUTH PLAIN\nAUTH=PLAIN",
    b"mx.example.com\n-bad line\nSIZE 10  \n  SIZE 20",
]


@pytest.mark.parametrize("reply", EHLO_REPLIES)
def test_ehlo_parse_agrees_with_smtplib(reply: bytes) -> None:
    ours = parse_ehlo(reply.decode().split("\n"))
    assert ours == {k.upper(): v for k, v in _smtplib_ehlo(reply).items()}


_keyword = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,10}", fullmatch=True)
_params = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-= ", max_size=20)


@given(st.lists(st.one_of(st.tuples(_keyword, _params).map(lambda kp: f"{kp[0]} {kp[1]}".rstrip()),
                          _params.map(lambda p: f"AUTH={p}")), max_size=8))
def test_ehlo_parse_agrees_with_smtplib_on_any_extension_list(lines: list[str]) -> None:
    reply = "\n".join(["mx.example.com", *lines]).encode()
    assert parse_ehlo(reply.decode().split("\n")) == {k.upper(): v for k, v in _smtplib_ehlo(reply).items()}


def _smtplib_data(message: bytes) -> bytes:
    # what smtplib.SMTP.data() writes after the 354 for a str message: line ends fixed, then
    # dot-stuffed (for bytes it leaves a bare CR or LF as it is; this client never sends one)
    fixed = smtplib._fix_eols(message.decode("latin-1")).encode("latin-1")  # type: ignore[attr-defined]
    q = smtplib._quote_periods(fixed)  # type: ignore[attr-defined]
    if q[-2:] != b"\r\n":
        q += b"\r\n"
    return q + b".\r\n"


@given(st.lists(st.sampled_from([b".", b"..", b"a", b"\r\n", b"\n", b"\r", b" ", b"\xc3\xa9", b"\r\n."]),
                max_size=40).map(b"".join))
def test_dot_stuffing_and_line_ends_agree_with_smtplib(message: bytes) -> None:
    assert data_payload(message) == _smtplib_data(message)


def test_dot_stuffing_of_a_built_message_agrees_with_smtplib() -> None:
    msg = MSG + b".\r\n..\r\n. lone\r\nend"
    assert data_payload(msg) == _smtplib_data(msg)
    assert b"\r\n..dot\r\n" in data_payload(MSG) and data_payload(MSG).endswith(b"\r\n.\r\n")


@pytest.mark.parametrize(("user", "password"), [("user@localhost", "s3cret pass"), ("u", "p=:+/x")])
def test_auth_encodings_agree_with_smtplib(user: str, password: str) -> None:
    client: Any = smtplib.SMTP()
    client.user, client.password = user, password
    assert auth_plain_token(user, password) == body_encode(client.auth_plain().encode("ascii"), eol="")
    assert base64.b64encode(user.encode()).decode() == body_encode(client.auth_login(None).encode("ascii"), eol="")
    client._auth_challenge_count = 2  # smtplib answers the second challenge with the password
    assert base64.b64encode(password.encode()).decode() == body_encode(
        client.auth_login("UGFzc3dvcmQ6").encode("ascii"), eol="")
