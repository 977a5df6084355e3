"""A loopback TCP proxy whose behaviour a test switches at runtime, to put a server (PostgreSQL,
Redis) behind a fault:

    forward     connections are accepted and relayed both ways
    blackhole   sockets stay open (new ones are accepted too) and nothing is relayed: a stalled
                server or a silent network partition; on `forward()` relaying resumes, as when a
                partition heals
    refuse      the listening socket is closed (new connections are refused) and every open
                connection is reset: a server that is down

Threads only (the service under test runs in its own process).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

FORWARD, BLACKHOLE, REFUSE = "forward", "blackhole", "refuse"


class _Pair:
    """One accepted client connection and its upstream connection (opened when relaying)."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.closed:
                if self.proxy.mode != FORWARD:
                    time.sleep(0.02)  # blackhole: hold the socket, read and relay nothing
                    continue
                if self.upstream is None:
                    try:
                        self.upstream = socket.create_connection(self.proxy.upstream, timeout=5)
                    except OSError:
                        return
                    self.upstream.settimeout(None)
                ready, _, _ = select.select([self.client, self.upstream], [], [], 0.05)
                for sock in ready:
                    if self.proxy.mode != FORWARD:
                        break
                    other = self.upstream if sock is self.client else self.client
                    data = sock.recv(65536)
                    if not data:
                        return
                    other.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            self.close()

    def close(self, *, reset: bool = False) -> None:
        self.closed = True
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        self.proxy._forget(self)


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = FORWARD
        self._lock = threading.RLock()
        self._pairs: set[_Pair] = set()
        self._stopped = threading.Event()
        self._listener: socket.socket | None = self._listen(0)
        self.port = int(self._listener.getsockname()[1])
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        sock.settimeout(0.05)
        return sock

    def _accept(self) -> None:
        while not self._stopped.is_set():
            listener = self._listener
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            client.settimeout(None)
            pair = _Pair(self, client)
            with self._lock:
                if self.mode == REFUSE:
                    pair.close(reset=True)
                    continue
                self._pairs.add(pair)
                self.accepted += 1
            pair.thread.start()

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)

    # -- switching -----------------------------------------------------------------------------
    def forward(self) -> None:
        with self._lock:
            if self._listener is None:
                self._listener = self._listen(self.port)
            self.mode = FORWARD

    def blackhole(self) -> None:
        with self._lock:
            if self._listener is None:
                self._listener = self._listen(self.port)
            self.mode = BLACKHOLE

    def refuse(self) -> None:
        with self._lock:
            self.mode = REFUSE
            listener, self._listener = self._listener, None
            pairs = list(self._pairs)
        if listener is not None:
            listener.close()
        for pair in pairs:
            pair.close(reset=True)

    @contextlib.contextmanager
    def fault(self, mode: str) -> Iterator[None]:
        """`with proxy.fault(BLACKHOLE): ...` then forward again."""
        {BLACKHOLE: self.blackhole, REFUSE: self.refuse, FORWARD: self.forward}[mode]()
        try:
            yield
        finally:
            self.forward()

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(2)
        with self._lock:
            listener, self._listener = self._listener, None
            pairs = list(self._pairs)
        if listener is not None:
            listener.close()
        for pair in pairs:
            pair.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
