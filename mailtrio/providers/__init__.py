"""Delivery providers: `smtp` (an ESMTP client on Trio streams) and `stub` (nothing leaves the process)."""
