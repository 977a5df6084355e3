"""Named SQL queries, loaded once from `sql/queries/*.sql` (`-- name: x` headers)."""

from __future__ import annotations

import re
from functools import cache

from mailtrio.store.migrations import sql_dir

_NAME_RE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    parts = _NAME_RE.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in out:
            raise ValueError(f"query {name!r} defined twice")
        out[name] = body.strip().rstrip(";").strip()
    return out


@cache
def all_queries() -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted((sql_dir() / "queries").glob("*.sql")):
        for name, body in parse(path.read_text(encoding="utf-8")).items():
            if name in out:
                raise ValueError(f"query {name!r} defined in two files")
            out[name] = body
    return out


def q(name: str) -> str:
    """The SQL text of the named query."""
    return all_queries()[name]
