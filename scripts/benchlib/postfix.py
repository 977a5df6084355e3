"""A private Postfix submission server on loopback, for the interop tests and bench scenarios.

Its own `config_directory`, queue, data directory and log file under one directory of its own;
listeners on free 127.0.0.1 ports, each an `smtpd` line of master.cf with its overrides:

    submission   STARTTLS required, SASL AUTH (PLAIN, LOGIN; Cyrus sasldb) required, AUTH only over TLS
    notls        no STARTTLS offered, AUTH offered in clear (a STARTTLS-stripping network)
    helo         submission, plus `reject_non_fqdn_helo_hostname` (a qualified EHLO name required)
    noutf8       submission without SMTPUTF8
    plain        no TLS, no AUTH, clients in mynetworks only (for smtp-source)

Mail for the `domains` goes to one virtual Maildir (`maildir`, one file per recipient, with
`X-Original-To`/`Delivered-To`); mail for the `discard_domains` is accepted and thrown away (no
mailbox writes, for throughput runs); anything else is refused: nothing is ever delivered off the
machine. `rcpt_access` maps a recipient to a reply (`450 4.2.1 ...`, `550 5.1.1 ...`) for fault
injection. The certificate is self-signed (openssl) for `localhost` and `127.0.0.1` unless one is
given; `ca_file` is what a client must trust.

Needs root (the master process starts as root), Debian's `postfix`, `sasl2-bin` (saslpasswd2) and
`libsasl2-modules` (PLAIN, LOGIN), installed by scripts/setup; `unavailable()` says what is
missing. Started and stopped by its own config directory (`postfix -c DIR start|stop`, then the
master's own pid if it lingers); the system's Postfix instance is never touched.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

SBIN = Path("/usr/sbin")
# The unprivileged owner of delivered mail (virtual(8) delivers as this uid/gid).
MAIL_UID_USER = "nobody"
COMMAND_TIMEOUT = 60.0

# master.cf services every instance needs (stock Debian lines, chroot off: the private queue
# directory has no chroot tree).
_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_SUBMISSION = ["smtpd_tls_security_level=encrypt", "smtpd_sasl_auth_enable=yes", "smtpd_tls_auth_only=yes",
               "smtpd_client_restrictions=permit_sasl_authenticated,reject"]
LISTENER_KINDS: dict[str, list[str]] = {
    "submission": _SUBMISSION,
    "notls": ["smtpd_tls_security_level=none", "smtpd_sasl_auth_enable=yes", "smtpd_tls_auth_only=no",
              "smtpd_client_restrictions=permit_sasl_authenticated,reject"],
    "helo": [*_SUBMISSION, "smtpd_helo_required=yes", "smtpd_helo_restrictions=reject_non_fqdn_helo_hostname"],
    "noutf8": [*_SUBMISSION, "smtputf8_enable=no"],
    "plain": ["smtpd_tls_security_level=none", "smtpd_sasl_auth_enable=no",
              "smtpd_client_restrictions=permit_mynetworks,reject"],
}


class PostfixError(RuntimeError):
    pass


def unavailable() -> str | None:
    """Why a private Postfix cannot run here (None: it can)."""
    for tool in ("postfix", "postconf", "saslpasswd2"):
        if not (SBIN / tool).exists():
            return f"{SBIN / tool} is not installed (scripts/setup installs postfix and sasl2-bin)"
    if not any(Path("/usr/lib").glob("*/sasl2/libplain.so*")):
        return "Cyrus SASL's PLAIN module is not installed (libsasl2-modules)"
    if os.geteuid() != 0:
        return "a Postfix instance must be started as root"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: Sequence[str], *, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
    proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise PostfixError(f"{' '.join(args[:3])} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
    return proc.stdout + proc.stderr


class PrivatePostfix:
    """One private Postfix instance; use as a context manager (or start()/stop())."""

    def __init__(
        self,
        *,
        listeners: Iterable[str] = ("submission",),
        domains: Iterable[str] = ("example.com",),
        discard_domains: Iterable[str] = ("sink.example.com",),
        rcpt_access: Mapping[str, str] | None = None,
        sasl_user: str = "mailtrio",
        sasl_password: str = "interop-Pass-1",
        cert: tuple[Path, Path] | None = None,
        hostname: str = "mx.interop.mailtrio.test",
        base: Path | None = None,
    ) -> None:
        self.listeners = {name: _free_port() for name in listeners}
        unknown = set(self.listeners) - set(LISTENER_KINDS)
        if unknown:
            raise ValueError(f"unknown listener kinds {sorted(unknown)} (known: {sorted(LISTENER_KINDS)})")
        self.domains = list(domains)
        self.discard_domains = list(discard_domains)
        self.rcpt_access = dict(rcpt_access or {})
        self.sasl_user = sasl_user
        self.sasl_password = sasl_password
        self.hostname = hostname
        self._cert = cert
        self._own_base = base is None and not os.environ.get("MAILTRIO_KEEP_POSTFIX")
        self.base = Path(tempfile.mkdtemp(prefix="mailtrio-postfix-")) if base is None else base
        self.conf = self.base / "conf"
        self.queue = self.base / "queue"
        self.data = self.base / "data"
        self.mail = self.base / "mail"
        self.maildir = self.mail / "inbox"
        self.log_file = self.base / "log" / "maillog"
        self.cert_file = self.conf / "tls" / "cert.pem"
        self.key_file = self.conf / "tls" / "key.pem"
        self.started = False

    # -- what clients need -----------------------------------------------------------------------
    @property
    def login(self) -> str:
        """The SASL login name (sasldb wants user@realm)."""
        return f"{self.sasl_user}@localhost"

    @property
    def ca_file(self) -> Path:
        return self.cert_file

    def port(self, listener: str) -> int:
        return self.listeners[listener]

    def addr(self, listener: str) -> str:
        return f"127.0.0.1:{self.listeners[listener]}"

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> PrivatePostfix:
        reason = unavailable()
        if reason is not None:
            raise PostfixError(reason)
        try:
            self._write_config()
            _run([str(SBIN / "postfix"), "-c", str(self.conf), "check"])
            _run([str(SBIN / "postfix"), "-c", str(self.conf), "start"])
            self.started = True
            self._wait_listening(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop this instance (by its config directory, then by its master's pid) and remove its
        directory when it made it."""
        if self.started:
            with contextlib.suppress(PostfixError, subprocess.TimeoutExpired):
                _run([str(SBIN / "postfix"), "-c", str(self.conf), "stop"], timeout=20)
            pid = self.master_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.started = False
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def reload(self) -> None:
        """Re-read main.cf and the maps (`set_rcpt_access`); sessions in progress keep the old ones."""
        _run([str(SBIN / "postfix"), "-c", str(self.conf), "reload"])

    def set_rcpt_access(self, mapping: Mapping[str, str]) -> None:
        self.rcpt_access = dict(mapping)
        self._write_rcpt_access()
        if self.started:
            self.reload()

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> PrivatePostfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what was delivered -------------------------------------------------------------------------
    def messages(self) -> list[Path]:
        """The delivered files (one per recipient), oldest first."""
        files = [p for sub in ("new", "cur") for p in (self.maildir / sub).glob("*") if p.is_file()]
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def wait_messages(self, count: int, timeout: float = 60.0) -> list[Path]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages()
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise PostfixError(f"{len(found)} of {count} messages delivered in {timeout:.0f}s; "
                                   f"log tail: {self.log()[-2000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def queue_is_empty(self) -> bool:
        out = subprocess.run([str(SBIN / "postqueue"), "-c", str(self.conf), "-j"], capture_output=True,
                             text=True, timeout=COMMAND_TIMEOUT, check=False)
        return out.returncode == 0 and not out.stdout.strip()

    # -- configuration ------------------------------------------------------------------------------
    def _write_config(self) -> None:
        postfix_uid = pwd.getpwnam("postfix").pw_uid
        postfix_gid = grp.getgrnam("postfix").gr_gid
        mail_user = pwd.getpwnam(MAIL_UID_USER)
        # Postfix's daemons run as `postfix`: every directory on the way must be traversable.
        for d in (self.base, self.conf, self.conf / "tls", self.conf / "sasl", self.queue, self.log_file.parent):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        self.data.mkdir(exist_ok=True)
        os.chown(self.data, postfix_uid, postfix_gid)
        self.mail.mkdir(exist_ok=True)
        os.chown(self.mail, mail_user.pw_uid, mail_user.pw_gid)
        self._write_cert()

        conf = self.conf
        (conf / "vmailbox").write_text("/.*/ inbox/\n")
        (conf / "virtual_domains").write_text("".join(f"{d} OK\n" for d in self.domains))
        (conf / "transport").write_text("".join(f"{d} discard:\n" for d in self.discard_domains))
        self._write_rcpt_access()
        domains = " ".join([*self.domains, *self.discard_domains])
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.hostname.partition(".")[2] or self.hostname,
            "myorigin": "$myhostname",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.1/32",
            "mydestination": "",
            "local_transport": "error:5.1.1 local delivery disabled",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "virtual_mailbox_domains": domains,
            "virtual_mailbox_base": str(self.mail),
            "virtual_mailbox_maps": f"regexp:{conf / 'vmailbox'}",
            "virtual_uid_maps": f"static:{mail_user.pw_uid}",
            "virtual_gid_maps": f"static:{mail_user.pw_gid}",
            "virtual_minimum_uid": "1",
            "virtual_mailbox_limit": "0",
            "transport_maps": f"texthash:{conf / 'transport'}",
            "default_transport": "error:5.7.1 outbound delivery disabled",
            "relay_transport": "error:5.7.1 outbound delivery disabled",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "smtputf8_enable": "yes",
            "recipient_delimiter": "+",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "smtpd_error_sleep_time": "0",
            "smtpd_tls_cert_file": str(self.cert_file),
            "smtpd_tls_key_file": str(self.key_file),
            "smtpd_tls_security_level": "may",
            "smtpd_tls_loglevel": "1",
            "smtpd_sasl_auth_enable": "no",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "cyrus_sasl_config_path": str(conf / "sasl"),
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": f"check_recipient_access texthash:{conf / 'rcpt_access'}",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.log_file.parent),
        }
        (conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        lines = [_SERVICES]
        for name, port in self.listeners.items():
            opts = [*LISTENER_KINDS[name], f"syslog_name=postfix-{name}"]
            lines.append(f"127.0.0.1:{port} inet n - n - - smtpd\n" + "".join(f"  -o {o}\n" for o in opts))
        (conf / "master.cf").write_text("".join(lines))

        (conf / "sasl" / "smtpd.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
            f"sasldb_path: {conf / 'sasl' / 'sasldb2'}\n")
        sasldb = conf / "sasl" / "sasldb2"
        _run([str(SBIN / "saslpasswd2"), "-p", "-c", "-f", str(sasldb), "-u", "localhost", self.sasl_user],
             stdin=self.sasl_password + "\n")
        os.chown(sasldb, 0, postfix_gid)
        sasldb.chmod(0o640)

    def _write_rcpt_access(self) -> None:
        (self.conf / "rcpt_access").write_text("".join(f"{k} {v}\n" for k, v in self.rcpt_access.items()))

    def _write_cert(self) -> None:
        if self._cert is not None:
            shutil.copyfile(self._cert[0], self.cert_file)
            shutil.copyfile(self._cert[1], self.key_file)
        else:
            _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                  "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                  "-keyout", str(self.key_file), "-out", str(self.cert_file)])
        self.key_file.chmod(0o600)
        self.cert_file.chmod(0o644)

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for port in self.listeners.values():
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise PostfixError(f"postfix is not listening on 127.0.0.1:{port} after {timeout:.0f}s; "
                                           f"log tail: {self.log()[-2000:]}") from None
                    time.sleep(0.1)
