"""mailtrio fault drill: prove that nothing is lost and nothing is duplicated without cause.

A duplicate has a cause when the sender could not have known the server held the message: an
earlier attempt was interrupted after handing it over, or wrote it and got no reply within
MAIL_SMTP_TIMEOUT (the attempt's details say `handed_over`; RFC 1047). Any other is unexplained.

Three `mailtrio serve` instances share one stream and one database. A producer XADDs the command
mix (10% repeated idempotency keys, 2% malformed, 10% scheduled a few seconds ahead, and a few
poison commands: a non-ASCII local part that the message builder may not represent) at a steady
rate while the drill SIGKILLs a random instance every few seconds and starts it again, stops one
instance with SIGSTOP for longer than a lease and continues it (SIGCONT), restarts Redis once
(SIGKILL, AOF replay) and takes PostgreSQL down for longer than a lease (immediate shutdown, WAL
replay), then SIGTERMs every instance, starts them once more and waits until everything has
drained.

The drill runs its own `redis-server` (AOF on, `appendfsync always`: see harness.PrivateRedis)
and its own PostgreSQL cluster (`initdb` into a temporary directory) on free loopback ports, and
its own SMTP server (faultsmtp.py: 451 for 10% of first attempts, the connection dropped after
DATA on 1% of transactions, every accepted message recorded with its Message-ID and delivery id).

    scripts/drill [--small] [--json FILE] [--keep]

Exit status 0 when lost = 0, unexplained duplicates = 0, pending = 0, every malformed command
is recorded with the expected code, every poison command ended final (failed, or sent once),
nothing unexpected reached the SMTP server, and every instance that was not deliberately killed
was alive at the end (none exited on its own).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from benchlib import commands, harness
from benchlib.harness import HarnessError, Procs, Serve

STREAM = "mail:delivery_commands"
GROUP = "mailservice"
TERMINAL = ("sent", "suppressed", "failed", "dead_letter", "cancelled")
WAITING = ("queued", "rendered", "sending")


@dataclass(frozen=True)
class Plan:
    commands: int
    rate: float
    kill_every: tuple[float, float]
    redis_restart_at: float
    pg_restart_at: float  # well after chaos_until: an instance relaunched by a kill is up by then
    pg_down_for: float  # longer than a lease
    stop_at: float  # SIGSTOP of one instance ...
    stop_for: float  # ... for longer than a lease, then SIGCONT
    poison: int  # commands whose `to` has a non-ASCII local part
    settle_s: float  # after the database is back: the instances recover before the coordinated stop
    chaos_until: float  # seconds after the producer started; kills stop then
    workers: int
    smtp_timeout: str
    lease_s: float  # MAIL_SMTP_TIMEOUT + 15 s (CONTRACT §2)
    ladder: str
    drain_cap: float  # seconds the final drain may take at most


FULL = Plan(commands=20_000, rate=800.0, kill_every=(3.0, 6.0), redis_restart_at=8.0, pg_restart_at=36.0,
            pg_down_for=21.0, stop_at=5.0, stop_for=21.0, poison=20, settle_s=10.0, chaos_until=26.0, workers=8,
            smtp_timeout="3s", lease_s=18.0, ladder="500ms,1s,2s,3s,4s,5s", drain_cap=1200.0)
SMALL = Plan(commands=600, rate=150.0, kill_every=(1.5, 2.5), redis_restart_at=1.2, pg_restart_at=23.0,
             pg_down_for=21.0, stop_at=1.0, stop_for=21.0, poison=4, settle_s=8.0, chaos_until=4.0, workers=4,
             smtp_timeout="3s", lease_s=18.0, ladder="200ms,500ms,1s,2s,3s", drain_cap=180.0)


def poison_commands(run: str, count: int, start: int) -> list[dict[str, str]]:
    """Well-formed commands (RFC 6531 allows a non-ASCII local part) that a message builder
    without SMTPUTF8 support cannot build: each must end final without disturbing anything."""
    out = []
    for i in range(start, start + count):
        # The header names the delivery at the server: a builder with SMTPUTF8 sends it.
        entry = commands.command(run, i, headers={"X-Drill-Delivery": f"{run}-p{i}"})
        entry["delivery_id"] = f"{run}-p{i}"
        entry["idempotency_key"] = f"{run}-key-p{i}"
        payload = json.loads(entry["payload"])
        payload["to"] = [f"jos\u00e9{i}@example.com"]
        entry["payload"] = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        out.append(entry)
    return out


class Producer(threading.Thread):
    """XADDs the entries at a steady rate; retries through Redis outages (bounded per entry)."""

    def __init__(self, addr: str, entries: list[dict[str, str]], rate: float, per_entry_budget: float = 60.0):
        super().__init__(name="producer", daemon=True)
        self.addr = addr
        self.entries = entries
        self.rate = rate
        self.budget = per_entry_budget
        self.xadd_calls = 0
        self.errors = 0
        self.failed: list[int] = []
        self.started_at = 0.0
        self.finished_at = 0.0
        self.error: str | None = None

    def run(self) -> None:
        client = redis.Redis.from_url(f"redis://{self.addr}", socket_timeout=5, socket_connect_timeout=2)
        self.started_at = time.time()
        start = time.perf_counter()
        try:
            for k, entry in enumerate(self.entries):
                delay = start + k / self.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                deadline = time.monotonic() + self.budget
                while True:
                    self.xadd_calls += 1
                    try:
                        client.xadd(STREAM, entry)  # type: ignore[arg-type]
                        break
                    except redis.RedisError:
                        # The reply may have been lost after the write: sending it again makes an
                        # exact repeat, which the service must treat as a duplicate.
                        self.errors += 1
                        if time.monotonic() > deadline:
                            self.failed.append(k)
                            break
                        time.sleep(0.1)
        except Exception as exc:  # report, never hang the drill
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished_at = time.time()
            client.close()


class Drill:
    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.procs = Procs()
        self.workdir = harness.make_workdir("mailtrio-drill-")
        self.events: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.rnd = random.Random(args.seed)
        self.instances: dict[str, Serve] = {}
        self.generation: dict[str, int] = {}
        self.unexpected_exits: list[dict[str, Any]] = []
        self.sigterm_exits: list[dict[str, Any]] = []
        self.paused: str | None = None  # the slot stopped with SIGSTOP right now
        self.pause_done = threading.Event()
        self.alive_at_end: dict[str, bool] = {}
        self.poison_ids: set[str] = set()

    def event(self, what: str, **kw: Any) -> None:
        rec = {"t": round(time.time() - self.t0, 2), "event": what, **kw}
        self.events.append(rec)
        print(f"[drill {rec['t']:7.2f}s] {what} {' '.join(f'{k}={v}' for k, v in kw.items())}",
              file=sys.stderr, flush=True)

    # --- infrastructure ----------------------------------------------------------------------

    def setup(self) -> None:
        self.pg = harness.PrivatePostgres(self.procs, self.workdir)
        self.event("postgres started", port=self.pg.port)
        self.redis = harness.PrivateRedis(self.procs, self.workdir, fsync="always")
        self.event("redis started", port=self.redis.port, appendfsync="always")
        self.smtp_port = harness.free_port()
        self.record = self.workdir / "smtp-record.jsonl"
        with open(self.workdir / "faultsmtp.log", "wb") as out:
            self.smtp = self.procs.start(
                "faultsmtp", [harness.PYTHON, str(Path(__file__).with_name("faultsmtp.py")), "--port",
                              str(self.smtp_port), "--record", str(self.record), "--defer-first", "10",
                              "--drop", "1", "--seed", str(self.args.seed)],
                stdout=out, stderr=subprocess.STDOUT)
        harness.wait_until(lambda: harness.port_open(self.smtp_port), 20, "the drill SMTP server to listen")
        self.event("smtp server started", port=self.smtp_port)

    def env(self, instance_id: str) -> dict[str, str]:
        p = self.plan
        return harness.serve_env(
            MAIL_REDIS_MASTER_ADDR=self.redis.addr,
            MAIL_REDIS_COMMAND_STREAM=STREAM,
            MAIL_REDIS_CONSUMER_GROUP=GROUP,
            MAIL_REDIS_CLAIM_IDLE="2s",
            MAIL_POSTGRES_PRIMARY_DSN=self.pg.dsn(),
            MAIL_POSTGRES_POOL_SIZE="6",
            MAIL_SMTP_MODE="smtp",
            MAIL_SMTP_ADDR=f"127.0.0.1:{self.smtp_port}",
            MAIL_SMTP_TLS="none",
            MAIL_SMTP_FROM="Drill <drill@example.com>",
            MAIL_SMTP_TIMEOUT=p.smtp_timeout,
            MAIL_RETRY_LADDER=p.ladder,
            MAIL_ATTEMPT_WORKER_CONCURRENCY=str(p.workers),
            MAIL_SHUTDOWN_TIMEOUT="10s",
            MAIL_INTERNAL_HTTP_ADDR=f"127.0.0.1:{harness.free_port()}",
            MAIL_INSTANCE_ID=instance_id,
            MAIL_LOG_LEVEL="info",
        )

    def launch(self, slot: str, *, wait: bool) -> Serve:
        """Start the instance in `slot`; every second restart of a slot takes a new instance id,
        so both paths are exercised: a consumer resuming its own pending entries, and a dead
        consumer's entries claimed by others."""
        gen = self.generation.get(slot, 0)
        self.generation[slot] = gen + 1
        instance_id = f"drill-{slot}-{gen // 2}"
        serve = Serve(self.procs, self.env(instance_id), self.workdir, name=f"serve-{slot}")
        serve.start(wait=False)
        self.instances[slot] = serve
        self.event("instance started", slot=slot, instance_id=instance_id, pid=serve.pid)
        if wait:
            serve.wait_ready(40)
        return serve

    def supervise(self, restarts_left: list[int]) -> None:
        """Restart an instance that exited on its own (as systemd's Restart=on-failure would)."""
        for slot, serve in list(self.instances.items()):
            if serve.proc is not None and not serve.alive():
                code = serve.proc.popen.returncode
                tail = serve.err_path.read_text(errors="replace").strip().splitlines()[-1:]
                self.unexpected_exits.append({"slot": slot, "code": code, "stderr": tail,
                                              "t": round(time.time() - self.t0, 2)})
                self.event("instance exited on its own", slot=slot, code=code, stderr=tail)
                serve.stop()
                if restarts_left[0] > 0:
                    restarts_left[0] -= 1
                    self.launch(slot, wait=False)

    def pause(self, slot: str) -> None:
        """SIGSTOP the instance in `slot` for `stop_for` seconds (longer than a lease), then
        SIGCONT it: it must send nothing under the leases that ended meanwhile, and live on."""
        serve = self.instances[slot]
        pid = serve.pid
        self.paused = slot
        try:
            self.event("SIGSTOP", slot=slot, pid=pid, for_s=self.plan.stop_for)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(self.plan.stop_for)
        except ProcessLookupError:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self.event("SIGCONT", slot=slot, pid=pid)
            self.paused = None
            self.pause_done.set()

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        p = self.plan
        self.setup()
        for slot in ("a", "b", "c"):
            self.launch(slot, wait=False)
        for serve in self.instances.values():
            serve.wait_ready(40)
        self.event("three instances ready")

        mix = commands.mix("dr", p.commands, dup_ratio=0.10, malformed_ratio=0.02, seed=self.args.seed,
                           auth_ratio=0.2, scheduled_ratio=0.10, schedule_window=(2.0, 6.0),
                           headers_for_id=True)
        poison = poison_commands("dr", p.poison, p.commands)
        self.poison_ids = {e["delivery_id"] for e in poison}
        for entry in poison:
            mix.entries.insert(self.rnd.randrange(len(mix.entries) + 1), entry)
        start = time.time() + 0.2
        mix.assign_send_at(start, p.rate)
        time.sleep(max(0.0, start - time.time()))
        producer = Producer(self.redis.addr, mix.entries, p.rate)
        producer.start()
        self.event("producer started", commands=len(mix.entries), rate=p.rate)

        chaos_end = time.monotonic() + p.chaos_until
        hard_end = time.monotonic() + len(mix.entries) / p.rate + 120
        next_kill = time.monotonic() + self.rnd.uniform(*p.kill_every)
        redis_at = time.monotonic() + p.redis_restart_at
        pg_at = time.monotonic() + p.pg_restart_at
        stop_at = time.monotonic() + p.stop_at
        hard_end += p.pg_down_for + p.stop_for
        redis_done = pg_done = stop_started = False
        pg_back = math.inf
        restarts_left = [20]
        while time.monotonic() < hard_end:
            now = time.monotonic()
            if not stop_started and now >= stop_at:
                slot = self.rnd.choice(sorted(self.instances))
                threading.Thread(target=self.pause, args=(slot,), name="pause", daemon=True).start()
                stop_started = True
            elif not redis_done and now >= redis_at:
                self.event("redis: SIGKILL")
                self.redis.restart(down_for=1.0)
                self.event("redis: restarted from the AOF")
                redis_done = True
            elif not pg_done and now >= pg_at:
                # longer than a lease: every instance loses its identity lock and its leases run
                # out while it waits for the database
                self.event("postgres: immediate shutdown", down_for_s=p.pg_down_for)
                self.pg.restart(down_for=p.pg_down_for)
                self.event("postgres: restarted (WAL recovery)")
                pg_done = True
                pg_back = time.monotonic()
            elif now >= next_kill and now < chaos_end:
                slot = self.rnd.choice(sorted(s for s in self.instances if s != self.paused))
                victim = self.instances[slot]
                self.event("SIGKILL", slot=slot, pid=victim.pid)
                victim.kill()
                time.sleep(0.3)
                self.launch(slot, wait=False)
                next_kill = time.monotonic() + self.rnd.uniform(*p.kill_every)
            self.supervise(restarts_left)
            if (not producer.is_alive() and now >= chaos_end and redis_done and pg_done
                    and self.pause_done.is_set() and now >= pg_back + p.settle_s):
                break
            time.sleep(0.05)
        producer.join(timeout=max(1.0, hard_end - time.monotonic()))
        self.event("producer finished", xadd_calls=producer.xadd_calls, errors=producer.errors,
                   failed=len(producer.failed), error=producer.error)

        # Let things settle briefly (every instance up, as an operator would check), then a
        # coordinated stop of everything.
        time.sleep(1.0)
        self.supervise(restarts_left)
        for serve in self.instances.values():
            with contextlib.suppress(HarnessError):
                serve.wait_ready(30)
        # Every instance not deliberately killed is still the one started for its slot, alive.
        self.alive_at_end = {slot: serve.alive() for slot, serve in sorted(self.instances.items())}
        self.event("instances alive before the coordinated stop", **self.alive_at_end)
        self.stop_all_graceful()

        # Restart once more and drain.
        for slot in ("a", "b", "c"):
            self.launch(slot, wait=False)
        for serve in self.instances.values():  # up (signal handlers installed) before any stop
            with contextlib.suppress(HarnessError):
                serve.wait_ready(40)
        stall_bound = p.lease_s + 30.0
        drained = self.wait_drained(mix, stall_bound, p.drain_cap)
        self.event("drain finished" if drained else "drain bound reached", stall_bound_s=stall_bound,
                   cap_s=p.drain_cap)
        self.stop_all_graceful()
        self.procs.stop(self.smtp, timeout=10)
        return self.analyse(mix, producer, drained)

    def stop_all_graceful(self) -> None:
        live = {slot: s for slot, s in self.instances.items() if s.alive()}
        for slot, serve in live.items():
            self.event("SIGTERM", slot=slot, pid=serve.pid)
        started = time.monotonic()
        for serve in live.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(serve.pid, signal.SIGTERM)
        for slot, serve in live.items():
            assert serve.proc is not None
            code = self.procs.wait(serve.proc, timeout=25)
            took = round(time.monotonic() - started, 2)
            self.sigterm_exits.append({"slot": slot, "code": code, "seconds": took})
            self.event("instance stopped", slot=slot, code=code, seconds=took)

    def wait_drained(self, mix: commands.Mix, stall_bound: float, cap: float) -> bool:
        """Wait until every stream entry is acknowledged and every expected delivery is final.

        Bounded twice: give up when nothing has progressed for `stall_bound` seconds (longer than
        a lease, so rescue of a dead instance's deliveries counts as progress still to come), and
        after `cap` seconds whatever happens.
        """
        ids = sorted(mix.expected_ids | self.poison_ids)
        deadline = time.monotonic() + cap
        last_progress = time.monotonic()
        last_seen: tuple[Any, ...] = ()
        restarts_left = [5]
        while time.monotonic() < deadline and time.monotonic() - last_progress < stall_bound:
            self.supervise(restarts_left)
            try:
                state = harness.group_state(self.redis.client(), STREAM, GROUP)
                done_rows = int(harness.query_one(
                    self.pg.dsn(), "SELECT count(*) FROM mail.deliveries WHERE delivery_id = ANY(%s) "
                    "AND status = ANY(%s)", (ids, list(TERMINAL))))
                attempts = int(harness.query_one(self.pg.dsn(), "SELECT count(*) FROM mail.attempts"))
            except Exception:
                time.sleep(0.5)
                continue
            if state is not None and state[0] == 0 and state[1] == 0 and done_rows >= len(ids):
                return True
            seen = (state, done_rows, attempts)
            if seen != last_seen:
                last_seen, last_progress = seen, time.monotonic()
            time.sleep(0.5)
        return False

    # --- the verdict -------------------------------------------------------------------------

    LOG_EVENTS = ("attempt crashed", "delivery given back unsent", "expired leases rescued; deliveries back on the "
                  "schedule", "instance identity lock lost; claiming and sending stop until it is re-acquired",
                  "instance identity lock re-acquired", "deliveries dead-lettered: repeatedly interrupted")

    def log_counts(self) -> dict[str, int]:
        """How often the instances said what the faults should make them say."""
        counts: Counter[str] = Counter()
        for path in sorted(self.workdir.glob("serve-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line).get("event")
                except ValueError:
                    continue
                if event in self.LOG_EVENTS:
                    counts[event] += 1
        return {e: counts[e] for e in self.LOG_EVENTS}

    def analyse(self, mix: commands.Mix, producer: Producer, drained: bool) -> dict[str, Any]:
        accepted: Counter[str] = Counter()
        first_accept: dict[str, float] = {}
        message_ids: dict[str, set[str]] = defaultdict(set)
        kinds: Counter[str] = Counter()
        if self.record.exists():
            for line in self.record.read_text().splitlines():
                rec = json.loads(line)
                kinds[rec["kind"]] += 1
                if rec["kind"] != "accepted":
                    continue
                d = rec["delivery_id"]
                accepted[d] += 1
                message_ids[d].add(rec["message_id"])
                first_accept[d] = min(first_accept.get(d, rec["t"]), rec["t"])

        dsn = self.pg.dsn()
        status = dict(harness.query_all(dsn, "SELECT delivery_id, status FROM mail.deliveries"))
        # Attempts by status; a `timed_out` attempt whose message had been written and whose reply
        # never came in time (details.handed_over) counts as `timed_out_handed_over`.
        attempts: dict[str, Counter[str]] = defaultdict(Counter)
        for d, s, handed_over, n in harness.query_all(
                dsn, "SELECT delivery_id, status, coalesce((details ->> 'handed_over')::boolean, false), "
                     "count(*) FROM mail.attempts GROUP BY 1, 2, 3"):
            attempts[d][s] += int(n)
            if s == "timed_out" and handed_over:
                attempts[d]["timed_out_handed_over"] += int(n)
        malformed_rows = harness.query_all(dsn, "SELECT delivery_id, failure_code FROM mail.malformed_commands")
        dead_letters = int(harness.query_one(dsn, "SELECT count(*) FROM mail.dead_letters"))

        expected = mix.expected_ids
        poison = self.poison_ids
        poison_final = sum(1 for d in poison if status.get(d) in TERMINAL)
        poison_sent_twice = sorted(d for d in poison if accepted[d] > 1)
        once = sum(1 for d in expected if accepted[d] == 1)
        dups = {d: accepted[d] for d in expected if accepted[d] > 1}
        # A second copy has a cause the sender could not know of: an attempt interrupted after it
        # handed the message over (the process died, its lease was rescued), or an attempt that
        # wrote the message and got no reply in time (RFC 1047). Anything else is unexplained.
        def unknowable(d: str) -> int:
            return attempts[d]["interrupted"] + attempts[d]["timed_out_handed_over"]

        unexplained = {d: {"accepted": n, "attempts": dict(attempts[d])} for d, n in dups.items()
                       if unknowable(d) < n - 1}
        by_interrupted = sum(1 for d, n in dups.items() if attempts[d]["interrupted"] >= n - 1)
        pending = sorted(d for d in expected if accepted[d] == 0 and status.get(d) in WAITING)
        lost = sorted(d for d in expected if accepted[d] == 0 and status.get(d) not in WAITING)
        sent_not_seen = sorted(d for d in expected if accepted[d] == 0 and status.get(d) == "sent")
        unexpected = sorted(d for d in accepted if d not in expected and d not in poison)
        split_message_id = sorted(d for d, mids in message_ids.items() if len(mids) > 1)
        early = sorted(d for d, due in mix.send_at.items() if d in first_accept and first_accept[d] < due - 0.05)

        by_id: dict[str, set[str]] = defaultdict(set)
        for d, code in malformed_rows:
            by_id[d or ""].add(code)
        recorded = sum(1 for d in mix.malformed_ids if d in by_id)
        wrong_code = sorted(d for d, code in mix.malformed_ids.items() if d in by_id and code not in by_id[d])
        good_quarantined = sorted(d for d in by_id if d in expected)

        result = {
            "commands_sent": len(mix.entries),
            "repeated_commands": mix.repeats,
            "scheduled_commands": len(mix.scheduled),
            "xadd_calls": producer.xadd_calls,
            "xadd_errors_retried": producer.errors,
            "xadd_failed": len(producer.failed),
            "deliveries_expected": len(expected),
            "delivered_exactly_once": once,
            "duplicates": len(dups),
            "duplicates_explained_by_interrupted": by_interrupted,
            "duplicates_explained_by_unanswered_message": len(dups) - len(unexplained) - by_interrupted,
            "unexplained_duplicates": len(unexplained),
            "lost": len(lost),
            "pending": len(pending),
            "malformed_expected": len(mix.malformed_ids),
            "malformed_recorded": recorded,
            "malformed_rows": len(malformed_rows),
            "malformed_wrong_code": len(wrong_code),
            "well_formed_quarantined": len(good_quarantined),
            "poison_commands": len(poison),
            "poison_final": poison_final,
            "poison_sent": sum(1 for d in poison if accepted[d] >= 1),
            "poison_sent_twice": len(poison_sent_twice),
            "unexpected_at_server": len(unexpected),
            "marked_sent_never_accepted": len(sent_not_seen),
            "message_id_changed_between_attempts": len(split_message_id),
            "scheduled_sent_early": len(early),
            "dead_letters": dead_letters,
            "server": dict(kinds),
            "drained": drained,
            "seconds": round(time.time() - self.t0, 1),
            "sigterm_exits": self.sigterm_exits,
            "unexpected_exits": self.unexpected_exits,
            "alive_at_end": self.alive_at_end,
            "log_events": self.log_counts(),
            "status_counts": dict(Counter(status.values())),
            "samples": {"lost": lost[:10], "pending": pending[:10], "unexplained": dict(list(unexplained.items())[:10]),
                        "wrong_code": wrong_code[:10], "quarantined": good_quarantined[:10],
                        "early": early[:10], "unexpected": unexpected[:10]},
            "events": self.events,
        }
        result["ok"] = (result["lost"] == 0 and result["unexplained_duplicates"] == 0 and result["pending"] == 0
                        and recorded == len(mix.malformed_ids) and not wrong_code and not good_quarantined
                        and not unexpected and not split_message_id and not producer.failed
                        and poison_final == len(poison) and not poison_sent_twice
                        and bool(self.alive_at_end) and all(self.alive_at_end.values())
                        and not self.unexpected_exits)
        return result

    def close(self, *, keep: bool) -> None:
        for serve in self.instances.values():  # a stopped process could not stop
            if serve.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(serve.pid, signal.SIGCONT)
        self.procs.stop_all()
        if keep:
            print(f"drill files kept in {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def report(r: dict[str, Any]) -> str:
    rows = [
        ("commands sent", r["commands_sent"]),
        ("  of which repeated idempotency keys", r["repeated_commands"]),
        ("  of which scheduled ahead", r["scheduled_commands"]),
        ("deliveries expected", r["deliveries_expected"]),
        ("delivered exactly once", r["delivered_exactly_once"]),
        ("duplicates", r["duplicates"]),
        ("  explained by an interrupted attempt", r["duplicates_explained_by_interrupted"]),
        ("  explained by a message whose reply timed out", r["duplicates_explained_by_unanswered_message"]),
        ("  unexplained", r["unexplained_duplicates"]),
        ("lost", r["lost"]),
        ("still pending", r["pending"]),
        ("malformed recorded / expected", f"{r['malformed_recorded']} / {r['malformed_expected']}"),
        ("malformed with the wrong code", r["malformed_wrong_code"]),
        ("well-formed commands quarantined", r["well_formed_quarantined"]),
        ("poison commands final / sent", f"{r['poison_final']} / {r['poison_sent']} of {r['poison_commands']}"),
        ("unexpected messages at the server", r["unexpected_at_server"]),
        ("scheduled sent early", r["scheduled_sent_early"]),
        ("dead letters", r["dead_letters"]),
        ("server: accepted/deferred/dropped",
         f"{r['server'].get('accepted', 0)} / {r['server'].get('deferred', 0)} / {r['server'].get('dropped', 0)}"),
        ("instance exits on SIGTERM (code)", ", ".join(str(e["code"]) for e in r["sigterm_exits"])),
        ("instances alive at the end (not killed)",
         f"{sum(r['alive_at_end'].values())} / {len(r['alive_at_end'])}"),
        ("instances that exited on their own", len(r["unexpected_exits"])),
        ("attempts crashed (contained)", r["log_events"]["attempt crashed"]),
        ("deliveries given back unsent (lease)", r["log_events"]["delivery given back unsent"]),
        ("identity locks lost / re-acquired",
         f"{r['log_events']['instance identity lock lost; claiming and sending stop until it is re-acquired']} / "
         f"{r['log_events']['instance identity lock re-acquired']}"),
        ("drill seconds (setup to verdict)", r["seconds"]),
        ("verdict", "PASS" if r["ok"] else "FAIL"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/drill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the test-suite size (seconds, not minutes)")
    p.add_argument("--json", help="where to write the JSON result (default: a file in the temp dir)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, SMTP record)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    harness.install_signal_exit()
    drill = Drill(args, SMALL if args.small else FULL)
    result: dict[str, Any] | None = None
    try:
        result = drill.run()
    except HarnessError as exc:
        print(f"drill could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        # every process is stopped by PID; the files are kept when asked or when the drill failed
        drill.close(keep=args.keep or result is None or not result["ok"])
    path = Path(args.json) if args.json else Path(tempfile.gettempdir()) / f"mailtrio-drill-{int(drill.t0)}.json"
    path.write_text(json.dumps(result, indent=2))
    print(report(result))
    print(f"\nJSON: {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
