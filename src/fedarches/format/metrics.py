"""Scalar metrics that may leave a party: the one sanitiser.

Why a filter and not trust: a report may hold arrays, per-cell values or file
paths; a bundle, a Flower reply and a version manifest must not, so anything
that is not a small finite scalar with a plain key is dropped rather than
shipped. The same function checks a received bundle (``read_bundle`` refuses
metrics it would change), so what a site may send and what the coordinator
accepts cannot drift apart.

Bounds (why these): integers are counts (cells, genes, epochs, bytes), kept
exact only while they fit a signed 64-bit integer in every JSON reader, so at
most ``MAX_METRIC_INT_DIGITS`` (18) digits; floats are scores and losses, and a
magnitude above ``MAX_METRIC_MAGNITUDE`` (1e12) is a diverged run or a hostile
value, never a figure worth publishing; text is a short label without control
characters or path separators.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Union

MAX_METRICS = 64
MAX_METRIC_TEXT = 200
MAX_METRIC_INT_DIGITS = 18
MAX_METRIC_INT = 10**MAX_METRIC_INT_DIGITS - 1
MAX_METRIC_MAGNITUDE = 1e12
MetricValue = Union[bool, int, float, str]

_METRIC_KEY = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def _clean_number(value: Any) -> MetricValue | None:
    """``value`` as a bounded bool/int/float, or None when it is out of bounds."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value) if -MAX_METRIC_INT <= value <= MAX_METRIC_INT else None
    if isinstance(value, float):
        return float(value) if math.isfinite(value) and abs(value) <= MAX_METRIC_MAGNITUDE else None
    return None


def _clean_text(value: str) -> str | None:
    if len(value) > MAX_METRIC_TEXT or "/" in value:
        return None
    if any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in value):
        return None
    return value


def clean_metric(value: Any) -> MetricValue | None:
    """One metric value made safe to ship, or None when it must be dropped."""
    if isinstance(value, (bool, int, float)):
        return _clean_number(value)
    if isinstance(value, str):
        return _clean_text(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
        item = value.item()
        return _clean_number(item) if isinstance(item, (bool, int, float)) else None
    return None


def sanitize_metrics(values: Mapping[str, Any]) -> dict[str, MetricValue]:
    """Keep only small scalar metrics (bounded numbers, booleans, short strings).

    At most ``MAX_METRICS`` keys, taken in sorted order so the same input always
    ships the same subset.
    """
    out: dict[str, MetricValue] = {}
    for key in sorted(values, key=str):
        if len(out) >= MAX_METRICS:
            break
        if not isinstance(key, str) or not _METRIC_KEY.match(key):
            continue
        value = clean_metric(values[key])
        if value is not None:
            out[key] = value
    return out
