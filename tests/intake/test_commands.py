"""Pure validation of stream entries: every failure code from a crafted entry, the precedence the
contract implies, normalisation, fingerprints, and hypothesis properties over arbitrary and
adversarial entries (never an exception, always exactly one classification)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailtrio import commands
from mailtrio.commands import Command, Malformed, validate
from tests.intake.conftest import DROP, as_bytes, entry, payload, rendered_payload

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
TEMPLATES = {"login-code", "newsletter"}


def check(fields: dict[Any, Any], entry_id: str = "1-1") -> Command | Malformed:
    return validate(entry_id, as_bytes(fields), now=NOW, has_template=TEMPLATES.__contains__)


def code_of(fields: dict[Any, Any]) -> str:
    out = check(fields)
    assert isinstance(out, Malformed), out
    assert out.failure_detail
    return out.failure_code


def accepted(fields: dict[Any, Any]) -> Command:
    out = check(fields)
    assert isinstance(out, Command), out
    return out


# -- well-formed ---------------------------------------------------------------------------------
def test_template_command_is_accepted_and_normalised() -> None:
    cmd = accepted(
        entry(
            delivery_id="d-1",
            payload_obj=payload(
                to=["Carol@Example.COM", {"email": "dave@example.org", "name": "Dave"}],
                cc=[{"email": "erin@example.com"}],
                bcc=["frank@example.com"],
                reply_to="support@example.com",
                headers={"X-Campaign": "c1", "List-Unsubscribe": "<mailto:u@example.com>"},
                tags=["a", "b"],
            ),
            send_at="2026-06-02T08:00:00+02:00",
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
    )
    assert cmd.delivery_id == "d-1"
    assert cmd.template_id == "login-code"
    assert cmd.send_at == datetime(2026, 6, 2, 6, 0, tzinfo=UTC)
    assert cmd.traceparent == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert json.loads(cmd.recipients_json) == {
        "to": [{"email": "Carol@example.com", "name": None}, {"email": "dave@example.org", "name": "Dave"}],
        "cc": [{"email": "erin@example.com", "name": None}],
        "bcc": [{"email": "frank@example.com", "name": None}],
    }
    # the payload is kept as sent (reply_to included), canonicalised
    stored = json.loads(cmd.payload_json)
    assert stored["reply_to"] == "support@example.com"
    assert list(json.loads(cmd.payload_json)) == sorted(stored)


def test_rendered_command_is_accepted() -> None:
    cmd = accepted(entry(payload_mode="rendered", payload_obj=rendered_payload(html=DROP)))
    assert cmd.template_id is None
    assert cmd.payload_mode == "rendered"


@pytest.mark.parametrize("locale", ["en", "fr-CA", "pt-BR", "zh-Hant-TW", "es-419", "de", "sr-Latn"])
def test_canonical_locales_are_accepted(locale: str) -> None:
    assert accepted(entry(locale=locale)).locale == locale


def test_past_send_at_is_kept_and_empty_optional_fields_count_as_absent() -> None:
    past = accepted(entry(send_at="2001-01-01T00:00:00Z"))
    assert past.send_at == datetime(2001, 1, 1, tzinfo=UTC)
    empty = accepted(entry(send_at="", traceparent=""))
    assert empty.send_at is None and empty.traceparent is None


def test_send_at_up_to_366_days_ahead() -> None:
    ok = (NOW + timedelta(days=366) - timedelta(seconds=1)).isoformat()
    assert accepted(entry(send_at=ok)).send_at is not None
    late = (NOW + timedelta(days=366, seconds=1)).isoformat()
    assert code_of(entry(send_at=late)) == "invalid_field"


def test_fingerprint_ignores_traceparent_json_spacing_and_key_order() -> None:
    base = entry(delivery_id="d-fp", payload_obj=payload())
    a = accepted(base)
    b = accepted({**base, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    reordered = json.dumps(dict(reversed(list(payload().items()))), indent=2)
    c = accepted({**base, "payload": reordered})
    assert a.fingerprint == b.fingerprint == c.fingerprint


@pytest.mark.parametrize(
    "change",
    [
        {"delivery_id": "d-other"},
        {"source": "notification"},
        {"locale": "fr"},
        {"payload": json.dumps(payload(variables={"code": "654321"}))},
        {"send_at": "2026-06-01T13:00:00Z"},
        {"payload_mode": "rendered", "payload": json.dumps(rendered_payload())},
    ],
)
def test_fingerprint_covers_every_other_field(change: dict[str, str]) -> None:
    base = entry(delivery_id="d-fp", idempotency_key="k")
    assert accepted(base).fingerprint != accepted({**base, **change}).fingerprint


# -- every failure code ----------------------------------------------------------------------
CRLF_CASES = [
    ("name", payload(to=[{"email": "a@example.com", "name": "Evil\r\nBcc: victim@example.com"}])),
    ("address", payload(to=["a@example.com\r\nBcc: victim@example.com"])),
    ("cc", payload(cc=[{"email": "a@example.com", "name": "x\ny"}])),
    ("bcc", payload(bcc=["b@example.com\x00"])),
    ("reply_to", payload(reply_to={"email": "r@example.com", "name": "R\r"})),
    ("header value", payload(headers={"X-A": "v\r\nBcc: victim@example.com"})),
    ("header name", payload(headers={"X-A\r\nBcc": "v"})),
    ("NUL in header", payload(headers={"X-A": "v\x00"})),
]


@pytest.mark.parametrize(("where", "body"), CRLF_CASES, ids=[c[0] for c in CRLF_CASES])
def test_unsafe_header(where: str, body: dict[str, Any]) -> None:
    assert code_of(entry(payload_obj=body)) == "unsafe_header"


def test_unsafe_subject() -> None:
    fields = entry(payload_mode="rendered", payload_obj=rendered_payload(subject="Hi\r\nBcc: x@example.com"))
    assert code_of(fields) == "unsafe_header"


def test_unsafe_header_is_checked_first() -> None:
    body = rendered_payload(subject="Hi\nthere", text=DROP, html=DROP, to=["not an address"])
    fields = entry(payload_mode="rendered", payload_obj=body, locale="EN_us", source=DROP, delivery_id="bad id!")
    assert code_of(fields) == "unsafe_header"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (entry(payload="{not json"), "invalid_json"),
        (entry(payload="[1, 2]"), "invalid_json"),
        (entry(payload='"a string"'), "invalid_json"),
        (entry(payload=b"\xff\xfe{}"), "invalid_json"),
        (entry(payload='{"to": NaN}'), "invalid_json"),
        (entry(payload='{"x": 1e999}'), "invalid_json"),
        (entry(payload='{"x": "\\ud800"}'), "invalid_json"),
        (entry(payload="[" * 100_000 + "]" * 100_000), "invalid_field"),
        (entry(payload=""), "invalid_json"),
        (entry(delivery_id=DROP), "missing_field"),
        (entry(source=DROP), "missing_field"),
        (entry(idempotency_key=DROP), "missing_field"),
        (entry(payload_mode=DROP), "missing_field"),
        (entry(locale=DROP), "missing_field"),
        (entry(payload=DROP), "missing_field"),
        (entry(payload_obj=payload(to=DROP)), "missing_field"),
        (entry(payload_obj=payload(to=None)), "missing_field"),
        (entry(payload_obj=payload(template_id=DROP)), "missing_field"),
        (entry(payload_obj=payload(to=[{"name": "No Email"}])), "missing_field"),
        (entry(payload_mode="rendered", payload_obj=rendered_payload(subject=DROP)), "missing_field"),
        (entry(payload_mode="rendered", payload_obj=rendered_payload(text=DROP, html=DROP)), "missing_field"),
        (entry(delivery_id="has space"), "invalid_field"),
        (entry(delivery_id="x" * 129), "invalid_field"),
        (entry(delivery_id="é"), "invalid_field"),
        (entry(delivery_id="ok\n"), "invalid_field"),
        (entry(source="marketing"), "invalid_field"),
        (entry(idempotency_key=""), "invalid_field"),
        (entry(idempotency_key="k" * 201), "invalid_field"),
        (entry(idempotency_key="tab\there"), "invalid_field"),
        (entry(payload_mode="mjml"), "invalid_field"),
        (entry(send_at="tomorrow"), "invalid_field"),
        (entry(send_at="2026-06-02T08:00:00"), "invalid_field"),
        (entry(send_at="2026-06-02"), "invalid_field"),
        (entry(send_at="2026-13-02T08:00:00Z"), "invalid_field"),
        (entry(send_at="2030-01-01T00:00:00Z"), "invalid_field"),
        (entry(traceparent="not-a-traceparent"), "invalid_field"),
        (entry(traceparent="00-00000000000000000000000000000000-b7ad6b7169203331-01"), "invalid_field"),
        (entry(traceparent="ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), "invalid_field"),
        (entry(delivery_id=b"\xff\xfe"), "invalid_field"),
        (entry(payload_obj=payload(template_id=5)), "invalid_field"),
        (entry(payload_obj=payload(template_id=" ")), "invalid_field"),
        (entry(payload_obj=payload(to="alice@example.com")), "invalid_field"),
        (entry(payload_obj=payload(to=[5])), "invalid_field"),
        (entry(payload_obj=payload(to=[{"email": 5}])), "invalid_field"),
        (entry(payload_obj=payload(to=[{"email": "a@example.com", "name": 5}])), "invalid_field"),
        (entry(payload_obj=payload(cc="a@example.com")), "invalid_field"),
        (entry(payload_obj=payload(reply_to=["a@example.com"])), "invalid_field"),
        (entry(payload_obj=payload(variables=[1])), "invalid_field"),
        (entry(payload_obj=payload(headers={"Subject": "x"})), "invalid_field"),
        (entry(payload_obj=payload(headers={"Bcc": "x@example.com"})), "invalid_field"),
        (entry(payload_obj=payload(headers={"X-": "x"})), "invalid_field"),
        (entry(payload_obj=payload(headers={"X-Bad Name": "x"})), "invalid_field"),
        (entry(payload_obj=payload(headers={"X-A": 5})), "invalid_field"),
        (entry(payload_obj=payload(headers=["X-A"])), "invalid_field"),
        (entry(payload_obj=payload(tags="a")), "invalid_field"),
        (entry(payload_obj=payload(tags=[1])), "invalid_field"),
        (entry(payload_obj=payload(variables={"code": "a\u0000b"})), "invalid_field"),
        (entry(payload_mode="rendered", payload_obj=rendered_payload(subject="  ")), "invalid_field"),
        (entry(payload_mode="rendered", payload_obj=rendered_payload(text=" ", html="")), "invalid_field"),
        (entry(payload_mode="rendered", payload_obj=rendered_payload(text=5)), "invalid_field"),
        (entry(locale="EN_us"), "invalid_locale"),
        (entry(locale="en-us"), "invalid_locale"),
        (entry(locale="zz-ZZ"), "invalid_locale"),
        (entry(locale="en-Latn"), "invalid_locale"),
        (entry(locale="iw"), "invalid_locale"),
        (entry(locale=""), "invalid_locale"),
        (entry(payload_obj=payload(to=[])), "invalid_recipient"),
        (entry(payload_obj=payload(to=[f"u{i}@example.com" for i in range(51)])), "invalid_recipient"),
        (entry(payload_obj=payload(to=["not an address"])), "invalid_recipient"),
        (entry(payload_obj=payload(to=["a@b@example.com"])), "invalid_recipient"),
        (entry(payload_obj=payload(to=[{"email": ""}])), "invalid_recipient"),
        (entry(payload_obj=payload(cc=["nope"])), "invalid_recipient"),
        (entry(payload_obj=payload(bcc=["x@-bad.com"])), "invalid_recipient"),
        (entry(payload_obj=payload(reply_to="reply to me")), "invalid_recipient"),
        (entry(payload_obj=payload(template_id="no-such-template")), "unknown_template"),
        (entry(payload_obj=payload(template_id="../login-code")), "unknown_template"),
        (entry(payload="{" + " " * (512 * 1024) + "}"), "payload_too_large"),
    ],
)
def test_failure_codes(fields: dict[str, Any], expected: str) -> None:
    assert code_of(fields) == expected


def test_payload_size_limit_is_512_kib_of_the_raw_value() -> None:
    body = json.dumps(payload(variables={"pad": ""}))
    pad = 512 * 1024 - len(body)
    exact = body.replace('"pad": ""', '"pad": "' + "x" * pad + '"')
    assert len(exact.encode()) == 512 * 1024
    assert isinstance(check(entry(payload=exact)), Command)
    over = exact.replace('"pad": "', '"pad": "x')
    assert code_of(entry(payload=over)) == "payload_too_large"


def test_large_integers_and_unicode_in_payloads_are_kept_exactly() -> None:
    body = payload(variables={"big": 123456789012345678901234567890, "neg": -98765432109876543210, "name": "Zoé 😀"})
    cmd = accepted(entry(payload_obj=body))
    assert json.loads(cmd.payload_json)["variables"] == body["variables"]
    assert "123456789012345678901234567890" in cmd.payload_json
    bad_utf8 = check(entry(payload=b'{"template_id": "login-code", "to": ["\xff@example.com"]}'))
    assert isinstance(bad_utf8, Malformed) and bad_utf8.failure_code == "invalid_json"


_plain_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_plain_text, st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                                              _plain_text, st.lists(st.integers(), max_size=3)), max_size=6))
def test_canonical_payload_keeps_every_value(body: dict[str, Any]) -> None:
    value, canonical = commands._parse_payload(json.dumps(body).encode())
    assert value == body
    assert json.loads(canonical) == body
    # canonical: the same content with other spacing and key order gives the same text
    again = commands._parse_payload(json.dumps(dict(reversed(list(body.items()))), indent=1).encode())[1]
    assert again == canonical


def test_precedence_follows_the_contract_order() -> None:
    # too large beats missing fields; invalid JSON beats missing fields
    assert code_of(entry(payload="x" * (600 * 1024), source=DROP)) == "payload_too_large"
    assert code_of(entry(payload="{", source=DROP)) == "invalid_json"
    # missing beats invalid; invalid beats locale; locale beats recipients; recipients beat template
    assert code_of(entry(source=DROP, payload_mode="mjml")) == "missing_field"
    assert code_of(entry(payload_mode="mjml", locale="xx_YY")) == "invalid_field"
    assert code_of(entry(locale="xx_YY", payload_obj=payload(to=["nope"]))) == "invalid_locale"
    bad_both = payload(to=["nope"], template_id="no-such-template")
    assert code_of(entry(payload_obj=bad_both)) == "invalid_recipient"


def test_malformed_record_keeps_the_raw_entry_escaped_and_bounded() -> None:
    raw = {
        b"delivery_id": b"d-\xff",
        b"source": b"x\x00y",
        b"\xfename": b"v",
        b"payload": b"{" + b" " * (600 * 1024) + b"}",
    }
    out = validate("9-9", raw, now=NOW, has_template=TEMPLATES.__contains__)
    assert isinstance(out, Malformed)
    assert out.stream_entry_id == "9-9"
    assert out.delivery_id == "d-\\xff"
    assert out.source == "x\\x00y"
    assert out.fields["\\xfename"] == "v"
    assert len(out.fields["payload"]) < 70 * 1024
    assert "truncated" in out.fields["payload"]
    assert all("\x00" not in k and "\x00" not in v for k, v in out.fields.items())


def test_non_mapping_and_odd_inputs_are_classified() -> None:
    assert isinstance(validate("1-1", None, now=NOW, has_template=bool), Malformed)
    assert isinstance(validate("1-1", {}, now=NOW, has_template=bool), Malformed)
    assert isinstance(validate("1-1", {"delivery_id": 5, 7: None}, now=NOW, has_template=bool), Malformed)


# -- addresses -------------------------------------------------------------------------------
def _reference(address: str) -> str | None:
    try:
        result = validate_email(address, check_deliverability=False, globally_deliverable=False, test_environment=True)
    except (EmailNotValidError, ValueError, UnicodeError):
        return None
    return str(result.normalized)


_label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?", fullmatch=True)
_local = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,20}", fullmatch=True)
_addresses = st.one_of(
    st.builds(
        lambda lo, labels, tld: f"{lo}@{'.'.join(labels)}.{tld}",
        _local,
        st.lists(_label, min_size=1, max_size=3),
        st.sampled_from(["com", "ORG", "test", "localhost", "io", "x1", "co", "xn--p1ai", "local"]),
    ),
    st.builds(lambda lo, d: f"{lo}@{d}", _local, st.text(max_size=20)),
    st.text(max_size=40),
)


@settings(max_examples=400, deadline=None)
@given(_addresses)
@example("Postmaster@Example.COM")
@example("Abuse@example.org")
@example("x@ab--cd.com")
@example("x@xn--p1ai.com")
@example("a@x.123")
@example("A@Example.TEST")
@example("a@host.localhost")
@example("a.b@example.com")
@example("a..b@example.com")
@example("a" * 65 + "@example.com")
def test_address_fast_path_agrees_with_email_validator(address: str) -> None:
    assert commands.normalize_address(address) == _reference(address)


# -- hypothesis: arbitrary and adversarial entries ------------------------------------------
_nasty_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "\r\n", "\x00", "a\rb", "a\nb", "é", "😀", "\ud800", "x" * 300]),
)
_nasty_bytes = st.one_of(
    _nasty_text.map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=40),
    st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]),
)
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _nasty_text)
_json_value = st.recursive(
    _json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_nasty_text, inner, max_size=4)),
    max_leaves=12,
)
_recipient = st.one_of(
    st.sampled_from(["a@example.com", "B@Example.org", "x@y", "bad", ""]),
    _nasty_text,
    st.fixed_dictionaries({"email": st.one_of(_nasty_text, st.just("c@example.com"), _json_leaf)},
                          optional={"name": st.one_of(_nasty_text, _json_leaf)}),
    _json_value,
)
_payload_dict = st.fixed_dictionaries(
    {},
    optional={
        "template_id": st.one_of(st.sampled_from(["login-code", "newsletter", "nope", ""]), _json_value),
        "to": st.one_of(st.lists(_recipient, max_size=3), _json_value),
        "cc": st.one_of(st.lists(_recipient, max_size=2), _json_value),
        "bcc": st.lists(_recipient, max_size=2),
        "reply_to": _recipient,
        "variables": _json_value,
        "headers": st.one_of(st.dictionaries(st.one_of(st.sampled_from(["X-A", "List-Unsubscribe", "Bcc", "X-\r\n"]),
                                                       _nasty_text), st.one_of(_nasty_text, _json_leaf), max_size=3),
                             _json_value),
        "tags": st.one_of(st.lists(_nasty_text, max_size=3), _json_value),
        "subject": st.one_of(_nasty_text, _json_leaf),
        "text": st.one_of(_nasty_text, _json_leaf),
        "html": st.one_of(_nasty_text, _json_leaf),
    },
)
_payload_bytes = st.one_of(
    _payload_dict.map(lambda d: json.dumps(d).encode()),
    _json_value.map(lambda v: json.dumps(v).encode()),
    _nasty_bytes,
    st.just(b"{" + b" " * (512 * 1024) + b"}"),
)
_field_names = ["delivery_id", "source", "idempotency_key", "payload_mode", "locale", "payload", "send_at",
                "traceparent"]
_value_for = {
    "delivery_id": st.one_of(st.from_regex(r"[A-Za-z0-9._:-]{1,20}", fullmatch=True), _nasty_bytes),
    "source": st.one_of(st.sampled_from([b"authsession", b"notification"]), _nasty_bytes),
    "idempotency_key": st.one_of(st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True), _nasty_bytes),
    "payload_mode": st.one_of(st.sampled_from([b"template", b"rendered"]), _nasty_bytes),
    "locale": st.one_of(st.sampled_from([b"en", b"fr-CA", b"EN", b"zh-Hant-TW"]), _nasty_bytes),
    "payload": _payload_bytes,
    "send_at": st.one_of(st.sampled_from([b"2026-06-01T12:00:00Z", b"2026-06-01T12:00:00+25:00",
                                          b"9999-12-31T23:59:59-23:59", b"0001-01-01T00:00:00+00:01"]),
                         _nasty_bytes),
    "traceparent": st.one_of(st.just(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), _nasty_bytes),
}


@st.composite
def entries(draw: st.DrawFn) -> dict[Any, Any]:
    fields: dict[Any, Any] = {}
    for name in _field_names:
        if draw(st.booleans()) or name in ("payload", "delivery_id"):
            value = draw(_value_for[name])
            fields[name.encode()] = value.encode() if isinstance(value, str) else value
    for _ in range(draw(st.integers(0, 2))):
        fields[draw(_nasty_bytes)] = draw(_nasty_bytes)
    return fields


def _assert_one_classification(out: object, entry_id: str) -> None:
    assert isinstance(out, (Command, Malformed))
    assert out.stream_entry_id == entry_id
    if isinstance(out, Malformed):
        assert out.failure_code in commands.FAILURE_CODES
        assert out.failure_detail
        # storable in PostgreSQL: no NUL, no lone surrogate
        json.dumps(out.fields, ensure_ascii=False).encode()
        for text in (out.failure_detail, out.delivery_id or "", out.source or "",
                     *out.fields.keys(), *out.fields.values()):
            assert "\x00" not in text
    else:
        for text in (out.payload_json, out.recipients_json, out.delivery_id, out.idempotency_key):
            text.encode()
        assert not commands._JSON_NUL_RE.search(out.payload_json)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(entries())
def test_arbitrary_entries_get_exactly_one_classification(fields: dict[Any, Any]) -> None:
    out = validate("5-5", fields, now=NOW, has_template=TEMPLATES.__contains__)
    _assert_one_classification(out, "5-5")


_header_positions = ["to_name", "to_addr", "cc_addr", "bcc_name", "reply_to", "header_value", "header_name", "subject"]


@settings(max_examples=300, deadline=None)
@given(
    position=st.sampled_from(_header_positions),
    bad=st.sampled_from(["\r", "\n", "\r\n", "\x00"]),
    prefix=st.text(max_size=5),
    suffix=st.text(max_size=5),
    mode=st.sampled_from(["template", "rendered"]),
)
def test_cr_lf_nul_in_every_header_position_is_unsafe(position: str, bad: str, prefix: str, suffix: str,
                                                      mode: str) -> None:
    value = prefix + bad + suffix
    body = payload() if mode == "template" else rendered_payload()
    if position == "to_name":
        body["to"] = [{"email": "a@example.com", "name": value}]
    elif position == "to_addr":
        body["to"] = [f"a{value}@example.com"]
    elif position == "cc_addr":
        body["cc"] = [{"email": value}]
    elif position == "bcc_name":
        body["bcc"] = [{"email": "b@example.com", "name": value}]
    elif position == "reply_to":
        body["reply_to"] = value
    elif position == "header_value":
        body["headers"] = {"X-Test": value}
    elif position == "header_name":
        body["headers"] = {"X-" + value: "v"}
    else:
        body["subject"] = value
    out = check(entry(payload_mode=mode, payload_obj=body))
    assert isinstance(out, Malformed)
    assert out.failure_code == "unsafe_header", out.failure_detail


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(_field_names), st.binary(max_size=64), max_size=8))
def test_random_bytes_in_known_fields(fields: dict[str, bytes]) -> None:
    out = validate("7-7", {k.encode(): v for k, v in fields.items()}, now=NOW, has_template=TEMPLATES.__contains__)
    _assert_one_classification(out, "7-7")
