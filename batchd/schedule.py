"""Submission windows: when a route may create batches (issue 11), as pure functions of time.

A window is either a set of daily ranges in a time zone (``"22:00-06:00"``, or to the second,
``"22:00:30-06:00:00"``; a range whose end is not after its start runs past midnight;
``"00:00-24:00"`` is all day) or a cron expression plus a
duration (``cron = "0 22 * * 1-5"``, ``duration = 8 h``: opens at each firing, stays open for the
duration). Times are computed in the window's zone, so a range keeps its wall-clock meaning across
daylight-saving changes (a night with a 23- or 25-hour day is a shorter or longer window).
Cron expressions are evaluated by cronsim (the library healthchecks.io runs on); everything else
here is ours.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

# HH:MM[:SS]-HH:MM[:SS]: seconds are optional (a test opens a window a few seconds from now).
_RANGE = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*-\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*$")
# How far to look for the next opening: a cron that fires less often than this is refused at parse.
_HORIZON = timedelta(days=400)


class ScheduleError(ValueError):
    """A window that cannot be understood (the message names the bad part)."""


def zone(name: str) -> tzinfo:
    """A time zone by IANA name ("UTC", "Europe/Berlin"); ScheduleError if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown time zone {name!r} (an IANA name such as 'Europe/Berlin')") from None


@dataclass(frozen=True)
class DailyRange:
    """One wall-clock range, e.g. 22:00-06:00 (start inclusive, end exclusive)."""

    start: time
    end: time  # time.max stands for 24:00

    @classmethod
    def parse(cls, text: str) -> DailyRange:
        """'HH:MM-HH:MM' or with seconds, 'HH:MM:SS-HH:MM:SS' (either end); '24:00' ends a day."""
        match = _RANGE.match(text)
        if not match:
            raise ScheduleError(f"window {text!r}: expected HH:MM-HH:MM (or HH:MM:SS), e.g. '22:00-06:00'")
        h1, m1, s1, h2, m2, s2 = (int(g) if g is not None else 0 for g in match.groups())
        if h1 > 23 or m1 > 59 or m2 > 59 or s1 > 59 or s2 > 59 or h2 > 24 or (h2 == 24 and (m2, s2) != (0, 0)):
            raise ScheduleError(f"window {text!r}: not a time of day")
        end = time.max if h2 == 24 else time(h2, m2, s2)
        if (h1, m1, s1) == (h2 % 24, m2, s2) and h2 != 24:
            raise ScheduleError(f"window {text!r} is empty; use '00:00-24:00' for all day")
        return cls(time(h1, m1, s1), end)

    def spans(self, day: date, tz: tzinfo) -> tuple[datetime, datetime]:
        """The range that starts on `day`, as aware datetimes in UTC."""
        opens = datetime.combine(day, self.start, tz)
        if self.end == time.max:
            closes = datetime.combine(day + timedelta(days=1), time(0), tz)
        elif self.end > self.start:
            closes = datetime.combine(day, self.end, tz)
        else:
            closes = datetime.combine(day + timedelta(days=1), self.end, tz)
        return opens.astimezone(UTC), closes.astimezone(UTC)


@dataclass(frozen=True)
class Window:
    """When batches may be created: daily ranges, or cron firings each open for `duration`."""

    tz: tzinfo
    ranges: tuple[DailyRange, ...] = ()
    cron: str | None = None
    duration: timedelta = timedelta(0)

    @classmethod
    def daily(cls, ranges: Iterable[str], tz: str = "UTC") -> Window:
        parsed = tuple(DailyRange.parse(text) for text in ranges)
        if not parsed:
            raise ScheduleError("a window needs at least one range")
        return cls(zone(tz), ranges=parsed)

    @classmethod
    def from_cron(cls, expression: str, duration: timedelta, tz: str = "UTC") -> Window:
        if duration <= timedelta(0):
            raise ScheduleError("a cron window needs a positive duration")
        try:
            CronSim(expression, datetime(2000, 1, 1))
        except CronSimError as exc:
            raise ScheduleError(f"cron {expression!r}: {exc}") from None
        window = cls(zone(tz), cron=expression, duration=duration)
        probe = datetime(2026, 1, 1, tzinfo=UTC)
        if window.next_open(probe) is None:
            raise ScheduleError(f"cron {expression!r} does not fire within a year")
        return window

    def _spans(self, around: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Every opening near or after `around` (UTC, aware), in order of opening."""
        if self.cron is None:
            local = around.astimezone(self.tz).date()
            for offset in range(-1, 9):
                day = local + timedelta(days=offset)
                yield from sorted(r.spans(day, self.tz) for r in self.ranges)
            return
        local_start = (around - self.duration).astimezone(self.tz)
        limit = around + _HORIZON
        for fire in CronSim(self.cron, local_start - timedelta(seconds=1)):
            opens = fire.astimezone(UTC)
            if opens > limit:
                return
            yield opens, opens + self.duration

    def is_open(self, at: datetime) -> bool:
        """True while batches may be created at `at` (an aware datetime)."""
        return any(opens <= at < closes for opens, closes in self._spans(at))

    def next_open(self, at: datetime) -> datetime | None:
        """`at` itself if open, else the next opening (UTC); None if it never opens again."""
        for opens, closes in self._spans(at):
            if closes <= at:
                continue
            return at if opens <= at else opens
        return None

    def closes_at(self, at: datetime) -> datetime | None:
        """When the window open at `at` closes (None if it is closed at `at`)."""
        spans = list(self._spans(at))
        ends = [closes for opens, closes in spans if opens <= at < closes]
        if not ends:
            return None
        end = max(ends)
        # Ranges that touch or overlap (22:00-24:00 then 00:00-06:00) make one longer opening.
        extended = True
        while extended:
            extended = False
            for opens, closes in spans:
                if opens <= end < closes:
                    end, extended = closes, True
        return end


def as_datetime(timestamp: float) -> datetime:
    """Unix time as an aware UTC datetime (the daemon's clock is unix time)."""
    return datetime.fromtimestamp(timestamp, UTC)
