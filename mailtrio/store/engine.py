"""Store code of the delivery engine (asyncio coroutines taking a connection; see store/__init__).

Claims, rendered content, fenced outcomes and lease rescue. Every statement is multi-row: one
round trip claims a batch, stores a batch of rendered contents or records a batch of outcomes.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

import orjson
import trio

from mailtrio.store import Conn
from mailtrio.store.queries import q

# orjson reads an integer beyond 64 bits as a float: text with a run of 19 digits (or anything
# orjson refuses) is decoded by the standard library, which keeps such integers exact.
_LONG_INT = re.compile(r"\d{19}")


def _json(text: str | None) -> Any:
    """Decode a JSON column as the standard library would, with orjson doing the common case."""
    if text is None:
        return None
    if _LONG_INT.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


@dataclass(frozen=True)
class Claim:
    """A delivery claimed under this instance's lease, with everything an attempt needs."""

    delivery_id: str
    source: str
    payload_mode: str
    template_id: str | None
    locale: str
    resolved_locale: str | None
    recipients: dict[str, Any]
    message_id: str
    attempt_count: int
    ladder_step: int
    traceparent: str | None
    lease_started_at: datetime
    priority: int
    due: datetime | None
    payload: dict[str, Any]
    # The stored content, when it was rendered by an earlier attempt.
    subject: str | None
    text_body: str | None
    html_body: str | None
    headers: dict[str, str] | None
    rendered: bool
    # Per-recipient outcomes of earlier attempts (None until one was stored, see retry.settle).
    recipient_outcomes: list[dict[str, Any]] | None = None
    # consecutive `interrupted` attempts so far (MAIL_MAX_INTERRUPTED)
    interrupted_streak: int = 0
    # the stored payload's size as JSON text (what a render has to work through)
    payload_bytes: int = 0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Claim:
        """Decode one claimed row (its JSON columns arrive as text, see claim_due). Raises for a
        row that cannot be decoded (e.g. RecursionError for JSON nested past the recursion
        limit); see Undecodable."""
        payload = _json(row["payload"])
        recipients = _json(row["recipients"])
        headers = _json(row["headers"])
        outcomes = _json(row.get("recipient_outcomes"))
        return cls(
            delivery_id=row["delivery_id"],
            source=row["source"],
            payload_mode=row["payload_mode"],
            template_id=row["template_id"],
            locale=row["locale"],
            resolved_locale=row["resolved_locale"],
            recipients=recipients if isinstance(recipients, dict) else {},
            message_id=row["message_id"],
            attempt_count=row["attempt_count"],
            ladder_step=row["ladder_step"],
            traceparent=row["traceparent"],
            lease_started_at=row["lease_started_at"],
            priority=row["prio"],
            due=row["due"],
            payload=payload if isinstance(payload, dict) else {},
            subject=row["subject"],
            text_body=row["text_body"],
            html_body=row["html_body"],
            headers=headers if isinstance(headers, dict) else None,
            rendered=row["rendered_at"] is not None,
            recipient_outcomes=outcomes if isinstance(outcomes, list) else None,
            interrupted_streak=row.get("interrupted_streak") or 0,
            payload_bytes=len(row["payload"] or ""),
        )


@dataclass(frozen=True)
class Undecodable:
    """A claimed row that Claim.from_row could not decode: it fails alone (the rest of its batch
    goes on), fenced on its lease like any other outcome."""

    delivery_id: str
    source: str
    lease_started_at: datetime
    attempt_count: int
    ladder_step: int
    error: BaseException

    @classmethod
    def from_row(cls, row: dict[str, Any], error: BaseException) -> Undecodable:
        return cls(
            delivery_id=row["delivery_id"],
            source=row["source"],
            lease_started_at=row["lease_started_at"],
            attempt_count=row["attempt_count"],
            ladder_step=row["ladder_step"],
            error=error,
        )


# Claimed payloads to render beyond this size (JSON text, summed over the batch) are rendered in a
# worker thread, so that a large render never holds the event loop (a template looping over a
# list of a hundred thousand items takes over 100 ms); smaller batches render inline, in well under
# a millisecond per delivery.
OFF_LOOP_BYTES = 64 * 1024


def render_off_loop(claims: Sequence[Claim]) -> bool:
    """Is what this batch has to render large enough to be rendered in a worker thread?"""
    return sum(c.payload_bytes for c in claims if not c.rendered) > OFF_LOOP_BYTES


def decode_claims(rows: Sequence[dict[str, Any]]) -> tuple[list[Claim], list[Undecodable]]:
    """Decode claimed rows one by one: a row that cannot be decoded never takes its batch along."""
    claims: list[Claim] = []
    broken: list[Undecodable] = []
    for row in rows:
        try:
            claims.append(Claim.from_row(row))
        except Exception as exc:  # RecursionError, ValueError, ...: this row alone
            broken.append(Undecodable.from_row(row, exc))
    return claims, broken


@dataclass(frozen=True)
class ContentWrite:
    delivery_id: str
    lease_started_at: datetime
    subject: str
    text_body: str | None
    html_body: str | None
    headers: dict[str, str]
    resolved_locale: str

    def as_json(self) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id,
            "lease_started_at": self.lease_started_at.isoformat(),
            "subject": self.subject,
            "text_body": self.text_body,
            "html_body": self.html_body,
            "headers": self.headers,
            "resolved_locale": self.resolved_locale,
        }


@dataclass(frozen=True)
class Finish:
    """The end of one claimed attempt.

    `attempt_status` None records no attempt row (a render failure, or a claim released before
    its attempt started). `retry_ms` None means the new status is terminal; otherwise the delivery
    goes back on the schedule that far in the future. `reenter` resets schedule_entered_at.
    """

    delivery_id: str
    lease_started_at: datetime
    status: str
    status_reason: str | None
    attempt_status: str | None
    elapsed_ms: int
    provider_summary: str | None
    details: dict[str, Any] | None
    retry_ms: int | None
    ladder_step: int
    reenter: bool = True
    keep_reason: bool = False
    dead_reason: str | None = None
    # the locale of the stored content (None: keep the delivery's)
    resolved_locale: str | None = None
    # Per-recipient outcomes to store (None: keep what is stored; a delivery with one recipient
    # stores nothing).
    recipient_outcomes: list[dict[str, Any]] | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "delivery_id": self.delivery_id,
            "lease_started_at": self.lease_started_at.isoformat(),
            "status": self.status,
            "status_reason": self.status_reason,
            "attempt_status": self.attempt_status,
            "elapsed_ms": max(0, int(self.elapsed_ms)),
            "provider_summary": self.provider_summary,
            "details": self.details,
            "retry_ms": self.retry_ms,
            "ladder_step": self.ladder_step,
            "reenter": self.reenter,
            "keep_reason": self.keep_reason,
            "dead_reason": self.dead_reason,
            "resolved_locale": self.resolved_locale,
        }
        if self.recipient_outcomes is not None:
            out["recipient_outcomes"] = self.recipient_outcomes
        return out


def _no_nul(value: Any) -> Any:
    """PostgreSQL text and jsonb cannot hold NUL: drop it from every string (provider replies,
    error texts) so that one odd reply can never fail a whole batch of outcomes."""
    if isinstance(value, str):
        return value.replace("\0", "") if "\0" in value else value
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    """Compact JSON text; orjson's output is the stdlib's (`ensure_ascii=False`) for these rows, at a
    fraction of the cost. What orjson refuses (an integer beyond 64 bits, a lone surrogate) takes
    the stdlib's path and meets its usual fate."""
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _rows(items: Sequence[ContentWrite] | Sequence[Finish]) -> str:
    text = _dumps([item.as_json() for item in items])
    if "\\u0000" in text:
        text = _dumps([_no_nul(item.as_json()) for item in items])
    return text


def _batch_params(owner: str, items: Sequence[ContentWrite] | Sequence[Finish]) -> dict[str, Any]:
    """Parameters of a fenced batch write: the rows as JSON, and their ids as an array (see
    store_content in engine.sql: it keeps every plan on the primary keys)."""
    return {"owner": owner, "rows": _rows(items), "ids": [item.delivery_id for item in items]}


@functools.lru_cache(maxsize=1024)
def _claim_sql(limit: int) -> str:
    """The claim statement with its limit written in as a constant.

    Statements run often are prepared, and PostgreSQL then may use one generic plan, which
    estimates `LIMIT $n` at a tenth of the table and joins the payloads by a full scan. With the
    batch size written in, every prepared variant (one per pool size at most) plans the small
    primary-key joins it needs.
    """
    return q("claim_due").replace("%(limit)s", str(int(limit)))


async def claim_due(conn: Conn, *, owner: str, lease_seconds: float, limit: int) -> list[Claim]:
    claims, _, _ = await claim_due_and_next(conn, owner=owner, lease_seconds=lease_seconds, limit=limit)
    return claims


async def claim_due_and_next(
    conn: Conn, *, owner: str, lease_seconds: float, limit: int
) -> tuple[list[Claim], list[Undecodable], float | None]:
    """Claim due deliveries and, in the same statement, read when the next one falls due
    (seconds from now, by the database clock; None when nothing waits). Rows that cannot be
    decoded come back apart, still claimed."""
    cur = await conn.execute(_claim_sql(limit), {"owner": owner, "lease_seconds": lease_seconds})
    rows = await cur.fetchall()
    wait_s = rows[0]["wait_s"] if rows else None
    claims, broken = decode_claims([row for row in rows if row["delivery_id"] is not None])
    claims.sort(key=lambda c: (c.priority, c.due or c.lease_started_at, c.delivery_id))
    wait = None if wait_s is None else float(wait_s)
    return claims, broken, wait


class ClaimPreparation(Protocol):
    """What the engine makes of a claimed batch before its commit (see claim_batch)."""

    contents: list[ContentWrite]
    failures: list[Finish]
    # set by claim_batch: the deliveries whose content write held its fence
    stored: set[str]


P = TypeVar("P", bound=ClaimPreparation)


async def claim_batch(
    conn: Conn,
    *,
    owner: str,
    lease_seconds: float,
    limit: int,
    prepare: Callable[[list[Claim], list[Undecodable]], P],
) -> tuple[P, float | None]:
    """Claim due deliveries (with the wait until the next one is due, see claim_due_and_next),
    then store what `prepare` rendered for them and fail those it could not render or decode
    (`prepare` gets the decoded claims and the rows that could not be decoded): two round trips
    (a batch with render failures as well: four, in one transaction).

    The claim commits on its own and synchronously: a lease that reached disk is what lets a
    rescue record an `interrupted` attempt if this instance dies mid-send. The content write is
    fenced on that lease and committed with synchronous_commit off (the statement sets it for
    its own transaction), so nothing waits for a second WAL flush before sending: it is visible
    at once and durable within the WAL writer's delay or with the next synchronous commit (the
    attempt's outcome). Only a PostgreSQL crash in between
    could drop it, and then the lease expires and the next claim renders the same payload again.
    """
    claims, broken, wait = await claim_due_and_next(conn, owner=owner, lease_seconds=lease_seconds, limit=limit)
    if render_off_loop(claims):
        # `prepare` is pure CPU over immutable inputs (the catalog never changes once loaded).
        prepared = await trio.to_thread.run_sync(prepare, claims, broken)
    else:
        prepared = prepare(claims, broken)
    prepared.stored = set()
    if prepared.contents and not prepared.failures:
        # One statement, its own transaction (the usual case: one round trip, no BEGIN/COMMIT).
        cur = await conn.execute(q("store_content"), _batch_params(owner, prepared.contents))
        prepared.stored = {r["delivery_id"] for r in await cur.fetchall()}
    elif prepared.contents or prepared.failures:
        async with conn.transaction():
            if prepared.contents:
                cur = await conn.execute(q("store_content"), _batch_params(owner, prepared.contents))
                prepared.stored = {r["delivery_id"] for r in await cur.fetchall()}
            if prepared.failures:
                await conn.execute(q("finish_attempts"), _batch_params(owner, prepared.failures))
    return prepared, wait


async def finish_attempts(conn: Conn, *, owner: str, items: Sequence[Finish]) -> set[str]:
    """Record outcomes (fenced) in one statement; returns the delivery ids whose fence held."""
    params = _batch_params(owner, items)
    if not any(f.retry_ms == 0 for f in items):
        cur = await conn.execute(q("finish_attempts"), params)
        return {r["delivery_id"] for r in await cur.fetchall()}
    async with conn.pipeline():
        cur = await conn.execute(q("finish_attempts"), params)
        # Due again right now (put back at shutdown): let every instance's scheduler know.
        await conn.execute(q("notify_schedule"))
    return {r["delivery_id"] for r in await cur.fetchall()}


async def rescue_expired(
    conn: Conn, *, rescuer: str, max_interrupted: int = 3, held: Sequence[str] = (), limit: int = 500
) -> list[dict[str, Any]]:
    """Put deliveries whose lease expired and whose owner is gone (its identity lock is free)
    back on the schedule, or dead-letter those interrupted `max_interrupted` times in a row;
    returns (delivery_id, instance_id, status, status_reason) per delivery. The rescuer's own
    expired leases are rescued too, except those it still `held` (it gives them back itself)."""
    cur = await conn.execute(q("rescue_leases"), {"owner": None, "rescuer": rescuer, "limit": limit,
                                                  "max_interrupted": max_interrupted, "held": list(held)})
    return list(await cur.fetchall())


async def rescue_own_leases(
    conn: Conn, *, owner: str, max_interrupted: int = 3, limit: int = 500
) -> list[dict[str, Any]]:
    """Right after taking the identity lock, before the first claim: put back what a previous run
    of this instance left `sending` (rows as rescue_expired)."""
    cur = await conn.execute(q("rescue_leases"), {"owner": owner, "rescuer": owner, "limit": limit,
                                                  "max_interrupted": max_interrupted, "held": []})
    return list(await cur.fetchall())


# -- the instance identity lock (one MAIL_INSTANCE_ID, one live process) ---------------------------


async def identity_lock(conn: Conn, *, instance_id: str) -> tuple[bool, int]:
    """Try the session-level identity lock on this connection: (acquired, this backend's pid)."""
    cur = await conn.execute(q("identity_lock"), {"instance_id": instance_id})
    row = await cur.fetchone()
    assert row is not None
    return bool(row["acquired"]), int(row["pid"])


async def identity_holder(conn: Conn, *, instance_id: str) -> dict[str, Any] | None:
    """The session holding an instance's identity lock (pid, application_name, backend_start,
    client_addr), or None when it is free."""
    cur = await conn.execute(q("identity_holder"), {"instance_id": instance_id})
    return await cur.fetchone()


async def identity_probe(conn: Conn) -> None:
    await conn.execute(q("identity_probe"))


async def identity_release(conn: Conn, *, instance_id: str) -> None:
    await conn.execute(q("identity_release"), {"instance_id": instance_id})


async def terminate_backend(conn: Conn, *, pid: int) -> bool:
    cur = await conn.execute(q("terminate_backend"), {"pid": pid})
    row = await cur.fetchone()
    return bool(row and row["terminated"])


async def notify_schedule(conn: Conn) -> None:
    await conn.execute(q("notify_schedule"))


async def listen_schedule(conn: Conn) -> None:
    await conn.execute("LISTEN mail_schedule")


async def wait_schedule_notify(conn: Conn, within: float) -> int:
    """Wait up to `within` s for NOTIFY mail_schedule; returns how many arrived (0 or 1)."""
    count = 0
    async for _ in conn.notifies(timeout=within, stop_after=1):
        count += 1
    return count
