# trio-asyncio patches asyncio's loop accessors; import it before psycopg/redis bind them.
import trio_asyncio  # noqa: F401
