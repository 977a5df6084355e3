"""Pure message building: every shape parsed back with the stdlib parser."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailtrio import message
from mailtrio.message import Address, Addressing, Content, ContentError

MID = "<d-1.0123456789abcdef@mailtrio.test>"
DATE = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SENDER = Address.from_value("Mail Service <no-reply@mailtrio.test>")


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def raw_header(data: bytes, name: str) -> str:
    """The unfolded raw value of header `name` (UTF-8 allowed, RFC 6532)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    lines = head.split("\r\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(name.lower() + ":"):
            value = line[len(name) + 1:]
            for cont in lines[i + 1:]:
                if cont[:1] not in (" ", "\t"):
                    break
                value += cont
            return value
    raise AssertionError(f"no {name} header")


def assert_display_name(data: bytes, header: str, name: str) -> None:
    """The display name parses back. The stdlib's address parser keeps the space between two
    adjacent encoded words of a phrase (which RFC 2047 §6.2 says to ignore), so the parsed name
    is compared without whitespace, and the RFC 2047 decoding of the raw header (which does
    ignore it) must contain the name exactly, up to whitespace runs."""
    from email.header import decode_header, make_header

    msg = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    got = " ".join(msg[header].addresses[0].display_name.split())
    want = " ".join(name.split())
    if got != want:
        assert "".join(got.split()) == "".join(want.split())
        decoded = str(make_header(decode_header(raw_header(data, header))))
        assert want in " ".join(decoded.split())


def build(content: Content, addressing: Addressing | None = None) -> bytes:
    addressing = addressing or Addressing(SENDER, [Address("to@example.com", "To Person")])
    return message.build(addressing, content, message_id=MID, date=DATE)


def check_wire(data: bytes) -> None:
    """CRLF only, no line over 998 octets, 7-bit clean (quoted-printable / encoded words)."""
    assert b"\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    for line in data.split(b"\r\n"):
        assert len(line) <= 998
    assert data.isascii()


def test_plain_text_message() -> None:
    data = build(Content("Your login code: 123456", "Hello,\nyour code is 123456.\n", None, {}, "en"))
    check_wire(data)
    msg = parse(data)
    assert msg["Message-ID"] == MID
    assert msg["Subject"] == "Your login code: 123456"
    assert msg["From"] == "Mail Service <no-reply@mailtrio.test>"
    assert msg["To"] == "To Person <to@example.com>"
    assert msg["Content-Language"] == "en"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"] == "Fri, 02 Jan 2026 03:04:05 +0000"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert msg.get_content().replace("\r\n", "\n") == "Hello,\nyour code is 123456.\n"


def test_html_makes_multipart_alternative() -> None:
    data = build(Content("News", "Plain body", "<p>HTML body</p>", {}, "fr"))
    check_wire(data)
    msg = parse(data)
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().strip() == "Plain body"
    assert parts[1].get_content().strip() == "<p>HTML body</p>"
    assert msg["Content-Language"] == "fr"


def test_html_only() -> None:
    msg = parse(build(Content("News", None, "<p>only html</p>", {}, "en")))
    assert msg.get_content_type() == "text/html"


def test_bcc_never_in_headers_but_in_envelope() -> None:
    addressing = Addressing(
        SENDER,
        to=[Address("a@example.com")],
        cc=[Address("c@example.com", "Cee")],
        bcc=[Address("secret@example.com"), Address("A@example.com")],
        reply_to=Address("reply@example.com", "Replies"),
    )
    data = build(Content("s", "b", None, {}, "en"), addressing)
    assert b"secret@example.com" not in data
    assert b"Bcc" not in data and b"bcc" not in data.lower().replace(b"bcc@", b"")
    msg = parse(data)
    assert msg["Cc"] == "Cee <c@example.com>"
    assert msg["Reply-To"] == "Replies <reply@example.com>"
    # A@example.com duplicates a@example.com (case-insensitive): sent once.
    assert addressing.envelope_recipients() == ["a@example.com", "c@example.com", "secret@example.com"]
    assert addressing.envelope_sender() == "no-reply@mailtrio.test"


def test_allowed_payload_headers() -> None:
    headers = {"X-Campaign": "spring", "list-unsubscribe": "<https://example.com/u/1>",
               "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    msg = parse(build(Content("s", "b", None, headers, "en")))
    assert msg["X-Campaign"] == "spring"
    assert msg["List-Unsubscribe"] == "<https://example.com/u/1>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_non_ascii_subject_names_and_body() -> None:
    content = Content("Votre code de connexion : 123 — été ✓", "Bonjour Zoë,\nçà et là.\n", "<p>Zoë</p>", {}, "fr")
    addressing = Addressing(Address("no-reply@mailtrio.test", "Sérvice Mail"),
                            to=[Address.from_value({"email": "zoe@example.com", "name": "Zoë Dupré, Jr."})])
    data = build(content, addressing)
    check_wire(data)
    msg = parse(data)
    assert msg["Subject"] == content.subject
    assert msg["To"].addresses[0].display_name == "Zoë Dupré, Jr."
    assert msg["From"].addresses[0].display_name == "Sérvice Mail"
    text, html = (p.get_content() for p in msg.iter_parts())
    assert text.replace("\r\n", "\n").strip() == "Bonjour Zoë,\nçà et là."
    assert html.strip() == "<p>Zoë</p>"


def test_idn_domain_is_punycoded() -> None:
    addressing = Addressing(SENDER, to=[Address("user@bücher.example")])
    assert addressing.envelope_recipients() == ["user@xn--bcher-kva.example"]
    assert not addressing.needs_smtputf8()
    assert Addressing(SENDER, to=[Address("üser@example.com")]).needs_smtputf8()


def test_long_lines_dots_and_trailing_spaces_survive() -> None:
    body = "x" * 2000 + "\n.leading dot\nfrom here \ntab\t\n" + "=" * 100
    data = build(Content("s", body, None, {}, "en"))
    check_wire(data)
    assert parse(data).get_content().replace("\r\n", "\n").rstrip("\n") == body


def test_long_subject_is_folded() -> None:
    subject = " ".join(["word"] * 60)
    data = build(Content(subject, "b", None, {}, "en"))
    check_wire(data)
    assert parse(data)["Subject"] == subject


def test_message_id_is_stable_and_derived_from_the_delivery() -> None:
    a = message.message_id_for("notification", "d-1", "mailtrio.test")
    assert a == message.message_id_for("notification", "d-1", "mailtrio.test")
    assert a != message.message_id_for("authsession", "d-1", "mailtrio.test")
    assert a.startswith("<d-1.") and a.endswith("@mailtrio.test>")
    assert message.sender_domain("Mail Service <No-Reply@MailTrio.TEST>") == "mailtrio.test"


@pytest.mark.parametrize(
    "content",
    [
        Content("", "body", None, {}, "en"),
        Content("   ", "body", None, {}, "en"),
        Content("subject", "  \n ", None, {}, "en"),
        Content("subject", None, "   ", {}, "en"),
        Content("sub\r\nBcc: x@example.com", "body", None, {}, "en"),
        Content("s", "b", None, {"X-Evil": "a\r\nBcc: x@example.com"}, "en"),
        Content("s", "b", None, {"X-Nul": "a\0b"}, "en"),
        Content("s", "b", None, {"Subject": "override"}, "en"),
        Content("s", "b", None, {"Bcc": "x@example.com"}, "en"),
        Content("s", "body with a \0 NUL", None, {}, "en"),
        Content("s", "b", "<p>\0</p>", {}, "en"),
    ],
)
def test_unsendable_content_is_refused(content: Content) -> None:
    with pytest.raises(ContentError):
        content.validate()


@pytest.mark.parametrize("addr", ["no-at-sign", "a b@example.com", "<a@example.com>", "a@example.com\r\nX: y", ""])
def test_unsafe_addresses_are_refused(addr: str) -> None:
    with pytest.raises(ContentError):
        Addressing(SENDER, to=[Address(addr)]).validate()


def test_recipient_values() -> None:
    assert Address.from_value("a@example.com") == Address("a@example.com", "")
    assert Address.from_value({"email": "a@example.com", "name": None}) == Address("a@example.com", "")
    assert Address.from_value({"email": " a@example.com ", "name": "A"}) == Address("a@example.com", "A")
    with pytest.raises(ContentError):
        Address.from_value(42)


_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00"), min_size=1, max_size=400
)
_header_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=120
).filter(lambda s: s.strip() == s and s.strip() != "")


@settings(max_examples=300, deadline=None)
@given(subject=_header_text, text=_text, html=st.one_of(st.none(), _text), name=st.one_of(st.just(""), _header_text),
       x_value=_header_text)
def test_round_trip(subject: str, text: str, html: str | None, name: str, x_value: str) -> None:
    """Whatever the content, the bytes are clean on the wire and parse back to the same thing."""
    content = Content(subject, text if text.strip() else "body", html if html and html.strip() else None,
                      {"X-Value": x_value}, "en")
    addressing = Addressing(SENDER, to=[Address("to@example.com", name)], bcc=[Address("hidden@example.com")])
    data = build(content, addressing)
    check_wire(data)
    assert b"hidden@example.com" not in data
    msg = parse(data)
    assert msg["Message-ID"] == MID
    assert " ".join(str(msg["Subject"]).split()) == " ".join(subject.split())
    assert " ".join(str(msg["X-Value"]).split()) == " ".join(x_value.split())
    if name:
        assert_display_name(data, "To", name)
    assert msg["To"].addresses[0].addr_spec == "to@example.com"
    parts = list(msg.iter_parts()) if msg.is_multipart() else [msg]
    expected = [content.text] + ([content.html] if content.html else [])
    assert len(parts) == len(expected)
    for part, want in zip(parts, expected, strict=True):
        got = part.get_content().replace("\r\n", "\n")
        assert got.rstrip("\n") == (want or "").replace("\r\n", "\n").rstrip("\n")


# -- IDNA 2008, SMTPUTF8, line limits, Message-IDs (#13) ------------------------------------------


def test_domains_go_out_in_idna_2008_a_label_form() -> None:
    addressing = Addressing(SENDER, to=[Address("user@faß.de", "Fass")], cc=[Address("a@bücher.example")],
                            reply_to=Address("r@faß.de"))
    assert addressing.envelope_recipients() == ["user@xn--fa-hia.de", "a@xn--bcher-kva.example"]
    data = build(Content("s", "b", None, {}, "en"), addressing)
    check_wire(data)
    msg = parse(data)
    assert msg["To"].addresses[0].addr_spec == "user@xn--fa-hia.de"
    assert msg["Cc"].addresses[0].addr_spec == "a@xn--bcher-kva.example"
    assert msg["Reply-To"].addresses[0].addr_spec == "r@xn--fa-hia.de"
    assert message.sender_domain("Service <no-reply@faß.de>") == "xn--fa-hia.de"


@pytest.mark.parametrize("where", ["to", "cc", "bcc", "reply_to"])
def test_non_ascii_local_parts_make_an_rfc_6532_message(where: str) -> None:
    josé = Address("josé@bücher.example", "José Ñandú")
    kwargs: dict[str, object] = {"to": [Address("a@example.com")]}
    if where == "reply_to":
        kwargs["reply_to"] = josé
    else:
        kwargs[where] = [*kwargs.get(where, []), josé]  # type: ignore[list-item]
    addressing = Addressing(SENDER, **kwargs)  # type: ignore[arg-type]
    assert addressing.needs_smtputf8()
    data = build(Content("Grüße", "body", None, {"X-A": "é"}, "en"), addressing)
    for line in data.split(b"\r\n"):
        assert len(line) <= 998
    msg = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    if where != "bcc":
        header = {"to": "To", "cc": "Cc", "reply_to": "Reply-To"}[where]
        addrs = {a.addr_spec: a.display_name for a in msg[header].addresses}
        assert addrs["josé@xn--bcher-kva.example"] == "José Ñandú"
    else:
        assert "josé" not in data.decode("utf-8")
        assert "josé@xn--bcher-kva.example" in addressing.envelope_recipients()
    assert msg["Subject"] == "Grüße"


LONG_VALUES = {
    "long ASCII word": "a" * 3000,
    "600 e-acute": "é" * 600,
    "long words and spaces": " ".join(["x" * 120] * 30),
    "astral": "\U0001F600" * 400,
    "tabs": "a\tb\t" * 300,
}


@pytest.mark.parametrize("value", list(LONG_VALUES.values()), ids=list(LONG_VALUES))
def test_no_line_over_998_octets_and_values_survive(value: str) -> None:
    name = value[: 256]
    content = Content(value[:998], "b", None, {"X-Long": value}, "en")
    addressing = Addressing(SENDER, to=[Address("to@example.com", name)], cc=[Address("c@example.com", name)])
    data = build(content, addressing)
    check_wire(data)
    msg = parse(data)
    assert msg["X-Long"] == value
    assert msg["Subject"] == value[:998]
    assert_display_name(data, "To", name)
    assert_display_name(data, "Cc", name)
    assert not msg.defects


def test_list_unsubscribe_is_folded_at_spaces_and_never_encoded() -> None:
    url = "<https://example.com/unsubscribe/" + "u" * 900 + ">"
    value = f"{url}, <mailto:unsubscribe@example.com?subject=x>"
    headers = {"list-unsubscribe": value, "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    content = Content("s", "b", None, headers, "en")
    content.validate()
    data = build(content)
    check_wire(data)
    assert b"=?" not in data.split(b"\r\n\r\n")[0]
    assert url.encode() in data  # the URL is never broken
    msg = parse(data)
    assert " ".join(str(msg["List-Unsubscribe"]).split()) == value
    with pytest.raises(ContentError):
        Content("s", "b", None, {"List-Unsubscribe": "<https://e.com/" + "u" * 990 + ">"}, "en").validate()


@pytest.mark.parametrize(
    "delivery_id", ["d-1", "a:b", "a..b", ".lead", "trail.", "..", ":", "a:..:b", "x" * 128, "A.B-C_D:9"]
)
def test_message_ids_are_valid_for_every_allowed_delivery_id(delivery_id: str) -> None:
    mid = message.message_id_for("notification", delivery_id, "mailtrio.test")
    assert mid == message.message_id_for("notification", delivery_id, "mailtrio.test")
    data = message.build(Addressing(SENDER, [Address("to@example.com")]), Content("s", "b", None, {}, "en"),
                         message_id=mid, date=DATE)
    header = parse(data)["Message-ID"]
    assert header == mid
    assert not header.defects, header.defects
    assert mid.startswith("<") and mid.endswith("@mailtrio.test>")


def test_message_ids_of_plain_delivery_ids_are_unchanged() -> None:
    # ids issued before this rule keep their form: <delivery_id.digest@domain>
    import hashlib

    digest = hashlib.sha256(b"notification\0d-1.x").hexdigest()[:16]
    assert message.message_id_for("notification", "d-1.x", "mailtrio.test") == f"<d-1.x.{digest}@mailtrio.test>"
    assert message.message_id_for("a", "a:b", "d") != message.message_id_for("a", "a=b", "d")


_plain = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=90)


@settings(max_examples=200, deadline=None)
@given(value=_plain, name=_plain)
def test_fast_path_and_stdlib_path_agree(value: str, name: str) -> None:
    """Short printable ASCII takes the direct path; the stdlib writes everything else. Both parse
    back to the same values."""
    value = value.strip() or "v"
    fast = message._unstructured("X-V", value)
    slow = message._std_header("X-V", value, False)
    assert parse(fast + b"\r\n")["X-V"] == parse(slow + b"\r\n")["X-V"] == value
    addr = [Address("to@example.com", name.strip())]
    fast_to = message._address_header("To", addr, False)
    slow_to = message._std_header("To", [message._std_address(a) for a in addr], False)
    a, b = parse(fast_to + b"\r\n")["To"].addresses[0], parse(slow_to + b"\r\n")["To"].addresses[0]
    assert a.addr_spec == b.addr_spec == "to@example.com"
    assert " ".join(a.display_name.split()) == " ".join(b.display_name.split())


async def test_large_content_is_built_off_the_loop_with_the_same_bytes() -> None:
    from mailtrio import workers

    addressing = Addressing(SENDER, [Address("to@example.com", "Tö")])
    small = Content("s", "b", None, {}, "en")
    big = Content("é" * 998, "é" * 200_000, "<p>" + "x" * 100_000 + "</p>", {"X-A": "é a" * 682}, "en")
    assert message.content_octets(small) <= message.OFF_LOOP_OCTETS < message.content_octets(big)
    for content in (small, big):
        data = await workers.build_message(addressing, content, MID)
        inline = message.build(addressing, content, message_id=MID, date=DATE)
        assert data.split(b"\r\n", 1)[1] == inline.split(b"\r\n", 1)[1]  # all but the Date line
        check_wire(data)


_any_header_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="".join(
    [chr(c) for c in range(0x20) if c != 0x09] + ["\x7f"])), min_size=1, max_size=300)


@settings(max_examples=200, deadline=None)
@given(value=st.one_of(_any_header_text, st.builds(lambda w, n: (w + " ") * n, st.sampled_from(
    ["word", "é", "x" * 80, "=?utf-8?q?x?=", "a\tb"]), st.integers(1, 60))))
def test_every_header_path_reads_back_as_the_stdlib_reads_its_own(value: str) -> None:
    """Unstructured values: the builder's output (fast, folded ASCII or encoded words) is read back
    by the stdlib parser as the value, and as the stdlib's own folding of it is read wherever that
    reads back right (it does not for a value that looks like an encoded word, e.g. `=??B??=`,
    which it writes raw). Whitespace runs may be folded differently; simple values are exact."""
    ours = message._unstructured("X-V", value)
    for line in ours.split(b"\r\n")[:-1]:
        assert 0 < len(line) <= 998 and line.strip()
    got = str(parse(ours + b"\r\n")["X-V"])
    assert " ".join(got.split()) == " ".join(value.split())
    if value.strip() == value and "  " not in value and "\t" not in value:
        assert got == value
    want = str(parse(message._std_header("X-V", value, False) + b"\r\n")["X-V"])
    if " ".join(want.split()) == " ".join(value.split()):
        assert " ".join(got.split()) == " ".join(want.split())


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)),
    st.sampled_from([None, 0, 330, -480]),
)
def test_the_date_line_is_the_standard_librarys_to_the_second(when: datetime, offset_minutes: int | None) -> None:
    """date_header (made once per second for UTC) says what email.utils.format_datetime says,
    for UTC and for other offsets, and parses back to the same second."""
    from datetime import timedelta, timezone
    from email.utils import format_datetime, parsedate_to_datetime

    if offset_minutes is not None:
        when = when.astimezone(timezone(timedelta(minutes=offset_minutes)))
    line = message.date_header(when)
    assert line == b"Date: " + format_datetime(when).encode("ascii") + b"\r\n"
    assert message.date_header(when) == line  # the cached answer is the same
    parsed = parsedate_to_datetime(line[len(b"Date: "):-2].decode("ascii"))
    assert parsed == when.replace(microsecond=0)
