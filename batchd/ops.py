"""What operators' commands compute beside the daemon: routes, next flushes, whether a daemon runs.

`parse_route` and `shown_flush` are pure (unit-tested in tests/test_ops.py; when a route flushes
is deadlines.plan_flush, the batcher's own rule); `daemon_pid` reads the
kernel's lock table, so `batchd status` can tell a running daemon from a stale lock file without
touching the lock itself (taking it, even shared and for an instant, could make a daemon that
starts at that moment refuse to run).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .deadlines import FlushPlan, FlushReason
from .store.contract import PAUSE_UNTIL

ANY = "*"
# A pause of a [[routes]] name (not a profile's) is kept under this prefix: profile names never hold ':'.
ROUTE_PREFIX = "route:"
LOCK_NAME = "batchd.lock"  # daemon.StateLock's file in the state directory
PROC_LOCKS = Path("/proc/locks")


def parse_route(text: str | None) -> tuple[str, str]:
    """(profile, model) of a ROUTE: `PROFILE`, `PROFILE/MODEL` or nothing (every route); `*` is any.

    A model may itself hold slashes (`openai/meta-llama/x`): only the first one separates.
    ValueError for an empty part.
    """
    if text is None or text.strip() in ("", ANY):
        return ANY, ANY
    profile, _, model = text.strip().partition("/")
    if not profile or (_ and not model):
        raise ValueError(f"not a route: {text!r} (use PROFILE or PROFILE/MODEL)")
    return profile, model or ANY


def route_name(profile: str, model: str) -> str:
    """The ROUTE an operator types for (profile, model): `*` for all, `PROFILE` for all its models,
    a route's name for its pause key (route_pause_key)."""
    if profile == ANY and model == ANY:
        return ANY
    if profile.startswith(ROUTE_PREFIX) and model == ANY:
        return profile[len(ROUTE_PREFIX) :]
    return profile if model == ANY else f"{profile}/{model}"


def route_pause_key(name: str) -> tuple[str, str]:
    """How a pause of a [[routes]] name that is not a profile is stored: (ROUTE_PREFIX + name, '*')."""
    return ROUTE_PREFIX + name, ANY


def held_until(
    holds: Mapping[tuple[str, str], float], profile: str, model: str, route: str | None = None
) -> float | None:
    """Until when submission for (profile, model), of the route named `route`, is held by `holds`
    (Store.active_holds, whose operator pauses may name '*' for any profile or model, or a route
    by route_pause_key), or None when it is not held."""
    keys = [(profile, model), (profile, ANY), (ANY, model), (ANY, ANY)]
    if route is not None:
        keys.append(route_pause_key(route))
    found = [holds[key] for key in keys if key in holds]
    return max(found) if found else None


@dataclass(frozen=True, slots=True)
class NextFlush:
    """When a route's queued work goes out next, as `batchd status` shows it."""

    at: float | None  # None: not until an operator resumes it, or a batch of the profile ends
    reason: str  # deadlines.FlushReason's words, or paused | in_flight


def shown_flush(plan: FlushPlan, now: float, in_flight_full: bool = False) -> NextFlush:
    """deadlines.plan_flush's answer as status shows it: a pause (a hold until PAUSE_UNTIL) has no
    time, nor has a flush waiting for capacity until a batch ends, nor a due flush of a profile at
    its max_in_flight (it waits for one of its batches to end); a flush already due is now.
    """
    if plan.at >= PAUSE_UNTIL:
        return NextFlush(None, "paused" if plan.reason == FlushReason.HELD else plan.reason.value)
    if in_flight_full and plan.at <= now:
        return NextFlush(None, "in_flight")
    return NextFlush(max(plan.at, now), plan.reason.value)


def _lock_holders(path: Path) -> list[int]:
    """Pids holding a lock on `path`'s inode in the kernel's table (/proc/locks)."""
    info = path.stat()
    ident = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    holders = []
    for line in PROC_LOCKS.read_text().splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; a waiting lock has "->" after the number.
        if "->" in fields:
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].lower() == ident and fields[4].isdigit():
            holders.append(int(fields[4]))
    return holders


def daemon_pid(state_dir: Path) -> int | None:
    """The pid of the daemon holding the state directory's lock, or None when none runs.

    The kernel's lock table is the truth (the lock goes when the process dies); where it cannot be
    read, the pid written in the lock file counts if that process is alive.
    """
    path = state_dir / LOCK_NAME
    try:
        holders = _lock_holders(path)
    except FileNotFoundError:
        return None
    except OSError:
        holders = []
        with contextlib.suppress(OSError, ValueError):
            pid = int(path.read_text().strip())
            os.kill(pid, 0)
            holders = [pid]
    return holders[0] if holders else None
