"""Latent arrays, label codes and exact neighbour search shared by label transfer
and the integration metrics.

Both read a user's latent and per-cell labels and search a k-d tree over it; one
copy here means one set of checks (and messages) for the same input.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from fedarches.errors import ColumnError, LatentError, SettingError

__all__ = [
    "LEAFSIZE", "as_latent", "drop_self", "encode_labels", "kd_tree", "label_strings", "resolve_workers",
    "stratified_sample",
]

LEAFSIZE = 64  # measured best of 8..256 for k=50 in 10-d


def as_latent(x: Any, what: str) -> np.ndarray:
    """A finite, C-contiguous float64 ``cells x dims`` matrix, or :class:`LatentError`."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise LatentError(f"latent check failed: {what} must be a numeric matrix (cells x latent dims): "
                          f"{exc}") from None
    if arr.ndim != 2:
        raise LatentError(f"latent check failed: {what} must be 2-D (cells x latent dims), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise LatentError(f"latent check failed: {what} has zero latent dimensions")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr).all(axis=1)).sum())
        raise LatentError(f"latent check failed: {what} has {bad} cells with NaN or infinite coordinates; "
                          "embed with a finite model or drop those cells")
    return np.ascontiguousarray(arr)


def label_strings(labels: Any, n: int, what: str) -> np.ndarray:
    """Any 1-D labels (str, int, categorical) -> numpy unicode array; refuses missing values."""
    raw = np.asarray(labels)
    if raw.ndim != 1:
        raw = raw.ravel()
    if raw.shape[0] != n:
        raise ColumnError(f"obs column check failed: {what} has {raw.shape[0]} entries but the latent has {n} cells")
    if raw.dtype.kind == "f":
        missing = np.isnan(raw)
    elif raw.dtype.kind == "O":
        missing = np.fromiter((v is None or (isinstance(v, float) and np.isnan(v)) for v in raw), dtype=bool, count=n)
    else:
        missing = np.zeros(n, dtype=bool)
    if missing.any():
        raise ColumnError(f"obs column check failed: {what} has {int(missing.sum())} missing values; "
                          "drop those cells (or give them a value) first")
    return raw.astype(str)


def encode_labels(labels: Any, n: int, categories: Sequence[str] | None = None,
                  what: str = "reference labels") -> tuple[list[str], np.ndarray]:
    """Label strings (or int codes when ``categories`` is given) -> (categories, int64 codes).

    Categories default to the sorted unique label strings.
    """
    if categories is None:
        cats_arr, codes = np.unique(label_strings(labels, n, what), return_inverse=True)
        return [str(c) for c in cats_arr], codes.astype(np.int64).ravel()
    cats = [str(c) for c in categories]
    if len(set(cats)) != len(cats):
        raise SettingError("setting check failed: label_categories contains duplicates")
    raw = np.asarray(labels)
    if raw.dtype.kind in "iu":
        codes = raw.astype(np.int64).ravel()
        if codes.shape[0] != n:
            raise ColumnError(f"obs column check failed: {what} have {codes.shape[0]} entries but the latent "
                              f"has {n} cells")
        if codes.size and (codes.min() < 0 or codes.max() >= len(cats)):
            raise ColumnError(f"obs column check failed: {what} codes must lie in [0, {len(cats)}); "
                              f"found {codes.min()}..{codes.max()}")
        return cats, codes
    lookup = {c: i for i, c in enumerate(cats)}
    uniq, inverse = np.unique(label_strings(labels, n, what), return_inverse=True)
    unknown = [str(u) for u in uniq if str(u) not in lookup]
    if unknown:
        raise ColumnError(f"obs column check failed: {what} {unknown[:5]} are not in label_categories")
    mapping = np.array([lookup[str(u)] for u in uniq], dtype=np.int64)
    return cats, mapping[inverse.ravel()]


def resolve_workers(workers: int) -> int:
    """Thread count for the kNN search: -1 means all cores."""
    if workers == 0 or workers < -1:
        raise SettingError(f"setting check failed: workers must be -1 (all cores) or a positive integer, "
                           f"got {workers}")
    return workers if workers > 0 else (os.cpu_count() or 1)


def kd_tree(points: np.ndarray, *, compact_nodes: bool = False) -> cKDTree:
    """Unbalanced (faster to build, as fast to query) k-d tree; ``compact_nodes`` trades
    build time for tighter node boxes."""
    return cKDTree(points, leafsize=LEAFSIZE, balanced_tree=False, compact_nodes=compact_nodes)


def drop_self(d: np.ndarray, i: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """k + 1 neighbours of indexed cells ``rows`` -> k neighbours without the cell itself.

    The cell is removed where it was found; where it was not (an exact duplicate took
    its place, or an approximate search missed it), the last neighbour goes instead.
    """
    n, k1 = i.shape
    is_self = i == rows[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k1 - 1)
    keep = np.ones((n, k1), dtype=bool)
    keep[np.arange(n), drop] = False
    return d[keep].reshape(n, k1 - 1), i[keep].reshape(n, k1 - 1)


def stratified_sample(codes: np.ndarray, n_groups: int, max_cells: int, rng: np.random.Generator, *,
                      min_per_group: int, round_up: bool = False) -> np.ndarray:
    """Sorted cell indices: all cells if at most ``max_cells``, else a seeded sample of each
    group proportional to its size (rounded, or up with ``round_up``), at least
    ``min(group size, min_per_group)`` cells of every group."""
    n = codes.shape[0]
    if n <= max_cells:
        return np.arange(n)
    keep = []
    for g in range(n_groups):
        members = np.flatnonzero(codes == g)
        if members.size == 0:
            continue
        share = max_cells * members.size / n
        m = min(members.size, max(int(np.ceil(share)) if round_up else round(share), min_per_group))
        keep.append(rng.choice(members, size=m, replace=False))
    return np.sort(np.concatenate(keep))
