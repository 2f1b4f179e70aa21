"""Wall-clock durations and deadlines for scheduling ("4h", "90m", "2d", or an ISO time).

Why separate from `engine.duration`: training durations count steps/epochs; a scheduler's job
length, slack and deadline are wall-clock hours, and a deadline may be an absolute UTC time.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

from greenstack.errors import ConfigError, Problem

_UNITS = {"s": 1 / 3600, "m": 1 / 60, "min": 1 / 60, "h": 1.0, "d": 24.0, "w": 168.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|min|h|d|w)?\s*$", re.IGNORECASE)
HINT = 'a number and a unit: "90m", "4h", "1.5d" (s, m, h, d, w)'


def parse_hours(text: Any, key: str, *, allow_zero: bool = False) -> float:
    """'4h' -> 4.0, '90m' -> 1.5, '2d' -> 48.0; a bare number means hours. Raises ConfigError naming key."""
    if isinstance(text, bool) or text is None:
        raise ConfigError(Problem(key, text, f"not a duration ({HINT})"))
    if isinstance(text, (int, float)):
        hours = float(text)
    else:
        match = _PATTERN.match(str(text))
        if not match:
            raise ConfigError(Problem(key, text, f"not a duration ({HINT})"))
        hours = float(match.group(1)) * _UNITS[(match.group(2) or "h").lower()]
    if hours < 0 or (hours == 0 and not allow_zero):
        raise ConfigError(Problem(key, text, "must be > 0" if not allow_zero else "must be >= 0", "e.g. 4h"))
    return hours


def parse_time(text: Any, key: str) -> datetime:
    """An ISO-8601 time with a UTC offset (or 'Z') as an aware UTC datetime; naive times are refused."""
    if isinstance(text, datetime):
        value = text
    else:
        try:
            value = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ConfigError(Problem(key, text, "not an ISO-8601 time", "e.g. 2024-05-01T13:00:00Z")) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ConfigError(Problem(key, text, "time without a timezone",
                                  "add 'Z' or an offset, e.g. 2024-05-01T13:00:00Z"))
    return value.astimezone(timezone.utc)


def parse_deadline(text: Any, now: datetime, key: str) -> datetime:
    """A deadline given as a duration from `now` ('24h') or as an absolute ISO time."""
    if isinstance(text, datetime) or (isinstance(text, str) and re.search(r"\d{4}-\d{2}-\d{2}", text)):
        return parse_time(text, key)
    return now + timedelta(hours=parse_hours(text, key))


def format_hours(hours: float) -> str:
    """1.5 -> '1h30m', 26 -> '1d2h', 0.25 -> '15m' (for countdowns and messages)."""
    minutes = int(round(hours * 60))
    days, rest = divmod(minutes, 24 * 60)
    h, m = divmod(rest, 60)
    parts = [f"{days}d"] * bool(days) + [f"{h}h"] * bool(h) + [f"{m}m"] * bool(m)
    return "".join(parts) or "0m"
