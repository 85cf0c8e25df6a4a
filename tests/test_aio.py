"""The daemon's shared asyncio helpers: a cancellation is never swallowed."""

from __future__ import annotations

import asyncio

import pytest

from batchd.aio import wait_any

from .conftest import loop_ticks


@pytest.mark.parametrize("ticks", range(6))
async def test_a_cancellation_that_lands_as_an_event_ends_the_wait_is_raised(ticks: int) -> None:
    event = asyncio.Event()
    waiting = asyncio.create_task(wait_any(60, event))
    await loop_ticks(2)  # inside asyncio.wait
    event.set()
    await loop_ticks(ticks)
    finished = waiting.done()
    waiting.cancel()
    if finished:
        assert waiting.result() is True
    else:
        with pytest.raises(asyncio.CancelledError):
            await waiting


async def test_the_wait_answers_which_way_it_ended() -> None:
    first, second = asyncio.Event(), asyncio.Event()
    assert await wait_any(0.01, first, second) is False
    asyncio.get_running_loop().call_soon(second.set)
    assert await wait_any(60, first, second) is True
    assert await wait_any(0, second) is True  # already set: no wait at all


async def test_no_waiter_is_left_behind() -> None:
    event = asyncio.Event()
    before = len(asyncio.all_tasks())
    assert await wait_any(0.01, event) is False
    await loop_ticks(2)
    assert len(asyncio.all_tasks()) == before
