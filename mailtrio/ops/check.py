"""`mailtrio check`: every start-up step of `mailtrio serve`, without starting the service.

Steps, in start-up order: configuration (every variable), Redis (PING), PostgreSQL (connect,
schema `mail`, open the pool), migrations (applied and pending, goose's view; nothing is applied),
the instance identity (is MAIL_INSTANCE_ID's identity lock held by a live process? Read, never
taken; held is reported, not failed: the running instance being replaced holds it), the template
catalog (parse all), the internal HTTP listener's address (bound and released; in
use is reported, not failed: the running instance being replaced holds it), and in smtp mode an
SMTP probe with the service's own client: connect, EHLO, STARTTLS or implicit TLS as configured,
AUTH when credentials are set, QUIT; no mail is sent. One line per step; the exit code is 0 when
every step is ok, else 1.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import trio

from mailtrio.ops import output, run_trio

EXIT_OK = 0
EXIT_FAILED = 1

# Bound on each network step (the SMTP probe has MAIL_SMTP_TIMEOUT).
STEP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Step:
    name: str
    result: str  # ok, failed or skipped
    detail: str


def run(env: Mapping[str, str], *, as_json: bool = False) -> int:
    steps = run_trio(check, env)
    if as_json:
        output.emit_json([asdict(s) for s in steps])
    else:
        width = max(len(s.name) for s in steps)
        for s in steps:
            print(f"{s.result:<7} {s.name.ljust(width)}  {s.detail}", flush=True)
    return EXIT_OK if all(s.result != "failed" for s in steps) else EXIT_FAILED


async def check(env: Mapping[str, str]) -> list[Step]:
    from mailtrio import bridge, telemetry
    from mailtrio.config import ConfigError, Settings

    try:
        settings = Settings.from_env(env)
        telemetry.check_env(env)
    except (ConfigError, ValueError) as exc:
        return [Step("configuration", "failed", str(exc))] + [
            Step(name, "skipped", "needs a valid configuration")
            for name in ("redis", "postgres", "migrations", "identity", "templates", "listener", "smtp")
        ]
    steps = [Step("configuration", "ok", f"{settings.smtp_mode} mode, API on "
                  f"{settings.http_host}:{settings.http_port}"
                  f"{' with a token' if settings.http_token else ''}")]
    async with bridge.open_loop():
        steps.append(await _step("redis", lambda: _redis(settings)))
        postgres = await _step("postgres", lambda: _postgres(settings))
        steps.append(postgres)
        if postgres.result == "ok":
            steps.append(await _step("migrations", lambda: _migrations(settings)))
            steps.append(await _step("identity", lambda: _identity(settings)))
        else:
            steps.append(Step("migrations", "skipped", "needs PostgreSQL"))
            steps.append(Step("identity", "skipped", "needs PostgreSQL"))
    steps.append(await _step("templates", lambda: _catalog(settings)))
    steps.append(await _step("listener", lambda: _listener(settings)))
    if settings.smtp_mode == "smtp":
        steps.append(await _step("smtp", lambda: _smtp(settings), within=settings.smtp_timeout + 1.0))
    else:
        steps.append(Step("smtp", "skipped", "MAIL_SMTP_MODE=stub sends nothing"))
    return steps


async def _step(name: str, fn: Callable[[], Awaitable[str]], *, within: float = STEP_TIMEOUT) -> Step:
    from mailtrio.store import StartupError

    try:
        with trio.fail_after(within):
            return Step(name, "ok", await fn())
    except trio.TooSlowError:
        return Step(name, "failed", f"no answer within {within:.0f}s")
    except StartupError as exc:
        return Step(name, "failed", str(exc))
    except Exception as exc:
        return Step(name, "failed", _one_line(exc))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _redis(settings: Any) -> str:
    from mailtrio.stream import Stream

    stream = Stream(settings)
    try:
        await stream.ping(within=STEP_TIMEOUT / 2)
    finally:
        await stream.close(within=2.0)
    return f"{settings.redis_host}:{settings.redis_port} answered PING"


async def _postgres(settings: Any) -> str:
    from mailtrio.store import Database

    db = Database(settings.postgres_dsn, 2, application_name=f"mailtrio-check:{settings.instance_id}")
    try:
        await db.open(within=STEP_TIMEOUT / 2)
    finally:
        await db.close(within=2.0)
    return "connected; schema mail exists"


async def _migrations(settings: Any) -> str:
    from mailtrio.store import migration_status

    status = await migration_status(settings.postgres_dsn, within=STEP_TIMEOUT / 2)
    applied = len(status.entries) - len(status.pending)
    text = f"{applied} of {len(status.entries)} applied"
    if status.pending:
        text += f"; pending (applied at start-up): {', '.join(m.filename for m in status.pending)}"
    if status.unknown_applied:
        text += (f"; the database also has version(s) {', '.join(map(str, status.unknown_applied))} "
                 "that this build does not embed (a newer release migrated it)")
    return text


async def _identity(settings: Any) -> str:
    """Who holds MAIL_INSTANCE_ID's identity lock now (mailtrio.identity). Only read: taking it,
    even for a moment, could make a starting instance wait or fail. Held is not a failure: during
    a deploy the instance being replaced holds it until it stops (serve waits a few seconds for a
    predecessor to let go); any other holder means two instances share one id, which serve
    refuses."""
    from mailtrio import bridge
    from mailtrio.identity import describe_holder
    from mailtrio.store import Database, close_quietly
    from mailtrio.store import engine as store_engine

    db = Database(settings.postgres_dsn, 1, application_name=f"mailtrio-check:{settings.instance_id}")
    conn = await db.connect_direct(within=STEP_TIMEOUT / 2)
    try:
        holder = await bridge.call(store_engine.identity_holder, conn, instance_id=settings.instance_id)
    finally:
        await close_quietly(conn)
    name = f"MAIL_INSTANCE_ID {settings.instance_id!r}"
    if holder is None:
        return f"{name} is free"
    return (f"{name} is held by a live process now ({describe_holder(holder)}): serve needs it free "
            "(the instance a deploy replaces lets it go when it stops; another one needs its own id)")


async def _catalog(settings: Any) -> str:
    from mailtrio.catalog import Catalog, CatalogError
    from mailtrio.store import StartupError

    try:
        catalog = Catalog.load(settings.template_dir, settings.default_locale)
    except CatalogError as exc:
        first = exc.problems[0] if exc.problems else "invalid"
        more = f" (and {len(exc.problems) - 1} more: mailtrio templates check)" if len(exc.problems) > 1 else ""
        raise StartupError(f"{first}{more}") from exc
    return f"{len(catalog.template_ids)} templates parsed from {settings.template_dir}"


async def _listener(settings: Any) -> str:
    """Can MAIL_INTERNAL_HTTP_ADDR be bound here? In use is not a failure: the running instance
    being replaced usually holds it."""
    import errno

    host, port = settings.http_host, settings.http_port
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    with trio.socket.socket(family, kind, proto) as sock:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        try:
            await sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{where} is in use now (by a running instance?): serve needs it free"
            raise
    return f"{where} can be bound"


async def _smtp(settings: Any) -> str:
    from mailtrio.providers.smtp import SmtpFailure, SmtpProvider
    from mailtrio.store import StartupError

    provider = SmtpProvider(settings)
    try:
        conn = await provider.connect()
    except SmtpFailure as exc:
        raise StartupError(f"{exc.phase}: {provider.scrub(exc.detail)}") from exc
    await conn.quit()
    done = ["connect", "EHLO"]
    if settings.smtp_tls == "starttls":
        done.append("STARTTLS")
    elif settings.smtp_tls == "tls":
        done.insert(1, "TLS")
    if settings.smtp_username:
        done.append("AUTH")
    done.append("QUIT")
    return f"{settings.smtp_host}:{settings.smtp_port}: {', '.join(done)} ok (nothing sent)"


def main(env: Mapping[str, str], as_json: bool) -> int:
    try:
        return run(env, as_json=as_json)
    except KeyboardInterrupt:
        print("mailtrio: check interrupted", file=sys.stderr)
        return EXIT_FAILED
