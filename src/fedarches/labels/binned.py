"""Novelty calibration from binned statistics: what a federated reference build uses
instead of per-cell values.

Why: the central calibration takes the (1 - fpr) quantile of each label's reference
cells' novelty statistic (`calibration.label_thresholds`). In a federated build no party
holds every site's cells, but every site can measure its own cells against the published
components and send a histogram of those statistics on one fixed logarithmic grid:
counts per bin, never a cell. Sums of histograms are the pooled distribution, so the
coordinator places the same quantiles the central build would, up to the bin width
(`BIN_DECADES`, ~2.3%, with linear interpolation inside a bin in log space).
"""

from __future__ import annotations

import numpy as np

from fedarches.labels.calibration import (
    KIND_EMPTY,
    KIND_GLOBAL,
    KIND_OWN_QUANTILE,
    KIND_SCALED,
    MIN_SCALE_CELLS,
)

__all__ = ["BIN_DECADES", "EDGES", "N_BINS", "binned_quantile", "binned_thresholds", "histogram"]

LOW_DECADE, HIGH_DECADE = -4.0, 4.0  # statistics and scores between 1e-4 and 1e4 (beyond: the end bins)
BIN_DECADES = 0.01
N_BINS = int(round((HIGH_DECADE - LOW_DECADE) / BIN_DECADES))
EDGES = np.linspace(LOW_DECADE, HIGH_DECADE, N_BINS + 1)  # log10 of the bin edges


def histogram(values: np.ndarray, codes: np.ndarray, n_rows: int) -> np.ndarray:
    """[n_rows, N_BINS] int64 counts of ``values`` (positive; others and NaN are skipped) in
    row ``codes``, on the fixed grid `EDGES` (values beyond it land in the end bins)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    c = np.asarray(codes, dtype=np.int64).ravel()
    ok = np.isfinite(v) & (v > 0) & (c >= 0) & (c < n_rows)
    ok |= np.isposinf(v) & (c >= 0) & (c < n_rows)
    logs = np.log10(np.minimum(v[ok], 10.0 ** HIGH_DECADE))
    b = np.clip(np.floor((logs - LOW_DECADE) / BIN_DECADES).astype(np.int64), 0, N_BINS - 1)
    out = np.zeros((n_rows, N_BINS), dtype=np.int64)
    np.add.at(out, (c[ok], b), 1)
    return out


def binned_quantile(counts: np.ndarray, q: float) -> float:
    """The ``q`` quantile of the distribution a histogram row describes (NaN when empty):
    the rank ``q (n - 1)`` as numpy's linear quantile, placed inside its bin linearly in log."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    n = counts.sum()
    if n <= 0:
        return float("nan")
    rank = q * (n - 1)
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, rank, side="right"))
    b = min(b, N_BINS - 1)
    before = cum[b] - counts[b]
    frac = (rank - before + 0.5) / counts[b] if counts[b] > 0 else 0.5
    return float(10.0 ** (EDGES[b] + min(max(frac, 0.0), 1.0) * BIN_DECADES))


def _shifted(counts: np.ndarray, decades: float) -> np.ndarray:
    """The histogram of values / 10**decades (shift by whole bins; the rest is under a bin)."""
    k = int(round(decades / BIN_DECADES))
    out = np.zeros_like(counts)
    if k >= 0:
        out[:N_BINS - k] = counts[k:]
        out[0] += counts[:k].sum()
    else:
        out[-k:] = counts[:N_BINS + k]
        out[-1] += counts[N_BINS + k:].sum()
    return out


def binned_thresholds(stats: np.ndarray, fpr: float, min_label_cells: int) -> dict[str, np.ndarray]:
    """Per-label thresholds from the pooled histograms ``stats`` [labels, N_BINS], as
    ``calibration.label_thresholds`` sets them from per-cell values: the label's own
    (1 - fpr) quantile with at least ``min_label_cells`` cells, else its median times the
    (1 - fpr) quantile of statistic / label median pooled over labels, else the global quantile.

    Returns ``label_thresholds``, ``label_threshold_kind``, ``calibration_counts`` (per
    label), ``global_threshold`` and ``pooled_ratio_quantile`` (one value each)."""
    q = 1.0 - float(fpr)
    stats = np.asarray(stats, dtype=np.int64)
    n_labels = stats.shape[0]
    counts = stats.sum(axis=1)
    global_threshold = binned_quantile(stats.sum(axis=0), q)
    medians = np.array([binned_quantile(stats[y], 0.5) if counts[y] >= MIN_SCALE_CELLS else np.nan
                        for y in range(n_labels)])
    ratio = np.zeros(N_BINS, dtype=np.int64)
    for y in np.flatnonzero(np.isfinite(medians) & (medians > 0)):
        ratio += _shifted(stats[y], float(np.log10(medians[y])))
    pooled = binned_quantile(ratio, q) if ratio.sum() else float("nan")
    thresholds = np.full(n_labels, global_threshold, dtype=np.float64)
    kind = np.full(n_labels, KIND_GLOBAL, dtype=np.int64)
    for y in range(n_labels):
        if counts[y] == 0:
            kind[y] = KIND_EMPTY
        elif counts[y] >= min_label_cells:
            thresholds[y], kind[y] = binned_quantile(stats[y], q), KIND_OWN_QUANTILE
        elif np.isfinite(medians[y]) and medians[y] > 0 and np.isfinite(pooled):
            thresholds[y], kind[y] = medians[y] * pooled, KIND_SCALED
    return {"label_thresholds": thresholds, "label_threshold_kind": kind, "calibration_counts": counts.astype(np.int64),
            "global_threshold": np.array([global_threshold]), "pooled_ratio_quantile": np.array([pooled])}
