"""Committing the outcomes of one stream batch: deliveries, duplicates and quarantine rows.

`commit_batch` runs inside one transaction (the caller wraps it in `Database.transaction`) and
issues a handful of multi-row statements whatever the batch size. The database decides
idempotency: reservations are taken with INSERT .. ON CONFLICT, so two consumers racing on the
same command serialise on the reservation row and exactly one of them creates the delivery.

Commands that share an idempotency key or a delivery id inside one batch are split into rounds
(stream order preserved among them); each round sees the previous round's writes, so a repeat
inside a batch behaves exactly as the same repeat across two batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import orjson
import psycopg
from psycopg.rows import tuple_row

from mailtrio.commands import Command, Malformed
from mailtrio.message import message_id_for
from mailtrio.store import Conn
from mailtrio.store.queries import q

# The database refused a value of the batch (bad input for a type, a CHECK constraint): not
# transient, so retrying the same batch would fail again.
DataRejected: tuple[type[BaseException], ...] = (psycopg.DataError, psycopg.IntegrityError)


# The scheduler is woken (NOTIFY mail_schedule, delivered at commit, sent by the accepting
# statement itself) when the batch created a delivery due now or within this horizon; later ones
# it finds through its next-due wait.
NOTIFY_HORIZON = timedelta(seconds=2)


class ReservationVanished(Exception):
    """A reservation that blocked this batch disappeared before it could be read (retention
    deleted an expired one in between). Retrying the batch resolves it."""


@dataclass
class BatchResult:
    accepted: list[Command] = field(default_factory=list)
    # (command, delivery id of the command it repeats)
    duplicates: list[tuple[Command, str]] = field(default_factory=list)
    # quarantine rows written by this transaction (validation failures and conflicts)
    rejected: list[Malformed] = field(default_factory=list)
    # malformed entries whose row already existed (a redelivered entry)
    already_rejected: list[Malformed] = field(default_factory=list)
    notified: bool = False


def plan_rounds(commands: Sequence[Command]) -> list[list[Command]]:
    """Split commands so that no round holds two with the same (source, key) or delivery id.

    A command goes one round after the latest round holding its key or its delivery id, so
    commands that depend on each other keep their stream order."""
    if not commands:
        return []
    first: list[Command] = []
    rounds: list[list[Command]] = [first]
    key_round: dict[tuple[str, str], int] = {}
    id_round: dict[str, int] = {}
    for cmd in commands:
        key = (cmd.source, cmd.idempotency_key)
        by_key = key_round.get(key)
        by_id = id_round.get(cmd.delivery_id)
        if by_key is None and by_id is None:
            # the common command: nothing before it in the batch shares its key or id
            first.append(cmd)
            key_round[key] = 0
            id_round[cmd.delivery_id] = 0
            continue
        n = max(-1 if by_key is None else by_key, -1 if by_id is None else by_id) + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(cmd)
        key_round[key] = n
        id_round[cmd.delivery_id] = n
    return rounds


async def commit_batch(
    conn: Conn,
    commands: Sequence[Command],
    malformed: Sequence[Malformed],
    *,
    ttl: timedelta,
    message_domain: str,
    make_conflict: Callable[[Command, str], Malformed],
    redelivered: bool = False,
) -> BatchResult:
    """Commit every outcome of one batch. Call inside a transaction."""
    result = BatchResult()
    if redelivered:
        done = await prior_outcomes(conn, commands, malformed)
        if done:
            # A redelivered accepted command is a duplicate of itself; a redelivered rejected
            # entry keeps its quarantine row (or the delivery it created before).
            result.duplicates.extend((c, c.delivery_id) for c in commands if c.stream_entry_id in done)
            result.already_rejected.extend(m for m in malformed if m.stream_entry_id in done)
            commands = [c for c in commands if c.stream_entry_id not in done]
            malformed = [m for m in malformed if m.stream_entry_id not in done]
    conflicts: list[Malformed] = []
    for round_ in plan_rounds(commands):
        await _commit_round(conn, round_, ttl, message_domain, make_conflict, result, conflicts)
    to_record = [*malformed, *conflicts]
    if to_record:
        recorded = await insert_malformed(conn, to_record)
        for m in to_record:
            (result.rejected if m.stream_entry_id in recorded else result.already_rejected).append(m)
    return result


async def _commit_round(
    conn: Conn,
    round_: list[Command],
    ttl: timedelta,
    message_domain: str,
    make_conflict: Callable[[Command, str], Malformed],
    result: BatchResult,
    conflicts: list[Malformed],
) -> None:
    tcur = conn.cursor(row_factory=tuple_row)
    await tcur.execute(
        q("intake_accept"),
        {"ttl": ttl, "rows": _accept_rows(round_, message_domain), "notify_within": NOTIFY_HORIZON},
    )
    # only the commands not accepted come back: (1-based position, reservation taken); position 0
    # says the scheduler was woken (a delivery inserted here is due within NOTIFY_HORIZON)
    missed = await tcur.fetchall()
    if missed and missed[0][0] == 0:
        result.notified = True
        missed = missed[1:]
    if not missed:
        result.accepted.extend(round_)
        return
    blocked = [round_[n - 1] for n, reserved in missed if not reserved]
    clashed = [round_[n - 1] for n, reserved in missed if reserved]

    if blocked:
        rows = _json([[c.source, c.idempotency_key] for c in blocked])
        cur = await conn.execute(q("intake_reservations_get"), {"rows": rows})
        live = {(row["source"], row["idempotency_key"]): row for row in await cur.fetchall()}
        for cmd in blocked:
            row = live.get((cmd.source, cmd.idempotency_key))
            if row is None:
                raise ReservationVanished(f"reservation of {cmd.source}/{cmd.idempotency_key!r} vanished")
            if row["fingerprint"] == cmd.fingerprint:
                result.duplicates.append((cmd, row["delivery_id"]))
            else:
                conflicts.append(
                    make_conflict(
                        cmd,
                        f"idempotency_key {cmd.idempotency_key!r} of source {cmd.source} is already "
                        f"reserved by delivery {row['delivery_id']!r} with other content",
                    )
                )

    missed_at = {n - 1 for n, _ in missed}
    result.accepted.extend(c for i, c in enumerate(round_) if i not in missed_at)
    if not clashed:
        return
    cur = await conn.execute(q("intake_delivery_owners"), {"delivery_ids": [c.delivery_id for c in clashed]})
    owners = {row["delivery_id"]: row for row in await cur.fetchall()}
    release: list[Command] = []
    for cmd in clashed:
        owner = owners.get(cmd.delivery_id)
        if owner is not None and (owner["source"], owner["idempotency_key"]) == (cmd.source, cmd.idempotency_key):
            # The same command again after its reservation expired: the delivery exists.
            result.duplicates.append((cmd, cmd.delivery_id))
            continue
        release.append(cmd)
        if owner is None:
            detail = f"delivery_id {cmd.delivery_id!r} was used by another command"
        else:
            detail = (
                f"delivery_id {cmd.delivery_id!r} already belongs to idempotency_key "
                f"{owner['idempotency_key']!r} of source {owner['source']}"
            )
        conflicts.append(make_conflict(cmd, detail))
    if release:
        await conn.execute(q("intake_release_reservations"), {"rows": _reservation_rows(release)})


def accept_row(c: Command, message_domain: str) -> list[Any]:
    """A command's row of `intake_accept`, columns by position (JSON texts as fragments). The
    consumer builds it ahead of the commit (`Command.row`), while the previous batch is being
    committed; the commit serialises a round's rows in one call."""
    fragment = orjson.Fragment
    return [
        c.delivery_id,
        c.source,
        c.idempotency_key,
        c.fingerprint,
        c.payload_mode,
        c.template_id,
        c.locale,
        fragment(c.recipients_json),
        c.send_at_text if c.send_at_text is not None or c.send_at is None else c.send_at.isoformat(),
        message_id_for(c.source, c.delivery_id, message_domain),
        c.traceparent,
        c.stream_entry_id,
        fragment(c.payload_json),
    ]


def _accept_rows(commands: Sequence[Command], message_domain: str) -> str:
    """The rows of `intake_accept` (see `accept_row`; a row built ahead is used as it is)."""
    return _json([c.row if c.row is not None else accept_row(c, message_domain) for c in commands])


async def insert_malformed(conn: Conn, rows: Sequence[Malformed]) -> set[str]:
    """Insert quarantine rows; return the stream entry ids recorded now (not before)."""
    data = _json(
        [[m.failure_code, m.failure_detail, m.stream_entry_id, m.delivery_id, m.source, m.fields] for m in rows]
    )
    cur = await conn.execute(q("intake_insert_malformed"), {"rows": data})
    return {row["stream_entry_id"] for row in await cur.fetchall()}


async def prior_outcomes(conn: Conn, commands: Iterable[Command], malformed: Iterable[Malformed]) -> set[str]:
    """Entries of a redelivered batch whose outcome was committed before the redelivery."""
    pairs: list[tuple[str | None, str]] = [(c.delivery_id, c.stream_entry_id) for c in commands]
    pairs += [(m.delivery_id, m.stream_entry_id) for m in malformed]
    if not pairs:
        return set()
    rows = _json([[p[0], p[1]] for p in pairs])
    cur = await conn.execute(q("intake_prior_outcomes"), {"rows": rows})
    return {row["stream_entry_id"] for row in await cur.fetchall()}


def _json(rows: list[list[Any]]) -> str:
    """Rows as one JSON array of arrays (the statements read columns by position). Payloads
    and recipients are embedded as the JSON they already are (orjson.Fragment), not re-escaped."""
    return orjson.dumps(rows).decode()


def _reservation_rows(commands: Sequence[Command]) -> str:
    return _json([[c.source, c.idempotency_key, c.delivery_id, c.fingerprint] for c in commands])
