"""Process and server harness shared by `scripts/bench` and `scripts/drill`.

Everything started here is registered in a `Procs` registry and stopped by PID (SIGTERM, then
SIGKILL after a bound). Every wait is bounded. The service is treated as a black box: it is started
as `python -m mailtrio serve` with environment variables (CONTRACT §2), fed through the Redis stream
(CONTRACT §4), and observed through PostgreSQL and its JSON log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"
PYTHON = sys.executable
def _pg_bin() -> Path:
    """PostgreSQL's server binaries: $MAILTRIO_PG_BIN, else the newest /usr/lib/postgresql/N/bin."""
    if os.environ.get("MAILTRIO_PG_BIN"):
        return Path(os.environ["MAILTRIO_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
SMTP_SINK = os.environ.get("MAILTRIO_SMTP_SINK", "/usr/sbin/smtp-sink")
SMTP_SOURCE = os.environ.get("MAILTRIO_SMTP_SOURCE", "/usr/sbin/smtp-source")


class HarnessError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `check` until it is true; raise HarnessError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect((host, port))
        except OSError:
            return False
        return True


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set size) of a live process, in MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a live process has used so far, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def machine_busy() -> tuple[float, float, float]:
    """(busy, total, steal) jiffies of all CPUs since boot; compare two readings for utilisation.

    Steal is time the hypervisor gave this machine's virtual CPUs to someone else: when it is
    high, every figure of the run is slower for reasons outside the code under test."""
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    total = sum(parts[:8])
    steal = parts[7] if len(parts) > 7 else 0.0
    return total - idle, total, steal


# --- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    stop_signal: int = signal.SIGTERM
    # the PID to signal when it is not the Popen child itself (e.g. a postmaster)
    pid_override: int | None = None

    @property
    def pid(self) -> int:
        return self.pid_override or self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


class Procs:
    """Registry of every process started; `stop_all` stops the survivors by PID, newest first."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], *, stop_signal: int = signal.SIGTERM,
              **popen: Any) -> Proc:
        p = subprocess.Popen(list(argv), **popen)
        proc = Proc(name, p, stop_signal)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, *, timeout: float = 15.0, sig: int | None = None) -> int | None:
        """Signal `proc` by PID, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, proc.stop_signal if sig is None else sig)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.popen.returncode

    def wait(self, proc: Proc, *, timeout: float) -> int | None:
        """Wait for a process already signalled; SIGKILL it after `timeout`. Returns the exit code."""
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.popen.returncode

    def kill(self, proc: Proc) -> None:
        self.stop(proc, sig=signal.SIGKILL, timeout=10)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=10)


def install_signal_exit() -> None:
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks stop every child by PID."""

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)


# --- Postfix smtp-sink -----------------------------------------------------------------------


class SmtpSink:
    """Postfix's `smtp-sink` on a free loopback port, with its running message counter (-c)."""

    def __init__(self, procs: Procs, workdir: Path, *, max_conn: int = 512) -> None:
        if not os.path.exists(SMTP_SINK):
            raise HarnessError(f"{SMTP_SINK} not found (install postfix: scripts/setup)")
        self.port = free_port()
        self.out_path = workdir / f"smtp-sink-{self.port}.out"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in stop()
        argv = [SMTP_SINK, "-c", "-m", str(max_conn)]
        if os.geteuid() == 0:
            argv += ["-u", os.environ.get("MAILTRIO_SMTP_SINK_USER", "postfix")]
        argv += [f"127.0.0.1:{self.port}", "1024"]
        self.proc = procs.start("smtp-sink", argv, stdout=self._out, stderr=subprocess.STDOUT)
        self.procs = procs
        wait_until(lambda: port_open(self.port) or not self.proc.alive(), 10, "smtp-sink to listen")
        if not self.proc.alive():
            raise HarnessError(f"smtp-sink exited: {self.out_path.read_text(errors='replace')[-500:]}")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def messages(self) -> int:
        """Messages accepted so far (the sink's `mesg=` counter; updated when "." is received)."""
        self._out.flush()
        try:
            with open(self.out_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 256))
                tail = f.read().decode(errors="replace")
        except OSError:
            return 0
        pos = tail.rfind("mesg=")
        if pos < 0:
            return 0
        digits = ""
        for ch in tail[pos + 5:]:
            if not ch.isdigit():
                break
            digits += ch
        return int(digits or 0)

    def stop(self) -> None:
        self.procs.stop(self.proc, timeout=5)
        self._out.close()


def smtp_source(addr: str, *, sessions: int, messages: int, size: int, timeout: float) -> float:
    """Run Postfix's `smtp-source` (persistent connections, -d) and return messages per second."""
    argv = [SMTP_SOURCE, "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", "bench@example.com", "-t", "sink@example.com", "-M", "bench.example.com", addr]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise HarnessError(f"smtp-source failed ({done.returncode}): {done.stderr.decode(errors='replace')[-500:]}")
    return messages / elapsed


# --- peers (../shared/peers) ----------------------------------------------------------------


def peers_dir(explicit: str | None = None) -> Path:
    """The peer benchmarks: `explicit`, $MAILTRIO_PEERS_DIR, else ../shared/peers beside the checkout."""
    found = Path(explicit or os.environ.get("MAILTRIO_PEERS_DIR") or ROOT.parent / "shared" / "peers")
    if not (found / "post_office" / "run.sh").is_file():
        raise HarnessError(f"no peer benchmarks in {found} (post_office/run.sh missing)")
    return found


def parse_peer_line(line: str) -> dict[str, Any]:
    """`post_office N=5000 ... msgs_per_s=431.3 ...` -> {"N": 5000, "msgs_per_s": 431.3, ...}."""
    out: dict[str, Any] = {"line": line.strip()}
    for word in line.split()[1:]:
        name, sep, value = word.partition("=")
        if not sep:
            continue
        try:
            out[name] = int(value)
        except ValueError:
            try:
                out[name] = float(value)
            except ValueError:
                out[name] = value
    return out


def post_office(peers: Path, messages: int, *, setup_timeout: float) -> dict[str, Any]:
    """django-post_office's `send_queued_mail` rate for `messages` queued mails (its run.sh, with
    its own smtp-sink), after its setup.sh when its virtualenv is missing. Everything it writes
    goes under $PEERS_WORK (default /tmp/mailtrio-peers)."""
    work = Path(os.environ.get("PEERS_WORK", "/tmp/mailtrio-peers"))
    env = {**os.environ, "PEERS_WORK": str(work)}
    if not (work / "post_office-venv" / "bin" / "python").exists():
        done = subprocess.run(["bash", str(peers / "post_office" / "setup.sh")], capture_output=True,
                              timeout=setup_timeout, check=False, env=env)
        if done.returncode != 0:
            raise HarnessError(f"post_office setup failed: {done.stderr.decode(errors='replace')[-400:]}")
    done = subprocess.run(["bash", str(peers / "post_office" / "run.sh"), str(messages)], capture_output=True,
                          timeout=max(120.0, messages / 20), check=False, env=env)
    lines = [ln for ln in done.stdout.decode(errors="replace").splitlines() if ln.startswith("post_office ")]
    if done.returncode != 0 or not lines:
        raise HarnessError(f"post_office run failed ({done.returncode}): "
                           f"{done.stderr.decode(errors='replace')[-400:]}")
    res = parse_peer_line(lines[-1])
    if res.get("sent_rows") != messages or not isinstance(res.get("msgs_per_s"), float):
        raise HarnessError(f"post_office did not send every message: {lines[-1]}")
    return res


# --- private Redis ---------------------------------------------------------------------------


class PrivateRedis:
    """A `redis-server` of our own on a free loopback port with AOF persistence.

    `appendfsync always`: every write (the producer's XADD, the consumer's XACK and group changes) is
    fsynced before Redis replies, so a SIGKILL of Redis loses nothing it acknowledged. With `everysec`
    a crash may drop up to a second of acknowledged XADDs, which the drill would then count as lost
    commands although the loss is Redis's durability setting, not the service.
    """

    def __init__(self, procs: Procs, workdir: Path, *, fsync: str = "always") -> None:
        self.procs = procs
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.log_path = self.dir / "redis.log"
        self.proc: Proc | None = None
        self.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "",
                "--daemonize", "no", "--logfile", str(self.log_path), "--protected-mode", "no"]
        self.proc = self.procs.start("redis-server", argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._ready, 20, "private redis-server to answer PING")

    def _ready(self) -> bool:
        assert self.proc is not None
        if not self.proc.alive():
            raise HarnessError(f"redis-server exited: {self.log_path.read_text(errors='replace')[-800:]}")
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10, socket_connect_timeout=2)

    def crash(self) -> None:
        """SIGKILL: no shutdown save, recovery from the AOF on the next start."""
        assert self.proc is not None
        self.procs.kill(self.proc)

    def restart(self, down_for: float = 1.0) -> None:
        self.crash()
        time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, timeout=10)


# --- private PostgreSQL cluster --------------------------------------------------------------


class PrivatePostgres:
    """An `initdb` cluster in a temporary directory on a free loopback port (trust auth).

    Run as the `postgres` system user when we are root. The postmaster is the Popen child itself
    (Popen(user=...)), so it is stopped by its own PID: SIGQUIT for a crash-like immediate stop
    (WAL recovery on restart), SIGINT for a fast clean stop.
    """

    def __init__(self, procs: Procs, workdir: Path, *, dbname: str = "mailtrio",
                 settings: Sequence[str] = ()) -> None:
        self.procs = procs
        self.port = free_port()
        self.base = workdir / "pg"
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.log_path = self.base / "postgres.log"
        self.dbname = dbname
        self.settings = list(settings)
        self.base.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            as_user = {"user": "postgres", "group": "postgres"}
            shutil.chown(workdir, "postgres", "postgres")
            for p in (self.base, self.sock):
                shutil.chown(p, "postgres", "postgres")
        self._as_user = as_user
        subprocess.run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-instructions"], check=True, capture_output=True, timeout=120,
                       **as_user)
        self.proc: Proc | None = None
        self.start()
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"'.encode())
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute("CREATE SCHEMA mail")

    def dsn(self, dbname: str | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname or self.dbname}"

    def start(self) -> None:
        argv = [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.sock}",
                "-c", "max_connections=200", "-c", "fsync=on", "-c", "shared_buffers=128MB"]
        for setting in self.settings:
            argv += ["-c", setting]
        log = open(self.log_path, "ab")  # noqa: SIM115 - inherited by the child, closed right after
        try:
            self.proc = self.procs.start("postgres", argv, stop_signal=signal.SIGINT, stdout=log,
                                         stderr=subprocess.STDOUT, **self._as_user)
        finally:
            log.close()
        wait_until(self._ready, 60, "private PostgreSQL to accept connections", interval=0.1)

    def _ready(self) -> bool:
        assert self.proc is not None
        if not self.proc.alive():
            raise HarnessError(f"postgres exited: {self.log_path.read_text(errors='replace')[-800:]}")
        try:
            with psycopg.connect(self.dsn("postgres"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT to the postmaster): no checkpoint, WAL replay on restart."""
        assert self.proc is not None
        self.procs.stop(self.proc, sig=signal.SIGQUIT, timeout=30)

    def restart(self, down_for: float = 1.0) -> None:
        self.crash()
        time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, timeout=30)


# --- databases on an existing server ---------------------------------------------------------


ADMIN_DSN = os.environ.get("MAILTRIO_BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def dsn_with_db(admin_dsn: str, dbname: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(admin_dsn)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo("", **params)


@contextlib.contextmanager
def fresh_database(admin_dsn: str = ADMIN_DSN, prefix: str = "mt_bench") -> Iterator[str]:
    """A new database with an empty schema `mail` (the service migrates it); dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    dsn = dsn_with_db(admin_dsn, name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA mail")
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def query_one(dsn: str, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> Any:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(sql.encode() if not params else sql, params).fetchone()  # type: ignore[arg-type]
        return None if row is None else row[0]


def query_all(dsn: str, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        return list(conn.execute(sql, params).fetchall())  # type: ignore[arg-type]


def table_exists(dsn: str, table: str) -> bool:
    return bool(query_one(dsn, f"SELECT to_regclass('mail.{table}') IS NOT NULL"))


# --- the service -----------------------------------------------------------------------------


def serve_env(**overrides: str) -> dict[str, str]:
    """The parent environment without MAIL_*/OTEL_* variables, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAIL_", "OTEL_"))}
    env.setdefault("MAIL_TEMPLATE_DIR", str(TEMPLATES))
    env.update(overrides)
    return env


@dataclass
class Serve:
    """One `mailtrio serve` process; stdout (JSON log lines) goes straight to a file."""

    procs: Procs
    env: dict[str, str]
    workdir: Path
    name: str = "serve"
    proc: Proc | None = None
    log_path: Path = field(init=False)
    err_path: Path = field(init=False)
    started_at: float = 0.0

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"{self.name}.log"
        self.err_path = self.workdir / f"{self.name}.err"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, ready_timeout: float = 30.0, wait: bool = True) -> Serve:
        out = open(self.log_path, "ab")  # noqa: SIM115 - inherited by the child, closed right after
        err = open(self.err_path, "ab")  # noqa: SIM115
        self._log_offset = self.log_path.stat().st_size
        try:
            self.proc = self.procs.start(self.name, [PYTHON, "-m", "mailtrio", "serve"], env=self.env,
                                         stdout=out, stderr=err, cwd=str(ROOT))
        finally:
            out.close()
            err.close()
        self.started_at = time.time()
        if wait:
            self.wait_ready(ready_timeout)
        return self

    def log_text(self, since_start: bool = True) -> str:
        with open(self.log_path, "rb") as f:
            if since_start:
                f.seek(getattr(self, "_log_offset", 0))
            return f.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if '"internal http listener started"' in self.log_text():
                return True
            if not self.proc.alive():
                raise HarnessError(
                    f"{self.name} exited ({self.proc.popen.returncode}) before it was ready: "
                    f"{self.err_path.read_text(errors='replace')[-800:]} {self.log_text()[-800:]}")
            return False

        wait_until(ready, timeout, f"{self.name} to log 'internal http listener started'", interval=0.05)

    def event_time(self, event: str) -> float | None:
        """The timestamp of the first log line with this event since the last start (epoch s)."""
        import json
        from datetime import datetime

        needle = f'"{event}"'
        for line in self.log_text().splitlines():
            if needle not in line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("event") == event and obj.get("timestamp"):
                ts = str(obj["timestamp"]).replace("Z", "+00:00")
                with contextlib.suppress(ValueError):
                    return datetime.fromisoformat(ts).timestamp()
        return None

    def count_events(self, event: str) -> int:
        return self.log_text().count(f'"event": "{event}"') + self.log_text().count(f'"event":"{event}"')

    def peak_rss_mb(self) -> float | None:
        return None if self.proc is None else peak_rss_mb(self.proc.pid)

    def cpu_seconds(self) -> float | None:
        return None if self.proc is None else cpu_seconds(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def stop(self, timeout: float = 40.0) -> int | None:
        if self.proc is None:
            return None
        return self.procs.stop(self.proc, timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None:
            self.procs.kill(self.proc)


# --- the stream ------------------------------------------------------------------------------


def redis_client(addr: str) -> redis.Redis:
    host, port = addr.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), socket_timeout=30, socket_connect_timeout=5)


def preload(client: redis.Redis, key: str, entries: Sequence[Mapping[str, str]], chunk: int = 1000) -> list[str]:
    """XADD every entry, `chunk` per pipeline; returns the entry ids."""
    ids: list[str] = []
    for i in range(0, len(entries), chunk):
        pipe = client.pipeline(transaction=False)
        for entry in entries[i:i + chunk]:
            pipe.xadd(key, dict(entry))  # type: ignore[arg-type]
        ids.extend(x.decode() if isinstance(x, bytes) else str(x) for x in pipe.execute())
    return ids


def entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def group_state(client: redis.Redis, key: str, group: str) -> tuple[int, int | None] | None:
    """(pending, lag) of the consumer group, or None when the group does not exist yet."""
    try:
        groups = client.xinfo_groups(key)
    except redis.ResponseError:
        return None
    for g in groups:
        name = g.get("name")
        if isinstance(name, bytes):
            name = name.decode()
        if name == group:
            lag = g.get("lag")
            return int(g.get("pending", 0)), (None if lag is None else int(lag))
    return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    import math

    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[rank - 1])


def make_workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
