"""Interop with a real MTA: `mailtrio serve` in smtp mode (STARTTLS, AUTH) against a private
Postfix 3.7 on loopback (scripts/benchlib/postfix.py: its own config directory, queue and log,
Cyrus sasldb, virtual Maildir delivery, nothing leaves the machine). What Postfix delivered is
read back from its Maildir with `BytesParser(policy=email.policy.default)`.

One Postfix and six service processes for the whole module, each with its own database and
stream; every delivery is sent in one batch per process, then the tests check:
the main process (the submission listener) sends every catalog template in every locale,
non-ASCII subjects and names, IDN and SMTPUTF8 recipients, dot lines, long lines, long header
values, Cc/Bcc/Reply-To, 50 recipients and two per-recipient mixes (250+450, 250+550); the
others meet a wrong SASL password, a listener without STARTTLS, a listener that requires a
qualified HELO name and a listener without SMTPUTF8.

Skipped only when Postfix cannot run here (not installed, or not root); scripts/setup installs it.
"""

from __future__ import annotations

import email.policy
import json
import re
import smtplib
import ssl
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
import redis

from mailtrio.catalog import Catalog
from mailtrio.providers.smtp import default_helo_name
from tests.engine import helpers as h
from tests.support import pg
from tests.support.serve import TEMPLATES, ServeProcess, base_env, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchlib.postfix import PrivatePostfix, unavailable

pytestmark = [
    pytest.mark.skipif(unavailable() is not None, reason=f"no private Postfix here: {unavailable()}"),
    # one Postfix and one batch per module: keep its tests on one xdist worker
    pytest.mark.xdist_group("postfix-interop"),
]

REDIS_ADDR = "127.0.0.1:6379"
API = "/api/v1/internal"
SMTP_FROM = "Mail Service <no-reply@mailtrio.test>"
DOMAINS = ("example.com", "xn--fa-hia.de", "xn--bcher-kva.example")
RCPT_ACCESS = {
    "defer450@example.com": "450 4.2.1 Mailbox temporarily unavailable",
    "reject550@example.com": "550 5.1.1 No such user here",
}
WRONG_PASSWORD = "Wrong-Secret-7731"
VARIABLES = {"code": "482913", "name": "Zoë Ünal-Øster", "title": "Nouvelles — été 2026",
             "intro": "Tom & Jerry <3 ünïcödé", "items": ["Äpfel", "Birnen & Co", "<b>not bold</b>"]}
SUBJECT = "Grüße aus Köln — 🎉 ünïcödé ✓"
NAMED = {"email": "named@example.com", "name": "Zoë Ünal-Øster, Jr."}
DOT_TEXT = ".\n..\n.hidden line\nmiddle\n. leading dot and space\nend.\n"
LONG_TEXT = "start\n" + "x" * 5000 + "\n" + ("word " * 400).strip() + "\n" + "é" * 1500 + "\nend\n"
LONG_HEADER = "tok-" + "a1b2c3d4" * 250  # 2,004 characters without a space
LONG_SUBJECT = "é" * 600
LONG_NAME = "Ñame " + "Ü" * 245  # intake allows names up to 256 characters
MIX50 = [f"r{i:02d}@example.com" for i in range(50)]


@dataclass
class Scenario:
    name: str
    listener: str
    password: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    db_name: str = ""
    dsn: str = ""
    stream: str = ""
    proc: ServeProcess | None = None
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    api: dict[str, Any] = field(default_factory=dict)
    output: str = ""
    # why this process did not finish its batch (None: it did)
    error: str | None = None


@dataclass
class Delivered:
    raw: bytes
    msg: EmailMessage

    @property
    def rcpt(self) -> str:
        return str(self.msg["X-Original-To"])


@dataclass
class Run:
    postfix: PrivatePostfix
    scenarios: dict[str, Scenario]
    delivered: list[Delivered]
    maillog: str
    catalog: Catalog

    def copies(self, delivery_id: str, scenario: str = "main") -> list[Delivered]:
        mid = self.row(delivery_id, scenario)["message_id"]
        return [d for d in self.delivered if d.msg["Message-ID"] == mid]

    def copy(self, delivery_id: str, rcpt: str, scenario: str = "main") -> Delivered:
        found = [d for d in self.copies(delivery_id, scenario) if d.rcpt == rcpt]
        assert len(found) == 1, (delivery_id, rcpt, [d.rcpt for d in self.copies(delivery_id, scenario)])
        return found[0]

    def row(self, delivery_id: str, scenario: str = "main") -> dict[str, Any]:
        return self.sc(scenario).rows[delivery_id]

    def sc(self, scenario: str) -> Scenario:
        sc = self.scenarios[scenario]
        assert sc.error is None, f"the {scenario} service process did not finish its batch: {sc.error}"
        return sc


def _entry(delivery_id: str, payload: dict[str, Any], *, mode: str, locale: str = "en",
           source: str = "notification") -> dict[str, str]:
    return {"delivery_id": delivery_id, "source": source, "idempotency_key": f"key-{delivery_id}",
            "payload_mode": mode, "locale": locale, "payload": json.dumps(payload)}


def _rendered(delivery_id: str, *, to: list[Any], subject: str = "Interop", text: str = "Hello.\n",
              **extra: Any) -> dict[str, str]:
    return _entry(delivery_id, {"to": to, "subject": subject, "text": text, **extra}, mode="rendered")


def catalog_cases() -> list[tuple[str, str]]:
    return sorted((t.name, loc.name) for t in TEMPLATES.iterdir() if t.is_dir() and not t.name.startswith("_")
                  for loc in t.iterdir() if loc.is_dir())


def main_batch() -> list[dict[str, str]]:
    entries = [
        _entry(f"cat-{tid}-{loc}", {"template_id": tid, "to": [f"cat-{tid}-{loc}@example.com"],
                                     "variables": VARIABLES}, mode="template", locale=loc)
        for tid, loc in catalog_cases()
    ]
    entries += [
        _rendered("utf8-subject", to=[NAMED], subject=SUBJECT, text="Grüße — ünïcödé body ✓\n",
                  html="<p>Grüße — <b>ünïcödé</b> ✓</p>"),
        _rendered("idn-2008", to=["kunde@faß.de"]),
        _rendered("idn", to=["kunde@bücher.example"]),
        _rendered("dots", to=["dots@example.com"], text=DOT_TEXT),
        _rendered("long-lines", to=["long@example.com"], text=LONG_TEXT),
        _rendered("long-headers", to=[{"email": "longhdr@example.com", "name": LONG_NAME}], subject=LONG_SUBJECT,
                  headers={"X-Long-Token": LONG_HEADER}),
        _rendered("cc-bcc", to=["to-a@example.com"], cc=["cc-b@example.com"], bcc=["bcc-c@example.com"],
                  reply_to={"email": "reply-d@example.com", "name": "Réponse"}),
        _rendered("fifty", to=MIX50),
        _rendered("mix-450", to=["mix450-ok@example.com", "defer450@example.com"]),
        _rendered("mix-550", to=["mix550-ok@example.com", "reject550@example.com"]),
    ]
    return entries


def _serve_env(pf: PrivatePostfix, sc: Scenario) -> dict[str, str]:
    env = base_env(
        MAIL_REDIS_MASTER_ADDR=REDIS_ADDR,
        MAIL_REDIS_COMMAND_STREAM=sc.stream,
        MAIL_REDIS_CONSUMER_GROUP="mailservice",
        MAIL_POSTGRES_PRIMARY_DSN=sc.dsn,
        MAIL_POSTGRES_POOL_SIZE="4",
        MAIL_TEMPLATE_DIR=str(TEMPLATES),
        MAIL_INTERNAL_HTTP_ADDR=f"127.0.0.1:{free_port()}",
        MAIL_SHUTDOWN_TIMEOUT="10s",
        MAIL_INSTANCE_ID=f"interop-{sc.name}-{uuid.uuid4().hex[:6]}",
        MAIL_LOG_LEVEL="debug",
        MAIL_SMTP_MODE="smtp",
        MAIL_SMTP_ADDR=pf.addr(sc.listener),
        MAIL_SMTP_FROM=SMTP_FROM,
        MAIL_SMTP_TLS="starttls",
        MAIL_SMTP_CA_FILE=str(pf.ca_file),
        MAIL_SMTP_USERNAME=pf.login,
        MAIL_SMTP_PASSWORD=sc.password or pf.sasl_password,
        MAIL_SMTP_TIMEOUT="20s",
        MAIL_RETRY_LADDER="1s,1s",
        MAIL_ATTEMPT_WORKER_CONCURRENCY="4",
    )
    env.update(sc.extra_env)
    return env


@pytest.fixture(scope="module")
def interop(pg_template: str) -> Iterator[Run]:
    scenarios = {sc.name: sc for sc in (
        Scenario("main", "submission"),
        Scenario("wrong-password", "submission", password=WRONG_PASSWORD),
        Scenario("notls", "notls"),
        Scenario("helo", "helo"),
        Scenario("noutf8", "noutf8"),
        # apart from the main batch: a process that fails on it cannot hold the others back
        Scenario("smtputf8", "submission"),
    )}
    client = redis.Redis(host="127.0.0.1", port=6379)
    pf = PrivatePostfix(listeners=("submission", "notls", "helo", "noutf8"), domains=DOMAINS,
                        rcpt_access=RCPT_ACCESS)
    try:
        pf.start()
        for sc in scenarios.values():
            sc.db_name, sc.dsn = pg.clone(pg_template)
            sc.stream = f"mt:interop:{uuid.uuid4().hex}"
        # the side batches stored as intake stores them, before their processes start
        h.insert(scenarios["wrong-password"].dsn, [h.delivery("wrong-pw", to=["wrongpw@example.com"])])
        h.insert(scenarios["notls"].dsn, [h.delivery("notls", to=["notls@example.com"])])
        h.insert(scenarios["helo"].dsn, [h.delivery("helo", to=["helo@example.com"])])
        h.insert(scenarios["noutf8"].dsn, [h.delivery("noutf8", to=["üser@example.com"], mode="rendered",
                                                      template_id=None, subject="x", text="y")])
        h.insert(scenarios["smtputf8"].dsn, [h.delivery("smtputf8", to=[{"email": "üser@example.com",
                                                                          "name": "Ünal"}],
                                                        mode="rendered", template_id=None, subject="SMTPUTF8 ✓",
                                                        text="ünïcödé\n")])
        # One process at a time comes up (six starting at once on a busy machine can overrun the
        # service's own startup bounds); each starts on its batch while the next one starts.
        for sc in scenarios.values():
            sc.proc = ServeProcess(_serve_env(pf, sc))
            sc.proc.wait_ready(40)
            if sc.name == "main":
                # the main batch through the command stream (intake's validation included)
                h.xadd(client, sc.stream, main_batch())
        expected = {"main": len(main_batch()), "wrong-password": 1, "notls": 1, "helo": 1, "noutf8": 1,
                    "smtputf8": 1}
        deadline = time.monotonic() + 150
        for name, count in expected.items():
            sc = scenarios[name]
            assert sc.proc is not None
            while True:
                rows = h.deliveries(sc.dsn)
                if len(rows) == count and all(r["status"] in h.TERMINAL for r in rows.values()):
                    sc.rows = rows
                    break
                if sc.proc.proc.poll() is not None or time.monotonic() > deadline:
                    waiting = {k: (r["status"], r["status_reason"]) for k, r in rows.items()
                               if r["status"] not in h.TERMINAL}
                    sc.error = (f"exit code {sc.proc.proc.poll()}, {len(rows)} of {count} deliveries, "
                                f"not final: {waiting}; stderr: {sc.proc.stderr[-1500:]}")
                    sc.rows = rows
                    break
                time.sleep(0.2)
            if sc.error is None:
                for did in sc.rows:
                    status, sc.api[did] = sc.proc.http("GET", f"{API}/deliveries/{did}")
                    assert status == 200
        if scenarios["main"].error is None:
            _, scenarios["main"].api["?recipient=defer450"] = scenarios["main"].proc.http(  # type: ignore[union-attr]
                "GET", f"{API}/deliveries?recipient=defer450@example.com")
        for sc in scenarios.values():
            assert sc.proc is not None
            if sc.proc.proc.poll() is None:
                code = sc.proc.stop()
                if code != 0 and sc.error is None:
                    sc.error = f"exit code {code} at stop"
            sc.output = "\n".join(sc.proc.raw) + sc.proc.stderr
        # every accepted copy is in the Maildir once Postfix's queue is empty
        deadline = time.monotonic() + 60
        while not pf.queue_is_empty():
            assert time.monotonic() < deadline, "postfix queue did not drain"
            time.sleep(0.2)
        parser = BytesParser(policy=email.policy.default)
        delivered = []
        for path in pf.messages():
            raw = path.read_bytes()
            delivered.append(Delivered(raw, parser.parsebytes(raw)))  # type: ignore[arg-type]
        catalog = Catalog.load(TEMPLATES, "en")
        yield Run(pf, scenarios, delivered, pf.log(), catalog)
    finally:
        for sc in scenarios.values():
            if sc.proc is not None and sc.proc.proc.poll() is None:
                sc.proc.kill()
            if sc.db_name:
                pg.drop(sc.db_name)
            if sc.stream:
                client.delete(sc.stream)
        client.close()
        pf.stop()


def _text_part(msg: EmailMessage, subtype: str = "plain") -> str | None:
    part = msg.get_body(preferencelist=(subtype,))
    return None if part is None else str(part.get_content())  # type: ignore[attr-defined]


def _utf8(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8")


def _nl(text: str) -> str:
    return text.replace("\r\n", "\n")


def _sessions(maillog: str, listener: str) -> list[str]:
    """The command counts of each SMTP session on a listener (the readiness probe's empty one aside)."""
    found = re.findall(rf"postfix-{listener}/smtpd\[\d+\]: disconnect from \S+ (.*)", maillog)
    return [s for s in found if s != "commands=0/0"]


def _long_raw_lines(raw: bytes) -> list[int]:
    return [len(line) for line in raw.split(b"\r\n" if b"\r\n" in raw else b"\n") if len(line) > 998]


# -- the main batch --------------------------------------------------------------------------------


def test_every_catalog_template_and_locale_arrives_whole(interop: Run) -> None:
    for tid, loc in catalog_cases():
        did = f"cat-{tid}-{loc}"
        assert interop.row(did)["status"] == "sent", interop.row(did)
        copy = interop.copy(did, f"{did}@example.com")
        expected = interop.catalog.render(tid, loc, VARIABLES)
        assert copy.msg["Subject"] == expected.subject
        assert _nl(_text_part(copy.msg) or "").rstrip("\n") == _nl(expected.text or "").rstrip("\n")
        if expected.html is not None:
            assert _nl(_text_part(copy.msg, "html") or "").rstrip("\n") == _nl(expected.html).rstrip("\n")
        assert copy.msg["From"].addresses[0].addr_spec == "no-reply@mailtrio.test"
        assert copy.msg["Message-ID"] == interop.row(did)["message_id"]
        assert not copy.msg.defects and not _long_raw_lines(copy.raw)


def test_non_ascii_subject_and_names(interop: Run) -> None:
    copy = interop.copy("utf8-subject", "named@example.com")
    assert copy.msg["Subject"] == SUBJECT
    [to] = copy.msg["To"].addresses
    assert (to.display_name, to.addr_spec) == (NAMED["name"], NAMED["email"])
    assert copy.msg["From"].addresses[0].display_name == "Mail Service"
    # (in a multipart message the CRLF before the boundary belongs to the boundary)
    assert (_text_part(copy.msg) or "").rstrip("\n") == "Grüße — ünïcödé body ✓"
    assert "<b>ünïcödé</b>" in (_text_part(copy.msg, "html") or "")


def test_an_idn_recipient_is_delivered_to_its_a_label_domain(interop: Run) -> None:
    assert interop.row("idn")["status"] == "sent"
    copy = interop.copy("idn", "kunde@xn--bcher-kva.example")
    assert copy.msg["Delivered-To"] == "kunde@xn--bcher-kva.example"


def test_an_idna_2008_domain_is_not_mapped_to_another_domain(interop: Run) -> None:
    assert interop.row("idn-2008")["status"] == "sent", interop.row("idn-2008")["status_reason"]
    copy = interop.copy("idn-2008", "kunde@xn--fa-hia.de")
    assert copy.msg["Delivered-To"] == "kunde@xn--fa-hia.de"
    assert "fass.de" not in interop.maillog


def test_a_non_ascii_local_part_goes_out_with_smtputf8(interop: Run) -> None:
    row = interop.row("smtputf8", "smtputf8")
    assert row["status"] == "sent", row["status_reason"]
    copy = interop.copy("smtputf8", "üser@example.com", "smtputf8")
    [to] = copy.msg["To"].addresses
    # the stdlib parser reads raw UTF-8 header bytes (RFC 6532) as surrogate escapes
    assert _utf8(to.addr_spec) == "üser@example.com" and _utf8(to.display_name) == "Ünal"
    assert copy.msg["Subject"] == "SMTPUTF8 ✓"
    # Postfix received it with SMTPUTF8 (its Received header says UTF8SMTPSA)
    assert "UTF8SMTPSA" in str(copy.msg["Received"])


def test_dot_lines_arrive_intact(interop: Run) -> None:
    copy = interop.copy("dots", "dots@example.com")
    assert _text_part(copy.msg) == DOT_TEXT


def test_long_body_lines_are_encoded_and_decode_equal(interop: Run) -> None:
    copy = interop.copy("long-lines", "long@example.com")
    assert not _long_raw_lines(copy.raw)
    assert _text_part(copy.msg) == LONG_TEXT


def test_long_header_values_are_folded_and_decode_equal(interop: Run) -> None:
    copy = interop.copy("long-headers", "longhdr@example.com")
    assert not _long_raw_lines(copy.raw), _long_raw_lines(copy.raw)
    assert copy.msg["Subject"] == LONG_SUBJECT
    assert copy.msg["X-Long-Token"] == LONG_HEADER


def test_a_long_display_name_decodes_equal(interop: Run) -> None:
    """The stdlib's address parser keeps the space between adjacent encoded words of a phrase
    (RFC 2047 §6.2 says to ignore it): the parsed name equals the sent one up to whitespace, and
    the RFC 2047 decoding of the raw header as delivered holds the name exactly."""
    from email.header import decode_header, make_header

    copy = interop.copy("long-headers", "longhdr@example.com")
    parsed = copy.msg["To"].addresses[0].display_name
    assert "".join(parsed.split()) == "".join(LONG_NAME.split())
    head = copy.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("ascii")
    unfolded = head.replace("\n ", " ").replace("\n\t", " ").split("\n")
    raw_to = next(line.split(":", 1)[1] for line in unfolded if line.lower().startswith("to:"))
    assert LONG_NAME in str(make_header(decode_header(raw_to)))


def test_cc_bcc_and_reply_to(interop: Run) -> None:
    copies = {d.rcpt: d for d in interop.copies("cc-bcc")}
    assert set(copies) == {"to-a@example.com", "cc-b@example.com", "bcc-c@example.com"}
    for copy in copies.values():
        assert [a.addr_spec for a in copy.msg["To"].addresses] == ["to-a@example.com"]
        assert [a.addr_spec for a in copy.msg["Cc"].addresses] == ["cc-b@example.com"]
        [reply_to] = copy.msg["Reply-To"].addresses
        assert (reply_to.display_name, reply_to.addr_spec) == ("Réponse", "reply-d@example.com")
        assert copy.msg["Bcc"] is None
        # only Postfix's own delivery headers of the Bcc copy name the Bcc recipient
        header_lines = copy.raw.split(b"\n\n", 1)[0].splitlines()
        assert not [ln for ln in header_lines if b"bcc-c@" in ln
                    and not ln.startswith((b"X-Original-To:", b"Delivered-To:"))]


def test_fifty_recipients_in_one_transaction(interop: Run) -> None:
    row = interop.row("fifty")
    assert row["status"] == "sent" and row["attempt_count"] == 1
    assert sorted(d.rcpt for d in interop.copies("fifty")) == MIX50
    outcomes = interop.sc("main").api["fifty"]["recipient_outcomes"]
    assert [o["email"] for o in outcomes] == MIX50 and {o["status"] for o in outcomes} == {"accepted"}
    # one message, fifty recipients, in Postfix's own log
    assert re.search(r"size=\d+, nrcpt=50 \(queue active\)", interop.maillog)


def test_250_and_450_the_deferred_recipient_alone_is_retried(interop: Run) -> None:
    api = interop.sc("main").api["mix-450"]
    # the ladder (1s, 1s) ran out for the deferred one; the accepted one got exactly one copy
    assert api["status"] == "dead_letter" and api["attempt_count"] == 3
    assert [d.rcpt for d in interop.copies("mix-450")] == ["mix450-ok@example.com"]
    assert [(o["email"], o["status"], o["attempt_no"]) for o in api["recipient_outcomes"]] == [
        ("mix450-ok@example.com", "accepted", 1), ("defer450@example.com", "dead_letter", 3)]
    assert api["recipient_outcomes"][1]["reply"].startswith("450 4.2.1 ")
    assert api["dead_letter"]["reason"].startswith("retry ladder exhausted after 3 attempts: 1 of 2 recipients "
                                                   "accepted; not delivered: defer450@example.com (450 4.2.1 ")
    # Postfix saw the deferred recipient on every attempt and the accepted one on the first only
    assert interop.maillog.count("to=<defer450@example.com> proto=ESMTP") == 3
    assert interop.maillog.count("to=<mix450-ok@example.com>, relay=virtual") == 1
    # GET /deliveries?recipient= shows the recipient's own outcome
    [item] = interop.sc("main").api["?recipient=defer450"]["items"]
    assert item["delivery_id"] == "mix-450"
    assert {o["email"]: o["status"] for o in item["recipient_outcomes"]}["defer450@example.com"] == "dead_letter"


def test_250_and_550_is_sent_naming_the_refused_recipient(interop: Run) -> None:
    api = interop.sc("main").api["mix-550"]
    assert api["status"] == "sent" and api["attempt_count"] == 1
    assert api["status_reason"].startswith("1 of 2 recipients accepted; refused: reject550@example.com (550 5.1.1 ")
    assert [d.rcpt for d in interop.copies("mix-550")] == ["mix550-ok@example.com"]
    assert [o["status"] for o in api["recipient_outcomes"]] == ["accepted", "rejected"]


def test_every_copy_is_standard_and_names_the_helo_name(interop: Run) -> None:
    assert interop.delivered
    helo = default_helo_name(SMTP_FROM)  # MAIL_SMTP_HELO_NAME unset: the FQDN, else mailtrio.test
    for copy in interop.delivered:
        assert copy.msg["Message-ID"] and copy.msg["Date"] and copy.msg["MIME-Version"] == "1.0"
        assert str(copy.msg["Received"]).startswith(f"from {helo} ("), copy.msg["Received"]
    # the service's own logs never carry the SMTP password
    assert interop.postfix.sasl_password not in interop.sc("main").output


# -- the other listeners ------------------------------------------------------------------------------


def test_a_wrong_sasl_password_is_retried_and_never_logged(interop: Run) -> None:
    sc = interop.sc("wrong-password")
    row = sc.rows["wrong-pw"]
    assert row["status"] == "dead_letter" and row["attempt_count"] == 3
    attempts = sc.api["wrong-pw"]["attempts"]
    assert [a["status"] for a in attempts] == ["transport_failed"] * 3
    assert all("535" in a["provider_summary"] and "auth" in a["provider_summary"] for a in attempts)
    assert interop.maillog.count("SASL PLAIN authentication failed") >= 3
    assert not [d for d in interop.delivered if d.rcpt == "wrongpw@example.com"]
    for text in (sc.output, interop.maillog, json.dumps(sc.api)):
        assert WRONG_PASSWORD not in text
        assert interop.postfix.sasl_password not in text


def test_a_listener_without_starttls_gets_nothing_and_no_auth_in_clear(interop: Run) -> None:
    sc = interop.sc("notls")
    row = sc.rows["notls"]
    assert row["status"] == "dead_letter"
    assert "does not offer STARTTLS" in row["status_reason"]
    assert not [d for d in interop.delivered if d.rcpt == "notls@example.com"]
    sessions = _sessions(interop.maillog, "notls")
    assert len(sessions) == 3  # one per attempt
    # EHLO, then QUIT or a dropped connection: never AUTH, never MAIL
    assert all("auth=" not in s and "mail=" not in s and "ehlo=1" in s for s in sessions), sessions


def test_a_listener_requiring_a_qualified_helo_name(interop: Run) -> None:
    row = interop.row("helo", "helo")
    assert row["status"] == "sent", row["status_reason"]
    [copy] = [d for d in interop.delivered if d.rcpt == "helo@example.com"]
    received = str(copy.msg["Received"])
    name = received.split()[1]  # "from NAME (...)"
    assert "." in name, received
    # the listener does refuse an unqualified name (what `EHLO vm` got before)
    with smtplib.SMTP("127.0.0.1", interop.postfix.port("helo"), local_hostname="vm", timeout=10) as client:
        code, _ = client.ehlo()
        assert code == 250
        client.starttls(context=ssl.create_default_context(cafile=str(interop.postfix.ca_file)))
        client.ehlo()
        client.login(interop.postfix.login, interop.postfix.sasl_password)
        code, reply = client.mail("no-reply@mailtrio.test")
        assert code == 250
        code, reply = client.rcpt("helo@example.com")
        assert code == 504 and b"Helo command rejected: need fully-qualified hostname" in reply


def test_a_listener_without_smtputf8_fails_the_delivery_and_sends_nothing(interop: Run) -> None:
    row = interop.row("noutf8", "noutf8")
    assert row["status"] == "failed" and row["attempt_count"] == 1
    assert row["status_reason"] == ("smtputf8_unsupported: the server does not offer SMTPUTF8, "
                                    "needed for üser@example.com")
    sessions = _sessions(interop.maillog, "noutf8")
    assert sessions and all("mail=" not in s for s in sessions), sessions
