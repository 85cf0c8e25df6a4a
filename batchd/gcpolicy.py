"""The garbage collector's pace during allocation bursts (a batch's results being collected).

A collection holds each chunk's outcomes, result lines and store rows (hundreds of thousands of
container objects) until the chunk commits. At CPython's default pace (a young collection every
700 net allocations) the collector traversed them over a thousand times per 50,000-line batch,
which cost as much as parsing the results. While a burst runs the young generation may grow to
BURST_THRESHOLD objects first; nothing is disabled, so cyclic garbage is still collected.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

BURST_THRESHOLD = 100_000

_active = 0
_saved: tuple[int, int, int] | None = None


@contextmanager
def burst() -> Iterator[None]:
    """Collect at the burst pace while inside; bursts may overlap (coroutines): the last one out restores."""
    global _active, _saved
    if _active == 0:
        _saved = gc.get_threshold()
        first, *older = _saved
        gc.set_threshold(max(first, BURST_THRESHOLD), *older)
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        if _active == 0 and _saved is not None:
            gc.set_threshold(*_saved)
            _saved = None
