"""The SMTP client's TCP transport (mailtrio.providers.tcp.TcpStream) over real loopback TCP:
Trio's stream contract (data, partial sends, EOF, close, concurrent use, a reset peer,
cancellation), and the one way it differs from trio.SocketStream on purpose: a call that does not
have to wait does not yield to the scheduler."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel
import trio.testing

from mailtrio.providers.tcp import TcpStream


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[TcpStream, trio.SocketStream]]:
    """A TcpStream (the client side, adopted from trio.open_tcp_stream) and the server's side."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        client = TcpStream.adopt(await trio.open_tcp_stream("127.0.0.1", port))
        server = await listeners[0].accept()
        assert isinstance(server, trio.SocketStream)
        try:
            with trio.fail_after(20):  # every wait of a test on this pair is bounded
                yield client, server
        finally:
            await client.aclose()
            await server.aclose()


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(65536)
        assert chunk, "EOF before all the data came"
        data += chunk
    return bytes(data)


async def test_bytes_go_both_ways_and_a_large_send_completes_while_the_peer_reads_slowly() -> None:
    async with connected() as (client, server):
        await client.send_all(b"EHLO x\r\n")
        assert await receive_exactly(server, 8) == b"EHLO x\r\n"
        await server.send_all(b"250 ok\r\n")
        assert await client.receive_some() == b"250 ok\r\n"

        # Far more than the socket buffers hold: send_all must wait for room, more than once.
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * (8 * 1024 * 4)  # 8 MiB
        got = bytearray()

        async def slow_reader() -> None:
            while len(got) < len(big):
                got.extend(await server.receive_some(16384))
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            await client.send_all(memoryview(big))
        assert bytes(got) == big


async def test_send_eof_ends_one_direction_only_and_may_be_repeated() -> None:
    async with connected() as (client, server):
        await client.send_all(b"x")
        await client.send_eof()
        await client.send_eof()
        assert await receive_exactly(server, 1) == b"x"
        assert await server.receive_some(10) == b""
        await server.send_all(b"still here")
        assert await receive_exactly(client, 10) == b"still here"
        with pytest.raises(trio.BrokenResourceError):
            # writing after our own EOF: the socket refuses (EPIPE)
            await client.send_all(b"more")


async def test_the_peer_closing_is_an_empty_read() -> None:
    async with connected() as (client, server):
        await server.aclose()
        assert await client.receive_some() == b""


async def test_closing_wakes_a_waiting_receiver_and_every_later_call_is_refused() -> None:
    async with connected() as (client, _server):
        outcome: list[BaseException] = []

        async def receiver() -> None:
            try:
                await client.receive_some()
            except BaseException as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()
        assert len(outcome) == 1 and isinstance(outcome[0], trio.ClosedResourceError)
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await client.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await client.send_eof()
        await client.aclose()  # closing twice is fine


async def test_two_receivers_or_two_senders_at_once_are_refused() -> None:
    async with connected() as (client, server):
        with pytest.raises(BaseExceptionGroup) as receiving:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.receive_some)
                await trio.testing.wait_all_tasks_blocked()
                await client.receive_some()
        assert receiving.group_contains(trio.BusyResourceError)
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with pytest.raises(BaseExceptionGroup) as sending:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, b"x" * (16 * 1024 * 1024))
                await trio.testing.wait_all_tasks_blocked()
                await client.send_all(b"y")
        assert sending.group_contains(trio.BusyResourceError)
        # both directions still work afterwards
        await server.send_all(b"250 ok\r\n")
        assert await receive_exactly(client, 8) == b"250 ok\r\n"


async def test_a_reset_connection_is_a_broken_resource() -> None:
    async with connected() as (client, server):
        # close with SO_LINGER 0: the peer's kernel answers with RST
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await server.aclose()
        await trio.sleep(0.05)
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):
                await client.send_all(b"x" * 65536)
                await trio.sleep(0.001)


async def test_a_cancelled_caller_is_interrupted_even_when_data_is_waiting() -> None:
    async with connected() as (client, server):
        await server.send_all(b"250 ok\r\n")
        await trio.sleep(0.05)
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.receive_some()
            pytest.fail("receive_some returned inside a cancelled scope")
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.send_all(b"x")
            pytest.fail("send_all returned inside a cancelled scope")
        # nothing was lost: the reply is still there
        assert await client.receive_some() == b"250 ok\r\n"
        with trio.move_on_after(0.2) as waited:
            await client.receive_some()
        assert waited.cancelled_caught, "a receive with nothing to read waits, within its deadline"


async def test_a_call_that_need_not_wait_does_not_let_other_tasks_run_unlike_socketstream() -> None:
    """The point of TcpStream: with the data already there, a receive and a send finish without a
    trip through the scheduler (trio.SocketStream makes one every time)."""

    async def ticks_during(stream: trio.abc.Stream, peer: trio.abc.Stream) -> int:
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()
            for _ in range(20):
                await peer.send_all(b"250 ok\r\n")
                await trio.sleep(0.002)  # the reply is in our socket's buffer now
                start = ticks
                assert await stream.receive_some() == b"250 ok\r\n"
                await stream.send_all(b"NOOP\r\n")
                ticks_in_calls = ticks - start
                assert await receive_exactly(peer, 6) == b"NOOP\r\n"
                if ticks_in_calls:
                    break
            stop = True
            return ticks_in_calls

    async with connected() as (client, server):
        assert await ticks_during(client, server) == 0
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    with trio.fail_after(20):
        async with listeners[0]:
            plain = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
            other = await listeners[0].accept()
            async with plain, other:
                assert await ticks_during(plain, other) > 0
