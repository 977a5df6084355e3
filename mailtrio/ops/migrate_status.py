"""`mailtrio migrate status`: the embedded migrations and which are applied, as goose shows them."""

from __future__ import annotations

import sys

from mailtrio.ops import output, run_trio


def main(dsn: str, *, as_json: bool = False) -> int:
    from mailtrio import bridge
    from mailtrio.store import MigrationStatus, StartupError, migration_status

    async def _read() -> MigrationStatus:
        async with bridge.open_loop():
            return await migration_status(dsn)

    try:
        status = run_trio(_read)
    except StartupError as exc:
        print(f"mailtrio: migrate status failed: {exc}", file=sys.stderr, flush=True)
        return 1
    if as_json:
        output.emit_json({
            "migrations": [
                {"version": mig.version, "file": mig.filename,
                 "applied_at": applied_at.isoformat() if applied_at else None}
                for mig, applied_at in status.entries
            ],
            "pending": [mig.version for mig in status.pending],
            "unknown_applied": status.unknown_applied,
        })
        return 0
    # goose's layout: the time a version was applied (ANSI C format, the database's clock), or Pending.
    print("    Applied At                  Migration")
    print("    =======================================")
    for mig, applied_at in status.entries:
        when = applied_at.strftime("%a %b %e %H:%M:%S %Y") if applied_at else "Pending"
        print(f"    {when:<24} -- {mig.filename}")
    for version in status.unknown_applied:
        print(f"    {'Applied':<24} -- version {version} (not embedded in this build)")
    return 0
