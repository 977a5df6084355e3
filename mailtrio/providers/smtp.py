"""The SMTP provider: an ESMTP client on Trio streams (RFC 5321, 3207 STARTTLS, 4954 AUTH, 2920
PIPELINING, 1870 SIZE, 6531 SMTPUTF8).

Each attempt worker owns one `SmtpSession`, a persistent connection reused across messages:
connect, EHLO with MAIL_SMTP_HELO_NAME (default: the host's fully qualified name, else the domain
of MAIL_SMTP_FROM), STARTTLS (`MAIL_SMTP_TLS=starttls`, required) or implicit TLS (`tls`), AUTH
PLAIN or LOGIN when credentials are configured (the `AUTH=` form of old servers is understood, as
smtplib does). A transaction is MAIL (with `SMTPUTF8` when an envelope address has a non-ASCII
local part, and `BODY=8BITMIME` for 8-bit content), one RCPT per envelope recipient (every reply
kept: the engine records each recipient's outcome) and DATA, sent in one write when the server
offers PIPELINING, then the message with CRLF line ends and dot-stuffing (as smtplib's `data`).

A connection that sat idle is probed with RSET before use. A 421 reply always closes the
connection (RFC 5321 §3.8); a 421 before the message content was sent, or a reused connection
found closed before anything was accepted, reconnects and retries inside the same attempt, once.
When no recipient was accepted but a pipelined DATA got its 354 anyway, the connection is
dropped: an empty message is never sent. After a refused transaction the session is reset (RSET);
any error or cancellation drops the connection so the next send starts clean. A message needing
SMTPUTF8 on a server that does not offer it is refused before anything is sent (permanent:
`smtputf8_unsupported: ...`).

Why not aiosmtplib through trio-asyncio: on this service's hot path every asyncio callback is a
Trio scheduling round, and a plain MAIL/RCPT/DATA transaction through aiosmtplib costs about ten
times the CPU of this client (measured against Postfix's smtp-sink: ~860 vs ~8,600 messages/s
with 16 connections on the reference machine), which caps the whole service far below its
throughput target. Here the attempt's cancel scope (MAIL_SMTP_TIMEOUT) acts on the socket itself.

Certificates are verified against MAIL_SMTP_CA_FILE (or the system store) for the host of
MAIL_SMTP_ADDR. TLS, AUTH, connection and protocol failures are `transport_failed` (retryable);
server replies are classified by `mailtrio.retry`. Summaries carry code, enhanced code and text,
never credentials.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import time

import trio

from mailtrio import retry
from mailtrio.config import Settings, helo_name_valid
from mailtrio.providers.base import AttemptStatus, Envelope, Phase, RecipientReply, Reply, SendReport
from mailtrio.providers.tcp import TcpStream

# A connection unused for this long is probed (RSET) before the next transaction.
IDLE_PROBE_SECONDS = 10.0
# Politeness bound on QUIT when a worker stops.
QUIT_TIMEOUT = 2.0
# Replies longer than this are a protocol error (RFC 5321 allows 512-octet lines; be generous).
MAX_REPLY_BYTES = 64 * 1024
_DOT_RE = re.compile(rb"(?m)^\.")
_EOL_RE = re.compile(rb"\r\n|\n|\r(?!\n)")
_ADDR_UNSAFE = re.compile(r"[\x00-\x20<>\x7f]")
# smtplib's parse of EHLO keywords (RFC 5321 §4.1.1.1 ehlo-keyword) and of the pre-RFC `AUTH=`.
_EHLO_KEYWORD_RE = re.compile(r"(?P<feature>[A-Za-z0-9][A-Za-z0-9\-]*) ?")
_OLDSTYLE_AUTH_RE = re.compile(r"auth=(.*)", re.I)
# RFC 5321 §3.8 / §4.2.2: the server is closing the transmission channel.
SERVICE_CLOSING = 421


def tls_context(settings: Settings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(settings.smtp_ca_file) if settings.smtp_ca_file else None
    )
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class SmtpFailure(Exception):
    """A connection, TLS, AUTH or protocol failure in a known phase."""

    def __init__(self, phase: Phase, detail: str) -> None:
        super().__init__(detail)
        self.phase = phase
        self.detail = detail


class ServiceClosing(SmtpFailure):
    """A 421 reply: the server is closing the connection (whatever command it answered)."""

    def __init__(self, phase: Phase, reply: Reply) -> None:
        super().__init__(phase, f"the server is closing the connection: {reply.summary()}")
        self.reply = reply


def parse_ehlo(lines: list[str]) -> dict[str, str]:
    """The extensions of an EHLO reply (its lines after the first), keyword upper-cased to its
    parameters, exactly as smtplib parses them: `AUTH` parameters from several lines, including
    the old `AUTH=PLAIN LOGIN` form, are joined."""
    extensions: dict[str, str] = {}
    for line in lines[1:]:
        old_auth = _OLDSTYLE_AUTH_RE.match(line)
        if old_auth:
            extensions["AUTH"] = extensions.get("AUTH", "") + " " + old_auth.group(1)
            continue
        m = _EHLO_KEYWORD_RE.match(line)
        if m:
            feature = m.group("feature").upper()
            params = line[m.end("feature"):].strip()
            if feature == "AUTH":
                extensions[feature] = extensions.get(feature, "") + " " + params
            else:
                extensions[feature] = params
    return extensions


def data_payload(message: bytes) -> bytes:
    """What follows a 354: the message with CRLF line ends (a bare CR or LF becomes CRLF, as
    smtplib's `_fix_eols`: a lone LF never reaches the server, so no `.` line can be smuggled),
    dot-stuffed, ending in CRLF, then the terminating `.` line."""
    lf = message.count(b"\n")
    if lf != message.count(b"\r\n") or lf != message.count(b"\r"):
        message = _EOL_RE.sub(b"\r\n", message)
    body = _DOT_RE.sub(b"..", message)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


def auth_plain_token(username: str, password: str) -> str:
    """The RFC 4616 PLAIN initial response (UTF-8; smtplib's encoding for ASCII credentials)."""
    return base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")


def default_helo_name(smtp_from: str) -> str:
    """The host's fully qualified name, else the domain of MAIL_SMTP_FROM (its A-label form)."""
    fqdn = socket.getfqdn()
    if helo_name_valid(fqdn) and not fqdn.lower().startswith("localhost."):
        return fqdn.rstrip(".")
    from mailtrio.message import sender_domain, wire_address

    # the A-label form the envelope uses for the same domain
    domain = wire_address(f"x@{sender_domain(smtp_from)}").rpartition("@")[2]
    return domain if re.fullmatch(r"[A-Za-z0-9.-]{1,253}", domain) else "localhost"


_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ssl.SSLError,
)


class SmtpConnection:
    """One SMTP connection: reply reading, commands, STARTTLS, AUTH."""

    def __init__(self, stream: trio.abc.Stream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.extensions: dict[str, str] = {}
        self.last_used = time.monotonic()
        self.last_lines: list[str] = []
        self._buf = bytearray()

    # -- wire ------------------------------------------------------------------------------------
    async def read_reply(self, phase: Phase) -> Reply:
        """One (possibly multiline) reply."""
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end < 0:
                if len(self._buf) > MAX_REPLY_BYTES:
                    raise SmtpFailure(phase, "reply too long")
                start = len(self._buf)
                try:
                    data = await self.stream.receive_some(65536)
                except _STREAM_ERRORS as exc:
                    raise SmtpFailure(phase, f"connection lost: {_describe(exc)}") from exc
                if not data:
                    raise SmtpFailure(phase, "connection closed by the server")
                self._buf += data
                continue
            line = bytes(self._buf[:end]).rstrip(b"\r")
            del self._buf[: end + 1]
            start = 0
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in (b" ", b"-")):
                raise SmtpFailure(phase, f"malformed reply line {line[:80]!r}")
            lines.append(line)
            if len(line) == 3 or line[3:4] == b" ":
                break
            if len(lines) > 200:
                raise SmtpFailure(phase, "reply has too many lines")
        code = int(lines[0][:3])
        self.last_lines = [ln[4:].decode("utf-8", "replace").strip() for ln in lines]
        reply = Reply.parse(code, " ".join(self.last_lines))
        if code == SERVICE_CLOSING:
            raise ServiceClosing(phase, reply)
        return reply

    async def write(self, data: bytes, phase: Phase) -> None:
        try:
            await self.stream.send_all(data)
        except _STREAM_ERRORS as exc:
            raise SmtpFailure(phase, f"connection lost: {_describe(exc)}") from exc

    async def command(self, line: str, phase: Phase) -> Reply:
        await self.write(line.encode("utf-8") + b"\r\n", phase)
        return await self.read_reply(phase)

    # -- session setup ---------------------------------------------------------------------------
    async def ehlo(self, local_hostname: str) -> None:
        reply = await self.command(f"EHLO {local_hostname}", Phase.EHLO)
        lines = list(self.last_lines)
        if reply.code != 250:
            helo = await self.command(f"HELO {local_hostname}", Phase.EHLO)
            if helo.code != 250:
                raise SmtpFailure(Phase.EHLO, f"EHLO/HELO refused: {helo.summary()}")
            self.extensions = {}
            return
        self.extensions = parse_ehlo(lines)

    def supports(self, extension: str) -> bool:
        return extension.upper() in self.extensions

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        if not self.supports("STARTTLS"):
            raise SmtpFailure(Phase.TLS, "the server does not offer STARTTLS (MAIL_SMTP_TLS=starttls)")
        reply = await self.command("STARTTLS", Phase.TLS)
        if reply.code != 220:
            raise SmtpFailure(Phase.TLS, f"STARTTLS refused: {reply.summary()}")
        # RFC 3207 §4.2: anything buffered before the handshake may be injected; drop it.
        self._buf.clear()
        tls = trio.SSLStream(self.stream, ctx, server_hostname=self.host)
        try:
            await tls.do_handshake()
        except _STREAM_ERRORS as exc:
            raise SmtpFailure(Phase.TLS, _describe(exc)) from exc
        self.stream = tls
        self.extensions = {}

    async def login(self, username: str, password: str) -> None:
        mechanisms = set(self.extensions.get("AUTH", "").upper().split())
        if not self.supports("AUTH"):
            raise SmtpFailure(Phase.AUTH, "the server does not offer AUTH")
        if "PLAIN" in mechanisms:
            token = auth_plain_token(username, password)
            reply = await self.command(f"AUTH PLAIN {token}", Phase.AUTH)
        elif "LOGIN" in mechanisms:
            reply = await self.command("AUTH LOGIN", Phase.AUTH)
            if reply.code == 334:
                reply = await self.command(base64.b64encode(username.encode()).decode("ascii"), Phase.AUTH)
            if reply.code == 334:
                reply = await self.command(base64.b64encode(password.encode()).decode("ascii"), Phase.AUTH)
        else:
            raise SmtpFailure(Phase.AUTH, f"no supported AUTH mechanism (server offers {sorted(mechanisms)})")
        if reply.code != 235:
            raise SmtpFailure(Phase.AUTH, f"authentication failed: {reply.summary()}")

    async def quit(self) -> None:
        try:
            with trio.move_on_after(QUIT_TIMEOUT):
                await self.command("QUIT", Phase.CONNECT)
        except SmtpFailure:
            pass
        finally:
            await trio.aclose_forcefully(self.stream)

    async def abort(self) -> None:
        await trio.aclose_forcefully(self.stream)


class SmtpProvider:
    name = "smtp"

    def __init__(self, settings: Settings) -> None:
        if settings.smtp_host is None or settings.smtp_port is None:
            raise ValueError("MAIL_SMTP_ADDR is required in smtp mode")
        self.host = settings.smtp_host
        self.port = settings.smtp_port
        self.tls_mode = settings.smtp_tls
        self.username = settings.smtp_username
        self._password = settings.smtp_password
        self.local_hostname = settings.smtp_helo_name or default_helo_name(settings.smtp_from)
        self.tls_context = tls_context(settings) if self.tls_mode != "none" else None
        self._secrets = self._secret_forms()

    def session(self) -> SmtpSession:
        return SmtpSession(self)

    def _secret_forms(self) -> list[str]:
        if not self._password:
            return []
        user = self.username or ""
        forms = [
            self._password,
            base64.b64encode(self._password.encode()).decode(),
            base64.b64encode(f"\0{user}\0{self._password}".encode()).decode(),
        ]
        return [f for f in forms if len(f) >= 3]

    def scrub(self, text: str) -> str:
        """Never let a credential reach a summary or a log line."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return text

    async def connect(self) -> SmtpConnection:
        """A ready connection: greeted, TLS as configured, EHLO'd, authenticated."""
        phase = Phase.CONNECT
        stream: trio.abc.Stream | None = None
        try:
            tcp = stream = await trio.open_tcp_stream(self.host, self.port)
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # the socket is driven by TcpStream from here on (no schedule point per call)
            stream = TcpStream.adopt(tcp)
            if self.tls_mode == "tls":
                assert self.tls_context is not None
                phase = Phase.TLS
                tls = trio.SSLStream(stream, self.tls_context, server_hostname=self.host)
                await tls.do_handshake()
                stream = tls
            conn = SmtpConnection(stream, self.host)
            phase = Phase.GREETING
            greeting = await conn.read_reply(phase)
            if greeting.code != 220:
                raise SmtpFailure(phase, f"server refused the session: {greeting.summary()}")
            await conn.ehlo(self.local_hostname)
            if self.tls_mode == "starttls":
                assert self.tls_context is not None
                await conn.starttls(self.tls_context)
                await conn.ehlo(self.local_hostname)
            if self.username:
                await conn.login(self.username, self._password or "")
            return conn
        except SmtpFailure:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise
        except _STREAM_ERRORS as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise SmtpFailure(phase, _describe(exc)) from exc
        except BaseException:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise


class SmtpSession:
    def __init__(self, provider: SmtpProvider) -> None:
        self.provider = provider
        self._conn: SmtpConnection | None = None
        # how far the current send got (base.Session): read when it is cut short from outside
        self.phase = Phase.CONNECT
        self.handed_over = False

    async def send(self, envelope: Envelope, message: bytes) -> SendReport:
        p = self.provider
        retried = False
        self.phase, self.handed_over = Phase.CONNECT, False
        try:
            while True:
                try:
                    reused = await self._ensure()
                    report = await self._transaction(envelope, message, reused=reused)
                except ServiceClosing as exc:
                    # RFC 5321 §3.8: a 421 closes the connection, whatever it answered.
                    await self._drop()
                    if exc.phase == Phase.MESSAGE or retried:
                        return self._closing_report(exc)
                    retried = True
                    continue
                except _Stale:
                    # A reused connection the server had closed: nothing was accepted, reopen once.
                    await self._drop()
                    if retried:
                        raise
                    retried = True
                    continue
                if self._conn is not None:
                    self._conn.last_used = time.monotonic()
                return report
        except (SmtpFailure, _Stale) as exc:
            await self._drop()
            phase = exc.phase
            detail = p.scrub(exc.detail)
            return SendReport(
                AttemptStatus.TRANSPORT_FAILED,
                f"transport failure during {phase}: {detail}",
                phase,
                extra={"error": detail},
            )
        except BaseException:
            # Cancelled (MAIL_SMTP_TIMEOUT or shutdown) mid-exchange: the session state is unknown.
            await self._drop()
            raise

    def _closing_report(self, exc: ServiceClosing) -> SendReport:
        reply = exc.reply
        return SendReport(
            AttemptStatus.PROVIDER_DEFERRED,
            self.provider.scrub(reply.summary()),
            exc.phase,
            reply=reply,
            handed_over=exc.phase == Phase.MESSAGE,
        )

    async def abort(self) -> None:
        await self._drop()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.quit()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.abort()

    async def _ensure(self) -> bool:
        """Connect when needed; True when an existing connection is reused."""
        conn = self._conn
        if conn is not None:
            if time.monotonic() - conn.last_used < IDLE_PROBE_SECONDS:
                return True
            try:
                reply = await conn.command("RSET", Phase.CONNECT)
                if reply.code == 250:
                    return True
            except SmtpFailure:
                pass
            await self._drop()
        self._conn = await self.provider.connect()
        return False

    async def _transaction(self, envelope: Envelope, message: bytes, *, reused: bool) -> SendReport:
        conn = self._conn
        assert conn is not None
        if not envelope.recipients:
            # Never a DATA without a recipient (with pipelining it would go out unchecked).
            return SendReport(AttemptStatus.TRANSPORT_FAILED, "no envelope recipient; nothing sent", Phase.RCPT)
        sender = _quote(envelope.sender)
        rcpts = [_quote(r) for r in envelope.recipients]
        options = []
        if envelope.smtputf8:
            if not conn.supports("SMTPUTF8"):
                return self._smtputf8_unsupported(envelope)
            options.append("SMTPUTF8")
        if not message.isascii() and conn.supports("8BITMIME"):
            options.append("BODY=8BITMIME")
        if conn.supports("SIZE"):
            options.append(f"SIZE={len(message)}")
        mail_line = f"MAIL FROM:{sender}" + "".join(f" {o}" for o in options)
        commands = [mail_line] + [f"RCPT TO:{r}" for r in rcpts] + ["DATA"]
        if not envelope.may_proceed():
            # Checked here explicitly, not only through the cancel scope: a process resumed after
            # its lease ended never starts a transaction for that delivery.
            return SendReport.unsent(Phase.MAIL, "the lease check failed before MAIL FROM")
        self.phase = Phase.MAIL

        if conn.supports("PIPELINING"):
            try:
                await conn.write(("\r\n".join(commands) + "\r\n").encode("utf-8"), Phase.MAIL)
                mail = await conn.read_reply(Phase.MAIL)
            except ServiceClosing:
                raise
            except SmtpFailure as exc:
                if reused:
                    raise _Stale(exc.phase, exc.detail) from exc
                raise
            rcpt_replies = [RecipientReply(a, await conn.read_reply(Phase.RCPT)) for a in envelope.recipients]
            data = await conn.read_reply(Phase.DATA)
        else:
            try:
                mail = await conn.command(mail_line, Phase.MAIL)
            except ServiceClosing:
                raise
            except SmtpFailure as exc:
                if reused:
                    raise _Stale(exc.phase, exc.detail) from exc
                raise
            if mail.code != 250:
                return await self._refused(Phase.MAIL, mail)
            rcpt_replies = []
            for a, r in zip(envelope.recipients, rcpts, strict=True):
                rcpt_replies.append(RecipientReply(a, await conn.command(f"RCPT TO:{r}", Phase.RCPT)))
            if not any(retry.rcpt_accepted(r.reply) for r in rcpt_replies):
                data = Reply(503, "no valid recipients; DATA not sent")
            else:
                data = await conn.command("DATA", Phase.DATA)

        if mail.code != 250:
            if data.code == 354:
                await self._drop()
            return await self._refused(Phase.MAIL, mail)
        refusal = retry.classify_recipients(rcpt_replies)
        if refusal is not None:
            if data.code == 354:
                # A pipelined DATA accepted with no recipient: never feed it a message, not even
                # an empty one; the connection goes (the next send opens a new one).
                await self._drop()
            return await self._refused(Phase.RCPT, refusal.reply, rcpt_replies, refusal)
        if data.code != 354:
            return await self._refused(Phase.DATA, data, rcpt_replies)

        if not envelope.may_proceed():
            # The lease ran short between MAIL FROM and the content: drop the connection without
            # the final dot, so the server discards the transaction.
            await self._drop()
            return SendReport.unsent(Phase.DATA, "the lease check failed before the message content")
        # From here until its reply is read, the server may hold the message without our knowing.
        self.phase, self.handed_over = Phase.MESSAGE, True
        await conn.write(data_payload(message), Phase.MESSAGE)
        final = await conn.read_reply(Phase.MESSAGE)
        self.handed_over = False  # the server said what became of it
        if final.code != 250:
            return await self._refused(Phase.MESSAGE, final, rcpt_replies)
        summary = final.summary()
        refused = [r for r in rcpt_replies if not retry.rcpt_accepted(r.reply)]
        if refused:
            summary += f" ({len(rcpt_replies) - len(refused)} of {len(rcpt_replies)} recipients accepted)"
        return SendReport(
            AttemptStatus.PROVIDER_ACCEPTED,
            summary,
            Phase.MESSAGE,
            reply=final,
            recipients=tuple(rcpt_replies),
            handed_over=True,
        )

    def _smtputf8_unsupported(self, envelope: Envelope) -> SendReport:
        """Nothing was sent: the message needs SMTPUTF8 (RFC 6531) and the server lacks it.
        Permanent: no retry can change what the server offers for this address."""
        needing = [a for a in (envelope.sender, *envelope.recipients) if not a.isascii()]
        summary = ("smtputf8_unsupported: the server does not offer SMTPUTF8, needed for "
                   + ", ".join(needing[:5]) + (f" and {len(needing) - 5} more" if len(needing) > 5 else ""))
        return SendReport(
            AttemptStatus.PROVIDER_REJECTED,
            summary[:1000],
            Phase.MAIL,
            extra={"smtputf8_unsupported": needing[:50]},
        )

    async def _refused(
        self,
        phase: Phase,
        reply: Reply,
        replies: list[RecipientReply] | None = None,
        refusal: retry.Refusal | None = None,
    ) -> SendReport:
        refusal = refusal or retry.classify_refusal(reply, phase)
        # Leave the session clean for the next message; a failing RSET drops the connection.
        conn = self._conn
        if conn is not None:
            try:
                rset = await conn.command("RSET", phase)
                if rset.code != 250:
                    await self._drop()
            except SmtpFailure:
                await self._drop()
        return SendReport(
            refusal.status,
            self.provider.scrub(refusal.reply.summary()),
            phase,
            reply=refusal.reply,
            recipients=tuple(replies or ()),
            suppressed=refusal.suppressed,
        )


class _Stale(Exception):
    """A reused connection failed before the server accepted anything."""

    def __init__(self, phase: Phase, detail: str) -> None:
        super().__init__(detail)
        self.phase = phase
        self.detail = detail


def _quote(address: str) -> str:
    if _ADDR_UNSAFE.search(address):
        raise SmtpFailure(Phase.MAIL, f"unsafe envelope address {address!r}")
    return f"<{address}>"


def _describe(exc: BaseException) -> str:
    # trio wraps socket and TLS errors (BrokenResourceError from ssl.SSLError): say what happened.
    while isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
