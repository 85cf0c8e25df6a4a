"""The child side of a job: run one benchmark function and record its peak RSS and CPU time.

Runs in a child forked by bench/zygote.py. The peak RSS (VmHWM) is reset at the start, so it
covers exactly this job on top of the preloaded imports, as a fresh process would.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import resource
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from .common import proc_status

T = TypeVar("T")


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """uvloop, as the daemon uses (batchd.cli.run_loop), for both sides alike."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def reset_peak_rss() -> None:
    """Make VmHWM start from the current RSS (Linux: `echo 5 > /proc/self/clear_refs`)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def execute(spec: str, args: dict[str, Any], out: str) -> None:
    reset_peak_rss()
    start_rss = proc_status()["VmRSS"]
    module_name, _, name = spec.partition(":")
    function = getattr(importlib.import_module(module_name), name)
    result = run_loop(function(**args)) if inspect.iscoroutinefunction(function) else function(**args)
    status = proc_status()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update(
        peak_rss=status["VmHWM"],
        end_rss=status["VmRSS"],
        start_rss=start_rss,
        cpu_s=usage.ru_utime + usage.ru_stime,
    )
    Path(out).write_text(json.dumps(result))
