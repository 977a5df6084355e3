"""An SMTP server for the fault drill (aiosmtpd, its own process).

It accepts every transaction, except that it answers `451` at the end of DATA to a fixed share
of first attempts (a Message-ID it has not seen before; chosen by a hash of the Message-ID, so
the choice is reproducible) and, at random with a given probability, drops the connection right
after the message data without any reply. Every transaction it answers is appended to a JSON-lines
record file, flushed at once:

    {"kind": "accepted" | "deferred" | "dropped", "message_id": ..., "delivery_id": ...,
     "rcpt": [...], "t": <epoch seconds>}

`delivery_id` is the value of the `X-Drill-Delivery` header the drill puts on every command.
A dropped transaction got no reply, so the client cannot know its fate: it is not a delivery.

    python faultsmtp.py --port P --record FILE [--defer-first 10] [--drop 1] [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import signal
import sys
import time
from email.parser import BytesHeaderParser
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class FaultHandler:
    def __init__(self, record: str, defer_first_pct: float, drop_pct: float, seed: int) -> None:
        self.out = open(record, "a", encoding="utf-8")  # noqa: SIM115 - closed at exit
        self.defer_first_pct = defer_first_pct
        self.drop_pct = drop_pct
        self.rnd = random.Random(seed)
        self.seen: set[str] = set()
        self.parser = BytesHeaderParser()

    def _write(self, **rec: Any) -> None:
        self.out.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.out.flush()

    def _defer_first(self, message_id: str) -> bool:
        digest = hashlib.sha256(message_id.encode()).digest()
        return int.from_bytes(digest[:4], "big") % 10000 < self.defer_first_pct * 100

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode()
        headers = self.parser.parsebytes(content)
        message_id = str(headers.get("Message-ID", "")).strip()
        delivery_id = str(headers.get("X-Drill-Delivery", "")).strip()
        rec = {"message_id": message_id, "delivery_id": delivery_id, "rcpt": list(envelope.rcpt_tos)}
        first = message_id not in self.seen
        self.seen.add(message_id)
        if first and self._defer_first(message_id):
            self._write(kind="deferred", t=time.time(), **rec)
            return "451 4.3.0 Temporary failure, try again later"
        if self.rnd.random() * 100 < self.drop_pct:
            self._write(kind="dropped", t=time.time(), **rec)
            if isinstance(server.transport, asyncio.Transport):
                server.transport.abort()
            # The connection is gone: aiosmtpd cancels this handler when it notices.
            await asyncio.sleep(3600)
            return "421 4.3.0 unreachable"
        self._write(kind="accepted", t=time.time(), **rec)
        return "250 2.0.0 OK"


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    handler = FaultHandler(args.record, args.defer_first, args.drop, args.seed)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="drill.example.com", ident="drill-smtp", enable_SMTPUTF8=True),
        host="127.0.0.1", port=args.port, backlog=1024,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    async with server:
        await stop.wait()
    handler.out.close()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--defer-first", type=float, default=10.0, help="percent of first attempts answered 451")
    p.add_argument("--drop", type=float, default=1.0, help="percent of transactions dropped after DATA")
    p.add_argument("--seed", type=int, default=7)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
