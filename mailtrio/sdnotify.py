"""systemd's notify protocol (sd_notify(3)), on a plain Unix datagram socket: no dependency.

Under `Type=notify` systemd passes the path of its socket in NOTIFY_SOCKET (a path, or `@name`
for the abstract namespace) and waits for `READY=1` before it calls the unit started; `STOPPING=1`
says a shutdown has begun and `STATUS=` is the one-line state `systemctl status` shows. Without
NOTIFY_SOCKET (not under systemd, or `Type=exec`) every call does nothing. A failed send is logged
once and never stops the service.
"""

from __future__ import annotations

import socket

from mailtrio import log

_log = log.get("mailtrio.sdnotify")


class Notifier:
    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._warned = False

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()
        return self.address

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram; True when it was sent."""
        if self.address is None or not assignments:
            return False
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, self._target())
        except OSError as exc:
            if not self._warned:
                self._warned = True
                _log.warning("systemd notification failed", error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")


def notify(address: str | None, *assignments: str) -> bool:
    """One notification to `address` (Settings.notify_socket); nothing when it is None."""
    return Notifier(address).notify(*assignments)
