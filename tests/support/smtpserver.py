"""A real SMTP server for tests: aiosmtpd in its own process.

STARTTLS (or implicit TLS) with a certificate from a trustme CA, optional AUTH, and behaviour
scripted per recipient address (regular expressions, first match wins):

    accept                    250
    defer                     451 4.3.0 on RCPT
    reject                    550 5.1.1 on RCPT
    suppress                  550 5.7.1 ... suppressed ... on RCPT
    rcpt552                   552 5.3.4 on RCPT (temporary per RFC 5321)
    data_defer / data_reject / data_suppress   the same after DATA
    stall                     wait `stall_s` after the message before answering (past the client's timeout)
    slow_rcpt                 wait `delay_s` before answering RCPT (250), i.e. before DATA
    drop                      read the message, then close the connection without a reply

    close421                  421 4.3.2 on RCPT, then the server closes the connection

A rule may carry `times`: it applies to the first N transactions for a matching address, after
which the address is accepted (a flaky server).

Server-wide options: `smtputf8` (offer SMTPUTF8, default true), `auth_oldstyle` (advertise
`AUTH=PLAIN LOGIN`, the pre-RFC 2554 form, instead of `AUTH LOGIN PLAIN`), `mail421` (answer the
first N MAIL commands with 421 and close), `data_without_rcpt` (answer DATA with 354 even when no
recipient was accepted, and record whatever the client then sends as `empty_data`), `record_ehlo`
(record each EHLO with the name the client gave, event `ehlo`). Every accepted message is appended to a JSON-lines
file with its Message-ID, so tests can count what reached the server; dropped, stalled and refused
transactions are recorded too, with their `event`.

Run in tests through `SmtpTestServer` (a context manager), or by hand:
    python -m tests.support.smtpserver CONFIG.json
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

_MESSAGE_ID_RE = re.compile(rb"(?im)^Message-ID:[ \t]*(<[^>\r\n]*>)")

RCPT_REPLIES = {
    "defer": "451 4.3.0 Temporary local problem, try again later",
    "reject": "550 5.1.1 User unknown",
    "suppress": "550 5.7.1 Recipient address is on the suppression list (suppressed)",
    "rcpt552": "552 5.3.4 Too many recipients for now",
    "close421": "421 4.3.2 Service shutting down, closing transmission channel",
}
DATA_REPLIES = {
    "data_defer": "451 4.3.0 Queue full, try again later",
    "data_reject": "554 5.6.0 Message content rejected",
    "data_suppress": "550 5.7.1 Message suppressed by recipient policy",
}


# -- server side (runs in the child process) -----------------------------------------------------


class _Handler:
    def __init__(self, config: dict[str, Any]) -> None:
        self.rules = [(re.compile(r["match"], re.I), r) for r in config.get("rules", [])]
        self.record_path = Path(config["record"])
        self.hits: Counter[tuple[int, str]] = Counter()
        self.record = self.record_path.open("a", encoding="utf-8")
        self.pipelining = bool(config.get("pipelining", True))
        self.implicit_tls = config.get("tls") == "tls"
        self.auth_oldstyle = bool(config.get("auth_oldstyle", False))
        self.mail421 = int(config.get("mail421", 0))
        self.record_ehlo = bool(config.get("record_ehlo", False))

    def _rule_for(self, address: str) -> dict[str, Any] | None:
        for i, (pattern, rule) in enumerate(self.rules):
            if pattern.search(address):
                times = rule.get("times")
                if times is not None and self.hits[(i, address.lower())] >= int(times):
                    return None
                return {**rule, "_index": i}
        return None

    def _use(self, rule: dict[str, Any], address: str) -> None:
        self.hits[(rule["_index"], address.lower())] += 1

    def _write(self, entry: dict[str, Any]) -> None:
        entry["ts"] = time.time()
        self.record.write(json.dumps(entry) + "\n")
        self.record.flush()  # tests read the file as soon as the client has its reply

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.record_ehlo:
            self._write({"event": "ehlo", "hostname": hostname})
        if self.pipelining:
            # aiosmtpd reads commands one by one from its stream, so pipelined commands just work.
            responses.insert(-1, "250-PIPELINING")
        if self.auth_oldstyle:
            responses = [("250-AUTH=" + r[len("250-AUTH "):]) if r.startswith("250-AUTH ") else r
                         for r in responses]
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if self.mail421 > 0:
            self.mail421 -= 1
            self._write({"event": "mail421", "address": address})
            asyncio.get_running_loop().call_later(0.05, server.transport.close)
            return "421 4.7.0 Too many connections, closing transmission channel"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        rule = self._rule_for(address)
        if rule is not None and rule["action"] == "slow_rcpt":
            self._use(rule, address)
            await asyncio.sleep(float(rule.get("delay_s", 1)))
        elif rule is not None and rule["action"] in RCPT_REPLIES:
            self._use(rule, address)
            reply = RCPT_REPLIES[rule["action"]]
            self._write({"event": "rcpt_refused", "address": address, "reply": reply})
            if rule["action"] == "close421":
                asyncio.get_running_loop().call_later(0.05, server.transport.close)
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data: bytes = envelope.original_content or envelope.content
        found = _MESSAGE_ID_RE.search(data.split(b"\r\n\r\n", 1)[0])
        entry = {
            "message_id": found.group(1).decode() if found else None,
            "mail_from": envelope.mail_from,
            "mail_options": list(envelope.mail_options),
            "rcpt_tos": list(envelope.rcpt_tos),
            "size": len(data),
            "auth": session.authenticated,
            "tls": session.ssl is not None or self.implicit_tls,
            "data": data.decode("utf-8", "surrogateescape"),
        }
        for address in envelope.rcpt_tos:
            rule = self._rule_for(address)
            if rule is None or rule["action"] in RCPT_REPLIES or rule["action"] in ("accept", "slow_rcpt"):
                continue
            action = rule["action"]
            self._use(rule, address)
            if action in DATA_REPLIES:
                self._write({"event": "data_refused", "reply": DATA_REPLIES[action], **entry})
                return DATA_REPLIES[action]
            if action == "drop":
                self._write({"event": "dropped", **entry})
                if server.transport is not None:
                    server.transport.abort()
                return "421 4.4.2 connection dropped"
            if action == "stall":
                await asyncio.sleep(float(rule.get("stall_s", 10)))
                if server.transport is None or server.transport.is_closing():
                    self._write({"event": "abandoned", **entry})
                    return "451 4.4.2 client gone"
        self._write({"event": "accepted", **entry})
        return "250 2.0.0 Ok: queued"


def _serve(config: dict[str, Any]) -> None:
    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

    handler = _Handler(config)
    tls_mode = config.get("tls", "starttls")
    ctx: ssl.SSLContext | None = None
    if tls_mode != "none":
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(config["cert"], config["key"])
    auth = config.get("auth")

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth is not None
            and auth_data.login.decode() == auth["user"]
            and auth_data.password.decode() == auth["password"]
        )
        if not ok:
            handler._write({"event": "auth_failed", "mechanism": mechanism})
        return AuthResult(success=ok, handled=False)

    data_without_rcpt = bool(config.get("data_without_rcpt", False))

    class RecordingSMTP(SMTP):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            if self.transport is None:  # not the TLS transport replacing it after STARTTLS
                handler._write({"event": "connect"})
            super().connection_made(transport)

        async def smtp_DATA(self, arg: str) -> None:
            if not (data_without_rcpt and self.envelope is not None and not self.envelope.rcpt_tos):
                await super().smtp_DATA(arg)
                return
            # A broken server: 354 with no recipient. Whatever comes next is recorded.
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            received = b""
            try:
                while not received.endswith(b"\r\n.\r\n") and received != b".\r\n":
                    received += await asyncio.wait_for(self._reader.readuntil(b"\r\n"), 5)
            except asyncio.CancelledError:
                # aiosmtpd cancels the command's coroutine when the client closes the connection
                handler._write({"event": "dropped_after_354", "received": received.decode("latin-1")})
                raise
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                handler._write({"event": "dropped_after_354", "received": received.decode("latin-1")})
                return
            handler._write({"event": "empty_data", "received": received.decode("latin-1")})
            await self.push("250 2.0.0 Ok: queued (no recipient)")

    def factory() -> SMTP:
        kwargs: dict[str, Any] = {
            "hostname": "mt-test-smtp",
            "enable_SMTPUTF8": bool(config.get("smtputf8", True)),
            "timeout": 60,
        }
        if tls_mode == "starttls":
            kwargs.update(tls_context=ctx, require_starttls=True)
        if auth is not None:
            # With implicit TLS aiosmtpd cannot tell the socket is encrypted: do not ask it to check.
            kwargs.update(authenticator=authenticator, auth_required=True, auth_require_tls=tls_mode == "starttls")
        return RecordingSMTP(handler, **kwargs)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            factory, host="127.0.0.1", port=int(config.get("port", 0)),
            ssl=ctx if tls_mode == "tls" else None,
        )
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        port = server.sockets[0].getsockname()[1]
        print(f"ready port={port}", flush=True)
        try:
            await stop.wait()
        finally:
            handler.record.flush()
            server.close()

    asyncio.run(main())


# -- test side ------------------------------------------------------------------------------------


@dataclass
class Certs:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_certs(directory: Path, name: str = "ca") -> Certs:
    """A trustme CA and a server certificate for 127.0.0.1 and localhost."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file = directory / f"{name}.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file = directory / f"{name}-server.pem"
    key_file = directory / f"{name}-server.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        with cert_file.open("ab") as fh:
            fh.write(extra.bytes())
    return Certs(ca_file, cert_file, key_file)


class SmtpTestServer:
    """The SMTP test server in its own process. Use as a context manager."""

    def __init__(
        self,
        directory: Path,
        *,
        rules: list[dict[str, Any]] | None = None,
        tls: str = "starttls",
        auth: tuple[str, str] | None = None,
        certs: Certs | None = None,
        port: int = 0,
        pipelining: bool = True,
        **options: Any,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.certs = certs or (make_certs(directory) if tls != "none" else None)
        self.record_path = directory / f"smtp-{os.getpid()}-{id(self)}.jsonl"
        self.record_path.touch()
        self.config: dict[str, Any] = {
            "tls": tls,
            "rules": rules or [],
            "record": str(self.record_path),
            "auth": {"user": auth[0], "password": auth[1]} if auth else None,
            "port": port,
            "pipelining": pipelining,
            **options,
        }
        if self.certs is not None:
            self.config.update(cert=str(self.certs.cert_file), key=str(self.certs.key_file))
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self._stderr: list[str] = []

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        assert self.certs is not None
        return self.certs.ca_file

    def start(self) -> SmtpTestServer:
        config_path = self.directory / f"smtp-config-{id(self)}.json"
        config_path.write_text(json.dumps(self.config))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.smtpserver", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready port="):
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise RuntimeError(f"SMTP test server did not start: {line!r} {err[-2000:]}")
        self.port = int(line.strip().split("=", 1)[1])
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> SmtpTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection -----------------------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        out = []
        with self.record_path.open(encoding="utf-8") as fh:
            for line in fh:
                # a last line without its newline is still being written: not an event yet
                if line.strip() and line.endswith("\n"):
                    out.append(json.loads(line))
        return out

    def accepted(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == "accepted"]

    def accepted_by_message_id(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for e in self.accepted():
            out[e["message_id"]].append(e)
        return dict(out)

    def wait_accepted(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.accepted()
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"SMTP server accepted {len(got)} of {count} messages in {timeout}s")
            time.sleep(0.05)

    def ehlo_names(self) -> list[str]:
        return [e["hostname"] for e in self.events() if e["event"] == "ehlo"]

    def connections(self) -> int:
        return sum(1 for e in self.events() if e["event"] == "connect")

    def stderr(self) -> str:
        return "".join(self._stderr)


def iter_messages(server: SmtpTestServer) -> Iterator[bytes]:
    for e in server.accepted():
        yield e["data"].encode("utf-8", "surrogateescape")


if __name__ == "__main__":
    _serve(json.loads(Path(sys.argv[1]).read_text()))
