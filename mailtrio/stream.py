"""The only module that imports redis: the command stream client."""

from __future__ import annotations

import redis.asyncio as aioredis
import trio
from redis.exceptions import RedisError

from mailtrio import bridge
from mailtrio.config import Settings
from mailtrio.store import StartupError


class Stream:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.command_stream
        self.group = settings.consumer_group
        self.consumer = settings.instance_id
        self.client = aioredis.Redis(
            host=settings.redis_host,
            port=settings.redis_port,
            db=settings.redis_db,
            password=settings.redis_password or None,
            socket_connect_timeout=5,
            socket_timeout=None,
            health_check_interval=0,
            client_name=f"mailtrio:{settings.instance_id}",
        )

    async def ping(self, *, within: float = 5.0) -> None:
        try:
            with trio.fail_after(within):
                await bridge.call(self.client.ping)
        except (RedisError, OSError, trio.TooSlowError) as exc:
            where = f"{self.settings.redis_host}:{self.settings.redis_port}"
            detail = " ".join((str(exc) or type(exc).__name__).split())
            raise StartupError(f"cannot reach the Redis master at {where}: {detail}") from exc

    async def close(self, *, within: float = 5.0) -> None:
        with trio.move_on_after(within) as scope:
            scope.shield = True
            await bridge.call(self.client.aclose)
