"""Embedded goose-format migrations, applied under goose's own advisory lock.

Files are `sql/NNNNN_name.sql` with `-- +goose Up` / `-- +goose Down` sections (and optionally
`-- +goose NO TRANSACTION`, `-- +goose StatementBegin/End`). Applied versions are recorded in
`mail.goose_db_version` exactly as goose does, so `goose -table mail.goose_db_version status`
agrees with the service.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

_FILE_RE = re.compile(r"^(\d+)_([A-Za-z0-9_\-]+)\.sql$")
# goose's Postgres session advisory lock id, so the goose CLI and the service exclude each other.
GOOSE_LOCK_ID = 5887940537704921958


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: str
    down: str
    use_transaction: bool


def sql_dir() -> Path:
    """The embedded `sql/` directory: inside the installed package, or the source tree's."""
    packaged = resources.files("mailtrio") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "sql"


def parse(text: str) -> tuple[str, str, bool]:
    """Split a goose file into (up, down, use_transaction)."""
    sections: dict[str, list[str]] = {"up": [], "down": []}
    current: str | None = None
    use_tx = True
    for line in text.splitlines():
        directive = line.strip()
        if directive.startswith("-- +goose"):
            word = directive[len("-- +goose") :].strip().upper()
            if word == "UP":
                current = "up"
            elif word == "DOWN":
                current = "down"
            elif word == "NO TRANSACTION":
                use_tx = False
            # StatementBegin/End only matter to a statement splitter; whole sections run at once.
            continue
        if current is not None:
            sections[current].append(line)
    if current is None:
        raise ValueError("no '-- +goose Up' annotation")
    return "\n".join(sections["up"]).strip(), "\n".join(sections["down"]).strip(), use_tx


def load(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    out = []
    for path in sorted(directory.iterdir()):
        m = _FILE_RE.match(path.name)
        if not m or not path.is_file():
            continue
        up, down, use_tx = parse(path.read_text(encoding="utf-8"))
        out.append(Migration(int(m.group(1)), m.group(2), up, down, use_tx))
    out.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in out]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {directory}")
    return out
