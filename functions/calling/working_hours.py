"""When an offer may call (R-10): its working hours in its own time zone."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from functions.core.config import DAYS, WorkingHours


def next_opening(hours: WorkingHours, now: dt.datetime) -> dt.datetime:
    """`now` if the window is open, else the start of the next window (aware datetime, UTC).
    Raises ValueError when no day of the week is open."""
    zone = ZoneInfo(hours.timezone)
    local = now.astimezone(zone)
    for offset in range(8):
        day = (local + dt.timedelta(days=offset)).date()
        window = hours.window(DAYS[day.weekday()])
        if window is None:
            continue
        start = dt.datetime.combine(day, window[0], tzinfo=zone)
        end = (dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tzinfo=zone) if window[1] is None
               else dt.datetime.combine(day, window[1], tzinfo=zone))
        if local < end:
            return max(start, local).astimezone(dt.UTC)
    raise ValueError("working hours have no open day")
