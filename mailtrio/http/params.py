"""Validation of path and query parameters, and the opaque keyset cursors of the listings.

Everything here raises `ApiError("invalid_argument", ...)` on bad input, so no malformed value
ever reaches the database (a NUL character, say, would otherwise be a server error).

A cursor is the base64url (unpadded) encoding of a small JSON object naming the listing it
belongs to and the keyset position of the last item of the previous page:
`{"k": "d", "t": <created_at in µs since the epoch>, "id": <delivery_id>}` for deliveries,
`"k": "dl"` for dead letters, `{"k": "m", "id": <id>}` for malformed commands. Clients treat it as
opaque; a cursor that does not decode to exactly that shape is `invalid_argument`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from werkzeug.datastructures import MultiDict

from mailtrio.http.errors import ApiError

DELIVERY_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_RECIPIENT_LENGTH = 320
MAX_CURSOR_LENGTH = 1024
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]+")
_DIGITS_RE = re.compile(r"[0-9]{1,6}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_BIGINT = (1 << 63) - 1


def invalid(message: str) -> ApiError:
    return ApiError("invalid_argument", message)


def delivery_id(value: str) -> str:
    if not DELIVERY_ID_RE.fullmatch(value):
        raise invalid("delivery_id must be 1-128 characters of [A-Za-z0-9._:-]")
    return value


def single(args: MultiDict[str, str], name: str) -> str | None:
    values = args.getlist(name)
    if len(values) > 1:
        raise invalid(f"{name} may be given at most once")
    return values[0] if values else None


def limit(args: MultiDict[str, str]) -> int:
    raw = single(args, "limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not _DIGITS_RE.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise invalid(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def one_of(args: MultiDict[str, str], name: str, allowed: Collection[str]) -> str | None:
    raw = single(args, name)
    if raw is not None and raw not in allowed:
        raise invalid(f"{name} must be one of: {', '.join(allowed)}")
    return raw


def recipient(args: MultiDict[str, str]) -> str | None:
    raw = single(args, "recipient")
    if raw is None:
        return None
    if not raw or len(raw) > MAX_RECIPIENT_LENGTH or _CONTROL_RE.search(raw):
        raise invalid(f"recipient must be 1-{MAX_RECIPIENT_LENGTH} characters without control characters")
    return raw


# -- cursors -------------------------------------------------------------------------------------
def _encode(obj: dict[str, Any]) -> str:
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode(args: MultiDict[str, str], kind: str) -> dict[str, Any] | None:
    raw = single(args, "cursor")
    if raw is None:
        return None
    bad = invalid("cursor is not a cursor of this listing")
    if len(raw) > MAX_CURSOR_LENGTH or not _CURSOR_RE.fullmatch(raw):
        raise bad
    try:
        obj = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError):
        raise bad from None
    if not isinstance(obj, dict) or obj.get("k") != kind:
        raise bad
    return obj


def encode_delivery_key(kind: str, key: tuple[datetime, str] | None) -> str | None:
    if key is None:
        return None
    created_at, did = key
    delta = created_at - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return _encode({"k": kind, "t": micros, "id": did})


def decode_delivery_key(args: MultiDict[str, str], kind: str) -> tuple[datetime, str] | None:
    obj = _decode(args, kind)
    if obj is None:
        return None
    t, did = obj.get("t"), obj.get("id")
    if (set(obj) != {"k", "t", "id"} or not isinstance(t, int) or isinstance(t, bool)
            or not isinstance(did, str) or not DELIVERY_ID_RE.fullmatch(did)):
        raise invalid("cursor is not a cursor of this listing")
    try:
        created_at = _EPOCH + timedelta(microseconds=t)
    except OverflowError:
        raise invalid("cursor is not a cursor of this listing") from None
    return created_at, did


def encode_id_key(kind: str, key: int | None) -> str | None:
    return None if key is None else _encode({"k": kind, "id": key})


def decode_id_key(args: MultiDict[str, str], kind: str) -> int | None:
    obj = _decode(args, kind)
    if obj is None:
        return None
    key = obj.get("id")
    if set(obj) != {"k", "id"} or not isinstance(key, int) or isinstance(key, bool) or not 0 < key <= _MAX_BIGINT:
        raise invalid("cursor is not a cursor of this listing")
    return key
