"""Pure message building: rendered content + delivery -> RFC 5322 bytes, stable Message-ID.

Output: CRLF line endings, UTF-8 bodies as 7bit when plain short-lined ASCII and quoted-printable
otherwise, `multipart/alternative` when there is HTML, no line longer than 998 octets (RFC 5322
§2.1.1), ever. Bcc recipients are part of the envelope only and never appear in a header.

Headers. Unstructured values (subject, `X-*`) and display names are folded at 78 characters;
what is not plain ASCII, or has a word too long for a line, is written as RFC 2047 `B` encoded
words of at most 75 characters, one a line. A header whose whole line is short printable ASCII
(the common case) is written as it is. This is the service's own linear code, not the stdlib's
folder (`policy.SMTP`), which took 76 ms for one 2,048-character value of short non-ASCII words
and has written blank continuation lines for long words in address headers; the stdlib remains
the reference: tests parse every path back with `email.policy.default` and compare with the
value and with the stdlib's own rendering (`_std_header`). `List-Unsubscribe` and
`List-Unsubscribe-Post` are structured (RFC 2369/8058): folded at their spaces and never encoded;
intake refuses a value that cannot be folded that way.

Addresses go out with their domain in IDNA 2008 A-label form (`faß.de` -> `xn--fa-hia.de`), in
the envelope and in the headers. A non-ASCII local part cannot be encoded: such a message needs
SMTPUTF8 (`Addressing.needs_smtputf8`, which the envelope carries) and its address headers are
written as RFC 6532 UTF-8.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy as _policy
from email.headerregistry import Address as _StdAddress
from email.utils import format_datetime, parseaddr
from functools import lru_cache
from typing import Any, Final

import idna


class ContentError(ValueError):
    """The content cannot be sent as it is (empty, or unsafe in a header)."""


# -- header rules shared with intake (mailtrio.commands) -------------------------------------------
# Producer headers allowed on the message (CONTRACT §4): case-insensitive `X-*`,
# `List-Unsubscribe`, `List-Unsubscribe-Post`; a field name is printable ASCII but the colon
# (RFC 5322 ftext), at most MAX_HEADER_NAME characters so that `Name: ` always fits a line.
MAX_HEADER_NAME: Final = 76
_FIELD_NAME_RE = re.compile(rf"[\x21-\x39\x3b-\x7e]{{1,{MAX_HEADER_NAME}}}")
ALLOWED_NAMED: Final = {"list-unsubscribe": "List-Unsubscribe", "list-unsubscribe-post": "List-Unsubscribe-Post"}
# Structured producer headers: folded at their spaces only, never encoded.
STRUCTURED: Final = frozenset(ALLOWED_NAMED)
# Any C0 control but TAB, and DEL: never in a header value, subject, display name or address.
UNSAFE_CONTROL_RE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 5322 §2.1.1: at most 998 octets a line, CRLF excluded.
MAX_LINE_OCTETS: Final = 998
# A subject (rendered-mode payload or rendered template), in characters: the builder folds it
# within 998-octet lines as encoded words; intake and the catalog hold subjects to it.
MAX_SUBJECT: Final = 998


def header_name_allowed(name: str) -> bool:
    """The one header-name rule of intake and of the builder."""
    if not isinstance(name, str) or not _FIELD_NAME_RE.fullmatch(name):
        return False
    lowered = name.lower()
    return (lowered.startswith("x-") and len(lowered) > 2) or lowered in ALLOWED_NAMED


def header_name(name: str) -> str:
    """The name as written on the message (List-* in their canonical spelling)."""
    return ALLOWED_NAMED.get(name.lower(), name)


def structured_value_fits(name: str, value: str) -> bool:
    """Whether a structured header (List-Unsubscribe*) can be folded at its spaces within the line
    limit: ASCII, and every space-free run fits on a line of its own (the first one after
    `Name: `)."""
    if not value.isascii():
        return False
    words = value.split()
    if not words:
        return True
    if len(header_name(name)) + 2 + len(words[0]) > MAX_LINE_OCTETS:
        return False
    return all(len(w) + 1 <= MAX_LINE_OCTETS for w in words)


# -- addresses and Message-ID ----------------------------------------------------------------------
@lru_cache(maxsize=4096)
def ascii_domain(domain: str) -> str:
    """A domain in its IDNA 2008 A-label form (UTS #46 mapping, non-transitional: `faß.de` ->
    `xn--fa-hia.de`); returned as it is when it is already ASCII or cannot be encoded."""
    if domain.isascii():
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain


def sender_domain(smtp_from: str) -> str:
    _, addr = parseaddr(smtp_from)
    domain = addr.rpartition("@")[2].strip().lower()
    return ascii_domain(domain) if domain else "localhost"


_DOT_ATOM_TEXT_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def message_id_for(source: str, delivery_id: str, domain: str) -> str:
    """The Message-ID of a delivery: derived from it alone, so every attempt carries the same one.

    `<delivery_id.digest@domain>` when the delivery id is RFC 5322 dot-atom-text (as before);
    otherwise its `:` become `=` and each empty dot-separated segment (`..`, a leading or
    trailing dot) becomes `_`, so the msg-id stays valid; the digest of the original id keeps
    distinct ids distinct."""
    digest = hashlib.sha256(f"{source}\0{delivery_id}".encode()).hexdigest()[:16]
    left = delivery_id
    if not _DOT_ATOM_TEXT_RE.fullmatch(left):
        left = ".".join(seg or "_" for seg in left.replace(":", "=").split("."))
    return f"<{left}.{digest}@{_msgid_domain(domain)}>"


@lru_cache(maxsize=64)
def _msgid_domain(domain: str) -> str:
    """The right-hand side of a Message-ID: the domain when it is dot-atom-text, else localhost
    (one domain per instance: checked once)."""
    return domain if _DOT_ATOM_TEXT_RE.fullmatch(domain) else "localhost"


_UNSAFE_ADDRESS = re.compile(r"[\x00-\x20<>\x7f]")
_MAX_LINE = 76  # body lines longer than this go quoted-printable
_FOLD_AT = 78
# Printable ASCII without the specials that need quoting in a display name (RFC 5322 atext and
# spaces): such a name is written as it is on the fast path.
_PLAIN_NAME_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*")
_PLAIN_TEXT_RE = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True)
class Address:
    email: str
    name: str = ""

    @classmethod
    def from_value(cls, value: Any) -> Address:
        """A recipient as the payload carries it: `"addr"` or `{"email": ..., "name": ...}`."""
        if isinstance(value, str):
            name, addr = parseaddr(value)
            return cls(addr or value.strip(), name)
        if isinstance(value, Mapping):
            return cls(str(value.get("email") or "").strip(), str(value.get("name") or "").strip())
        raise ContentError(f"not a recipient: {value!r}")


def addresses(values: Iterable[Any] | None) -> list[Address]:
    return [Address.from_value(v) for v in values or ()]


@dataclass(frozen=True)
class Content:
    """Rendered content as stored in mail.payloads and reused by every attempt."""

    subject: str
    text: str | None
    html: str | None
    headers: Mapping[str, str] = field(default_factory=dict)
    locale: str = ""

    def validate(self) -> None:
        """Raise ContentError for an empty subject or body or an unsafe header."""
        if not self.subject or not self.subject.strip():
            raise ContentError("empty subject")
        if UNSAFE_CONTROL_RE.search(self.subject):
            raise ContentError("CR, LF, NUL or another control character in the subject")
        if not (self.text and self.text.strip()) and not (self.html and self.html.strip()):
            raise ContentError("empty body")
        if "\0" in (self.text or "") or "\0" in (self.html or ""):
            raise ContentError("NUL in the body")
        for name, value in self.headers.items():
            if not isinstance(name, str) or not header_name_allowed(name):
                raise ContentError(f"header {name!r} is not allowed (X-*, List-Unsubscribe, List-Unsubscribe-Post)")
            if not isinstance(value, str):
                raise ContentError(f"header {name!r} must be a string")
            if UNSAFE_CONTROL_RE.search(value):
                raise ContentError(f"CR, LF, NUL or another control character in header {name!r}")
            if name.lower() in STRUCTURED and not structured_value_fits(name, value):
                raise ContentError(f"header {name!r} cannot be folded within {MAX_LINE_OCTETS} octets")


@dataclass(frozen=True)
class Addressing:
    sender: Address  # MAIL_SMTP_FROM, parsed once: `Name <addr>` or `addr`
    to: Sequence[Address]
    cc: Sequence[Address] = ()
    bcc: Sequence[Address] = ()
    reply_to: Address | None = None

    def validate(self) -> None:
        for addr in (*self.to, *self.cc, *self.bcc, *([self.reply_to] if self.reply_to else [])):
            if not addr.email or "@" not in addr.email or _UNSAFE_ADDRESS.search(addr.email):
                raise ContentError(f"invalid address {addr.email!r}")
            if UNSAFE_CONTROL_RE.search(addr.email) or UNSAFE_CONTROL_RE.search(addr.name):
                raise ContentError("CR, LF, NUL or another control character in an address")
        if not self.to:
            raise ContentError("no recipient")

    def envelope_sender(self) -> str:
        return wire_address(self.sender.email)

    def envelope_recipients(self) -> list[str]:
        """To, Cc and Bcc addresses, each once (case-insensitively), in that order."""
        seen: set[str] = set()
        out: list[str] = []
        for addr in (*self.to, *self.cc, *self.bcc):
            wire = wire_address(addr.email)
            key = wire.lower()
            if key not in seen:
                seen.add(key)
                out.append(wire)
        return out

    def needs_smtputf8(self, recipients: Sequence[str] | None = None) -> bool:
        """Whether the message needs SMTPUTF8: a non-ASCII local part in the envelope or in an
        address header (Reply-To included: it cannot be encoded either)."""
        rcpts = self.envelope_recipients() if recipients is None else recipients
        if not (self.envelope_sender().isascii() and all(a.isascii() for a in rcpts)):
            return True
        return self.reply_to is not None and not wire_address(self.reply_to.email).isascii()


def wire_address(email: str) -> str:
    """The address with its domain in IDNA 2008 A-label form (the local part is left as it is)."""
    local, at, domain = email.rpartition("@")
    if not at or domain.isascii():
        return email
    return f"{local}@{ascii_domain(domain)}"


def _std_address(addr: Address) -> _StdAddress:
    local, _, domain = wire_address(addr.email).rpartition("@")
    return _StdAddress(display_name=addr.name, username=local, domain=domain)


# Encoded words of at most 75 characters: `=?utf-8?b?` + 60 base64 characters (45 octets) + `?=`.
_EW_OCTETS = 45


def _encoded_words(text: str) -> list[str]:
    """`text` as RFC 2047 `B` encoded words of at most 75 characters, split between characters
    (never inside one's UTF-8 sequence), preferably just before a space."""
    data = text.encode("utf-8")
    words: list[str] = []
    i, n = 0, len(data)
    while i < n:
        end = min(i + _EW_OCTETS, n)
        if end < n:
            while (data[end] & 0xC0) == 0x80:  # a continuation byte: back to the character's start
                end -= 1
            space = data.rfind(b" ", i + 1, end)
            if space > i:
                end = space
        words.append("=?utf-8?b?" + binascii.b2a_base64(data[i:end], newline=False).decode("ascii") + "?=")
        i = end
    return words


def _phrase(name: str) -> list[str]:
    """A display name as the tokens of an RFC 5322 phrase: atoms when it is plain ASCII, one
    quoted-string when it is ASCII with specials, else encoded words."""
    if not name.strip():
        return []
    if _PLAIN_NAME_RE.fullmatch(name):
        return name.split()
    if _PLAIN_TEXT_RE.fullmatch(name):
        return ['"' + " ".join(name.split()).replace("\\", "\\\\").replace('"', '\\"') + '"']
    return _encoded_words(name)


def _fold_tokens(name: str, tokens: Sequence[str]) -> str:
    """`Name: tok tok ...` folded before a token where a line would pass 78 characters."""
    lines: list[str] = []
    line = f"{name}:"
    fresh = True
    for token in tokens:
        if not fresh and len(line.encode("utf-8")) + 1 + len(token.encode("utf-8")) > _FOLD_AT:
            lines.append(line)
            line = ""
        line = f"{line} {token}"
        fresh = False
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _address_header(name: str, addrs: Sequence[Address], utf8: bool = False) -> bytes:
    """One address header, folded between its words. Display names are atoms, a quoted-string or
    RFC 2047 encoded words; addresses have A-label domains and, with SMTPUTF8 (`utf8`), may have
    a raw UTF-8 local part (RFC 6532)."""
    tokens: list[str] = []
    for i, a in enumerate(addrs):
        email = wire_address(a.email)
        phrase = _phrase(a.name)
        part = [*phrase, f"<{email}>"] if phrase else [email]
        if i < len(addrs) - 1:
            part[-1] += ","
        tokens += part
    text = _fold_tokens(name, tokens)
    return text.encode("utf-8" if utf8 else "ascii", "strict" if utf8 else "backslashreplace")


def _std_header(name: str, value: Any, utf8: bool) -> bytes:
    """The stdlib's rendering of a header (policy SMTP, or SMTPUTF8): the reference the tests
    compare the builder's output with. Not used to build messages: its folder costs up to ~75 ms
    for a 2,048-character value of many short non-ASCII words (it grows faster than linearly),
    and it has written blank continuation lines for long words in address headers."""
    policy = _policy.SMTPUTF8 if utf8 else _policy.SMTP
    header = policy.header_factory(name, value)
    return policy.fold_binary(name, header)


_WSP_SPLIT_RE = re.compile(r"([ \t]+)")
_FOLDABLE_ASCII_RE = re.compile(r"[\x20-\x7e\t]*")


def _fold_ascii(name: str, value: str) -> str | None:
    """Printable ASCII folded before its whitespace at 78 characters, unencoded; None when a word
    is too long for a line of 78 or could be read as an encoded word."""
    if not _FOLDABLE_ASCII_RE.fullmatch(value) or "=?" in value:
        return None
    body = value.strip(" \t")
    trailing = value[len(value.rstrip(" \t")):] if body else ""
    pieces = _WSP_SPLIT_RE.split(body)
    if any(len(w) > _FOLD_AT - 2 for w in pieces[::2]):
        return None
    lines: list[str] = []
    line = f"{name}: {pieces[0]}"
    for ws, word in zip(pieces[1::2], pieces[2::2], strict=True):
        if len(line) + len(ws) + len(word) > _FOLD_AT:
            lines.append(line)
            line = ws + word
        else:
            line += ws + word
    lines.append(line + trailing)  # trailing whitespace stays on a line with a word
    return "\r\n".join(lines) + "\r\n"


def _unstructured(name: str, value: str) -> bytes:
    """One unstructured header (RFC 5322 §3.2.5): as is when its line is short printable ASCII;
    printable ASCII with words that fit folded before its whitespace; anything else as RFC 2047
    encoded words of at most 75 characters, one a line. Linear in the value; tests hold every
    path to the stdlib's reading of it."""
    if (len(name) + 2 + len(value) <= _FOLD_AT and _PLAIN_TEXT_RE.fullmatch(value) and value.strip() == value
            and "=?" not in value):
        return f"{name}: {value}\r\n".encode("ascii")
    folded = _fold_ascii(name, value)
    if folded is None:
        folded = _fold_tokens(name, _encoded_words(value))
    return folded.encode("ascii")


def _structured(name: str, value: str) -> bytes:
    """A structured header (List-Unsubscribe*): folded at its spaces, never encoded."""
    words = value.split()
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if len(line) + 1 + len(word) > _FOLD_AT and line != f"{name}:":
            lines.append(line)
            line = ""
        line = f"{line} {word}"
    lines.append(line)
    out = "\r\n".join(lines)
    if any(len(x) > MAX_LINE_OCTETS for x in lines):
        raise ContentError(f"header {name!r} cannot be folded within {MAX_LINE_OCTETS} octets")
    return out.encode("ascii") + b"\r\n"


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _encode_body(text: str, boundary: bytes | None) -> tuple[bytes, bytes]:
    """(Content-Transfer-Encoding value, body bytes with CRLF endings and a final CRLF)."""
    raw = _normalize_newlines(text).encode("utf-8")
    lines = raw.split(b"\n")
    if (
        raw.isascii()
        and max(map(len, lines)) <= _MAX_LINE
        and not any(line.endswith((b" ", b"\t")) for line in lines)
        and (boundary is None or boundary not in raw)
    ):
        body = b"\r\n".join(lines)
        return b"7bit", body if body.endswith(b"\r\n") else body + b"\r\n"
    qp = binascii.b2a_qp(raw, quotetabs=False, istext=True, header=False)
    body = qp.replace(b"\n", b"\r\n")
    return b"quoted-printable", body if body.endswith(b"\r\n") else body + b"\r\n"


def _part(subtype: str, text: str, boundary: bytes | None) -> tuple[bytes, bytes]:
    cte, body = _encode_body(text, boundary)
    headers = (
        b'Content-Type: text/' + subtype.encode("ascii") + b'; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: " + cte + b"\r\n"
    )
    return headers, body


def boundary_for(message_id: str) -> bytes:
    # "=_" never occurs in quoted-printable output, and a 7bit part containing the boundary is
    # sent quoted-printable instead, so the boundary cannot collide with the content.
    return b"=_mt_" + hashlib.sha256(message_id.encode("utf-8")).hexdigest()[:24].encode("ascii")


# Content larger than this (subject, bodies and header values, in characters) is built off the
# event loop by the caller (workers.build_message): encoding a megabyte takes ~30 ms.
OFF_LOOP_OCTETS: Final = 64 * 1024


def content_octets(content: Content) -> int:
    """A cheap measure of the work of building `content` (characters, not octets, for speed)."""
    return (len(content.subject) + len(content.text or "") + len(content.html or "")
            + sum(len(v) for v in content.headers.values()))


def date_header(date: datetime) -> bytes:
    """The `Date:` line (RFC 5322 §3.3, email.utils.format_datetime). Whole seconds only, so for
    a UTC time it is made once per second (formatting it is ~2% of the CPU of a delivery)."""
    if date.tzinfo is UTC:
        return _utc_date_header(int(date.timestamp()))
    return b"Date: " + format_datetime(date).encode("ascii") + b"\r\n"


@lru_cache(maxsize=4)
def _utc_date_header(epoch_second: int) -> bytes:
    return b"Date: " + format_datetime(datetime.fromtimestamp(epoch_second, UTC)).encode("ascii") + b"\r\n"


def build(addressing: Addressing, content: Content, *, message_id: str, date: datetime) -> bytes:
    """The RFC 5322 message for one attempt (identical on every attempt but for `Date`).

    With a non-ASCII local part anywhere (`addressing.needs_smtputf8()`), the address headers
    are RFC 6532 UTF-8 and the message must go out with SMTPUTF8."""
    utf8 = addressing.needs_smtputf8()
    out = [
        date_header(date),
        _address_header("From", [addressing.sender], utf8),
        _address_header("To", addressing.to, utf8),
    ]
    if addressing.cc:
        out.append(_address_header("Cc", addressing.cc, utf8))
    if addressing.reply_to is not None:
        out.append(_address_header("Reply-To", [addressing.reply_to], utf8))
    out.append(_unstructured("Subject", content.subject))
    out.append(b"Message-ID: " + message_id.encode("ascii") + b"\r\n")
    out.append(b"MIME-Version: 1.0\r\n")
    if content.locale:
        out.append(b"Content-Language: " + content.locale.encode("ascii") + b"\r\n")
    for name, value in content.headers.items():
        canonical = header_name(name)
        if name.lower() in STRUCTURED:
            out.append(_structured(canonical, value))
        else:
            out.append(_unstructured(canonical, value))
    has_text = bool(content.text and content.text.strip())
    has_html = bool(content.html and content.html.strip())
    if has_text and has_html:
        boundary = boundary_for(message_id)
        out.append(b'Content-Type: multipart/alternative; boundary="' + boundary + b'"\r\n\r\n')
        for subtype, text in (("plain", content.text or ""), ("html", content.html or "")):
            headers, body = _part(subtype, text, boundary)
            out += [b"--" + boundary + b"\r\n", headers, b"\r\n", body]
        out.append(b"--" + boundary + b"--\r\n")
    else:
        subtype, text = ("plain", content.text or "") if has_text else ("html", content.html or "")
        headers, body = _part(subtype, text, None)
        out += [headers, b"\r\n", body]
    return b"".join(out)
