"""Pure validation of command-stream entries (CONTRACT §4): raw entry -> Command | Malformed.

No I/O. `validate()` never raises for anything a producer can put in an entry: field names and
values arrive as raw bytes (possibly invalid UTF-8, huge, or missing) and every entry ends as
exactly one `Command` (well-formed, ready to be stored) or one `Malformed` (failure code and a
human detail, plus the raw entry escaped for storage).

Which code wins when an entry has several problems follows the contract: `unsafe_header` (any
C0 control character but TAB, or DEL, in a header name or value, the subject, or a recipient
name or address) is checked first, over every part of the payload that was parsed; then
`payload_too_large` (an oversized payload is never parsed), `invalid_json`, `missing_field`,
`invalid_field`, `invalid_locale`, `invalid_recipient` and `unknown_template`.
`idempotency_conflict` is decided later by the database, `stale_command` by the consumer.

Bounds that later stages rely on (the message builder, the row decoder, the SMTP client) are
enforced here, so that a command accepted at intake can always be built and sent: nesting of
at most MAX_DEPTH levels, at most MAX_RECIPIENTS envelope recipients, bounded subject, display
names and header values, header names by the builder's own rule (`message.header_name_allowed`)
and structured headers that can be folded within 998-octet lines.

A well-formed command also gets its idempotency fingerprint: a SHA-256 over every contract
field but `traceparent`, with the payload canonicalised (parsed, keys sorted, compact, and
numbers by value: an integral float is written as the integer it equals, so `1` and `1.0`, or
`1e20` and `100000000000000000000.0`, make the same fingerprint), so the same content sent
twice with different JSON spelling is a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final

import orjson
from email_validator import EmailNotValidError, validate_email

from mailtrio import bcp47, enums, message
from mailtrio.enums import FailureCode, PayloadMode
from mailtrio.message import MAX_LINE_OCTETS, STRUCTURED, UNSAFE_CONTROL_RE, header_name_allowed, structured_value_fits

# -- the contract's limits -------------------------------------------------------------------
MAX_PAYLOAD_BYTES: Final = 512 * 1024
MAX_TO: Final = 50
# to + cc + bcc together (each message goes to at most this many envelope recipients)
MAX_RECIPIENTS: Final = 100
# JSON nesting of the payload (the payload object itself is level 1)
MAX_DEPTH: Final = 32
# Header-bound text, in characters: the builder folds each within 998-octet lines (RFC 2047
# encoded words where needed); the rendered subject of a template is held to the same bound.
MAX_SUBJECT: Final = message.MAX_SUBJECT
MAX_NAME: Final = 256
MAX_HEADER_VALUE: Final = 2048
MAX_HEADERS: Final = 50
MAX_SEND_AHEAD: Final = timedelta(days=366)
SOURCES: Final = enums.SOURCES
MODES: Final = enums.PAYLOAD_MODES
REQUIRED_FIELDS: Final = ("delivery_id", "source", "idempotency_key", "payload_mode", "locale", "payload")

FAILURE_CODES: Final = enums.FAILURE_CODES

# Stored copies of a malformed entry are bounded: an attacker's 100 MB field is not kept whole.
RAW_VALUE_LIMIT: Final = 64 * 1024
RAW_NAME_LIMIT: Final = 1024
RAW_FIELDS_LIMIT: Final = 256
# delivery_id / source as recorded on a malformed row and its log line
RAW_ID_LIMIT: Final = 256

_DELIVERY_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_LOCALE_RE = bcp47.SHAPE
# RFC 3339 date-time with a mandatory offset (`Z` or ±hh:mm); the separator may be T, t or space.
_RFC3339_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)
# W3C trace context: version-traceid-parentid-flags; future versions may append fields.
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\x00-\x20\x7f]*)?")
# RFC 5322 field-name: printable US-ASCII except the colon.
# C0 controls but TAB, and DEL (the builder's rule: they never reach a header)
_UNSAFE_RE = UNSAFE_CONTROL_RE
# `\u0000` in a JSON text that is not itself an escaped backslash followed by "u0000".
_JSON_NUL_RE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

# Fast path for the common ASCII address; anything else goes through email-validator. The fast
# path accepts a strict subset of what email-validator accepts and yields the same normalised
# form (local part kept, domain lower-cased); a property test holds them equal.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_FAST_ADDR_RE = re.compile(
    rf"([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\.)+[A-Za-z]{{2,63}})"
)
_CASE_INSENSITIVE_MAILBOXES: Final = frozenset(
    ("info", "marketing", "sales", "support", "abuse", "noc", "security", "postmaster",
     "hostmaster", "usenet", "news", "webmaster", "www", "uucp", "ftp")
)
_SPECIAL_USE_TLDS: Final = frozenset(("arpa", "invalid", "local", "localhost", "onion", "test"))


# -- results ------------------------------------------------------------------------------------
@dataclass(slots=True)
class Command:
    """A well-formed command, ready to be stored as a `queued` delivery."""

    stream_entry_id: str
    delivery_id: str
    source: str
    idempotency_key: str
    payload_mode: str
    locale: str
    template_id: str | None
    send_at: datetime | None
    traceparent: str | None
    # canonical JSON texts (keys sorted, compact) for mail.payloads.payload and deliveries.recipients
    payload_json: str
    recipients_json: str
    fingerprint: str
    # send_at in UTC, ISO 8601 (as the fingerprint reads it), for the database; None when absent
    send_at_text: str | None = None
    # the command's row for the database, built ahead of the commit by the consumer
    # (mailtrio.store.intake.accept_row); None: built at the commit
    row: list[Any] | None = None


@dataclass(frozen=True, slots=True)
class Malformed:
    """A rejected entry: what the malformed-commands quarantine stores and logs."""

    stream_entry_id: str
    failure_code: str
    failure_detail: str
    delivery_id: str | None
    source: str | None
    # the raw entry, field -> value, undecodable bytes escaped, long values truncated
    fields: dict[str, str]


Outcome = Command | Malformed


class _Reject(Exception):
    """Internal: the first failure found, turned into a Malformed by `validate`."""

    def __init__(self, code: FailureCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


# -- entry point ----------------------------------------------------------------------------------
def validate(
    stream_entry_id: str,
    fields: Mapping[Any, Any] | None,
    *,
    now: datetime,
    has_template: Callable[[str], bool],
) -> Outcome:
    """Classify one stream entry. Never raises for any content of `fields`."""
    try:
        return _validate(stream_entry_id, fields or {}, now, has_template)
    except _Reject as exc:
        return _malformed(stream_entry_id, fields or {}, exc.code, exc.detail)
    except Exception as exc:  # a bug here must not stop the consumer: quarantine the entry
        detail = f"entry could not be validated ({type(exc).__name__})"
        return _malformed(stream_entry_id, fields or {}, FailureCode.INVALID_FIELD, detail)


def _validate(
    entry_id: str, fields: Mapping[Any, Any], now: datetime, has_template: Callable[[str], bool]
) -> Command:
    # The common entry is read once, field by field, with the cheap tests first; every rule and
    # its order (which code wins) are those of the module docstring.
    raw: Mapping[bytes, Any] = fields
    for k in fields:
        if type(k) is not bytes:
            raw = {_as_bytes(k): v for k, v in fields.items()}
            break
    get = raw.get

    # Parse the payload first (if it can be read at all) so that unsafe_header wins over
    # every other finding, as the contract requires.
    payload_raw = get(b"payload")
    payload: Any = None
    payload_error: _Reject | None = None
    canonical = ""
    text = b""
    if payload_raw is not None:
        payload_bytes = payload_raw if type(payload_raw) is bytes else _as_bytes(payload_raw)
        if len(payload_bytes) > MAX_PAYLOAD_BYTES:
            payload_error = _Reject(
                FailureCode.PAYLOAD_TOO_LARGE,
                f"payload is {len(payload_bytes)} bytes; the limit is {MAX_PAYLOAD_BYTES} bytes (512 KiB)",
            )
        else:
            try:
                payload, canonical, text = _parse(payload_bytes)
            except _Reject as exc:
                payload_error = exc
    # A control character can only be in a string of the canonical text escaped (so behind a
    # backslash), or as DEL itself: without either, no header, subject or address holds one.
    if isinstance(payload, dict) and (b"\\" in text or b"\x7f" in text):
        _check_unsafe(payload)

    # Entry fields present?
    delivery_id_raw = get(b"delivery_id")
    source_raw = get(b"source")
    key_raw = get(b"idempotency_key")
    mode_raw = get(b"payload_mode")
    locale_raw = get(b"locale")
    if (delivery_id_raw is None or source_raw is None or key_raw is None or mode_raw is None
            or locale_raw is None or payload_raw is None):
        for name in REQUIRED_FIELDS:
            if get(_KEYS[name]) is None:
                if payload_error is not None:
                    raise payload_error
                raise _Reject(FailureCode.MISSING_FIELD, f"required field {name!r} is missing")
    if payload_error is not None:
        raise payload_error
    if not isinstance(payload, dict):
        raise _Reject(FailureCode.INVALID_JSON, f"payload is JSON but not an object (got {_json_type(payload)})")

    payload_mode = _decode(mode_raw, "payload_mode")
    mode = payload_mode if payload_mode in MODES else None

    # Payload keys present?
    pget = payload.get
    to = pget("to")
    if to is None:
        raise _Reject(FailureCode.MISSING_FIELD, "payload key 'to' is missing")
    if mode == PayloadMode.TEMPLATE and pget("template_id") is None:
        raise _Reject(FailureCode.MISSING_FIELD, "payload key 'template_id' is missing (payload_mode template)")
    if mode == PayloadMode.RENDERED:
        if pget("subject") is None:
            raise _Reject(FailureCode.MISSING_FIELD, "payload key 'subject' is missing (payload_mode rendered)")
        if pget("text") is None and pget("html") is None:
            raise _Reject(FailureCode.MISSING_FIELD, "payload needs 'text' or 'html' (payload_mode rendered)")
    cc = pget("cc")
    bcc = pget("bcc")
    for rec_key, items in (("to", to), ("cc", cc), ("bcc", bcc)):
        if isinstance(items, list):
            for item in items:
                if type(item) is not str and isinstance(item, dict) and item.get("email") is None:
                    _check_recipient_shapes_present(payload, rec_key)
    reply_to = pget("reply_to")
    if reply_to is not None:
        _check_recipient_present(reply_to, "payload.reply_to")
    has_float = _check_depth(payload, text)

    # Entry field values.
    delivery_id = _decode(delivery_id_raw, "delivery_id")
    if not _DELIVERY_ID_RE.fullmatch(delivery_id):
        raise _Reject(FailureCode.INVALID_FIELD, "delivery_id must be 1-128 characters of [A-Za-z0-9._:-]")
    source = _decode(source_raw, "source")
    if source not in SOURCES:
        raise _Reject(FailureCode.INVALID_FIELD, f"source must be {_one_of(SOURCES)}, got {_show(source)}")
    key = _decode(key_raw, "idempotency_key")
    if not 1 <= len(key) <= 200 or not key.isprintable():
        raise _Reject(FailureCode.INVALID_FIELD, "idempotency_key must be 1-200 printable characters")
    if mode is None:
        raise _Reject(FailureCode.INVALID_FIELD,
                      f"payload_mode must be {_one_of(MODES)}, got {_show(payload_mode)}")
    send_at, send_at_c = _send_at(raw, now)
    traceparent = _traceparent(raw)

    # Payload values.
    template_id: str | None = None
    if mode == PayloadMode.TEMPLATE:
        template_id = pget("template_id")
        if not isinstance(template_id, str) or not template_id.strip():
            raise _Reject(FailureCode.INVALID_FIELD, "payload.template_id must be a non-blank string")
    else:
        subject = _content(payload, "subject", required=True)
        if len(subject) > MAX_SUBJECT:
            raise _Reject(
                FailureCode.INVALID_FIELD,
                f"payload.subject is {len(subject)} characters long; at most {MAX_SUBJECT} are allowed",
            )
        text_body = _content(payload, "text", required=False)
        html_body = _content(payload, "html", required=False)
        if not text_body and not html_body:
            raise _Reject(FailureCode.INVALID_FIELD, "payload needs a non-blank 'text' or 'html'")
    for rec_key, value in (("to", to), ("cc", cc), ("bcc", bcc)):
        if value is not None and not isinstance(value, list):
            raise _Reject(FailureCode.INVALID_FIELD, f"payload.{rec_key} must be a list of recipients")
    headers = pget("headers")
    if headers is not None:
        _check_headers(headers)
    variables = pget("variables")
    if variables is not None and not isinstance(variables, dict):
        raise _Reject(FailureCode.INVALID_FIELD, "payload.variables must be an object")
    tags = pget("tags")
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
        raise _Reject(FailureCode.INVALID_FIELD, "payload.tags must be a list of strings")
    if "\\u0000" in canonical and _JSON_NUL_RE.search(canonical):
        raise _Reject(FailureCode.INVALID_FIELD, "payload contains a NUL character (\\u0000), which cannot be stored")

    # Locale.
    locale = _decode(locale_raw, "locale")
    if not _locale_ok(locale):
        raise _Reject(
            FailureCode.INVALID_LOCALE,
            f"locale {_show(locale)} is not a canonical BCP 47 tag (e.g. en, fr-CA, pt-BR, zh-Hant-TW)",
        )

    # Recipients.
    if not to:
        raise _Reject(FailureCode.INVALID_RECIPIENT, "payload.to must have at least one recipient")
    if len(to) > MAX_TO:
        raise _Reject(FailureCode.INVALID_RECIPIENT,
                      f"payload.to has {len(to)} recipients; at most {MAX_TO} are allowed")
    total = len(to) + len(cc or ()) + len(bcc or ())
    if total > MAX_RECIPIENTS:
        raise _Reject(
            FailureCode.INVALID_RECIPIENT,
            f"to, cc and bcc have {total} recipients together; at most {MAX_RECIPIENTS} are allowed",
        )
    recipients = {
        "to": _recipients(to, "to"),
        "cc": _recipients(cc, "cc") if cc else [],
        "bcc": _recipients(bcc, "bcc") if bcc else [],
    }
    if reply_to is not None:
        _recipient(reply_to, "payload.reply_to")

    # Template.
    if template_id is not None and not has_template(template_id):
        raise _Reject(FailureCode.UNKNOWN_TEMPLATE, f"template {_show(template_id)} is not in the catalog")

    # The fingerprint's material: the fields as read (valid UTF-8, so their bytes are the text's
    # encoding) and the canonical payload bytes, unless integral floats must be rewritten.
    material: bytes | None = None
    if not has_float:
        parts: tuple[Any, ...] = (delivery_id_raw, source_raw, key_raw, mode_raw, locale_raw, send_at_c.encode(), text)
        try:
            material = b"\x1e".join(parts)
        except TypeError:  # fields given as text (tests, tools): join the decoded values
            material = None
    if material is None:
        by_value = _canonical_numbers(payload) if has_float else canonical
        material = "\x1e".join((delivery_id, source, key, payload_mode, locale, send_at_c, by_value)).encode()
    return Command(
        entry_id,
        delivery_id,
        source,
        key,
        payload_mode,
        locale,
        template_id,
        send_at,
        traceparent,
        canonical,
        orjson.dumps(recipients).decode(),
        hashlib.sha256(material).hexdigest(),
        send_at_c or None,
    )


# -- pieces ---------------------------------------------------------------------------------------
def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8", "surrogatepass")


_KEYS: Final = {name: name.encode() for name in (*REQUIRED_FIELDS, "send_at", "traceparent")}


def _text(raw: Mapping[bytes, Any], name: str) -> str:
    """The value of an entry field as text ("" when absent); invalid UTF-8 is an invalid field."""
    value = raw.get(_KEYS[name])
    if value is None:
        return ""
    return _decode(value, name)


def _decode(value: Any, name: str) -> str:
    """An entry field's value as text; invalid UTF-8 is an invalid field."""
    try:
        if type(value) is bytes:
            return value.decode()
        return _as_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise _Reject(FailureCode.INVALID_FIELD, f"{name} is not valid UTF-8") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# Built once: json.loads/dumps with options would build a new decoder/encoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_CANONICAL = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))
# orjson turns integers beyond 64 bits into floats: such payloads take the exact path.
_LONG_INT_RE = re.compile(rb"\d\d\d\d\d\d\d\d\d\d\d\d\d\d\d\d\d\d\d")


def _parse_payload(data: bytes) -> tuple[Any, str]:
    """Parse the payload; return it with its canonical JSON text (keys sorted, compact)."""
    value, canonical, _ = _parse(data)
    return value, canonical


def _parse(data: bytes) -> tuple[Any, str, bytes]:
    """Parse the payload; return it with its canonical JSON text (keys sorted, compact), also
    as UTF-8 bytes.

    orjson does the common case (it also rejects invalid UTF-8, unpaired surrogate escapes,
    NaN/Infinity and nesting deeper than 1024). orjson reads an integer beyond 64 bits as a float,
    which it then writes with an exponent: when the output has one and the input has a run of 19
    digits, the standard library parses the payload again and keeps such integers exact."""
    try:
        value = orjson.loads(data)
        out = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        if b"e+" not in out or not _LONG_INT_RE.search(data):
            return value, out.decode(), out
    except orjson.JSONDecodeError as exc:
        if isinstance(exc.__cause__, UnicodeDecodeError) or "UTF-8" in str(exc):
            raise _Reject(FailureCode.INVALID_JSON, "payload is not valid UTF-8") from None
        if "depth limit" in str(exc) or "recursion" in str(exc).lower():
            raise _Reject(FailureCode.INVALID_FIELD, f"payload is nested deeper than {MAX_DEPTH} levels") from None
        raise _Reject(FailureCode.INVALID_JSON, f"payload is not valid JSON: {_short(str(exc))}") from None
    except orjson.JSONEncodeError:
        pass  # fall through to the exact path
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Reject(FailureCode.INVALID_JSON, "payload is not valid UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise _Reject(FailureCode.INVALID_FIELD, f"payload is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise _Reject(FailureCode.INVALID_JSON, f"payload is not valid JSON: {_short(str(exc))}") from None
    try:
        canonical = _CANONICAL.encode(value)
        encoded = canonical.encode("utf-8")
    except RecursionError:
        raise _Reject(FailureCode.INVALID_FIELD, f"payload is nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeEncodeError:
        raise _Reject(FailureCode.INVALID_JSON, "payload contains an unpaired UTF-16 surrogate escape") from None
    return value, canonical, encoded


# The canonical text reduced to its shape, for `_check_depth`: every digit becomes `0`, `.`, `e`
# and `E` become `.`, `[` and `{` become `[`, anything else a space (one C-speed pass).
_SHAPE: Final = bytes(
    ord("0") if chr(b).isdigit() and b < 128 else
    ord(".") if b in b".eE" else
    ord("[") if b in b"[{" else
    ord(" ")
    for b in range(256)
)


def _check_depth(payload: Any, canonical: bytes) -> bool:
    """Refuse nesting deeper than MAX_DEPTH; return whether the payload may hold a float.

    Walks the value only when its canonical text has more opening brackets than the limit or
    something that looks like a fractional number, a digit followed by `.`, `e` or `E` (both
    JSON encoders write every float so; inside a string it only costs the walk): the common
    payload needs neither."""
    shape = canonical.translate(_SHAPE)
    deep = shape.count(b"[") > MAX_DEPTH
    maybe_float = b"0." in shape
    if not deep and not maybe_float:
        return False
    has_float = False
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            if isinstance(value, float):
                has_float = True
            continue
        if depth > MAX_DEPTH:
            raise _Reject(FailureCode.INVALID_FIELD, f"payload is nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)
    return has_float


def _by_value(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: _by_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_by_value(v) for v in value]
    return value


def _canonical_numbers(payload: Any) -> str:
    """The canonical text with every integral float written as the integer it equals."""
    return _CANONICAL.encode(_by_value(payload))


def _absent(payload: dict[str, Any], key: str) -> bool:
    return payload.get(key) is None


def _check_unsafe(payload: dict[str, Any]) -> None:
    """CR, LF or NUL in a header name or value, the subject, or a recipient name or address."""
    subject = payload.get("subject")
    if isinstance(subject, str) and _UNSAFE_RE.search(subject):
        raise _Reject(FailureCode.UNSAFE_HEADER, f"payload.subject contains {_which_unsafe(subject)}")
    headers = payload.get("headers")
    if isinstance(headers, dict):
        for name, value in headers.items():
            if _UNSAFE_RE.search(name):
                raise _Reject(FailureCode.UNSAFE_HEADER, f"header name {_show(name)} contains {_which_unsafe(name)}")
            if isinstance(value, str) and _UNSAFE_RE.search(value):
                raise _Reject(FailureCode.UNSAFE_HEADER, f"header {_show(name)} contains {_which_unsafe(value)}")
    for key in ("to", "cc", "bcc"):
        items = payload.get(key)
        if isinstance(items, list):
            for i, item in enumerate(items):
                _check_unsafe_recipient(item, f"payload.{key}[{i}]")
        elif items is not None:
            _check_unsafe_recipient(items, f"payload.{key}")
    if "reply_to" in payload:
        _check_unsafe_recipient(payload["reply_to"], "payload.reply_to")


def _check_unsafe_recipient(item: Any, where: str) -> None:
    if isinstance(item, str):
        if _UNSAFE_RE.search(item):
            raise _Reject(FailureCode.UNSAFE_HEADER, f"{where} contains {_which_unsafe(item)}")
    elif isinstance(item, dict):
        for part in ("email", "name"):
            value = item.get(part)
            if isinstance(value, str) and _UNSAFE_RE.search(value):
                raise _Reject(FailureCode.UNSAFE_HEADER, f"{where}.{part} contains {_which_unsafe(value)}")


_CONTROL_NAMES: Final = {"\r": "CR", "\n": "LF", "\x00": "NUL", "\x7f": "DEL"}


def _which_unsafe(text: str) -> str:
    found: list[str] = []
    for ch in _UNSAFE_RE.findall(text):
        label = _CONTROL_NAMES.get(ch, f"control character U+{ord(ch):04X}")
        if label not in found:
            found.append(label)
    return " and ".join(found[:3])


def _check_recipient_shapes_present(payload: dict[str, Any], key: str) -> None:
    items = payload.get(key)
    if isinstance(items, list):
        for i, item in enumerate(items):
            _check_recipient_present(item, f"payload.{key}[{i}]")


def _check_recipient_present(item: Any, where: str) -> None:
    if isinstance(item, dict) and item.get("email") is None:
        raise _Reject(FailureCode.MISSING_FIELD, f"{where} has no 'email'")


def _content(payload: dict[str, Any], key: str, *, required: bool) -> str:
    value = payload.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Reject(FailureCode.INVALID_FIELD, f"payload.{key} must be a string")
    if required and not value.strip():
        raise _Reject(FailureCode.INVALID_FIELD, f"payload.{key} must not be blank")
    return value.strip()


def _check_headers(headers: Any) -> None:
    if headers is None:
        return
    if not isinstance(headers, dict):
        raise _Reject(FailureCode.INVALID_FIELD, "payload.headers must be an object of header name -> string")
    if len(headers) > MAX_HEADERS:
        raise _Reject(FailureCode.INVALID_FIELD,
                      f"payload.headers has {len(headers)} headers; at most {MAX_HEADERS} are allowed")
    for name, value in headers.items():
        if not header_name_allowed(name):
            raise _Reject(
                FailureCode.INVALID_FIELD,
                f"header {_show(name)} is not allowed (only X-*, List-Unsubscribe, List-Unsubscribe-Post; "
                "a field name is 1-76 printable ASCII characters without ':')",
            )
        if not isinstance(value, str):
            raise _Reject(FailureCode.INVALID_FIELD, f"header {_show(name)} must have a string value")
        if len(value) > MAX_HEADER_VALUE:
            raise _Reject(
                FailureCode.INVALID_FIELD,
                f"header {_show(name)} is {len(value)} characters long; at most {MAX_HEADER_VALUE} are allowed",
            )
        if name.lower() in STRUCTURED and not structured_value_fits(name, value):
            raise _Reject(
                FailureCode.INVALID_FIELD,
                f"header {_show(name)} cannot be folded within {MAX_LINE_OCTETS}-octet lines: it must be "
                f"ASCII and every part between spaces must fit on one line",
            )


def _send_at(raw: Mapping[bytes, Any], now: datetime) -> tuple[datetime | None, str]:
    """send_at parsed, with its canonical form (UTC ISO 8601) for the fingerprint."""
    text = _text(raw, "send_at")
    if not text:
        return None, ""
    parsed = _parse_rfc3339(text)
    if parsed is None:
        raise _Reject(FailureCode.INVALID_FIELD, f"send_at {_show(text)} is not an RFC 3339 timestamp with an offset")
    value, canonical = parsed
    try:
        too_late = value > _latest_send_at(now)
    except OverflowError:
        too_late = True
    if too_late:
        raise _Reject(FailureCode.INVALID_FIELD, f"send_at {_show(text)} is more than 366 days ahead")
    return value, canonical


@lru_cache(maxsize=4)
def _latest_send_at(now: datetime) -> datetime:
    """now + MAX_SEND_AHEAD (a batch validates every entry against the same `now`)."""
    return now + MAX_SEND_AHEAD


@lru_cache(maxsize=1024)
def _parse_rfc3339(text: str) -> tuple[datetime, str] | None:
    """RFC 3339 date-time with offset -> (aware datetime, UTC ISO form); None when invalid.
    Cached: scheduled batches tend to share a handful of send_at values."""
    m = _RFC3339_RE.fullmatch(text)
    if not m:
        return None
    date, time_, frac, offset = m.groups()
    iso = f"{date}T{time_}{(frac or '')[:7]}{'+00:00' if offset in ('Z', 'z') else offset}"
    try:
        value = datetime.fromisoformat(iso)
        if value.utcoffset() is None:
            return None
        return value, value.astimezone(UTC).isoformat()
    except (ValueError, OverflowError):
        return None


def _traceparent(raw: Mapping[bytes, Any]) -> str | None:
    text = _text(raw, "traceparent")
    if not text:
        return None
    if not valid_traceparent(text):
        raise _Reject(FailureCode.INVALID_FIELD, f"traceparent {_show(text)} is not a valid W3C trace context")
    return text


def valid_traceparent(text: str) -> bool:
    """W3C Trace Context `traceparent` (version 00, or a later version with optional extra fields)."""
    m = _TRACEPARENT_RE.fullmatch(text)
    if not m:
        return False
    version, trace_id, span_id, _flags, extra = m.groups()
    if version == "ff" or (version == "00" and extra is not None):
        return False
    return trace_id != "0" * 32 and span_id != "0" * 16


_locale_ok = bcp47.is_canonical


def _recipients(items: list[Any], key: str) -> list[dict[str, str | None]]:
    """The recipients of payload.<key>, as `_recipient` reads each (a plain address string
    without building its position's name unless it is refused)."""
    out: list[dict[str, str | None]] = []
    for i, item in enumerate(items):
        if type(item) is str:
            normalized = normalize_address(item)
            if normalized is None:
                raise _Reject(FailureCode.INVALID_RECIPIENT,
                              f"payload.{key}[{i}] {_show(item)} is not a valid email address")
            out.append({"email": normalized, "name": None})
        else:
            out.append(_recipient(item, f"payload.{key}[{i}]"))
    return out


def _recipient(item: Any, where: str) -> dict[str, str | None]:
    """`"addr"` or `{"email": "addr", "name": "Name"}` -> {"email", "name"}; email normalised."""
    email: Any
    name: Any
    if isinstance(item, str):
        email, name = item, None
    elif isinstance(item, dict):
        email, name = item.get("email"), item.get("name")
        if not isinstance(email, str):
            raise _Reject(FailureCode.INVALID_FIELD, f"{where}.email must be a string")
        if name is not None and not isinstance(name, str):
            raise _Reject(FailureCode.INVALID_FIELD, f"{where}.name must be a string")
        if name is not None and len(name) > MAX_NAME:
            raise _Reject(
                FailureCode.INVALID_FIELD,
                f"{where}.name is {len(name)} characters long; at most {MAX_NAME} are allowed",
            )
    else:
        raise _Reject(FailureCode.INVALID_FIELD, f"{where} must be an address string or an object with 'email'")
    normalized = normalize_address(email)
    if normalized is None:
        raise _Reject(FailureCode.INVALID_RECIPIENT, f"{where} {_show(email)} is not a valid email address")
    return {"email": normalized, "name": name}


def normalize_address(address: str) -> str | None:
    """The normalised form of an email address, or None when it does not parse."""
    fast = _fast_address(address)
    if fast is not None:
        return fast
    return _slow_address(address)


def _fast_address(address: str) -> str | None:
    if len(address) > 254:
        return None
    m = _FAST_ADDR_RE.fullmatch(address)
    if not m:
        return None
    local, domain = m.groups()
    domain_l = domain.lower()
    if (
        len(domain) > 253
        or "--" in domain
        or local.lower() in _CASE_INSENSITIVE_MAILBOXES
        or domain_l.rpartition(".")[2] in _SPECIAL_USE_TLDS
    ):
        return None
    return f"{local}@{domain_l}"


@lru_cache(maxsize=8192)
def _slow_address(address: str) -> str | None:
    try:
        result = validate_email(
            address, check_deliverability=False, globally_deliverable=False, test_environment=True
        )
    except (EmailNotValidError, ValueError, UnicodeError):
        return None
    return str(result.normalized)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_of(values: tuple[str, ...]) -> str:
    """'a' or 'b' (or 'c'): the values of an enumeration, for a failure detail."""
    return " or ".join(repr(v) for v in values)


def _show(value: Any, limit: int = 80) -> str:
    """A value quoted for a failure detail: control characters escaped, bounded length."""
    text = value if isinstance(value, str) else str(value)
    shown = repr(text[:limit])
    return shown if len(text) <= limit else shown + "…"


# -- malformed records -----------------------------------------------------------------------------
def escape_bytes(value: Any, limit: int) -> str:
    """Raw bytes as storable text: UTF-8 decoded, invalid bytes as \\xNN, NUL as \\x00, bounded."""
    data = _as_bytes(value)
    text = data[: limit * 4 + 4].decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
    if len(text) > limit or len(data) > limit * 4 + 4:
        text = f"{text[:limit]}…[truncated, {len(data)} bytes]"
    return text


def raw_fields(fields: Mapping[Any, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, (name, value) in enumerate(fields.items()):
        if i >= RAW_FIELDS_LIMIT:
            out["…"] = f"[{len(fields) - RAW_FIELDS_LIMIT} more fields not kept]"
            break
        out[escape_bytes(name, RAW_NAME_LIMIT)] = escape_bytes(b"" if value is None else value, RAW_VALUE_LIMIT)
    return out


def _malformed(entry_id: str, fields: Mapping[Any, Any], code: FailureCode, detail: str) -> Malformed:
    raw = {_as_bytes(k): v for k, v in fields.items()}

    def ident(name: str) -> str | None:
        value = raw.get(name.encode())
        return None if value is None else escape_bytes(value, RAW_ID_LIMIT)

    return Malformed(
        stream_entry_id=entry_id,
        failure_code=code.value,
        failure_detail=detail.replace("\x00", "\\x00"),
        delivery_id=ident("delivery_id"),
        source=ident("source"),
        fields=raw_fields(fields),
    )


def conflict(command: Command, detail: str, fields: Mapping[Any, Any]) -> Malformed:
    """An otherwise well-formed command that the idempotency reservations reject."""
    return Malformed(
        stream_entry_id=command.stream_entry_id,
        failure_code=FailureCode.IDEMPOTENCY_CONFLICT.value,
        failure_detail=detail,
        delivery_id=command.delivery_id,
        source=command.source,
        fields=raw_fields(fields),
    )


def stale(stream_entry_id: str, fields: Mapping[Any, Any], age_s: float, ttl_s: float) -> Malformed:
    """An entry older than MAIL_IDEMPOTENCY_TTL read (again): its reservation may be gone, so it
    is quarantined rather than turned into a delivery that may already have been sent."""
    detail = (
        f"stream entry is {age_s:.0f}s old, older than MAIL_IDEMPOTENCY_TTL ({ttl_s:.0f}s): read again "
        "(a consumer group re-created on an untrimmed stream?) or consumed too late; not delivered"
    )
    return _malformed(stream_entry_id, fields, FailureCode.STALE_COMMAND, detail)
