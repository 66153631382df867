"""How the report page writes values: the Jinja filters of worker/report/templates.

Every filter takes a value that may be null (a metric that could not be measured) and writes "—" for it.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

DASH = "—"


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def pct(value: Any, digits: int = 2) -> str:
    v = _finite(value)
    return DASH if v is None else f"{v * 100:.{digits}f}%"


def pts(value: Any) -> str:
    """A difference of two fractions, in percentage points."""
    v = _finite(value)
    return DASH if v is None else f"{v * 100:+.2f} pts"


def diff(a: Any, b: Any) -> float | None:
    x, y = _finite(a), _finite(b)
    return None if x is None or y is None else x - y


def dec(value: Any, digits: int = 4) -> str:
    v = _finite(value)
    return DASH if v is None else f"{v:.{digits}f}"


def count(value: Any) -> str:
    v = _finite(value)
    return DASH if v is None else f"{int(v):,}" if v == int(v) else f"{v:,}"


def seconds(value: Any) -> str:
    v = _finite(value)
    if v is None:
        return DASH
    if v < 60:
        return f"{v:.2f} s"
    minutes, secs = divmod(v, 60)
    if minutes < 60:
        return f"{int(minutes)} min {secs:04.1f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes):02d} min"


def size(value: Any) -> str:
    v = _finite(value)
    if v is None:
        return DASH
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= scale:
            return f"{v / scale:.1f} {unit} ({int(v):,} bytes)"
    return f"{int(v):,} bytes"


def when(value: datetime | None) -> str:
    """A timestamp to the second, in UTC (the page never shows microseconds or local time)."""
    if value is None:
        return DASH
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def version(value: Any) -> str:
    return DASH if value is None else f"v{value}"


def to_json(value: Any, indent: int | None = None) -> str:
    if value is None:
        return DASH
    return json.dumps(value, sort_keys=True, ensure_ascii=False, indent=indent, default=str,
                      separators=None if indent else (", ", ": "))


def text(value: Any) -> str:
    return DASH if value is None or value == "" else str(value)


FILTERS = {"pct": pct, "pts": pts, "dec": dec, "count": count, "seconds": seconds, "size": size, "when": when,
           "version": version, "json": to_json, "text": text}
