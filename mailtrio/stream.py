"""The only module that imports redis: the command stream client.

`Stream` wraps the consumer-group commands the intake needs. Every call runs under a Trio
deadline; redis-py's own retries are off, so every failure surfaces to the caller, which decides
how to back off (the consumer re-reads its own pending entries after any failure, so nothing read
but not acknowledged is forgotten). A missing consumer group (`NOGROUP`: the stream key was
deleted, or Redis restarted without persistence) is re-created at ID 0 with MKSTREAM and the
call is retried once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import hiredis
import redis
import redis.asyncio as aioredis
import trio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from mailtrio import bridge, log
from mailtrio.config import Settings
from mailtrio.store import StartupError

_log = log.get("mailtrio.stream")
T = TypeVar("T")

# Errors of the Redis client worth retrying after a pause (connection reset, restart, CLIENT
# KILL, LOADING, READONLY after a failover, our own deadlines).
StreamError: tuple[type[BaseException], ...] = (RedisError, OSError, trio.TooSlowError)

class _Connection(aioredis.Connection):
    """redis-py's asyncio connection, whose commands made of str, bytes and int arguments are
    packed by hiredis in C. redis-py packs every argument in Python (~1.6 us each): the largest
    part of acknowledging a batch of 2,000 entries, or of publishing a batch of events. Other
    arguments, and command names with a space in them ("XGROUP CREATE"), go the usual way;
    str is encoded as UTF-8, strictly, as redis-py's default encoder does."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if args and type(args[0]) is str and " " not in args[0]:
            for arg in args:
                kind = type(arg)
                if kind is not str and kind is not bytes and kind is not int:
                    break
            else:
                return [hiredis.pack_command(args)]
        packed: list[bytes] = super().pack_command(*args)
        return packed


# One entry as read: its ID and its fields (raw bytes). Fields are None for an entry that was
# deleted from the stream while it was pending.
Entry = tuple[str, dict[bytes, bytes] | None]

# Bound on one non-blocking call (connect + command + reply).
CALL_TIMEOUT = 10.0


def _id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_id(value: Any) -> tuple[int, int]:
    """A stream entry id as (milliseconds, sequence); "0-0" for anything unreadable."""
    ms, _, seq = _id(value or "0-0").partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def entry_ms(entry_id: str) -> int | None:
    """The millisecond timestamp of a stream entry id (None when it is not one)."""
    ms = entry_id.partition("-")[0]
    return int(ms) if ms.isdigit() else None


def _entries(raw: Any) -> list[Entry]:
    out: list[Entry] = []
    for entry_id, fields in raw or ():
        if entry_id is None:
            continue
        out.append((_id(entry_id), fields or None))
    return out


def _read_reply(response: Any, **options: Any) -> list[Entry]:
    """An XREADGROUP reply of one stream (RESP2: `[[stream, [[id, [field, value, ...]], ...]]]`)
    straight to entries, in one pass: redis-py's own parser builds each entry's dict through a
    helper call, and its ids would then be decoded one by one again. An entry deleted while it
    was pending comes as `[id, nil]`: its fields are None."""
    if not response:
        return []
    out: list[Entry] = []
    append = out.append
    for entry_id, fields in response[0][1]:
        if entry_id is None:
            continue
        if fields:
            it = iter(fields)
            append((entry_id.decode() if type(entry_id) is bytes else str(entry_id), dict(zip(it, it, strict=False))))
        else:
            append((_id(entry_id), None))
    return out


class Stream:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.command_stream
        self.group = settings.consumer_group
        self.consumer = settings.instance_id
        self.client = aioredis.Redis(
            host=settings.redis_host,
            port=settings.redis_port,
            db=settings.redis_db,
            password=settings.redis_password or None,
            socket_connect_timeout=5,
            socket_timeout=None,
            health_check_interval=0,
            client_name=f"mailtrio:{settings.instance_id}",
            # No retry inside redis-py: a failed call surfaces at once, and the loop that made it
            # (the command consumer, the event publisher) resets the client and retries with
            # mailtrio.backoff, the one backoff of every retry loop.
            retry=Retry(NoBackoff(), 0),
            # RESP2: stream replies map straight to redis-py's shapes (no RESP3 conversion)
            protocol=2,
        )
        self.client.connection_pool.connection_class = _Connection
        self.client.set_response_callback("XREADGROUP", _read_reply)
        self._add_json: Any = None

    async def ping(self, *, within: float = 5.0) -> None:
        try:
            with trio.fail_after(within):
                await bridge.call(self.client.ping)
        except (RedisError, OSError, trio.TooSlowError) as exc:
            where = f"{self.settings.redis_host}:{self.settings.redis_port}"
            detail = " ".join((str(exc) or type(exc).__name__).split())
            raise StartupError(f"cannot reach the Redis master at {where}: {detail}") from exc

    async def close(self, *, within: float = 5.0) -> None:
        """Close the client within `within` seconds and the caller's deadline (the caller shields
        it at shutdown); a connection that does not close by then is abandoned."""
        with trio.move_on_after(within):
            await bridge.call(self.client.aclose)

    async def reset(self) -> None:
        """Drop every pooled connection (after a failure: idle ones may be dead too)."""
        with trio.move_on_after(CALL_TIMEOUT):
            try:
                await bridge.call(self.client.connection_pool.disconnect)
            except (RedisError, OSError):
                pass

    # -- consumer group ------------------------------------------------------------------------
    async def ensure_group(self) -> bool:
        """Create the consumer group at ID 0 (MKSTREAM) unless it exists; True when created."""
        try:
            with trio.fail_after(CALL_TIMEOUT):
                await bridge.call(self.client.xgroup_create, self.name, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if str(exc).startswith("BUSYGROUP"):
                return False
            raise
        _log.info("consumer group created", stream=self.name, group=self.group, start_id="0")
        return True

    async def _grouped(self, fn: Callable[[], Awaitable[T]], within: float) -> T:
        """Run one group command; on NOGROUP re-create the group and try once more."""
        try:
            with trio.fail_after(within):
                return await bridge.call(fn)
        except ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            _log.warning("consumer group missing; re-creating it", stream=self.name, group=self.group)
            await self.ensure_group()
            with trio.fail_after(within):
                return await bridge.call(fn)

    async def read_new(self, count: int, block: float) -> list[Entry]:
        """XREADGROUP `>`: up to `count` never-delivered entries, waiting at most `block` seconds
        (0: what is there now, without waiting)."""

        async def _read() -> Any:
            return await self.client.xreadgroup(
                self.group, self.consumer, {self.name: ">"}, count=count,
                block=max(1, int(block * 1000)) if block > 0 else None
            )

        entries: list[Entry] = await self._grouped(_read, block + CALL_TIMEOUT)
        return entries

    async def read_pending(self, after: str, count: int) -> list[Entry]:
        """XREADGROUP from `after`: this consumer's own pending entries (delivered, not acked)."""

        async def _read() -> Any:
            return await self.client.xreadgroup(self.group, self.consumer, {self.name: after}, count=count)

        entries: list[Entry] = await self._grouped(_read, CALL_TIMEOUT)
        return entries

    async def claim(self, min_idle: float, cursor: str, count: int) -> tuple[str, list[Entry], list[str]]:
        """XAUTOCLAIM entries pending longer than `min_idle` seconds on any consumer of the group.

        Returns the next cursor ("0-0" when the sweep is complete), the claimed entries (now
        pending on this consumer) and the IDs of pending entries that no longer exist (Redis
        removes those from the pending list itself)."""

        async def _claim() -> Any:
            return await self.client.xautoclaim(
                self.name, self.group, self.consumer, max(1, int(min_idle * 1000)), cursor, count=count
            )

        reply = await self._grouped(_claim, CALL_TIMEOUT)
        next_cursor = _id(reply[0])
        deleted = [_id(x) for x in reply[2]] if len(reply) > 2 and reply[2] else []
        return next_cursor, _entries(reply[1]), deleted

    async def ack(self, ids: Sequence[str]) -> int:
        """XACK all `ids` in one call."""
        if not ids:
            return 0
        with trio.fail_after(CALL_TIMEOUT):
            return int(await bridge.call(self.client.xack, self.name, self.group, *ids))

    # -- trimming ------------------------------------------------------------------------------
    async def trim(self, older_than: float) -> tuple[int, str | None]:
        """XTRIM MINID: delete the entries older than `older_than` seconds (by the Redis server's
        clock, which stamped their ids) that every consumer group of the stream has read and
        acknowledged. An entry still pending in any group, or not yet read by one, is kept; so is
        everything when the stream has no group. Returns (entries deleted, the MINID used)."""

        async def _trim() -> tuple[int, str | None]:
            seconds, micros = await self.client.time()
            bound = (max(0, int(seconds) * 1000 + int(micros) // 1000 - int(older_than * 1000)), 0)
            try:
                groups = await self.client.xinfo_groups(self.name)
            except ResponseError as exc:
                if "no such key" in str(exc).lower():
                    return 0, None
                raise
            if not groups:
                return 0, None
            for group in groups:
                last = _parse_id(group.get("last-delivered-id"))
                # everything after last-delivered-id is unread by this group
                bound = min(bound, (last[0], last[1] + 1))
                if int(group.get("pending") or 0) > 0:
                    summary = await self.client.xpending(self.name, _id(group["name"]))
                    oldest = summary.get("min") if isinstance(summary, dict) else None
                    if oldest is not None:
                        bound = min(bound, _parse_id(oldest))
            minid = f"{bound[0]}-{bound[1]}"
            deleted = await self.client.xtrim(self.name, minid=minid, approximate=False)
            return int(deleted or 0), minid

        with trio.fail_after(CALL_TIMEOUT):
            return await bridge.call(_trim)

    # -- producing -----------------------------------------------------------------------------
    async def add(self, fields: Mapping[Any, Any]) -> str:
        """XADD one entry; returns its ID."""
        with trio.fail_after(CALL_TIMEOUT):
            return _id(await bridge.call(self.client.xadd, self.name, dict(fields)))

    async def add_json_batch(
        self,
        key: str,
        entries: Sequence[str],
        *,
        maxlen: int | None = None,
        min_id: str | None = None,
    ) -> int:
        """XADD a batch of entries, in order, in one round trip; returns how many were added.

        Each entry comes as a JSON object of string fields (as PostgreSQL wrote it) and a script
        on the server decodes it and XADDs it, trimming with `MAXLEN ~ maxlen`; a final
        `XTRIM MINID ~ min_id` drops entries older than `min_id` (both approximate: whole macro
        nodes, cheap). Entries are never parsed here: a pipeline of XADDs packed in Python cost
        twice the CPU per event (json decoding and per-field packing, ~12 us), the largest part
        of the publisher's work in the service process. Any error fails the whole call; entries
        added before it stay, and the caller publishes the batch again (at least once)."""
        if not entries:
            return 0
        if self._add_json is None:
            self._add_json = self.client.register_script(_ADD_JSON_BATCH)
        script = self._add_json
        args = [str(maxlen) if maxlen is not None else "", min_id or "", *entries]
        with trio.fail_after(CALL_TIMEOUT):
            return int(await bridge.call(script, keys=[key], args=args))


# KEYS[1]: the stream; ARGV[1]: MAXLEN ~ bound ('' = none); ARGV[2]: MINID ~ bound ('' = none);
# ARGV[3..]: the entries, each a JSON object of string fields. Entries are added in order; a
# field's position within its entry is not kept (an entry is a map).
_ADD_JSON_BATCH = """
local key, maxlen, minid = KEYS[1], ARGV[1], ARGV[2]
for i = 3, #ARGV do
    local args = {}
    for k, v in pairs(cjson.decode(ARGV[i])) do
        args[#args + 1] = k
        args[#args + 1] = v
    end
    if maxlen ~= '' then
        redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(args))
    else
        redis.call('XADD', key, '*', unpack(args))
    end
end
if minid ~= '' then
    redis.call('XTRIM', key, 'MINID', '~', minid)
end
return #ARGV - 2
"""


def tail_entries(
    host: str,
    port: int,
    *,
    stream: str,
    after: str = "$",
    db: int = 0,
    password: str | None = None,
    block: float = 5.0,
    count: int = 100,
    idle_marker: bool = False,
) -> Iterator[tuple[str | None, dict[str, str]]]:
    """Yield the entries of `stream` after entry ID `after` (`$`: only entries added from now on),
    waiting for new ones with blocking XREADs of at most `block` seconds, with a synchronous
    client (the `mailtrio events tail` helper). Fields are decoded as UTF-8. With `idle_marker`,
    a read that found nothing yields `(None, {})`. Runs until the caller stops iterating.

    A lost connection is retried by redis-py's default retry (a few tries within about 5 s, its
    own jittered exponential backoff) before StreamError ends the command: a one-shot CLI client,
    not a loop of the service, so mailtrio.backoff is not involved."""
    client = redis.Redis(
        host=host,
        port=port,
        db=db,
        password=password or None,
        socket_connect_timeout=10,
        socket_timeout=block + CALL_TIMEOUT,
        client_name="mailtrio:events-tail",
    )
    try:
        if after == "$":
            # resolve `$` once, so that nothing added between two reads is skipped
            info: Any = client.xinfo_stream(stream) if client.exists(stream) else None
            after = _id(info["last-generated-id"]) if info else "0-0"
        while True:
            reply: Any = client.xread({stream: after}, count=count, block=max(1, int(block * 1000)))
            if not reply and idle_marker:
                yield None, {}
            for entry_id, fields in reply[0][1] if reply else ():
                after = _id(entry_id)
                yield after, {_id(k): v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                              for k, v in (fields or {}).items()}
    finally:
        client.close()


def add_entry(
    host: str,
    port: int,
    fields: Mapping[Any, Any],
    *,
    stream: str,
    db: int = 0,
    password: str | None = None,
    timeout: float = 10.0,
) -> str:
    """XADD one entry with a short-lived synchronous client (the `mailtrio enqueue` helper)."""
    client = redis.Redis(
        host=host,
        port=port,
        db=db,
        password=password or None,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
    )
    try:
        return _id(client.xadd(stream, dict(fields)))
    finally:
        client.close()
