"""mailtrio: a mail delivery service built on Trio."""

import time

# When the service's own code began (a launcher's start-up, e.g. PEX unpacking, is not counted):
# the startup budget of CONTRACT §1 runs from here.
STARTED_AT = time.monotonic()

# trio-asyncio patches asyncio's loop accessors; it must be imported before any asyncio library
# (psycopg, redis) binds `asyncio.get_running_loop` at its own import time.
import trio_asyncio  # noqa: E402, F401

__version__ = "0.1.0"
