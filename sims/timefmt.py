"""Durations and start times as people type them on the command line."""
from __future__ import annotations

import re
from datetime import datetime, timezone

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h|d)?")


def parse_duration(text: str | float | int) -> float:
    """'90' / '90s' / '10m' / '1h30m' / '1d' -> seconds (a bare number is seconds)."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().lower()
    pos, total = 0, 0.0
    while pos < len(s):  # bounded: each match consumes at least one character
        m = _PART.match(s, pos)
        if not m or m.end() == pos:
            raise ValueError(f"not a duration: {text!r} (try 30s, 10m, 2h, 1d)")
        total += float(m.group(1)) * _UNITS[m.group(2) or "s"]
        pos = m.end()
    if not s:
        raise ValueError("empty duration")
    return total


def parse_start(text: str | datetime | None) -> datetime:
    """ISO-8601 start of the simulated period; naive times are UTC (the profiles use its hour of day)."""
    if text is None:
        return datetime(2025, 6, 2, tzinfo=timezone.utc)  # a Monday
    dt = text if isinstance(text, datetime) else datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def fmt_duration(seconds: float) -> str:
    seconds = float(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
