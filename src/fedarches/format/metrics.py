"""Scalar metrics that may leave a party: the one sanitiser.

Why a filter and not trust: a report may hold arrays, per-cell values or file
paths; a bundle, a Flower reply and a version manifest must not, so anything
that is not a small finite scalar with a plain key is dropped rather than
shipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Union

MAX_METRICS = 64
MAX_METRIC_TEXT = 200
MetricValue = Union[bool, int, float, str]

_METRIC_KEY = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def sanitize_metrics(values: Mapping[str, Any]) -> dict[str, MetricValue]:
    """Keep only small scalar metrics (numbers, booleans, short strings).

    Why a filter and not trust: a report may hold arrays, per-cell values or
    file paths; a bundle must not, so anything that is not a finite scalar
    with a plain key is dropped rather than shipped.
    """
    out: dict[str, MetricValue] = {}
    for key in sorted(values):
        if len(out) >= MAX_METRICS:
            break
        value = values[key]
        if not isinstance(key, str) or not _METRIC_KEY.match(key):
            continue
        if isinstance(value, bool):
            out[key] = value
        elif isinstance(value, int):
            out[key] = int(value)
        elif isinstance(value, float):
            if math.isfinite(value):
                out[key] = float(value)
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
            item = value.item()
            if isinstance(item, (bool, int)) or (isinstance(item, float) and math.isfinite(item)):
                out[key] = item
        elif isinstance(value, str) and len(value) <= MAX_METRIC_TEXT and "/" not in value:
            out[key] = value
    return out
