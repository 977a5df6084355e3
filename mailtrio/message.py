"""Pure message building: rendered content + delivery -> RFC 5322 bytes, stable Message-ID."""

from __future__ import annotations

import hashlib
from email.utils import parseaddr


def sender_domain(smtp_from: str) -> str:
    _, addr = parseaddr(smtp_from)
    domain = addr.rpartition("@")[2].strip().lower()
    return domain or "localhost"


def message_id_for(source: str, delivery_id: str, domain: str) -> str:
    """The Message-ID of a delivery: derived from it alone, so every attempt carries the same one."""
    digest = hashlib.sha256(f"{source}\0{delivery_id}".encode()).hexdigest()[:16]
    return f"<{delivery_id}.{digest}@{domain}>"
