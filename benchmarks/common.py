"""Helpers shared by the harness and the runners.

Imported by runners in BOTH virtual environments (fedarches' and the peers'), so it
uses the standard library and numpy only.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any


def set_threads(n: int) -> None:
    """Pin BLAS / OpenMP / torch threads (call before importing torch for the env vars)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(n)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


class EpochClock:
    """Collects wall-clock seconds of consecutive epochs or steps (begin() / end())."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0: float | None = None

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def end(self) -> None:
        if self._t0 is not None:
            self.times.append(time.perf_counter() - self._t0)
            self._t0 = None


def median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def per_epoch_summary(times: list[float], skip_first: int = 1) -> dict[str, Any]:
    """Median seconds per epoch, skipping warm-up epoch(s) when there are enough."""
    body = times[skip_first:] if len(times) > skip_first + 1 else times
    return {
        "epochs": len(times),
        "seconds_per_epoch_median": median(body),
        "seconds_total": float(sum(times)),
        "epoch_seconds": [round(t, 6) for t in times],
    }
