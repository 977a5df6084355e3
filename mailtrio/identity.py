"""One MAIL_INSTANCE_ID, one live process: the instance identity lock.

The id names the consumer in the Redis group and owns the leases. Two live processes under one
id (cloned VMs, containers where the pid is always 1 and the hostname repeats) would each take
the other's leases for a previous run's and send those messages again. So the process holds a
session-level PostgreSQL advisory lock keyed on its id, on a dedicated connection, for its whole
life (engine.sql: identity_lock):

- At startup, right after the migrations and before anything is consumed or claimed, the lock
  is taken; a second process with the same id while the first lives exits 1 with one line
  naming MAIL_INSTANCE_ID and the session holding it. (A predecessor that just died may still
  hold it for a moment while PostgreSQL notices: the lock is retried for STARTUP_WAIT first.)
- Holding it proves that no earlier run under this id is alive, which is what lets the scheduler
  rescue that run's leases at once. Another instance's expired lease is rescued only when no
  session holds its owner's lock (engine.sql: rescue_leases).
- The connection is probed every PROBE_INTERVAL. When it breaks (PostgreSQL restarted or failed
  over, the network dropped) or a probe does not answer within PROBE_TIMEOUT, the lock counts as
  lost at once: the scheduler stops claiming and the workers start no SMTP transaction
  (`holds()` is False; they give their deliveries back unsent). The lock is then re-acquired on a
  new connection, with backoff. If a session of this very process still holds it (the old
  connection not yet gone on the server), that session is terminated and the lock taken again.
  If another session holds it and keeps it for STARTUP_WAIT, another process has taken this
  identity: this one stops claiming and exits 1 (IdentityConflict). Not at once, because that
  session may be this process's own: an attempt abandoned at its deadline while the network was
  healing can reach the server after all, take the lock there, and hold it until the server
  notices its client gone (moments later). Meanwhile nothing is claimed or sent.

The server-side TCP keepalives set on the lock's session make PostgreSQL release the lock of a
host that vanished (power loss, a kernel panic) within about 25 s. A process that is merely
stopped (SIGSTOP, a VM pause) keeps its lock, and so its leases, until it resumes or dies.
"""

from __future__ import annotations

from typing import Any

import trio

from mailtrio import log, shutdown
from mailtrio.backoff import Backoff
from mailtrio.store import Conn, Database, StartupError, close_quietly
from mailtrio.store import engine as store

_log = log.get("mailtrio.identity")

PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 5.0
# At startup, how long a lock held by someone else is retried before giving up.
STARTUP_WAIT = 3.0
STARTUP_POLL = 0.25
# Re-acquiring a lost lock (mailtrio.backoff): about 0.2 s, doubling to about 2 s.
RECONNECT_BACKOFF = (0.2, 2.0)


class IdentityConflict(Exception):
    """Another live process holds this MAIL_INSTANCE_ID."""


def describe_holder(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "another session"
    parts = [f"PostgreSQL backend pid {holder.get('pid')}"]
    if holder.get("application_name"):
        parts.append(f"application_name {holder['application_name']!r}")
    if holder.get("client_addr"):
        parts.append(f"client {holder['client_addr']}")
    if holder.get("backend_start") is not None:
        parts.append(f"connected since {holder['backend_start'].isoformat(timespec='seconds')}")
    return ", ".join(parts)


class InstanceIdentity:
    def __init__(self, db: Database, instance_id: str) -> None:
        self.db = db
        self.instance_id = instance_id
        self._conn: Conn | None = None
        self._pid: int | None = None
        self._held = False
        self.changed = trio.Event()
        self.losses = 0

    def holds(self) -> bool:
        """True while the lock is known held (its connection answered its last probe)."""
        return self._held

    def _set_held(self, held: bool) -> None:
        if held != self._held:
            self._held = held
            self.changed.set()
            self.changed = trio.Event()

    # -- taking the lock ---------------------------------------------------------------------
    async def _try(self) -> tuple[bool, dict[str, Any] | None]:
        """One attempt on a fresh connection: (acquired, holder when not)."""
        conn = await self.db.connect_direct()
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                acquired, pid = await store.identity_lock(conn, instance_id=self.instance_id)
                holder = None if acquired else await store.identity_holder(conn, instance_id=self.instance_id)
        except BaseException:
            await self._close(conn)
            raise
        if acquired:
            self._conn, self._pid = conn, pid
            self._set_held(True)
            return True, None
        await self._close(conn)
        return False, holder

    async def acquire(self) -> None:
        """At startup: take the lock, or raise StartupError naming MAIL_INSTANCE_ID."""
        deadline = trio.current_time() + STARTUP_WAIT
        while True:
            try:
                acquired, holder = await self._try()
            except Exception as exc:
                raise StartupError(f"cannot take the instance identity lock: {_one_line(exc)}") from exc
            if acquired:
                _log.info("instance identity lock acquired", instance_id=self.instance_id, backend_pid=self._pid)
                return
            if trio.current_time() >= deadline:
                raise StartupError(
                    f"MAIL_INSTANCE_ID {self.instance_id!r} is already in use by a live process "
                    f"({describe_holder(holder)} holds its identity lock): every running instance needs "
                    "its own MAIL_INSTANCE_ID")
            # Not a retry after an error (an error ends start-up above): a short poll, bounded by
            # STARTUP_WAIT, for a predecessor's session to vanish. A fixed step notices that
            # soonest; backoff and jitter would only delay the start.
            await trio.sleep(STARTUP_POLL)

    # -- keeping it ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe the lock's connection; on loss re-acquire it, or raise IdentityConflict."""
        task_status.started()
        try:
            while True:
                await self._watch()
                self._set_held(False)
                self.losses += 1
                await self._reacquire()
        finally:
            await self.release()

    async def _watch(self) -> None:
        """Return when the lock's connection fails a probe (the lock then counts as lost)."""
        while True:
            await trio.sleep(PROBE_INTERVAL)
            conn = self._conn
            if conn is None:
                return
            try:
                with trio.fail_after(PROBE_TIMEOUT):
                    await store.identity_probe(conn)
            except Exception as exc:
                _log.error("instance identity lock lost; claiming and sending stop until it is re-acquired",
                           instance_id=self.instance_id, error=_one_line(exc))
                self._conn = None
                await self._close(conn)
                return

    async def _reacquire(self) -> None:
        backoff = Backoff(*RECONNECT_BACKOFF)
        delay = backoff.next()
        # another session seen holding the lock: (its backend pid, when first seen)
        foreign: tuple[Any, float] | None = None
        while True:
            try:
                acquired, holder = await self._try()
            except Exception as exc:
                _log.warning("instance identity lock: reconnect failed", instance_id=self.instance_id,
                             error=_one_line(exc), retry_in_s=round(delay, 3))
            else:
                if acquired:
                    _log.info("instance identity lock re-acquired", instance_id=self.instance_id,
                              backend_pid=self._pid)
                    return
                old = self._pid
                if holder is not None and old is not None and holder.get("pid") == old:
                    # Our own previous session, not yet gone on the server: end it.
                    _log.warning("instance identity lock still held by this process's previous session; "
                                 "terminating it", instance_id=self.instance_id, backend_pid=old)
                    try:
                        await self._terminate(old)
                    except Exception as exc:
                        _log.warning("could not terminate the previous session", error=_one_line(exc))
                else:
                    now = trio.current_time()
                    pid = holder.get("pid") if holder is not None else None
                    if foreign is None or foreign[0] != pid:
                        foreign = (pid, now)
                        _log.warning("instance identity lock held by another session; waiting to see whether it "
                                     "goes", instance_id=self.instance_id, holder=describe_holder(holder),
                                     wait_s=STARTUP_WAIT)
                    elif now - foreign[1] >= STARTUP_WAIT:
                        message = (f"MAIL_INSTANCE_ID {self.instance_id!r} was taken by another live process "
                                   f"({describe_holder(holder)}) while this one's identity lock was lost; "
                                   "stopping")
                        _log.error("instance identity conflict", instance_id=self.instance_id,
                                   holder=describe_holder(holder))
                        raise IdentityConflict(message)
                    # a short poll, as at startup: a session of our own goes within moments
                    await trio.sleep(STARTUP_POLL)
                    continue
            await trio.sleep(delay)
            delay = backoff.next()

    async def _terminate(self, pid: int) -> None:
        conn = await self.db.connect_direct()
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                await store.terminate_backend(conn, pid=pid)
        finally:
            await self._close(conn)

    # -- letting go -----------------------------------------------------------------------------
    async def release(self) -> None:
        """Unlock and close (shielded, bounded, and never past the shutdown deadline): at the very
        end of the process."""
        conn, self._conn = self._conn, None
        self._set_held(False)
        if conn is None:
            return
        with shutdown.shielded(2.0, reserve=0.0):
            try:
                await store.identity_release(conn, instance_id=self.instance_id)
            except Exception:
                pass  # closing the session releases it as well
        await self._close(conn)

    @staticmethod
    async def _close(conn: Conn) -> None:
        await close_quietly(conn)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
