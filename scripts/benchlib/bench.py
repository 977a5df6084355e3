"""mailtrio benchmark: intake, end to end against smtp-sink (with smtp-source beside it), latency
under offered load, authsession fairness behind a notification backlog, a real MTA (a private
Postfix with STARTTLS and SASL AUTH, with a naive threaded smtplib sender beside it), and peak RSS.

Each scenario runs one `mailtrio serve` process on a fresh database (schema `mail`, migrated by
the service) and a fresh stream key, and sends SMTP (MAIL_SMTP_TLS=none) to one Postfix
`smtp-sink` on a free loopback port. It prints one table and writes a JSON file.

    scripts/bench [--quick] [--json FILE] [--scenarios intake,e2e,latency,fairness,mta]
                  [--workers 16] [--instances 1] [--profile DIR] [--peers]

With --instances N the e2e and mta scenarios run N `mailtrio serve` processes (distinct
MAIL_INSTANCE_ID, each with --workers workers) on the same database and command stream: the
deployment of one instance per core. Their CPU and peak RSS are summed; smtp-source and the
smtplib sender use as many connections as all instances together.

The mta scenario (not in the default list; needs root and Postfix, see benchlib.postfix) starts a
private Postfix whose submission listener requires STARTTLS and SASL AUTH and whose `discard:`
transport takes a sink domain; it preloads the stream and measures XADD -> every delivery `sent`
(each outcome durable in PostgreSQL) at --workers connections, then a naive sender on the same
listener: Python's smtplib in --workers threads, each reusing one STARTTLS+AUTH connection, the
same number of messages of the same content. It prints both rates and their ratio.

With --peers the end-to-end scenario also runs the peer benchmark of ../shared/peers
(django-post_office's `send_queued_mail` against its own smtp-sink, after its setup.sh; it writes
only under $PEERS_WORK) in the same sitting and prints mailtrio's rate as a ratio of it.

Time sources: XADD time is the millisecond part of the stream entry id (Redis's clock); the 250
time is the attempt's `finished_at` (the service's clock, taken when the server's reply to the
end of DATA arrived). Both clocks are this machine's. Rates are measured from the service's
`command consumer started` log line to the moment the outcome is observed in PostgreSQL
(polled every 50-200 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import commands, harness, postfix
from benchlib.harness import HarnessError, Procs, Serve

TARGETS = {
    "intake.commands_per_s": ">= 10000",
    "e2e.deliveries_per_s": ">= 1500",
    "e2e.ratio_to_smtp_source": ">= 0.1",
    "e2e.ratio_to_post_office": ">= 3",
    "latency.500.p99_ms": "< 100",
    "latency.200.p50_ms": "< 20",
    "latency.200.p99_ms": "< 100",
    "fairness.auth_p99_ms": "< 1000",
    "mta.ratio_to_smtplib": ">= 0.9",
    "rss_mb": "< 250",
}


@dataclass(frozen=True)
class Sizes:
    intake: int
    e2e: int
    loads: tuple[int, ...]
    load_seconds: float
    backlog: int
    auth_count: int
    auth_rate: float
    peer_messages: int
    mta: int


FULL = Sizes(intake=100_000, e2e=50_000, loads=(100, 200, 500, 1000), load_seconds=15.0,
             backlog=100_000, auth_count=200, auth_rate=20.0, peer_messages=5_000, mta=2_000)
QUICK = Sizes(intake=2_000, e2e=600, loads=(100, 500, 1000), load_seconds=0.3,
              backlog=2_000, auth_count=10, auth_rate=40.0, peer_messages=300, mta=200)
# The mta scenario's recipients: a domain that the private Postfix accepts and discards.
MTA_SINK_DOMAIN = "sink.example.com"
MTA_SENDER = "bench@example.com"


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sizes) -> None:
        self.args = args
        self.sizes = sizes
        self.procs = Procs()
        self.workdir = harness.make_workdir("mailtrio-bench-")
        self.redis_addr: str = args.redis_addr
        self.redis = harness.redis_client(self.redis_addr)
        self.sink: harness.SmtpSink | None = None
        self.run_id = uuid.uuid4().hex[:8]
        self.serve_env = dict(item.split("=", 1) for item in args.serve_env)
        self._others: list[Serve] = []

    # --- plumbing ----------------------------------------------------------------------------

    def env(self, dsn: str, key: str, name: str, **extra: str) -> dict[str, str]:
        assert self.sink is not None
        env = harness.serve_env(
            MAIL_REDIS_MASTER_ADDR=self.redis_addr,
            MAIL_REDIS_COMMAND_STREAM=key,
            MAIL_REDIS_EVENT_STREAM=f"{key}:events",
            MAIL_REDIS_CONSUMER_GROUP="mailservice",
            MAIL_POSTGRES_PRIMARY_DSN=dsn,
            MAIL_SMTP_MODE="smtp",
            MAIL_SMTP_ADDR=self.sink.addr,
            MAIL_SMTP_TLS="none",
            MAIL_SMTP_FROM="Bench <bench@example.com>",
            MAIL_SMTP_TIMEOUT="10s",
            MAIL_INTERNAL_HTTP_ADDR=f"127.0.0.1:{harness.free_port()}",
            MAIL_ATTEMPT_WORKER_CONCURRENCY=str(self.args.workers),
            MAIL_INSTANCE_ID=f"bench-{name}-{self.run_id}",
            MAIL_SHUTDOWN_TIMEOUT="20s",
            MAIL_LOG_LEVEL="info",
        )
        env.update(extra)
        env.update(self.serve_env)
        return env

    @contextlib.contextmanager
    def scenario(self, name: str, **extra_env: str) -> Iterator[tuple[str, str, Serve]]:
        """A fresh database and stream key and a (not yet started) serve process for them."""
        key = f"mt:bench:{self.run_id}:{name}"
        self.redis.delete(key, f"{key}:events")
        with harness.fresh_database(self.args.admin_dsn) as dsn:
            serve = Serve(self.procs, self.env(dsn, key, name, **extra_env), self.workdir, name=f"serve-{name}")
            # --instances N: N-1 more processes on the same database and stream (their own
            # MAIL_INSTANCE_ID and listener), started right after the first (see start()).
            self._others = []
            for i in range(2, self.instances(name) + 1):
                env = self.env(dsn, key, f"{name}{i}", **extra_env)
                self._others.append(Serve(self.procs, env, self.workdir, name=f"serve-{name}{i}"))
            try:
                yield dsn, key, serve
            finally:
                for other in self._others:
                    with contextlib.suppress(Exception):
                        other.stop()
                with contextlib.suppress(Exception):
                    serve.stop()
                self.redis.delete(key, f"{key}:events")

    def instances(self, scenario: str) -> int:
        """Processes to run in this scenario: --instances applies to the throughput scenarios."""
        return self.args.instances if scenario in ("e2e", "mta") else 1

    def start(self, serve: Serve, name: str) -> subprocess.Popen[bytes] | None:
        serve.start(ready_timeout=60)
        # The first process has migrated the database; the others start without waiting for
        # each other's listener (the first one's consumer is already at work).
        for other in self._others:
            other.start(wait=False)
        for other in self._others:
            other.wait_ready(60)
        self._busy0 = harness.machine_busy()
        self._wall0 = time.time()
        # startup (imports, migrations) is not counted
        self._cpu0 = sum(s.cpu_seconds() or 0.0 for s in (serve, *self._others))
        if not self.args.profile:
            return None
        out = Path(self.args.profile) / f"{name}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        spy = shutil_which("py-spy")
        if spy is None:
            print("py-spy not found; profiling skipped", file=sys.stderr)
            return None
        return subprocess.Popen([spy, "record", "--pid", str(serve.pid), "--rate", "100", "--nonblocking",
                                 "--format", "raw", "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finish(self, serve: Serve, spy: subprocess.Popen[bytes] | None, dsn: str) -> dict[str, Any]:
        """Stop the service; its peak RSS, its CPU use, its PostgreSQL backends' CPU use and the
        machine's over the scenario."""
        pg_cpu = self.backend_cpu(dsn)
        commits = None
        with contextlib.suppress(Exception):
            commits = int(harness.query_one(
                dsn, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))
        statements = self.top_statements(dsn) if self.args.private_pg else None
        # Several instances: the sum of their peak RSS and of their CPU time.
        rss_values = [s.peak_rss_mb() for s in (serve, *self._others)]
        rss = None if None in rss_values else sum(v for v in rss_values if v is not None)
        cpu_values = [s.cpu_seconds() for s in (serve, *self._others)]
        cpu = None if None in cpu_values else sum(v for v in cpu_values if v is not None) - self._cpu0
        for other in self._others:
            with contextlib.suppress(Exception):
                other.stop()
        busy1 = harness.machine_busy()
        wall = time.time() - self._wall0
        span = max(1.0, busy1[1] - self._busy0[1])
        busy = (busy1[0] - self._busy0[0]) / span
        steal = (busy1[2] - self._busy0[2]) / span
        code = serve.stop()
        if spy is not None:
            try:
                spy.wait(20)
            except subprocess.TimeoutExpired:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(20)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
        return {"peak_rss_mb": None if rss is None else round(rss, 1), "exit_code": code,
                "service_cpu_s": None if cpu is None else round(cpu, 2),
                "service_cpu_share": None if cpu is None else round(cpu / max(wall, 1e-3), 3),
                "machine_busy_share": round(busy, 3),
                "machine_steal_share": round(steal, 3),
                "postgres_backends_cpu_s": None if pg_cpu is None else round(pg_cpu, 2),
                "postgres_commits": commits,
                **({"postgres_top_statements": statements} if statements is not None else {})}

    @staticmethod
    def top_statements(dsn: str, limit: int = 8) -> list[dict[str, Any]] | None:
        """The statements that took the most execution time in this scenario's database."""
        try:
            with harness.psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                rows = conn.execute(
                    "SELECT calls, total_exec_time, rows, plans, total_plan_time, "
                    "left(regexp_replace(query, '\\s+', ' ', 'g'), 160) "
                    "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                    "WHERE d.datname = current_database() ORDER BY total_exec_time DESC LIMIT %s", (limit,)).fetchall()
        except Exception as exc:
            return [{"error": str(exc)}]
        # plans: how many times the statement was planned (pg_stat_statements.track_planning, on
        # with --private-pg): a prepared statement planned on every call is re-planned for its
        # parameters instead of running its generic plan
        return [{"calls": int(c), "total_ms": round(float(t), 1), "ms_per_call": round(float(t) / max(1, int(c)), 3),
                 "rows_per_call": round(int(r) / max(1, int(c)), 1), "plans": int(p),
                 "plan_ms_per_call": round(float(pt) / max(1, int(c)), 3), "query": q}
                for c, t, r, p, pt, q in rows]

    @staticmethod
    def backend_cpu(dsn: str) -> float | None:
        """CPU seconds used so far by the PostgreSQL backends serving this scenario's database
        (the service's pooled connections; readable when the server is local and we may read
        its /proc entries)."""
        try:
            pids = harness.query_all(dsn, "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                          "AND pid <> pg_backend_pid() AND application_name LIKE 'mailtrio:%%'")
        except Exception:
            return None
        values = [harness.cpu_seconds(int(pid)) for (pid,) in pids]
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    def t0(self, serve: Serve) -> float:
        started = serve.event_time("command consumer started")
        return started if started is not None else serve.started_at

    def wait_ingested(self, key: str, timeout: float) -> float:
        """Wait until the group has read and acknowledged every entry; returns that moment."""

        def done() -> bool:
            state = harness.group_state(self.redis, key, "mailservice")
            return state is not None and state[0] == 0 and state[1] == 0

        harness.wait_until(done, timeout, "every stream entry to be acknowledged", interval=0.05)
        return time.time()

    # --- scenarios ---------------------------------------------------------------------------

    def intake(self) -> dict[str, Any]:
        n = self.sizes.intake
        mix = commands.mix(f"in{self.run_id}", n, dup_ratio=0.05, malformed_ratio=0.02, seed=3)
        # Every accepted command is due in an hour, so the engine stays idle and intake is measured alone.
        later = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat(timespec="seconds")
        for entry in mix.entries:
            if entry.get("delivery_id") in mix.expected_ids:
                entry["send_at"] = later
        with self.scenario("intake", MAIL_SMTP_MODE="stub") as (dsn, key, serve):
            harness.preload(self.redis, key, mix.entries)
            spy = self.start(serve, "intake")
            end = self.wait_ingested(key, timeout=max(60.0, n / 500))
            t0 = self.t0(serve)
            deliveries = harness.query_one(dsn, "SELECT count(*) FROM mail.deliveries")
            malformed = harness.query_one(dsn, "SELECT count(*) FROM mail.malformed_commands")
            foot = self.finish(serve, spy, dsn)
        elapsed = end - t0
        return {
            "commands": n, "expected_deliveries": len(mix.expected_ids), "duplicates_sent": mix.repeats,
            "expected_malformed": len(mix.malformed_ids),
            "deliveries": deliveries, "malformed": malformed,
            "outcomes_match": deliveries == len(mix.expected_ids) and malformed == len(mix.malformed_ids),
            "seconds": round(elapsed, 3), "commands_per_s": round(n / elapsed, 1), **foot,
            **per_item(foot, n),
        }

    def e2e(self) -> dict[str, Any]:
        assert self.sink is not None
        n = self.sizes.e2e
        entries = [commands.command(f"e2{self.run_id}", i) for i in range(n)]
        with self.scenario("e2e") as (dsn, key, serve):
            harness.preload(self.redis, key, entries)
            sink_before = self.sink.messages()
            spy = self.start(serve, "e2e")
            intake_done: float | None = None
            deadline = time.monotonic() + max(90.0, n / 50)
            sent = terminal = 0
            last_db = 0.0
            # The sink's counter is read from a file; the database is asked only every 2 s (to
            # notice final failures) and then once the sink has seen every message, so that the
            # bench's own queries do not take CPU from the service on a small machine.
            while time.monotonic() < deadline:
                if intake_done is None:
                    state = harness.group_state(self.redis, key, "mailservice")
                    if state is not None and state == (0, 0):
                        intake_done = time.time()
                at_sink = self.sink.messages() - sink_before
                if (at_sink >= n or time.monotonic() - last_db >= 2.0) and harness.table_exists(dsn, "deliveries"):
                    last_db = time.monotonic()
                    row = harness.query_all(
                        dsn, "SELECT count(*) FILTER (WHERE status = 'sent'), "
                        "count(*) FILTER (WHERE status IN ('sent','failed','suppressed','dead_letter','cancelled')) "
                        "FROM mail.deliveries")[0]
                    sent, terminal = int(row[0]), int(row[1])
                    if terminal >= n:
                        break
                time.sleep(0.05)
            end = time.time()
            t0 = self.t0(serve)
            if terminal < n:
                raise HarnessError(f"only {terminal} of {n} deliveries reached a final status ({sent} sent)")
            accepted_attempts = harness.query_one(
                dsn, "SELECT count(*) FROM mail.attempts WHERE status = 'provider_accepted'")
            avg_size = harness.query_one(
                dsn, "SELECT avg(octet_length(coalesce(text_body, '')) + octet_length(coalesce(html_body, '')))"
                " FROM mail.payloads")
            time.sleep(0.3)  # the sink updates its counter when "." is received; let it settle
            sink_count = self.sink.messages() - sink_before
            foot = self.finish(serve, spy, dsn)
        rate = n / (end - t0)
        # The same number of messages through the same sink with as many connections as workers.
        size = int(float(avg_size or 1000)) + 700  # body + typical header block
        sessions = self.args.workers * self.instances("e2e")
        source_rate = harness.smtp_source(self.sink.addr, sessions=sessions, messages=n,
                                          size=size, timeout=max(120.0, n / 100))
        return {
            "deliveries": n, "sent": sent, "attempts_accepted": accepted_attempts, "sink_accepted": sink_count,
            "seconds": round(end - t0, 3), "deliveries_per_s": round(rate, 1),
            "intake_seconds": None if intake_done is None else round(intake_done - t0, 3),
            "smtp_source_msgs_per_s": round(source_rate, 1), "smtp_source_message_bytes": size,
            "smtp_source_sessions": self.args.workers * self.instances("e2e"),
            "instances": self.instances("e2e"),
            "ratio_to_smtp_source": round(rate / source_rate, 4), **foot, **per_item(foot, n),
            **(self.peers() if self.args.peers else {}),
        }

    def peers(self) -> dict[str, Any]:
        """django-post_office's send rate in this sitting (../shared/peers), and the ratio."""
        try:
            res = harness.post_office(harness.peers_dir(self.args.peers_dir), self.sizes.peer_messages,
                                      setup_timeout=600.0)
        except HarnessError as exc:
            return {"post_office_error": str(exc)}
        return {"post_office_msgs_per_s": res["msgs_per_s"], "post_office_messages": res["N"],
                "post_office_line": res["line"]}

    def mta(self) -> dict[str, Any]:
        """XADD -> every delivery `sent` through a private Postfix's STARTTLS+AUTH submission
        listener, then a naive threaded smtplib sender on the same listener."""
        reason = postfix.unavailable()
        if reason is not None:
            raise HarnessError(f"mta scenario needs a private Postfix: {reason}")
        n = self.sizes.mta
        entries = [commands.command(f"mt{self.run_id}", i, domain=MTA_SINK_DOMAIN) for i in range(n)]
        with postfix.PrivatePostfix(listeners=("submission",), discard_domains=(MTA_SINK_DOMAIN,)) as pf:
            smtp_env = {
                "MAIL_SMTP_ADDR": pf.addr("submission"), "MAIL_SMTP_TLS": "starttls",
                "MAIL_SMTP_CA_FILE": str(pf.ca_file), "MAIL_SMTP_USERNAME": pf.login,
                "MAIL_SMTP_PASSWORD": pf.sasl_password, "MAIL_SMTP_FROM": f"Bench <{MTA_SENDER}>",
                "MAIL_SMTP_TIMEOUT": "20s",
            }
            # Warm-up: Postfix starts its smtpd processes on demand and keeps them for later
            # connections; neither sender measured below pays for their start.
            naive_smtplib(pf, messages=self.args.workers, threads=self.args.workers, subject="warm-up",
                          text="warm-up", html=None, timeout=60.0)
            with self.scenario("mta", **smtp_env) as (dsn, key, serve):
                harness.preload(self.redis, key, entries)
                spy = self.start(serve, "mta")
                deadline = time.monotonic() + max(120.0, n / 20)
                sent = terminal = 0
                while time.monotonic() < deadline:
                    if harness.table_exists(dsn, "deliveries"):
                        row = harness.query_all(
                            dsn, "SELECT count(*) FILTER (WHERE status = 'sent'), count(*) FILTER (WHERE status IN "
                            "('sent','failed','suppressed','dead_letter','cancelled')) FROM mail.deliveries")[0]
                        sent, terminal = int(row[0]), int(row[1])
                        if terminal >= n:
                            break
                    time.sleep(0.2)
                end = time.time()
                t0 = self.t0(serve)
                if terminal < n:
                    raise HarnessError(f"only {terminal} of {n} deliveries reached a final status ({sent} sent); "
                                       f"postfix log tail: {pf.log()[-1500:]}")
                accepted_attempts = harness.query_one(
                    dsn, "SELECT count(*) FROM mail.attempts WHERE status = 'provider_accepted'")
                attempt_p50 = harness.query_one(
                    dsn, "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) FROM mail.attempts")
                sample = harness.query_all(
                    dsn, "SELECT subject, text_body, html_body FROM mail.payloads WHERE rendered_at IS NOT NULL "
                         "ORDER BY delivery_id LIMIT 1")
                foot = self.finish(serve, spy, dsn)
            rate = n / (end - t0)
            subject, text, html = sample[0] if sample else ("Bench", "Hello.", None)
            naive = naive_smtplib(pf, messages=n, threads=self.args.workers * self.instances("mta"),
                                  subject=str(subject), text=str(text or ""), html=None if html is None else str(html),
                                  timeout=max(120.0, n / 20))
        return {
            "deliveries": n, "sent": sent, "attempts_accepted": accepted_attempts,
            "seconds": round(end - t0, 3), "deliveries_per_s": round(rate, 1),
            "attempt_p50_ms": None if attempt_p50 is None else round(float(attempt_p50), 1),
            "connections": self.args.workers * self.instances("mta"),
            "instances": self.instances("mta"),
            "smtplib_msgs_per_s": naive["msgs_per_s"], "smtplib_sent": naive["sent"],
            "smtplib_errors": naive["errors"], "smtplib_threads": self.args.workers * self.instances("mta"),
            "ratio_to_smtplib": round(rate / naive["msgs_per_s"], 3) if naive["msgs_per_s"] else None,
            **foot, **per_item(foot, n),
        }

    def _paced(self, key: str, make: Callable[[int], dict[str, str]], count: int,
               rate: float) -> dict[str, int]:
        """XADD `count` entries, one at a time, at `rate` per second; returns delivery id -> entry ms."""
        sent: dict[str, int] = {}
        start = time.perf_counter()
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            entry = make(i)
            entry_id = self.redis.xadd(key, entry)  # type: ignore[arg-type]
            sent[entry["delivery_id"]] = harness.entry_ms(entry_id.decode() if isinstance(entry_id, bytes)
                                                          else str(entry_id))
        return sent

    def _latencies(self, dsn: str, sent: dict[str, int], timeout: float) -> tuple[list[float], int, dict[str, Any]]:
        """Wait until these deliveries are final; return XADD->250 latencies (ms), how many are
        missing, and the latency split into stages by the service's own timestamps:
        intake = XADD -> delivery committed (created_at), queue = committed -> claimed
        (attempt started_at, the lease start), attempt = claimed -> 250 (finished_at)."""
        ids = list(sent)

        def final() -> bool:
            left = harness.query_one(
                dsn, "SELECT count(*) FROM mail.deliveries WHERE delivery_id = ANY(%s) "
                "AND status IN ('sent','failed','suppressed','dead_letter','cancelled')", (ids,))
            return int(left) >= len(ids)

        with contextlib.suppress(HarnessError):
            harness.wait_until(final, timeout, "offered deliveries to finish", interval=0.5)
        rows = harness.query_all(
            dsn, "SELECT a.delivery_id, (extract(epoch FROM d.created_at) * 1000)::float8, "
            "(extract(epoch FROM a.started_at) * 1000)::float8, (extract(epoch FROM a.finished_at) * 1000)::float8 "
            "FROM mail.attempts a JOIN mail.deliveries d USING (delivery_id) "
            "WHERE a.status = 'provider_accepted' AND a.delivery_id = ANY(%s)", (ids,))
        lat = [float(fin) - sent[d] for d, _c, _s, fin in rows]
        stages: dict[str, Any] = {}
        for name, values in (("intake", [float(c) - sent[d] for d, c, _s, _f in rows]),
                             ("queue", [float(st) - float(c) for _d, c, st, _f in rows]),
                             ("attempt", [float(f) - float(st) for _d, _c, st, f in rows])):
            stages[name] = {"p50_ms": _round(harness.percentile(values, 50)),
                            "p99_ms": _round(harness.percentile(values, 99))}
        return lat, len(ids) - len(rows), stages

    @staticmethod
    def _summary(lat: list[float]) -> dict[str, float | None]:
        return {"p50_ms": _round(harness.percentile(lat, 50)), "p95_ms": _round(harness.percentile(lat, 95)),
                "p99_ms": _round(harness.percentile(lat, 99)), "max_ms": _round(max(lat) if lat else None)}

    def latency(self) -> dict[str, Any]:
        out: dict[str, Any] = {"time_source": "XADD = stream entry id ms; 250 = attempts.finished_at"}
        with self.scenario("latency") as (dsn, key, serve):
            spy = self.start(serve, "latency")
            time.sleep(0.5)  # let the consumer block on the stream
            for load in self.sizes.loads:
                count = max(1, int(load * self.sizes.load_seconds))
                run = f"lt{self.run_id}x{load}"
                t_start = time.perf_counter()
                sent = self._paced(key, functools.partial(commands.command, run), count, load)
                offered = count / (time.perf_counter() - t_start)
                lat, missing, stages = self._latencies(dsn, sent, timeout=max(30.0, count / 50))
                out[str(load)] = {"deliveries": count, "offered_per_s": round(offered, 1), "measured": len(lat),
                                  "missing": missing, **self._summary(lat), "stages": stages}
            out.update(self.finish(serve, spy, dsn))
        return out

    def fairness(self) -> dict[str, Any]:
        b = self.sizes.backlog
        backlog = [commands.command(f"fb{self.run_id}", i) for i in range(b)]
        with self.scenario("fairness") as (dsn, key, serve):
            harness.preload(self.redis, key, backlog)
            spy = self.start(serve, "fairness")
            self.wait_ingested(key, timeout=max(60.0, b / 500))

            def waiting() -> int:
                return int(harness.query_one(
                    dsn, "SELECT count(*) FROM mail.deliveries WHERE status IN ('queued','rendered','sending') "
                    "AND source = 'notification'"))

            depth_start = waiting()
            run = f"fa{self.run_id}"
            sent = self._paced(key, lambda i: commands.command(run, i, source="authsession"),
                               self.sizes.auth_count, self.sizes.auth_rate)
            depth_end = waiting()
            lat, missing, stages = self._latencies(dsn, sent, timeout=60.0)
            foot = self.finish(serve, spy, dsn)
        s = self._summary(lat)
        return {"backlog": b, "notification_waiting_at_start": depth_start,
                "notification_waiting_at_end": depth_end, "backlog_held": depth_end > 0,
                "auth_deliveries": self.sizes.auth_count, "auth_rate_per_s": self.sizes.auth_rate,
                "measured": len(lat), "missing": missing,
                "auth_p50_ms": s["p50_ms"], "auth_p95_ms": s["p95_ms"], "auth_p99_ms": s["p99_ms"],
                "auth_max_ms": s["max_ms"], "stages": stages, **foot}

    # --- driver ------------------------------------------------------------------------------

    def run(self, names: list[str]) -> dict[str, Any]:
        self.sink = harness.SmtpSink(self.procs, self.workdir)
        if self.args.private_pg:
            pg = harness.PrivatePostgres(self.procs, self.workdir, settings=(
                "shared_preload_libraries=pg_stat_statements,auto_explain", "pg_stat_statements.track=all",
                "pg_stat_statements.track_planning=on",
                "auto_explain.log_min_duration=-1", *self.args.pg_setting))
            self.args.admin_dsn = pg.dsn("postgres")
        results: dict[str, Any] = {}
        for name in names:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                results[name] = getattr(self, name)()
            except HarnessError as exc:
                results[name] = {"error": str(exc)}
            results[name]["wall_seconds"] = round(time.monotonic() - started, 1)
        return results

    def close(self) -> None:
        if self.sink is not None:
            self.sink.stop()
        self.procs.stop_all()
        self.redis.close()


def naive_smtplib(pf: postfix.PrivatePostfix, *, messages: int, threads: int, subject: str, text: str,
                  html: str | None, timeout: float) -> dict[str, Any]:
    """The naive reference sender: `threads` threads, each with one smtplib connection to the
    submission listener (STARTTLS, AUTH) reused for every message it sends; the messages are
    taken from one shared counter. Timed from the first connection to the last reply."""
    host, port = "127.0.0.1", pf.port("submission")
    context = ssl.create_default_context(cafile=str(pf.ca_file))
    lock = threading.Lock()
    state = {"next": 0, "sent": 0}
    errors: list[str] = []

    def body(i: int) -> bytes:
        msg = EmailMessage()
        msg["From"] = f"Bench <{MTA_SENDER}>"
        msg["To"] = f"naive{i}@{MTA_SINK_DOMAIN}"
        msg["Subject"] = subject
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain="example.com")
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
        return msg.as_bytes()

    def run() -> None:
        try:
            with smtplib.SMTP(host, port, timeout=30) as smtp:
                smtp.ehlo("bench.example.com")
                smtp.starttls(context=context)
                smtp.ehlo("bench.example.com")
                smtp.login(pf.login, pf.sasl_password)
                while True:
                    with lock:
                        i = state["next"]
                        if i >= messages:
                            return
                        state["next"] = i + 1
                    smtp.sendmail(MTA_SENDER, [f"naive{i}@{MTA_SINK_DOMAIN}"], body(i))
                    with lock:
                        state["sent"] += 1
        except (OSError, smtplib.SMTPException) as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    started = time.monotonic()
    workers = [threading.Thread(target=run, name=f"naive-{k}", daemon=True) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(max(0.1, started + timeout - time.monotonic()))
    elapsed = time.monotonic() - started
    if any(t.is_alive() for t in workers):
        errors.append(f"not finished within {timeout:.0f}s")
    sent = state["sent"]
    return {"sent": sent, "errors": errors[:5], "seconds": round(elapsed, 3),
            "msgs_per_s": round(sent / elapsed, 1) if sent == messages and elapsed > 0 else None}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def _procs(res: dict[str, Any]) -> str:
    n = res.get("instances", 1)
    return f", {n} processes" if n > 1 else ""


def per_item(foot: dict[str, Any], n: int) -> dict[str, Any]:
    """Service CPU per item and the rate one whole core would give at that cost: a figure that
    holds even when other work on the machine takes CPU away from the service."""
    cpu = foot.get("service_cpu_s")
    if not cpu or not n:
        return {"service_cpu_ms_per_item": None, "rate_per_core_s": None, "postgres_cpu_ms_per_item": None}
    ms = 1000.0 * cpu / n
    pg = foot.get("postgres_backends_cpu_s")
    commits = foot.get("postgres_commits")
    return {"service_cpu_ms_per_item": round(ms, 3), "rate_per_core_s": round(1000.0 / ms, 1),
            "postgres_cpu_ms_per_item": None if pg is None else round(1000.0 * pg / n, 3),
            # transactions committed in the scenario's database (the bench's own polling included)
            "postgres_commits_per_item": None if commits is None else round(commits / n, 3)}


def override(sizes: Sizes, items: list[str]) -> Sizes:
    changes: dict[str, Any] = {}
    for item in items:
        name, _, value = item.partition("=")
        current = getattr(sizes, name) if hasattr(sizes, name) else None
        if current is None:
            raise KeyError(name)
        if isinstance(current, tuple):
            changes[name] = tuple(int(v) for v in value.split(","))
        else:
            changes[name] = type(current)(value)
    return dataclasses.replace(sizes, **changes)


def shutil_which(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _stages(stages: dict[str, Any]) -> str:
    return " / ".join(str(stages[k]["p50_ms"]) for k in ("intake", "queue", "attempt"))


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []

    def add(scn: str, figure: str, value: Any, target: str = "") -> None:
        if isinstance(value, float):
            text = f"{value:,.1f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            text = f"{value:,}"
        else:
            text = str(value)
        rows.append((scn, figure, text, target))

    for scn, res in results.items():
        if "error" in res:
            add(scn, "error", res["error"])
            continue
        if scn == "intake":
            add(scn, "commands/s", res["commands_per_s"], TARGETS["intake.commands_per_s"])
            add(scn, "commands (5% dup, 2% malformed)", res["commands"])
            add(scn, "service CPU ms/command (-> per core/s)",
                f"{res['service_cpu_ms_per_item']} (-> {res['rate_per_core_s']})")
            add(scn, "PostgreSQL backends CPU ms/command", res["postgres_cpu_ms_per_item"])
            add(scn, "outcomes match", res["outcomes_match"])
        elif scn == "e2e":
            add(scn, f"deliveries/s (XADD backlog -> 250){_procs(res)}", res["deliveries_per_s"],
                TARGETS["e2e.deliveries_per_s"])
            add(scn, "smtp-source msgs/s (same sink)", res["smtp_source_msgs_per_s"])
            add(scn, f"ratio mailtrio/smtp-source ({res['smtp_source_sessions']} conns)",
                f"{res['ratio_to_smtp_source']:.3f}")
            if "post_office_msgs_per_s" in res:
                add(scn, f"django-post_office msgs/s ({res['post_office_messages']}, same sitting)",
                    res["post_office_msgs_per_s"])
                add(scn, "ratio mailtrio/post_office", f"{res['deliveries_per_s'] / res['post_office_msgs_per_s']:.2f}",
                    TARGETS["e2e.ratio_to_post_office"])
            elif "post_office_error" in res:
                add(scn, "django-post_office", "error: " + res["post_office_error"])
            add(scn, "sent / sink accepted", f"{res['sent']} / {res['sink_accepted']}")
            add(scn, "service CPU ms/delivery (-> per core/s)",
                f"{res['service_cpu_ms_per_item']} (-> {res['rate_per_core_s']})")
            add(scn, "PostgreSQL backends CPU ms/delivery", res["postgres_cpu_ms_per_item"])
            add(scn, "PostgreSQL commits/delivery", res["postgres_commits_per_item"])
        elif scn == "latency":
            for load, lr in res.items():
                if not isinstance(lr, dict):
                    continue
                tgt = "p99 " + TARGETS["latency.500.p99_ms"] if load == "500" else ""
                if load == "200":
                    tgt = "p50 < 20, p99 < 100"
                add(scn, f"{load}/s p50/p95/p99 ms",
                    f"{lr['p50_ms']} / {lr['p95_ms']} / {lr['p99_ms']} (missing {lr['missing']})", tgt)
                add(scn, f"{load}/s p50 intake/queue/attempt ms", _stages(lr["stages"]))
        elif scn == "mta":
            add(scn, f"mailtrio deliveries/s (XADD -> sent, {res['connections']} conns){_procs(res)}",
                res["deliveries_per_s"])
            add(scn, f"smtplib msgs/s ({res['smtplib_threads']} threads, same listener)",
                res["smtplib_msgs_per_s"] if res["smtplib_msgs_per_s"] is not None
                else f"error: {res['smtplib_errors']}")
            add(scn, "ratio mailtrio/smtplib", "-" if res["ratio_to_smtplib"] is None
                else f"{res['ratio_to_smtplib']:.2f}", TARGETS["mta.ratio_to_smtplib"])
            add(scn, "sent / attempts accepted", f"{res['sent']} / {res['attempts_accepted']}")
            add(scn, "attempt p50 ms (claim -> reply)", res["attempt_p50_ms"])
            add(scn, "service CPU ms/delivery (-> per core/s)",
                f"{res['service_cpu_ms_per_item']} (-> {res['rate_per_core_s']})")
        elif scn == "fairness":
            add(scn, "authsession p99 ms behind backlog", res["auth_p99_ms"], TARGETS["fairness.auth_p99_ms"])
            add(scn, "p50 intake/queue/attempt ms", _stages(res["stages"]))
            add(scn, "notification waiting start/end",
                f"{res['notification_waiting_at_start']} / {res['notification_waiting_at_end']}")
        if "peak_rss_mb" in res:
            add(scn, "peak RSS MiB", res["peak_rss_mb"], TARGETS["rss_mb"])
            add(scn, "service CPU / machine busy / steal",
                f"{100 * (res['service_cpu_share'] or 0):.0f}% of a core / {100 * res['machine_busy_share']:.0f}%"
                f" / {100 * res.get('machine_steal_share', 0.0):.0f}%")
    widths = [max(len(r[i]) for r in [("scenario", "figure", "value", "target"), *rows]) for i in range(4)]
    lines = []
    for r in [("scenario", "figure", "value", "target"), *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI sizes (well under a minute)")
    p.add_argument("--json", help="where to write the JSON result (default: a file in the temp dir)")
    p.add_argument("--scenarios", default="intake,e2e,latency,fairness")
    p.add_argument("--size", action="append", default=[], metavar="NAME=VALUE",
                   help="override one size, e.g. --size e2e=5000 --size loads=100,500 (see Sizes)")
    p.add_argument("--workers", type=int, default=16, help="MAIL_ATTEMPT_WORKER_CONCURRENCY and smtp-source -s")
    p.add_argument("--instances", type=int, default=1,
                   help="e2e and mta: run this many `mailtrio serve` processes on the same database and stream "
                        "(each with --workers workers; CPU and peak RSS are their sums)")
    p.add_argument("--profile", help="directory for py-spy raw profiles, one per scenario")
    p.add_argument("--admin-dsn", default=harness.ADMIN_DSN, help="PostgreSQL server for the fresh databases")
    p.add_argument("--private-pg", action="store_true",
                   help="run PostgreSQL of our own (initdb) with pg_stat_statements and report the statements "
                        "that took the database's time in each scenario")
    p.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="extra server setting for --private-pg (e.g. auto_explain.log_min_duration=20ms)")
    p.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the service (the bench drops inherited MAIL_*/OTEL_* "
                        "variables), e.g. OTEL_TRACES_SAMPLER=always_on to record every span")
    p.add_argument("--redis-addr", default=os.environ.get("MAILTRIO_BENCH_REDIS_ADDR", "127.0.0.1:6379"))
    p.add_argument("--peers", action="store_true",
                   help="with e2e: run django-post_office's send benchmark (../shared/peers) in the same sitting")
    p.add_argument("--peers-dir", default=None,
                   help="the peer benchmarks (default: ../shared/peers beside the checkout, or $MAILTRIO_PEERS_DIR)")
    p.add_argument("--keep-logs", action="store_true", help="keep the work directory with the service logs")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    harness.install_signal_exit()
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(names) - {"intake", "e2e", "latency", "fairness", "mta"}
    if unknown:
        print(f"unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    bad_env = [item for item in args.serve_env if "=" not in item]
    if bad_env:
        print(f"bad --serve-env (NAME=VALUE): {', '.join(bad_env)}", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    try:
        sizes = override(sizes, args.size)
    except (KeyError, ValueError) as exc:
        print(f"bad --size: {exc}", file=sys.stderr)
        return 2
    bench = Bench(args, sizes)
    started = time.time()
    try:
        results = bench.run(names)
    finally:
        bench.close()
    doc = {
        "meta": {"quick": args.quick, "workers": args.workers, "serve_env": args.serve_env, "started_at": started,
                 "seconds": round(time.time() - started, 1), "cpus": os.cpu_count(), "sizes": sizes.__dict__,
                 "targets": TARGETS},
        "scenarios": results,
    }
    path = Path(args.json) if args.json else Path(tempfile.gettempdir()) / f"mailtrio-bench-{int(started)}.json"
    path.write_text(json.dumps(doc, indent=2))
    if args.keep_logs:
        print(f"logs: {bench.workdir}", file=sys.stderr)
    else:
        shutil.rmtree(bench.workdir, ignore_errors=True)
    print(table(results))
    print(f"\nJSON: {path}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
