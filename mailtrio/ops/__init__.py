"""Operator tools: the queue subcommands over the internal HTTP API and the pre-flight `check`.

`client` speaks to the internal API (stdlib HTTP only), `output` prints aligned tables or JSON,
`commands` holds the subcommands (`deliveries`, `dead-letters`, `malformed`, `schedule`) and
`check` runs every start-up step without starting the service.
"""

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def run_trio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """`trio.run(fn, *args)`, re-raising the first real exception out of (nested) exception groups."""
    import trio

    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from group
