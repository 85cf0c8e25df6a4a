"""Machinery shared by both vendors' batch tasks: pacing, interruption, reading input, writing JSONL."""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from batchd.emulator.state import EmulatorState, Job

# Lines handed to a worker thread at once: small enough that cancel/expire/close are noticed
# quickly, large enough that the thread hand-off cost is negligible.
CHUNK_LINES = 2000


async def wait_until(state: EmulatorState, job: Job, deadline: Callable[[], float]) -> None:
    """Sleep until ``deadline()`` (monotonic), an interrupt, or shutdown.

    The deadline is re-evaluated on every wake-up because PUT /_emulator/config may move it.
    """
    while not job.interrupted and not state.closing:
        remaining = deadline() - time.monotonic()
        if remaining <= 0:
            return
        job.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.wake.wait(), remaining)


class JsonlSink:
    """A JSONL file written line by line; remembers line offsets so it can be shuffled on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")
        self._offsets = array.array("q")

    @property
    def count(self) -> int:
        """Lines written so far."""
        return len(self._offsets)

    def write(self, value: Any) -> None:
        """Append one JSON value as a line."""
        self._offsets.append(self._file.tell())
        self._file.write(orjson.dumps(value, option=orjson.OPT_APPEND_NEWLINE))

    def finish(self, rng: random.Random | None) -> int:
        """Close the file, shuffling its lines when ``rng`` is given; returns its size in bytes."""
        end = self._file.tell()
        self._file.close()
        if rng is not None and self.count > 1:
            # Rewrite by seeking through the offsets so a shuffle never holds the file in memory.
            order = list(range(self.count))
            rng.shuffle(order)
            tmp = self.path.with_suffix(".shuffled")
            with self.path.open("rb") as src, tmp.open("wb") as dst:
                for i in order:
                    stop = self._offsets[i + 1] if i + 1 < self.count else end
                    src.seek(self._offsets[i])
                    dst.write(src.read(stop - self._offsets[i]))
            os.replace(tmp, self.path)
        return end

    def close(self) -> None:
        """Close without finishing (shutdown path); idempotent."""
        self._file.close()


class LineRun:
    """One batch's answers being produced: walks the input lines, writes sinks (called in a thread)."""

    def __init__(self, source: Path, sinks: list[JsonlSink]) -> None:
        self._source = source.open("rb")
        self.sinks = sinks
        self.pos = 0

    def _lines(self) -> Iterator[Any]:
        for raw in self._source:
            if raw.strip():
                self.pos += 1
                yield orjson.loads(raw)

    def answer(self, line: Any, inject_error: bool) -> None:
        """Write the outcome of one input line."""
        raise NotImplementedError

    def close_out(self, line: Any) -> None:
        """Write the outcome of a line that never ran (expired or canceled)."""
        raise NotImplementedError

    def step(self, upto: int, error_rate: float, draw: Callable[[], float]) -> int:
        """Answer lines up to index ``upto``; returns how many request errors were injected."""
        injected = 0
        lines = self._lines()
        while self.pos < upto:
            inject = error_rate > 0 and draw() < error_rate
            self.answer(next(lines), inject)
            injected += inject
        return injected

    def close_rest(self) -> None:
        """Close out every line not answered yet."""
        for line in self._lines():
            self.close_out(line)

    def close(self) -> None:
        """Release the input and any unfinished output."""
        self._source.close()
        for sink in self.sinks:
            sink.close()


async def run_lines(state: EmulatorState, job: Job, run: LineRun, total: int, duration: Callable[[], float]) -> None:
    """Answer ``total`` lines spread evenly over ``duration()`` seconds, until done or interrupted.

    Line i becomes due at start + duration * (i + 1) / total, so a cancel part way through leaves
    a realistic prefix of finished work. A forced expiry then finishes the first
    ``expire_fraction`` of the lines (or more, if they were already done).
    """

    async def step(upto: int) -> None:
        rate = state.faults.request_error_rate
        # Await first, then add: `+=` would read the counter before the await and lose other batches' counts.
        injected = await asyncio.to_thread(run.step, upto, rate, job.rng.random)
        state.counters["request_errors"] += injected

    start = time.monotonic()
    while not job.interrupted and not state.closing:
        if run.pos >= total:
            if not job.held:
                break
            # Held: the work is done but the batch stays running until cancelled, expired or released.
            job.wake.clear()
            await job.wake.wait()
            continue
        span = duration()
        elapsed = time.monotonic() - start
        due = total if span <= 0 or elapsed >= span else int(total * elapsed / span)
        if due > run.pos:
            await step(min(due, run.pos + CHUNK_LINES))
        else:
            await wait_until(state, job, lambda: start + duration() * (run.pos + 1) / total)
    if job.expire_fraction is not None and not job.cancel_requested and not state.closing:
        await step(max(run.pos, min(total, int(job.expire_fraction * total))))
