"""Stream entries for the bench and the drill, built as a producer would (CONTRACT §4).

Well-formed commands use the sample catalog (`templates/`): `newsletter` for `notification`,
`login-code` for `authsession`. Malformed commands carry a valid, unique `delivery_id` so the
drill can find their quarantine record; each one breaks exactly one rule.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

Entry = dict[str, str]


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def command(run: str, i: int, *, source: str = "notification", send_at: float | None = None,
            headers: Mapping[str, str] | None = None, locale: str | None = None,
            domain: str = "example.com") -> Entry:
    """A well-formed template command; its delivery id is `<run>-<i>` (or `<run>-a<i>` for auth);
    its recipient is in `domain`."""
    delivery_id = f"{run}-{'a' if source == 'authsession' else 'n'}{i}"
    payload: dict[str, object]
    if source == "authsession":
        payload = {
            "template_id": "login-code",
            "to": [{"email": f"user{i}@{domain}", "name": f"User {i}"}],
            "variables": {"code": f"{(i * 7919) % 1000000:06d}", "name": f"User {i}"},
        }
        loc = locale or ("en", "fr", "pt-BR")[i % 3]
    else:
        payload = {
            "template_id": "newsletter",
            "to": [f"reader{i}@{domain}"],
            "variables": {"title": f"News #{i}", "intro": "What happened this week.",
                          "items": ["First story", "Second story", "Third story"]},
            "tags": ["bench"],
        }
        loc = locale or ("en", "fr")[i % 2]
    if headers:
        payload["headers"] = dict(headers)
    entry: Entry = {
        "delivery_id": delivery_id,
        "source": source,
        "idempotency_key": f"{run}-key-{delivery_id}",
        "payload_mode": "template",
        "locale": loc,
        "payload": json.dumps(payload, separators=(",", ":")),
    }
    if send_at is not None:
        entry["send_at"] = _rfc3339(send_at)
    return entry


# Each malformed kind breaks one rule; the value is the failure code CONTRACT §4 assigns.
MALFORMED_KINDS: dict[str, str] = {
    "not_json": "invalid_json",
    "no_source": "missing_field",
    "bad_mode": "invalid_field",
    "bad_locale": "invalid_locale",
    "bad_recipient": "invalid_recipient",
    "unknown_template": "unknown_template",
    "crlf_name": "unsafe_header",
}


def malformed(run: str, i: int) -> tuple[Entry, str]:
    """A malformed command with a unique valid delivery id, and the failure code it must get."""
    kinds = list(MALFORMED_KINDS)
    kind = kinds[i % len(kinds)]
    entry = command(run, i)
    entry["delivery_id"] = f"{run}-m{i}"
    entry["idempotency_key"] = f"{run}-key-m{i}"
    payload = json.loads(entry["payload"])
    if kind == "not_json":
        entry["payload"] = '{"template_id": "newsletter", "to": ['
    elif kind == "no_source":
        del entry["source"]
    elif kind == "bad_mode":
        entry["payload_mode"] = "mjml"
    elif kind == "bad_locale":
        entry["locale"] = "EN_us"
    elif kind == "bad_recipient":
        payload["to"] = ["not an address"]
    elif kind == "unknown_template":
        payload["template_id"] = "no-such-template"
    elif kind == "crlf_name":
        payload["to"] = [{"email": f"reader{i}@example.com", "name": "Evil\r\nBcc: victim@example.com"}]
    if kind != "not_json":
        entry["payload"] = json.dumps(payload, separators=(",", ":"))
    return entry, MALFORMED_KINDS[kind]


@dataclass
class Mix:
    """A shuffled command mix: well-formed, exact repeats (same key, same content) and malformed."""

    entries: list[Entry] = field(default_factory=list)
    expected_ids: set[str] = field(default_factory=set)
    malformed_ids: dict[str, str] = field(default_factory=dict)
    repeats: int = 0
    # delivery id -> seconds after its first XADD at which it is due (see assign_send_at)
    scheduled: dict[str, float] = field(default_factory=dict)
    # delivery id -> the send_at given to it (epoch seconds)
    send_at: dict[str, float] = field(default_factory=dict)

    def assign_send_at(self, start: float, rate: float) -> None:
        """Give each scheduled command `send_at` = its planned first XADD time + its delay.

        Entry k is planned at start + k / rate; a repeat keeps its original's exact `send_at`.
        """
        for k, entry in enumerate(self.entries):
            delivery_id = entry.get("delivery_id", "")
            delay = self.scheduled.get(delivery_id)
            if delay is None:
                continue
            if delivery_id not in self.send_at:
                self.send_at[delivery_id] = start + k / rate + delay
            entry["send_at"] = _rfc3339(self.send_at[delivery_id])


def mix(run: str, total: int, *, dup_ratio: float, malformed_ratio: float, seed: int = 1,
        auth_ratio: float = 0.0, scheduled_ratio: float = 0.0,
        schedule_window: tuple[float, float] = (2.0, 6.0), headers_for_id: bool = False) -> Mix:
    """`total` entries: `dup_ratio` exact repeats of earlier ones, `malformed_ratio` malformed.

    A `scheduled_ratio` share is due uniform(schedule_window) seconds after it is sent
    (`Mix.assign_send_at`); a repeat copies its original exactly. With `headers_for_id`, each
    command carries the header `X-Drill-Delivery: <delivery id>`.
    """
    rnd = random.Random(seed)
    n_dup = int(total * dup_ratio)
    n_bad = int(total * malformed_ratio)
    n_good = total - n_dup - n_bad
    out = Mix()
    originals: list[Entry] = []
    for i in range(n_good):
        source = "authsession" if rnd.random() < auth_ratio else "notification"
        delivery_id = f"{run}-{'a' if source == 'authsession' else 'n'}{i}"
        headers = {"X-Drill-Delivery": delivery_id} if headers_for_id else None
        entry = command(run, i, source=source, headers=headers)
        originals.append(entry)
        out.expected_ids.add(entry["delivery_id"])
        if scheduled_ratio and rnd.random() < scheduled_ratio:
            out.scheduled[entry["delivery_id"]] = rnd.uniform(*schedule_window)
    bad: list[Entry] = []
    for j in range(n_bad):
        entry, code = malformed(run, n_good + j)
        bad.append(entry)
        out.malformed_ids[entry["delivery_id"]] = code
    # Repeats come after their original: shuffle originals + malformed, then insert each repeat
    # at a random later position.
    order = originals + bad
    rnd.shuffle(order)
    for _ in range(n_dup):
        src_pos = rnd.randrange(len(order))
        while "delivery_id" not in order[src_pos] or order[src_pos]["delivery_id"] not in out.expected_ids:
            src_pos = rnd.randrange(len(order))
        pos = rnd.randint(src_pos + 1, len(order))
        order.insert(pos, dict(order[src_pos]))
    out.entries = order
    out.repeats = n_dup
    return out
