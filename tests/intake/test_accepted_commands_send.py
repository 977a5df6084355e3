"""Across stage boundaries: every command intake accepts (`commands.validate`) can be prepared
(`workers.prepare`), built (`message.build`), sent to a real SMTP server (aiosmtpd offering
SMTPUTF8, through the service's own SMTP client) and parses back whole with the stdlib parser:
non-ASCII names and local parts, IDN domains, long values at the bounds, nesting at the limit."""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import itertools
import json
import re
from datetime import UTC, datetime
from email.header import decode_header, make_header
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from mailtrio import commands, message, workers
from mailtrio.catalog import Catalog
from mailtrio.config import Settings
from mailtrio.providers.base import AttemptStatus, Envelope
from mailtrio.providers.smtp import SmtpProvider
from mailtrio.store.engine import Claim
from tests.support.serve import TEMPLATES, base_env
from tests.support.smtpserver import SmtpTestServer

SENDER = message.Address.from_value("Mail Sérvice <no-reply@mailtrio.test>")
CATALOG = Catalog.load(TEMPLATES, "en")
_ids = itertools.count()


@pytest.fixture(scope="module")
def smtp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with SmtpTestServer(Path(tmp_path_factory.mktemp("smtp")), tls="none") as server:
        yield server


# -- strategies ------------------------------------------------------------------------------------
_header_char = st.characters(blacklist_categories=("Cs",), blacklist_characters="".join(
    [chr(c) for c in range(0x20) if c != 0x09] + ["\x7f"]))
_name = st.text(_header_char, max_size=commands.MAX_NAME)
_local = st.one_of(
    st.from_regex(r"[a-z0-9]{1,12}(\.[a-z0-9]{1,8})?", fullmatch=True),
    st.sampled_from(["josé", "üser", "ñandú.x", "пользователь", "用户", "Zoë"]),
)
_domain = st.sampled_from(["example.com", "faß.de", "bücher.example", "xn--bcher-kva.example", "例え.jp",
                           "sub.example.org"])


@st.composite
def recipient(draw: st.DrawFn) -> Any:
    addr = f"{draw(_local)}@{draw(_domain)}"
    if draw(st.booleans()):
        return addr
    return {"email": addr, "name": draw(_name)}


@st.composite
def nested(draw: st.DrawFn, depth: int) -> Any:
    value: Any = draw(st.text(_header_char, max_size=20))
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


_long_text = st.one_of(
    st.text(_header_char, min_size=1, max_size=80),
    st.text(_header_char, min_size=1, max_size=commands.MAX_HEADER_VALUE),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "😀", "x y", "\t"]),
              st.integers(1, commands.MAX_HEADER_VALUE)),
)
_url = st.builds(lambda n: "<https://example.com/unsubscribe/" + "u" * n + ">", st.integers(1, 900))


@st.composite
def command_entry(draw: st.DrawFn) -> dict[str, Any]:
    n = next(_ids)
    mode = draw(st.sampled_from(["template", "rendered"]))
    body: dict[str, Any] = {
        "to": draw(st.lists(recipient(), min_size=1, max_size=3)),
        "cc": draw(st.lists(recipient(), max_size=2)),
        "bcc": draw(st.lists(recipient(), max_size=2)),
    }
    if draw(st.booleans()):
        body["reply_to"] = draw(recipient())
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["X-Value"] = draw(_long_text.filter(lambda s: s.strip() != ""))
    if draw(st.booleans()):
        headers["x-lower"] = draw(st.text(_header_char, min_size=1, max_size=60).filter(str.strip))
    if draw(st.booleans()):
        headers["List-Unsubscribe"] = draw(_url) + ", <mailto:u@example.com>"
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    if headers:
        body["headers"] = headers
    subject = draw(st.one_of(st.text(_header_char, min_size=1, max_size=100),
                             st.text(_header_char, min_size=1, max_size=commands.MAX_SUBJECT),
                             st.builds(lambda n: "é" * n, st.integers(1, commands.MAX_SUBJECT))))
    deep = draw(nested(commands.MAX_DEPTH - 2))  # the payload and `variables` are levels 1 and 2
    if mode == "template":
        body["template_id"] = draw(st.sampled_from(["login-code", "newsletter"]))
        body["variables"] = {"code": "123456", "title": subject, "intro": draw(st.text(max_size=300)),
                             "name": draw(_name), "deep": deep}
    else:
        body["subject"] = subject
        body["text"] = draw(st.text(min_size=1, max_size=500))
        if draw(st.booleans()):
            body["html"] = "<p>" + draw(st.text(max_size=300)) + "</p>"
        body["variables"] = {"deep": deep}
    delivery_id = draw(st.sampled_from([f"p-{n}", f"p:{n}", f"p..{n}", f".p{n}.", f"p-{n}:a..b"]))
    return {"delivery_id": delivery_id, "source": draw(st.sampled_from(["authsession", "notification"])),
            "idempotency_key": f"k-{n}", "payload_mode": mode, "locale": draw(st.sampled_from(["en", "fr", "pt-BR"])),
            "payload": json.dumps(body, ensure_ascii=draw(st.booleans()))}


# -- the stages --------------------------------------------------------------------------------------
def claim_for(cmd: commands.Command) -> Claim:
    """The claim the engine would hand to `prepare` for this command's delivery (built from the
    dataclass's own fields, so that fields added with a default do not matter here)."""
    values: dict[str, Any] = {
        "delivery_id": cmd.delivery_id, "source": cmd.source, "payload_mode": cmd.payload_mode,
        "template_id": cmd.template_id, "locale": cmd.locale, "resolved_locale": None,
        "recipients": json.loads(cmd.recipients_json),
        "message_id": message.message_id_for(cmd.source, cmd.delivery_id, "mailtrio.test"),
        "attempt_count": 0, "ladder_step": 0, "traceparent": None, "lease_started_at": datetime.now(UTC),
        "priority": 0, "due": None, "payload": json.loads(cmd.payload_json), "subject": None, "text_body": None,
        "html_body": None, "headers": None, "rendered": False,
    }
    names = {f.name for f in dataclasses.fields(Claim)}
    return Claim(**{k: v for k, v in values.items() if k in names})


def send(server: SmtpTestServer, envelope: Envelope, data: bytes) -> Any:
    env = base_env(MAIL_REDIS_MASTER_ADDR="127.0.0.1:6379", MAIL_POSTGRES_PRIMARY_DSN="postgresql://x@127.0.0.1/x",
                   MAIL_TEMPLATE_DIR=str(TEMPLATES), MAIL_SMTP_MODE="smtp", MAIL_SMTP_ADDR=server.addr,
                   MAIL_SMTP_FROM="Mail Sérvice <no-reply@mailtrio.test>", MAIL_SMTP_TLS="none")
    provider = SmtpProvider(Settings.from_env(env))

    async def main() -> Any:
        session = provider.session()
        try:
            with trio.fail_after(30):
                return await session.send(envelope, data)
        finally:
            with trio.move_on_after(5):
                await session.close()

    return trio.run(main)


_EW = re.compile(r"=\?utf-8\?b\?([A-Za-z0-9+/=]*)\?=")


def decoded_name(raw_value: str, name: str) -> bool:
    """RFC 2047 decoding of a raw header value (UTF-8 allowed around the encoded words): the
    whitespace between two adjacent encoded words is dropped, as §6.2 says."""
    if raw_value.isascii():
        text = str(make_header(decode_header(raw_value)))
    else:
        text = re.sub(r"\?=\s+=\?", "?==?", raw_value)
        text = _EW.sub(lambda m: base64.b64decode(m.group(1)).decode("utf-8"), text)
    return " ".join(name.split()) in " ".join(text.split())


def raw_header(head: str, name: str) -> str:
    lines = head.split("\r\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(name.lower() + ":"):
            value = line[len(name) + 1:]
            for cont in lines[i + 1:]:
                if cont[:1] not in (" ", "\t"):
                    break
                value += cont
            return value
    raise AssertionError(f"no {name}")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.data_too_large])
@given(fields=command_entry())
def test_every_accepted_command_is_built_sent_and_parses_back_whole(smtp: SmtpTestServer,
                                                                    fields: dict[str, Any]) -> None:
    out = commands.validate("1-1", {k.encode(): v.encode() for k, v in fields.items()}, now=datetime.now(UTC),
                            has_template=CATALOG.has_template)
    assume(isinstance(out, commands.Command))
    assert isinstance(out, commands.Command)
    claim = claim_for(out)
    content, addressing = workers.prepare(claim, CATALOG, SENDER)
    data = message.build(addressing, content, message_id=claim.message_id, date=datetime.now(UTC))
    for line in data.split(b"\r\n"):
        assert len(line) <= 998
    recipients = addressing.envelope_recipients()
    envelope = Envelope(sender=addressing.envelope_sender(), recipients=recipients, source=claim.source,
                        delivery_id=claim.delivery_id, message_id=claim.message_id,
                        smtputf8=addressing.needs_smtputf8(recipients))
    event(f"smtputf8={envelope.smtputf8}")
    event(f"longest line > 78: {max(map(len, data.split(chr(13).encode() + chr(10).encode()))) > 78}")
    report = send(smtp, envelope, data)
    assert report.status == AttemptStatus.PROVIDER_ACCEPTED, report.summary
    (got,) = smtp.accepted_by_message_id()[claim.message_id][-1:]
    wire = got["data"].encode("utf-8", "surrogateescape")
    assert sorted(got["rcpt_tos"]) == sorted(recipients)
    # IDN domains went out as A-labels, in the envelope and the headers
    assert all(a.rpartition("@")[2].isascii() for a in recipients)
    # parse back: BytesParser(policy=default), with RFC 6532 headers read as UTF-8
    msg = email.message_from_bytes(wire, policy=email.policy.default)
    utext = email.message_from_string(wire.decode("utf-8"), policy=email.policy.default)
    head = wire.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    assert msg["Message-ID"] == claim.message_id and not msg["Message-ID"].defects
    assert " ".join(str(msg["Subject"]).split()) == " ".join(content.subject.split())
    for name, value in content.headers.items():
        assert " ".join(str(msg[message.header_name(name)]).split()) == " ".join(value.split())
    for header, addrs in (("To", addressing.to), ("Cc", addressing.cc)):
        if not addrs:
            assert header not in msg
            continue
        parsed = utext[header].addresses
        assert [a.addr_spec for a in parsed] == [message.wire_address(a.email) for a in addrs]
        for p, a in zip(parsed, addrs, strict=True):
            if " ".join(p.display_name.split()) != " ".join(a.name.split()):
                # the stdlib keeps the space between adjacent encoded words; RFC 2047 drops it
                assert "".join(p.display_name.split()) == "".join(a.name.split())
                assert decoded_name(raw_header(head, header), a.name)
    shown = {message.wire_address(a.email).lower() for a in (*addressing.to, *addressing.cc)}
    if addressing.reply_to is not None:
        shown.add(message.wire_address(addressing.reply_to.email).lower())
    in_headers = {a.addr_spec.lower() for h in ("To", "Cc", "Reply-To") if h in utext for a in utext[h].addresses}
    assert "Bcc" not in utext
    for b in addressing.bcc:
        if message.wire_address(b.email).lower() not in shown:
            assert message.wire_address(b.email).lower() not in in_headers
    parts = list(msg.iter_parts()) if msg.is_multipart() else [msg]
    bodies = [content.text] + ([content.html] if content.text and content.html else [])
    if not content.text:
        bodies = [content.html]
    for part, want in zip(parts, bodies, strict=True):
        assert part.get_content().replace("\r\n", "\n").rstrip("\n") == (want or "").replace("\r\n", "\n").replace(
            "\r", "\n").rstrip("\n")
