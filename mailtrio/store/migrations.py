"""Embedded goose-format migrations.

Files are `sql/NNNNN_name.sql` with `-- +goose Up` / `-- +goose Down` sections (and optionally
`-- +goose NO TRANSACTION`, `-- +goose StatementBegin/End`). Each section is split into statements
the way goose splits them: a statement ends on a line whose last token is `;` (a trailing `--`
comment aside), except between `StatementBegin` and `StatementEnd`, where the whole block is one
statement (a function body with semicolons in it). Statements run one at a time: all in one
transaction, or, under `NO TRANSACTION`, each on its own (PostgreSQL refuses `CREATE INDEX
CONCURRENTLY` inside a transaction block or beside another statement in the same query string).
Applied versions are recorded in `mail.goose_db_version` exactly as goose does, so
`goose -table mail.goose_db_version postgres "$DSN" status` agrees with `mailtrio migrate status`.

Locking: the service takes a PostgreSQL session advisory lock around migrating, with the id of
goose's own Postgres session locker, so instances of the service starting together apply each
migration once, and a program that uses goose's library with that session locker waits for them
too. The stock `goose` command takes no lock at all: do not run `goose up` while an instance may
be starting; `mailtrio migrate` (which takes the lock) is the way to migrate ahead of a rollout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

_FILE_RE = re.compile(r"^(\d+)_([A-Za-z0-9_\-]+)\.sql$")
# The advisory lock id of goose's Postgres session locker (crc64-ECMA of "goose"); see the module
# docstring for who takes it and who does not.
GOOSE_LOCK_ID = 5887940537704921958


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: str
    down: str
    use_transaction: bool
    up_statements: tuple[str, ...] = ()
    down_statements: tuple[str, ...] = ()
    filename: str = ""


def sql_dir() -> Path:
    """The embedded `sql/` directory: inside the installed package, or the source tree's."""
    packaged = resources.files("mailtrio") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "sql"


def _ends_statement(line: str) -> bool:
    """goose's rule: the line's last word before any `--` comment ends with a semicolon."""
    words: list[str] = []
    for word in line.split():
        if word.startswith("--"):
            break
        words.append(word)
    return bool(words) and words[-1].endswith(";")


@dataclass(frozen=True)
class Parsed:
    up: tuple[str, ...]
    down: tuple[str, ...]
    use_transaction: bool


def split(text: str) -> Parsed:
    """Split a goose file into its Up and Down statements, as goose does.

    Raises ValueError for a file goose would refuse: no Up annotation, a StatementBegin without
    its StatementEnd (or the reverse), or a statement left unterminated at the end of a section."""
    statements: dict[str, list[str]] = {"up": [], "down": []}
    section: str | None = None
    in_block = False
    buf: list[str] = []
    use_tx = True

    def finish_section() -> None:
        if in_block:
            raise ValueError(f"'-- +goose StatementBegin' without StatementEnd in the {section} section")
        if any(line.strip() for line in buf):
            raise ValueError(f"unterminated statement at the end of the {section} section "
                             "(end it with ';' or wrap it in StatementBegin/StatementEnd)")
        buf.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        # As in goose, only a line that starts with `--` is an annotation or a skipped comment.
        if line.startswith("--"):
            directive = line[2:].strip()
            if directive.startswith("+goose"):
                word = directive[len("+goose"):].strip().upper()
                if word in ("UP", "DOWN"):
                    if section is not None:
                        finish_section()
                    section = word.lower()
                elif word == "NO TRANSACTION":
                    use_tx = False
                elif word == "STATEMENTBEGIN":
                    if section is None or in_block:
                        raise ValueError(f"line {number}: unexpected StatementBegin")
                    if any(ln.strip() for ln in buf):
                        raise ValueError(f"line {number}: StatementBegin after an unterminated statement")
                    buf.clear()
                    in_block = True
                elif word == "STATEMENTEND":
                    if section is None or not in_block:
                        raise ValueError(f"line {number}: StatementEnd without StatementBegin")
                    statements[section].append("\n".join(buf).strip())
                    buf.clear()
                    in_block = False
                else:
                    raise ValueError(f"line {number}: unknown goose annotation {stripped!r}")
                continue
            if not in_block:
                continue  # a comment line between statements
        if section is None:
            continue
        if not in_block and not stripped and not buf:
            continue
        buf.append(line)
        if not in_block and _ends_statement(line):
            statements[section].append("\n".join(buf).strip())
            buf.clear()
    if section is None:
        raise ValueError("no '-- +goose Up' annotation")
    finish_section()
    return Parsed(tuple(statements["up"]), tuple(statements["down"]), use_tx)


def parse(text: str) -> tuple[str, str, bool]:
    """A goose file as (up, down, use_transaction), each section's statements joined by newlines."""
    parsed = split(text)
    return "\n".join(parsed.up), "\n".join(parsed.down), parsed.use_transaction


def load(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    out = []
    for path in sorted(directory.iterdir()):
        m = _FILE_RE.match(path.name)
        if not m or not path.is_file():
            continue
        try:
            parsed = split(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path.name}: {exc}") from None
        out.append(Migration(int(m.group(1)), m.group(2), "\n".join(parsed.up), "\n".join(parsed.down),
                             parsed.use_transaction, parsed.up, parsed.down, path.name))
    out.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in out]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {directory}")
    return out
