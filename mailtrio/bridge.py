"""The one place that knows about trio-asyncio.

redis-py's asyncio client and psycopg's AsyncConnection (and its pool) are asyncio libraries.
The service runs on Trio; `open_loop()` provides an asyncio loop inside the Trio run and `aio()`
wraps an asyncio coroutine function so Trio code can await it. Trio cancellation propagates into
the asyncio task, so cancel scopes bound asyncio work too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ParamSpec, TypeVar

import trio_asyncio

P = ParamSpec("P")
T = TypeVar("T")


def open_loop() -> AbstractAsyncContextManager[Any]:
    """Open the asyncio loop that hosts the asyncio libraries for the lifetime of the service."""
    return trio_asyncio.open_loop()  # type: ignore[no-any-return]


def aio(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Adapt an asyncio coroutine function so that Trio code can await it."""
    return trio_asyncio.aio_as_trio(fn)  # type: ignore[no-any-return]


async def call(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Await the asyncio coroutine function `fn(*args, **kwargs)` from Trio."""
    return await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)  # type: ignore[no-any-return]
