"""Small asyncio helpers shared by the daemon's loops."""

from __future__ import annotations

import asyncio


async def wait_any(timeout: float, *events: asyncio.Event) -> bool:
    """Wait until one of `events` is set or `timeout` seconds pass; True if an event was set."""
    if any(event.is_set() for event in events):
        return True
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        limit = None if timeout == float("inf") else max(timeout, 0.0)
        done, _ = await asyncio.wait(waiters, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        # Not awaited: a cancellation of this task landing in that await would have been swallowed
        # (and the caller's stop with it). A cancelled Event.wait() ends on its own next loop turn.
        for waiter in waiters:
            waiter.cancel()
