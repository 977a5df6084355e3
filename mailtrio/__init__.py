"""mailtrio: a mail delivery service built on Trio."""

# trio-asyncio patches asyncio's loop accessors; it must be imported before any asyncio library
# (psycopg, redis, aiosmtplib) binds `asyncio.get_running_loop` at its own import time.
import trio_asyncio  # noqa: F401

__version__ = "0.1.0"
