"""Delivery providers: `smtp` (aiosmtplib) and `stub` (nothing leaves the process)."""
