"""The interpreter's pace during bursts of work (a batch's results being collected).

A collection holds each chunk's outcomes, result lines and store rows (hundreds of thousands of
container objects) until the chunk commits. At CPython's default pace (a young collection every
700 net allocations) the collector traversed them over a thousand times per 50,000-line batch,
which cost as much as parsing the results. While a burst runs the young generation may grow to
BURST_THRESHOLD objects first (a pass over that many, and the older generation's pass every tenth,
stay short pauses of the event loop); nothing is disabled, so cyclic garbage is still collected.

The store's writer thread releases the GIL around every SQLite step (each row of an executemany)
and must take it back from the thread parsing the next chunk, which by default keeps it for up to
5 ms (sys.getswitchinterval): the writer spent most of a chunk's commit waiting. During a burst the
interval is BURST_SWITCH_INTERVAL, so the two threads take turns at the pace of SQLite's steps.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

BURST_THRESHOLD = 20_000
BURST_SWITCH_INTERVAL = 0.0005

_active = 0
_saved: tuple[int, int, int] | None = None
_saved_interval = 0.0


def freeze_start_up() -> None:
    """Move everything alive after start-up (modules, the SDKs, settings: hundreds of thousands of
    objects that live as long as the process) out of the collector's sight. Every older-generation
    pass would traverse them again: the pauses of a long ingest and the CPU of an idle daemon."""
    gc.collect()
    gc.freeze()


@contextmanager
def burst() -> Iterator[None]:
    """Run at the burst pace while inside; bursts may overlap (coroutines): the last one out restores."""
    global _active, _saved, _saved_interval
    if _active == 0:
        _saved = gc.get_threshold()
        first, *older = _saved
        gc.set_threshold(max(first, BURST_THRESHOLD), *older)
        _saved_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(_saved_interval, BURST_SWITCH_INTERVAL))
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        if _active == 0 and _saved is not None:
            gc.set_threshold(*_saved)
            sys.setswitchinterval(_saved_interval)
            _saved = None
