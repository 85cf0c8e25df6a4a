"""Transactions that a cancellation cannot tear.

A store call runs its whole transaction as its own task; the caller awaits it through
`settle()`. If the caller is cancelled meanwhile, the transaction still finishes (commit or
rollback) and only then is the cancellation delivered, so the connection is never left inside an
open transaction and the caller never runs ahead of an unfinished commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


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


def shielded(function: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorator: the store method runs whole, as in `settle`."""

    async def wrapper(*args: object, **kwargs: object) -> T:
        return await settle(function(*args, **kwargs))

    wrapper.__name__ = function.__name__
    wrapper.__qualname__ = function.__qualname__
    wrapper.__doc__ = function.__doc__
    return wrapper
