"""Calibration of the distance novelty test on the reference itself.

Why: "further from the reference than reference cells are from each other" needs
a scale per cell type (types differ in density) and a fair comparison (a query
study never has its own study in the reference). So each label's threshold is
the ``1 - fpr`` quantile of the novelty statistic of its reference cells measured
against OTHER studies; labels seen in one study only fall back to leave-one-out,
and small labels borrow the pooled shape of the distribution (docs/LABELS.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedarches.labels.knn import NeighbourIndex
from fedarches.neighbours import label_strings, stratified_sample

__all__ = [
    "KIND_EMPTY", "KIND_GLOBAL", "KIND_OWN_QUANTILE", "KIND_SCALED", "MIN_LABEL_CELLS", "MIN_SCALE_CELLS",
    "MODE_CROSS_STUDY", "MODE_LEAVE_ONE_OUT", "MODE_SITE", "Thresholds", "batch_groups", "calibration_sample",
    "calibration_statistics", "label_thresholds",
]

# How each label was calibrated, stored in the state so a reader can tell.
MODE_CROSS_STUDY = 0  # the label's cells, distances to other studies only
MODE_LEAVE_ONE_OUT = 1  # the label's cells, distances to the whole reference minus the cell
MODE_SITE = 2  # a label a site added by merge (label summaries): calibrated on that site's cells
KIND_OWN_QUANTILE = 0  # >= min_label_cells calibration cells: their own (1 - fpr) quantile
KIND_SCALED = 1  # fewer: the label's median statistic x the pooled quantile of stat / label median
KIND_GLOBAL = 2  # fewer than MIN_SCALE_CELLS: the quantile over all calibration cells
KIND_EMPTY = 3  # no reference cell (only possible with explicit label_categories): global
MIN_LABEL_CELLS = 100  # about 1/fpr: fewer cells cannot place their own (1 - fpr) quantile
MIN_SCALE_CELLS = 5


@dataclass(frozen=True)
class Thresholds:
    """Per-label novelty thresholds (indexed by label code) and how each was set."""

    label_thresholds: np.ndarray  # float64
    label_calibration_mode: np.ndarray  # int64, MODE_*
    label_threshold_kind: np.ndarray  # int64, KIND_*
    global_threshold: float
    pooled_ratio_quantile: np.ndarray  # float64 [cross-study, leave-one-out]
    calibration_counts: np.ndarray  # int64 calibration cells per label

    def state(self) -> dict[str, np.ndarray]:
        """The arrays a saved label state holds (safetensors-ready copies)."""
        return {
            "label_thresholds": self.label_thresholds.astype(np.float64).copy(),
            "label_calibration_mode": self.label_calibration_mode.astype(np.int64).copy(),
            "label_threshold_kind": self.label_threshold_kind.astype(np.int64).copy(),
            "global_threshold": np.array([self.global_threshold], dtype=np.float64),
            "pooled_ratio_quantile": np.asarray(self.pooled_ratio_quantile, dtype=np.float64).copy(),
            "calibration_counts": self.calibration_counts.astype(np.int64).copy(),
        }

    @classmethod
    def from_state(cls, st: Any) -> "Thresholds":
        """Inverse of :meth:`state`; a missing key raises ``KeyError`` for the caller to name."""
        return cls(
            label_thresholds=np.asarray(st["label_thresholds"], dtype=np.float64).ravel().copy(),
            label_calibration_mode=np.asarray(st["label_calibration_mode"], dtype=np.int64).ravel().copy(),
            label_threshold_kind=np.asarray(st["label_threshold_kind"], dtype=np.int64).ravel().copy(),
            global_threshold=float(np.asarray(st["global_threshold"]).ravel()[0]),
            pooled_ratio_quantile=np.asarray(st["pooled_ratio_quantile"], dtype=np.float64).ravel().copy(),
            calibration_counts=np.asarray(st["calibration_counts"], dtype=np.int64).ravel().copy(),
        )


def calibration_sample(codes: np.ndarray, n_labels: int, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    """Reference cells whose novelty statistic is calibrated: all of them when few, else a
    seeded sample in which every label keeps at least ``min(n_label, 2000)`` cells."""
    return stratified_sample(codes, n_labels, max_cells, rng, min_per_group=2000, round_up=True)


def batch_groups(ref_batches: Any, n: int, max_groups: int) -> np.ndarray:
    """Study of each cell -> group id; studies beyond ``max_groups`` are dealt into groups
    (largest first, round robin), which bounds the number of other-study searches."""
    batches = label_strings(ref_batches, n, "reference batches")
    names, inverse = np.unique(batches, return_inverse=True)
    inverse = inverse.ravel()
    if names.size <= max_groups:
        return inverse.astype(np.int64)
    sizes = np.bincount(inverse, minlength=names.size)
    by_size = np.lexsort((np.arange(names.size), -sizes))  # largest first, ties by name
    group_of_study = np.empty(names.size, dtype=np.int64)
    group_of_study[by_size] = np.arange(names.size) % max_groups
    return group_of_study[inverse]


def calibration_statistics(
    index: NeighbourIndex, latent: np.ndarray, codes: np.ndarray, ref_batches: Any | None,
    cal: np.ndarray, n_labels: int, k_novelty: int, max_groups: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per calibration cell: the statistic its label is calibrated with, and the
    leave-one-out statistic (used to pool the distribution shape for small
    leave-one-out labels); per label: the calibration mode."""
    kn = k_novelty
    mode = np.full(n_labels, MODE_LEAVE_ONE_OUT, dtype=np.int64)
    # k+1 neighbours of a reference cell include the cell itself at distance 0 (or
    # an exact duplicate at the same distance); dropping it is exact either way.
    loo_stats = index.distances(latent, latent[cal], kn + 1, self_rows=cal).mean(axis=1)
    stats = loo_stats.copy()
    if ref_batches is None:
        return stats, loo_stats, mode
    groups = batch_groups(ref_batches, latent.shape[0], max_groups)
    n_groups = int(groups.max()) + 1
    if n_groups < 2:
        warnings.warn("the reference has a single study: novelty thresholds are calibrated "
                      "leave-one-out, which is optimistic for query studies with a batch effect",
                      stacklevel=3)
        return stats, loo_stats, mode
    present = np.zeros((n_labels, n_groups), dtype=bool)
    present[codes, groups] = True
    # A label seen in one study only would be calibrated against other cell types.
    cross_label = present.sum(axis=1) >= 2
    mode[cross_label] = MODE_CROSS_STUDY
    cal_groups = groups[cal]
    cross_cell = cross_label[codes[cal]]
    for g in range(n_groups):
        members = np.flatnonzero(cross_cell & (cal_groups == g))
        if members.size == 0:
            continue
        others = np.flatnonzero(groups != g)
        d = index.distances(latent, latent[cal[members]], min(kn, others.size), subset=others)
        stats[members] = d.mean(axis=1)
    return stats, loo_stats, mode


def _pooled_shape(stats: np.ndarray, loo_stats: np.ndarray, cal_codes: np.ndarray, mode: np.ndarray,
                  n_labels: int, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Per calibration mode, the q quantile of statistic / own-label median (pooled), and
    per label the median of the statistic of its own mode."""
    cross_cell = mode[cal_codes] == MODE_CROSS_STUDY
    pooled = np.full(2, np.nan, dtype=np.float64)
    medians = np.full(n_labels, np.nan, dtype=np.float64)
    for m_idx, (values, cells) in enumerate(((stats, cross_cell), (loo_stats, np.ones_like(cross_cell)))):
        med = np.full(n_labels, np.nan, dtype=np.float64)
        for y in np.flatnonzero(np.bincount(cal_codes[cells], minlength=n_labels) >= MIN_SCALE_CELLS):
            med[y] = float(np.median(values[cells & (cal_codes == y)]))
        ok = cells & np.isfinite(med[cal_codes]) & (med[cal_codes] > 0)
        if ok.any():
            pooled[m_idx] = float(np.quantile(values[ok] / med[cal_codes[ok]], q))
        own = (mode == (MODE_CROSS_STUDY if m_idx == 0 else MODE_LEAVE_ONE_OUT))
        medians[own] = med[own]
    return pooled, medians


def label_thresholds(stats: np.ndarray, loo_stats: np.ndarray, cal_codes: np.ndarray, mode: np.ndarray,
                     n_labels: int, fpr: float, min_label_cells: int) -> Thresholds:
    """Per-label thresholds at the (1 - fpr) quantile, with a scale model for small labels.

    A quantile at 1 - fpr from fewer than ~1/fpr cells is little more than the
    maximum, and a global quantile ignores that cell types differ in density (a
    dense small type would never be flagged). So labels with fewer than
    ``min_label_cells`` (but at least MIN_SCALE_CELLS) calibration cells get
    ``median_y x Q``: the shape of the distribution (Q) pooled across labels of the
    same calibration mode, the scale the label's own.
    """
    q = 1.0 - fpr
    global_threshold = float(np.quantile(stats, q))
    counts = np.bincount(cal_codes, minlength=n_labels).astype(np.int64)
    pooled, medians = _pooled_shape(stats, loo_stats, cal_codes, mode, n_labels, q)
    thresholds = np.full(n_labels, global_threshold, dtype=np.float64)
    kind = np.full(n_labels, KIND_GLOBAL, dtype=np.int64)
    for y in range(n_labels):
        q_y = pooled[0] if mode[y] == MODE_CROSS_STUDY else pooled[1]
        if counts[y] == 0:
            kind[y] = KIND_EMPTY
        elif counts[y] >= min_label_cells:
            thresholds[y] = float(np.quantile(stats[cal_codes == y], q))
            kind[y] = KIND_OWN_QUANTILE
        elif np.isfinite(medians[y]) and medians[y] > 0 and np.isfinite(q_y):
            thresholds[y] = medians[y] * q_y
            kind[y] = KIND_SCALED
    return Thresholds(label_thresholds=thresholds, label_calibration_mode=mode, label_threshold_kind=kind,
                      global_threshold=global_threshold, pooled_ratio_quantile=pooled, calibration_counts=counts)
