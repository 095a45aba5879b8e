"""Nearest reference cells of query points: an exact k-d tree, or a faiss IVF index
whose ``nprobe`` is tuned on what label transfer reads from the neighbours.

Why two: the exact tree is milliseconds to seconds up to ~100k reference cells but
takes minutes at a million; the IVF index is approximate, so its ``nprobe`` is
chosen where its kNN labels and novelty neighbours agree with the exact search
(docs/LABELS.md has the measurements). The exact tree is always built: it tunes
``nprobe`` and answers rows whose probed lists hold fewer than k cells.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from fedarches.errors import SettingError
from fedarches.labels.weights import label_probabilities
from fedarches.neighbours import drop_self, kd_tree
from fedarches.threads import policy_workers

__all__ = ["APPROX_MIN_QUERY", "APPROX_MIN_REFERENCE", "EXACT_METHOD", "METHODS", "IVFIndex", "NeighbourIndex", "spatial_order"]

EXACT_METHOD = "scipy.spatial.cKDTree (exact Euclidean kNN)"
METHODS = ("auto", "exact", "ivf")
# Approximate kNN (faiss IndexIVFFlat) from this many reference cells on, with method="auto".
APPROX_MIN_REFERENCE = 200_000
# ... and for a query of this many cells against a reference of at least QUERY_IVF_MIN_REFERENCE:
# the exact search costs per query cell (k = 50 neighbours), so a million query cells took 44 s of
# exact search against 50,000 reference cells and 11 s with the tuned index (docs/SPEED.md)
APPROX_MIN_QUERY = 200_000
QUERY_IVF_MIN_REFERENCE = 10_000
CHUNK = 65_536  # query cells per kNN call: bounds memory to ~60 MB per chunk at k=50
_ORDER_MIN = 20_000  # below this, sorting queries spatially costs more than it saves

# nprobe is the smallest step at which, on reference cells searched leave-one-out, all three hold:
_IVF_MIN_LABEL_AGREEMENT = 0.995  # the kNN label (eq. 21 argmax) equals the exact search's
_IVF_MIN_RECALL_NOVELTY = 0.95  # recall of the k_novelty nearest (the distance statistic's neighbours)
_IVF_MIN_RECALL_K = 0.85  # recall@k (the neighbours the label weights come from)
_IVF_TUNE_CELLS = 1000  # reference cells whose exact kNN tunes nprobe
_IVF_MAX_NPROBE = 256
_NPROBE_STEPS = (4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64, 96, 128, 192, _IVF_MAX_NPROBE)


def spatial_order(points: np.ndarray) -> np.ndarray:
    """Query order for chunked search: neighbouring queries walk the same tree nodes
    (exact) or probe the same inverted lists (IVF) while in cache."""
    n = points.shape[0]
    return kd_tree(points).indices if n >= _ORDER_MIN else np.arange(n)


def _tree_query(tree: cKDTree, points: np.ndarray, k: int, workers: int,
                eps: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One exact query, always 2-D float64 distances and int64 ids."""
    d, i = tree.query(points, k=k, workers=workers, eps=eps)
    return (np.asarray(d, dtype=np.float64).reshape(len(points), k),
            np.asarray(i, dtype=np.int64).reshape(len(points), k))


def _chunked_query(tree: cKDTree, points: np.ndarray, k: int, workers: int,
                   eps: float) -> tuple[np.ndarray, np.ndarray]:
    """kNN of any number of ``points``: chunked (bounded memory), spatially ordered."""
    n = points.shape[0]
    dist = np.empty((n, k), dtype=np.float64)
    idx = np.empty((n, k), dtype=np.int64)
    if n == 0:
        return dist, idx
    order = spatial_order(points)
    for start in range(0, n, CHUNK):
        sel = order[start:start + CHUNK]
        dist[sel], idx[sel] = _tree_query(tree, points[sel], k, workers, eps)
    return dist, idx


def _nlist_for(n: int) -> int:
    """Coarse cells of the IVF index: ~4 sqrt(n) (4,000 at 1M), at least 16, ~>= 40 cells per list."""
    return int(min(n, max(16, min(4 * np.sqrt(n), n // 40))))


class IVFIndex:
    """Approximate kNN: faiss ``IndexIVFFlat`` (exact float32 L2 inside the probed lists).

    Deterministic for a fixed seed and thread count: the k-means of the coarse quantizer
    is seeded and trained on a seeded sample, list order is insertion order, and
    ``nprobe`` is tuned on a seeded sample of reference cells (:meth:`_tune`). Never
    saved: rebuilt from the reference latent.
    """

    workers = policy_workers()  # inside fedarches.threads.thread_limits: that block's count

    def __init__(self, latent: np.ndarray, tree: cKDTree, codes: np.ndarray, n_labels: int, k: int,
                 k_novelty: int, workers: int, seed: int) -> None:
        import faiss  # optional at import time: only the approximate path needs it

        self._faiss = faiss
        self.workers = workers
        n, dims = latent.shape
        self._x = np.ascontiguousarray(latent, dtype=np.float32)
        self.nlist = _nlist_for(n)
        rng = np.random.default_rng(seed)
        n_train = min(n, 50 * self.nlist)
        train = self._x[np.sort(rng.choice(n, size=n_train, replace=False))] if n_train < n else self._x
        self._quantizer = faiss.IndexFlatL2(dims)
        index = faiss.IndexIVFFlat(self._quantizer, dims, self.nlist)
        index.cp.seed = int(seed) & 0x7FFFFFFF
        index.cp.niter = 10
        with self._threads():
            index.train(train)
            index.add(self._x)
        self._index = index
        self.nprobe = 1
        self.recall = self.recall_novelty = self.label_agreement = 0.0
        self._tune(latent, tree, codes, n_labels, k, k_novelty, rng)

    def _tune(self, latent: np.ndarray, tree: cKDTree, codes: np.ndarray, n_labels: int, k: int,
              k_novelty: int, rng: np.random.Generator) -> None:
        """Smallest nprobe whose output agrees with the exact search where it matters.

        Judged on what label transfer reads from the neighbours, not on recall alone:
        the kNN label, the k_novelty nearest (the novelty statistic) and recall@k (the
        label weights). Reference cells are searched leave-one-out (k + 1 neighbours,
        the cell itself dropped) so that they face what a query cell faces; with
        itself counted, a reference cell would score one free hit out of k_novelty.
        """
        n = latent.shape[0]
        tune = np.sort(rng.choice(n, size=min(n, _IVF_TUNE_CELLS), replace=False))
        kk = min(k, n - 1)
        kn = min(k_novelty, kk)
        de, ie = tree.query(latent[tune], k=kk + 1, workers=self.workers)
        de, ie = drop_self(np.asarray(de).reshape(tune.size, kk + 1), np.asarray(ie).reshape(tune.size, kk + 1), tune)
        exact_label = label_probabilities(de, codes[ie], n_labels).argmax(axis=1)
        for nprobe in _NPROBE_STEPS:
            self.nprobe = min(nprobe, self.nlist)
            d, i = self.search(self._x[tune], kk + 1)
            d, i = drop_self(d, i, tune)
            valid = i >= 0
            self.recall = float(((i[:, :, None] == ie[:, None, :]) & valid[:, :, None]).any(axis=2).mean())
            self.recall_novelty = float(((i[:, :kn, None] == ie[:, None, :kn])
                                         & valid[:, :kn, None]).any(axis=2).mean())
            full = valid.all(axis=1)
            label = np.full(tune.size, -1, dtype=np.int64)
            if full.any():
                label[full] = label_probabilities(d[full], codes[i[full]], n_labels).argmax(axis=1)
            self.label_agreement = float((label == exact_label).mean())
            if (self.label_agreement >= _IVF_MIN_LABEL_AGREEMENT and self.recall_novelty >= _IVF_MIN_RECALL_NOVELTY
                    and self.recall >= _IVF_MIN_RECALL_K) or self.nprobe >= self.nlist:
                break

    @contextmanager
    def _threads(self) -> Iterator[None]:
        old = self._faiss.omp_get_max_threads()
        self._faiss.omp_set_num_threads(self.workers)
        try:
            yield
        finally:
            self._faiss.omp_set_num_threads(old)

    def search(self, points: np.ndarray, k: int, index: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Squared float32 distances are turned into float64 Euclidean distances; -1 ids
        mark rows whose probed lists held fewer than k cells."""
        index = self._index if index is None else index
        index.nprobe = self.nprobe
        with self._threads():
            d2, idx = index.search(np.ascontiguousarray(points, dtype=np.float32), k)
        return np.sqrt(np.maximum(d2.astype(np.float64), 0.0)), idx.astype(np.int64)

    def subset(self, rows: np.ndarray) -> Any:
        """An IVF index over ``rows`` of the reference that shares this one's trained coarse
        quantizer (no second k-means); ids are positions in ``rows``. The cross-study
        calibration searches one per study group."""
        sub = self._faiss.IndexIVFFlat(self._quantizer, self._x.shape[1], self.nlist)
        sub.is_trained = True
        with self._threads():
            sub.add(self._x[rows])
        return sub

    def describe(self) -> str:
        return (f"faiss IndexIVFFlat (approximate Euclidean kNN, nlist={self.nlist}, nprobe={self.nprobe}; "
                f"on {_IVF_TUNE_CELLS} reference cells left out: recall@k {self.recall:.3f}, recall of the "
                f"novelty neighbours {self.recall_novelty:.3f}, kNN label agreement {self.label_agreement:.3f})")


class NeighbourIndex:
    """The reference cells' neighbour search: the exact tree and, when chosen, the IVF index.

    ``method``: "auto" (IVF from ``APPROX_MIN_REFERENCE`` cells on, when ``eps`` is 0
    and faiss is installed), "exact" or "ivf". ``description`` names the search used.
    ``eps > 0`` is cKDTree's ``(1 + eps)``-approximate search (exact method only).
    """

    workers = policy_workers()  # inside fedarches.threads.thread_limits: that block's count

    def __init__(self, latent: np.ndarray, codes: np.ndarray, n_labels: int, k: int, k_novelty: int, *,
                 workers: int, eps: float, method: str, seed: int) -> None:
        self.workers = workers
        self.eps = eps
        self.method = method
        self.tree = kd_tree(latent)
        self.ivf: IVFIndex | None = None
        # built on the first query of APPROX_MIN_QUERY cells or more (method "auto"), used by such queries only
        self.query_ivf: IVFIndex | None = None
        self._ivf_args = (latent, codes, n_labels, k, k_novelty, seed)
        if method == "ivf" or (method == "auto" and latent.shape[0] >= APPROX_MIN_REFERENCE and eps == 0.0):
            try:
                self.ivf = IVFIndex(latent, self.tree, codes, n_labels, k, k_novelty, workers, seed)
            except ImportError:
                if method == "ivf":
                    raise SettingError("setting check failed: method='ivf' needs faiss: "
                                       "pip install faiss-cpu") from None
                warnings.warn("faiss is not installed: label transfer uses the exact (slower) k-d tree",
                              stacklevel=4)
        self.description = self.ivf.describe() if self.ivf is not None else EXACT_METHOD

    def for_query(self, n_points: int) -> IVFIndex | None:
        """The approximate index a query of ``n_points`` cells searches, or None (exact tree).

        With method "auto", a large query against a mid-sized reference gets the same tuned
        IVF index a large reference has (built once, here); smaller queries stay exact, so
        the thresholds, calibrated with the exact search, meet the search they were made with
        wherever that costs little."""
        if self.ivf is not None:
            return self.ivf
        if (self.method != "auto" or self.eps != 0.0 or n_points < APPROX_MIN_QUERY
                or self.tree.n < QUERY_IVF_MIN_REFERENCE):
            return None
        if self.query_ivf is None:
            latent, codes, n_labels, k, k_novelty, seed = self._ivf_args
            try:
                self.query_ivf = IVFIndex(latent, self.tree, codes, n_labels, k, k_novelty, self.workers, seed)
            except ImportError:
                return None
        return self.query_ivf

    def query_description(self, n_points: int) -> str:
        """The search a query of ``n_points`` cells gets (see :meth:`for_query`)."""
        ivf = self.for_query(n_points)
        return self.description if ivf is None or ivf is self.ivf else (
            f"{self.description}; queries of {APPROX_MIN_QUERY:,}+ cells: {ivf.describe()}")

    def knn(self, points: np.ndarray, k: int, ivf: IVFIndex | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest reference cells of ``points`` (one chunk); ``ivf``: :meth:`for_query`'s
        index for the whole query (default: the reference's own choice)."""
        ivf = self.ivf if ivf is None else ivf
        if ivf is None:
            return _tree_query(self.tree, points, k, self.workers, self.eps)
        d, i = ivf.search(points, k)
        self._exact_where_short(self.tree, points, d, i, k)
        return d, i

    def distances(self, latent: np.ndarray, points: np.ndarray, k: int, *,
                  self_rows: np.ndarray | None = None, subset: np.ndarray | None = None) -> np.ndarray:
        """Distances from ``points`` to their k nearest reference cells, for calibration.

        ``self_rows``: the points are these reference cells; k includes the cell itself,
        which is dropped (k - 1 columns come back). ``subset``: search only these
        reference cells (other studies). Calibration uses the same search as
        prediction, so a statistic and its threshold carry the same approximation.
        """
        if self.ivf is None:
            tree = self.tree if subset is None else kd_tree(latent[subset])
            d, _ = _chunked_query(tree, points, k, self.workers, self.eps)
            return d[:, 1:] if self_rows is not None else d
        d, i = self.ivf.search(points, k, None if subset is None else self.ivf.subset(subset))
        if (i < 0).any():
            self._exact_where_short(self.tree if subset is None else kd_tree(latent[subset]), points, d, i, k)
        if self_rows is not None:
            d, _ = drop_self(d, i, self_rows)
        return d

    def _exact_where_short(self, tree: cKDTree, points: np.ndarray, d: np.ndarray, i: np.ndarray, k: int) -> None:
        """Rows whose probed lists held fewer than k cells: exact search, in place."""
        short = np.flatnonzero((i < 0).any(axis=1))
        if short.size:
            de, ie = tree.query(points[short], k=k, workers=self.workers)
            d[short] = np.asarray(de).reshape(short.size, k)
            i[short] = np.asarray(ie).reshape(short.size, k)
