"""Store-local days: what "per day" means for salts and point limits."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo


class LocalDays:
    """Maps UNIX seconds to the store's local date, cheaply for timestamps in the same day."""

    def __init__(self, timezone: str) -> None:
        self._tz = ZoneInfo(timezone)
        self._start = 0.0
        self._end = -1.0
        self._day = ""

    @property
    def tz(self) -> ZoneInfo:
        """The store's time zone."""
        return self._tz

    def day(self, ts: float) -> str:
        """Local date of `ts` as YYYY-MM-DD."""
        if not self._start <= ts < self._end:
            local = datetime.fromtimestamp(ts, self._tz)
            midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
            # Next midnight via the date, so a DST change inside the day is handled by zoneinfo.
            next_midnight = (midnight + timedelta(days=1, hours=12)).replace(hour=0, tzinfo=self._tz)
            self._start, self._end = midnight.timestamp(), next_midnight.timestamp()
            self._day = midnight.date().isoformat()
        return self._day

    def bounds(self, ts: float) -> tuple[float, float]:
        """The local day of `ts` as UNIX seconds: its midnight and the next (23 to 25 hours later)."""
        self.day(ts)
        return self._start, self._end
