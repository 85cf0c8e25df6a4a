"""Transactions that a cancellation cannot tear.

A store call runs its whole transaction as its own task; the caller awaits it through
`settle()`. If the caller is cancelled meanwhile, the transaction still finishes (commit or
rollback) and only then is the cancellation delivered, so the connection is never left inside an
open transaction and the caller never runs ahead of an unfinished commit.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


async def settle(work: Awaitable[T]) -> T:
    """Await `work` to its end whatever happens to the caller; re-raise a cancellation afterwards."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True  # deferred: the transaction ends first
        except BaseException:
            if cancelled:
                raise asyncio.CancelledError from None
            raise
    if cancelled:
        raise asyncio.CancelledError
    return result


def shielded(function: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorator: the store method runs whole, as in `settle` (its signature is kept for mypy)."""

    @functools.wraps(function)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return await settle(function(*args, **kwargs))

    return wrapper
