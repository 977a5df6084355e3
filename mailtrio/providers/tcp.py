"""The SMTP client's TCP transport: a connected socket driven with Trio's I/O waits, which goes
through the scheduler only when it has to wait.

`trio.SocketStream` makes every send and every receive a full schedule point: after the system
call succeeds it still yields to the run loop (`cancel_shielded_checkpoint`), which then runs
every other ready task before this one goes on. An SMTP transaction is four such calls (the
pipelined commands, their replies, the message, its reply); with 16 workers, a claim loop and
the outcome writer on one loop, those yields cost ~7% of the service's CPU per delivery
(`scripts/bench --scenarios e2e`, same sitting). `TcpStream` checks for cancellation on every
call (`checkpoint_if_cancelled`: a cancelled caller is interrupted at once, as with any Trio
stream) but yields only when the socket is not ready. A worker still yields at least once per
job: taking the next job from the channel is a schedule point, and so is waiting for any reply
that has not arrived yet.

The connection is made by `trio.open_tcp_stream` (name resolution, happy eyeballs, its
TCP_NODELAY); `adopt` then takes its file descriptor over. STARTTLS and implicit TLS wrap this
stream in `trio.SSLStream` as they would a `SocketStream`. Errors follow Trio's stream contract:
`trio.BrokenResourceError` for a failed socket, `trio.ClosedResourceError` once closed here,
`trio.BusyResourceError` for two concurrent sends or two concurrent receives. (It is not a
schedule point on every call, so `trio.testing.check_half_closeable_stream`, which asserts that,
does not apply; tests/providers/test_tcp_stream.py checks the rest of that contract.)
"""

from __future__ import annotations

import errno
import socket

import trio

DEFAULT_RECEIVE_SIZE = 65536


class TcpStream(trio.abc.HalfCloseableStream):
    def __init__(self, sock: socket.socket) -> None:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("TcpStream needs a SOCK_STREAM socket")
        sock.setblocking(False)
        self.socket = sock
        self._sending = False
        self._receiving = False
        self._closed = False
        self._shut_wr = False

    @classmethod
    def adopt(cls, stream: trio.SocketStream) -> TcpStream:
        """Take over the connected socket of `stream` (which must not be used afterwards)."""
        trio_sock = stream.socket
        family, type_, proto = trio_sock.family, trio_sock.type, trio_sock.proto
        return cls(socket.socket(family, type_, proto, fileno=trio_sock.detach()))

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_open()
            await trio.lowlevel.checkpoint_if_cancelled()
            with memoryview(data) as view:
                sent, total = 0, len(view)
                while sent < total:
                    try:
                        sent += self.socket.send(view[sent:])
                    except BlockingIOError:
                        # raises ClosedResourceError if aclose() is called meanwhile
                        await trio.lowlevel.wait_writable(self.socket)
                    except OSError as exc:
                        raise trio.BrokenResourceError(f"socket send failed: {exc}") from exc
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_open()
            await trio.lowlevel.wait_writable(self.socket)
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            self._check_open()
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    return self.socket.recv(max_bytes)
                except BlockingIOError:
                    # raises ClosedResourceError if aclose() is called meanwhile
                    await trio.lowlevel.wait_readable(self.socket)
                except OSError as exc:
                    raise trio.BrokenResourceError(f"socket receive failed: {exc}") from exc
        finally:
            self._receiving = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_open()
            await trio.lowlevel.checkpoint()
            if self._shut_wr:
                return
            self._shut_wr = True
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    raise trio.BrokenResourceError(f"socket shutdown failed: {exc}") from exc
        finally:
            self._sending = False

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # wakes any task waiting on this socket with ClosedResourceError, then closes it
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()
