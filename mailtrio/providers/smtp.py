"""The SMTP provider: aiosmtplib driven from Trio through `bridge` (trio-asyncio).

Each attempt worker owns one `SmtpSession`, a persistent connection reused across messages:
connect, EHLO, STARTTLS (`MAIL_SMTP_TLS=starttls`, required) or implicit TLS (`tls`), AUTH when
credentials are configured; then MAIL, one RCPT per envelope recipient (each reply kept for the
attempt's details) and DATA. A whole transaction is a single asyncio coroutine, so one send costs
one crossing of the bridge. A connection that sat idle is probed with RSET before use; a reused
connection found closed before anything was sent is reopened once within the same attempt.
Any error or cancellation leaves the connection closed so the next send starts clean.

Certificates are verified against MAIL_SMTP_CA_FILE (or the system store) for the host name of
MAIL_SMTP_ADDR. TLS and AUTH failures are `transport_failed` (retryable), as are refused or lost
connections and protocol errors; server replies are classified by `mailtrio.retry`.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import time

import aiosmtplib
from aiosmtplib import SMTPResponse

from mailtrio import bridge, retry
from mailtrio.config import Settings
from mailtrio.providers.base import AttemptStatus, Envelope, Phase, RecipientReply, Reply, SendReport

# A connection unused for this long is probed (RSET) before the next transaction.
IDLE_PROBE_SECONDS = 10.0
# Politeness bound on QUIT when a worker stops.
QUIT_TIMEOUT = 2.0


def tls_context(settings: Settings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(settings.smtp_ca_file) if settings.smtp_ca_file else None
    )
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Failure(Exception):
    """A transport-level failure in a known phase (internal to this module)."""

    def __init__(self, phase: Phase, detail: str) -> None:
        super().__init__(detail)
        self.phase = phase
        self.detail = detail


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
        self.timeout = settings.smtp_timeout
        self.local_hostname = socket.gethostname() or "localhost"
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


class SmtpSession:
    def __init__(self, provider: SmtpProvider) -> None:
        self.provider = provider
        self._client: aiosmtplib.SMTP | None = None
        self._last_used = 0.0

    # -- Trio side -----------------------------------------------------------------------------
    async def send(self, envelope: Envelope, message: bytes) -> SendReport:
        return await bridge.call(self._send, envelope, message)

    async def abort(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None or not client.is_connected:
            return
        try:
            await bridge.call(_quit, client)
        except Exception:
            client.close()

    # -- asyncio side (one coroutine per transaction) -----------------------------------------
    async def _send(self, envelope: Envelope, message: bytes) -> SendReport:
        p = self.provider
        try:
            reused = await self._ensure_connected()
            try:
                report = await self._transaction(envelope, message)
            except _Failure as exc:
                if not (reused and exc.phase == Phase.MAIL):
                    raise
                # The server closed the idle connection under us before anything was sent.
                self._drop()
                await self._ensure_connected()
                report = await self._transaction(envelope, message)
            self._last_used = time.monotonic()
            return report
        except _Failure as exc:
            self._drop()
            detail = p.scrub(exc.detail)
            return SendReport(
                AttemptStatus.TRANSPORT_FAILED,
                f"transport failure during {exc.phase}: {detail}",
                exc.phase,
                extra={"error": detail},
            )
        except asyncio.CancelledError:
            # Timed out or shutting down mid-command: the session state is unknown.
            self._drop()
            raise
        except Exception as exc:
            self._drop()
            detail = p.scrub(_describe(exc))
            return SendReport(
                AttemptStatus.TRANSPORT_FAILED,
                f"transport failure: {detail}",
                Phase.CONNECT,
                extra={"error": detail},
            )

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def _ensure_connected(self) -> bool:
        """Connect when needed; True when an existing connection is reused."""
        client = self._client
        if client is not None and client.is_connected:
            if time.monotonic() - self._last_used < IDLE_PROBE_SECONDS:
                return True
            try:
                await client.rset()
                return True
            except Exception:
                self._drop()
        self._client = await self._connect()
        return False

    async def _connect(self) -> aiosmtplib.SMTP:
        p = self.provider
        client = aiosmtplib.SMTP(
            hostname=p.host,
            port=p.port,
            local_hostname=p.local_hostname,
            timeout=p.timeout + 5.0,
            use_tls=p.tls_mode == "tls",
            start_tls=False,
            tls_context=p.tls_context if p.tls_mode == "tls" else None,
        )
        phase = Phase.TLS if p.tls_mode == "tls" else Phase.CONNECT
        try:
            await client.connect()
            phase = Phase.EHLO
            await client.ehlo()
            if p.tls_mode == "starttls":
                phase = Phase.TLS
                if not client.supports_extension("starttls"):
                    raise _Failure(phase, "the server does not offer STARTTLS (MAIL_SMTP_TLS=starttls)")
                await client.starttls(tls_context=p.tls_context, server_hostname=p.host)
                phase = Phase.EHLO
                await client.ehlo()
            if p.username:
                phase = Phase.AUTH
                await client.login(p.username, p._password or "")
        except _Failure:
            client.close()
            raise
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            reply = Reply.parse(exc.code, exc.message)
            raise _Failure(phase, reply.summary()) from exc
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, ValueError) as exc:
            client.close()
            raise _Failure(phase, _describe(exc)) from exc
        except asyncio.CancelledError:
            client.close()
            raise
        return client

    async def _transaction(self, envelope: Envelope, message: bytes) -> SendReport:
        client = self._client
        assert client is not None
        encoding = "utf-8" if envelope.smtputf8 else "ascii"
        options = ["SMTPUTF8"] if envelope.smtputf8 else []
        if client.supports_extension("size"):
            options.append(f"SIZE={len(message)}")
        try:
            await client.mail(envelope.sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            return await self._refused(Phase.MAIL, _reply(exc.code, exc.message))
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError, OSError) as exc:
            raise _Failure(Phase.MAIL, _describe(exc)) from exc

        replies: list[RecipientReply] = []
        for rcpt in envelope.recipients:
            try:
                resp: SMTPResponse = await client.rcpt(rcpt, encoding=encoding)
                replies.append(RecipientReply(rcpt, _reply(resp.code, resp.message)))
            except aiosmtplib.SMTPResponseException as exc:
                replies.append(RecipientReply(rcpt, _reply(exc.code, exc.message)))
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError, OSError) as exc:
                raise _Failure(Phase.RCPT, _describe(exc)) from exc
        refusal = retry.classify_recipients(replies)
        if refusal is not None:
            return await self._refused(Phase.RCPT, refusal.reply, replies, refusal)

        try:
            resp = await client.data(message)
        except aiosmtplib.SMTPResponseException as exc:
            return await self._refused(Phase.DATA, _reply(exc.code, exc.message), replies)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError, OSError) as exc:
            raise _Failure(Phase.DATA, _describe(exc)) from exc
        final = _reply(resp.code, resp.message)
        summary = final.summary()
        refused = [r for r in replies if not retry.rcpt_accepted(r.reply)]
        if refused:
            summary += f" ({len(replies) - len(refused)} of {len(replies)} recipients accepted)"
        return SendReport(
            AttemptStatus.PROVIDER_ACCEPTED,
            summary,
            Phase.MESSAGE,
            reply=final,
            recipients=tuple(replies),
            handed_over=True,
        )

    async def _refused(
        self,
        phase: Phase,
        reply: Reply,
        replies: list[RecipientReply] | None = None,
        refusal: retry.Refusal | None = None,
    ) -> SendReport:
        refusal = refusal or retry.classify_refusal(reply, phase)
        # Leave the session clean for the next message; a failing RSET closes the connection.
        client = self._client
        if client is not None and client.is_connected:
            try:
                await client.rset()
            except Exception:
                self._drop()
        return SendReport(
            refusal.status,
            self.provider.scrub(refusal.reply.summary()),
            phase,
            reply=refusal.reply,
            recipients=tuple(replies or ()),
            suppressed=refusal.suppressed,
        )


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(client.quit(), QUIT_TIMEOUT)
    except Exception:
        client.close()


def _reply(code: int, message: str) -> Reply:
    return Reply.parse(int(code), message or "")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _reply(exc.code, exc.message).summary()
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
