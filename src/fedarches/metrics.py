"""Integration metrics of a latent space in one call.

Why these: the scArches paper reports batch mixing (entropy of batch mixing, EBM)
and biological conservation (kNN purity); scIB adds the silhouette and clustering
scores most integration benchmarks quote. All are computed on the latent only, with
numpy, scipy and scikit-learn, so they run anywhere the model runs.

Definitions (``n_b`` = number of distinct batches):

* ``ebm`` - entropy of batch mixing as in the trVAE/scArches code: draw ``n_pools``
  pools of ``pool_size`` random cells (seeded; without replacement inside a pool);
  for each drawn cell take its ``k`` (=50) nearest latent neighbours, excluding the
  cell itself; the cell's entropy is ``-sum_b p_b log p_b / log n_b`` where ``p_b``
  is the fraction of those neighbours from batch ``b`` (``log`` base ``n_b``, so
  the value lies in [0, 1]: 0 = all neighbours from one batch, 1 = neighbours
  spread evenly over all batches); average over the pool, then over pools. With
  unequal batch sizes a perfectly mixed latent scores the entropy of the batch
  proportions, below 1. NaN when there is a single batch.
* ``knn_purity`` - scArches: for each cell the fraction of its ``k_purity`` (=30)
  nearest latent neighbours (self excluded) with its own label; averaged over the
  cells of each label, then over labels (so small cell types count as much as
  large ones).
* ``asw_celltype`` - scIB: ``(silhouette(latent, labels) + 1) / 2`` (Euclidean).
* ``asw_batch`` - scIB ``silhouette_batch``: within each label that occurs in at
  least two batches, the per-cell silhouette of the batch labels, ``1 - |s|``
  averaged per label, then over labels. 1 = batches indistinguishable.
* ``nmi`` / ``ari`` - scikit-learn ``KMeans`` (``n_clusters`` = number of labels,
  ``n_init=10``, seeded) on the latent against the labels; NMI with arithmetic
  normalisation. KMeans rather than scIB's resolution-optimised Leiden: leidenalg
  and igraph are not dependencies of this project, and KMeans with a fixed number
  of clusters is deterministic and parameter-free.

Large inputs are subsampled deterministically (``seed``): kNN purity queries at
most ``max_cells`` cells (stratified by label, neighbours still searched among all
cells); silhouettes and KMeans use at most ``max_cells`` cells (stratified by
label, every label keeping at least ``min(n_label, 50)`` cells). EBM only ever
queries ``n_pools * pool_size`` cells (timings: docs/LABELS.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial import cKDTree
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_samples,
)

from fedarches.errors import EmptyDataError, SettingError
from fedarches.neighbours import as_latent, drop_self, encode_labels, kd_tree, resolve_workers, stratified_sample

__all__ = [
    "clustering_scores",
    "entropy_batch_mixing",
    "integration_metrics",
    "knn_purity",
    "silhouette_batch",
    "silhouette_celltype",
]


# ----------------------------------------------------------------------------- input


def _latent(latent: Any) -> np.ndarray:
    z = as_latent(latent, "latent")
    if z.shape[0] < 3:
        raise EmptyDataError(f"data shape check failed: integration metrics need at least 3 cells, got {z.shape[0]}")
    return z


def _codes(values: Any, n: int, what: str) -> tuple[np.ndarray, int]:
    cats, codes = encode_labels(values, n, what=what)
    return codes, len(cats)


def _neighbours(tree: cKDTree, z: np.ndarray, cells: np.ndarray, k: int, workers: int) -> np.ndarray:
    """Indices of the k nearest neighbours of ``cells`` (rows of z), the cell itself excluded."""
    kk = min(k + 1, z.shape[0])
    d, idx = tree.query(z[cells], k=kk, workers=workers)
    idx = np.asarray(idx, dtype=np.int64).reshape(len(cells), kk)
    return drop_self(np.asarray(d).reshape(len(cells), kk), idx, cells)[1]


# ----------------------------------------------------------------------------- metrics
# Private versions work on validated arrays and integer codes, so integration_metrics
# validates and encodes once (np.unique on a million strings takes about a second).


def _ebm(z: np.ndarray, codes: np.ndarray, n_b: int, tree: cKDTree, k: int, n_pools: int,
         pool_size: int, seed: int, workers: int) -> float:
    if n_b < 2:
        return float("nan")
    if k < 1 or n_pools < 1 or pool_size < 1:
        raise SettingError("setting check failed: k, n_pools and pool_size must be positive")
    n = z.shape[0]
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    size = min(pool_size, n)
    cells = np.concatenate([rng.choice(n, size=size, replace=False) for _ in range(n_pools)])
    nbr = _neighbours(tree, z, cells, k, workers)
    m = cells.shape[0]
    flat = (np.arange(m, dtype=np.int64)[:, None] * n_b + codes[nbr]).ravel()
    p = np.bincount(flat, minlength=m * n_b).reshape(m, n_b) / float(k)
    plogp = p * np.log(np.where(p > 0, p, 1.0))
    entropy = -plogp.sum(axis=1) / np.log(n_b)
    return float(entropy.reshape(n_pools, size).mean(axis=1).mean())


def _purity(z: np.ndarray, codes: np.ndarray, n_l: int, tree: cKDTree, k: int, max_cells: int,
            seed: int, workers: int) -> float:
    if k < 1:
        raise SettingError(f"setting check failed: k_purity must be positive, got {k}")
    k = min(k, z.shape[0] - 1)
    cells = stratified_sample(codes, n_l, max_cells, np.random.default_rng(seed), min_per_group=50)
    nbr = _neighbours(tree, z, cells, k, workers)
    own = codes[cells]
    per_cell = (codes[nbr] == own[:, None]).mean(axis=1)
    sums = np.bincount(own, weights=per_cell, minlength=n_l)
    counts = np.bincount(own, minlength=n_l)
    present = counts > 0
    return float(np.mean(sums[present] / counts[present]))


def _asw_celltype(z: np.ndarray, codes: np.ndarray, n_l: int, max_cells: int, seed: int) -> float:
    cells = stratified_sample(codes, n_l, max_cells, np.random.default_rng(seed), min_per_group=50)
    sub = codes[cells]
    if not 2 <= np.unique(sub).size < cells.size:
        return float("nan")
    return float((np.mean(silhouette_samples(z[cells], sub)) + 1.0) / 2.0)


def _asw_batch(z: np.ndarray, b_codes: np.ndarray, l_codes: np.ndarray, n_l: int, max_cells: int,
               seed: int) -> float:
    cells = stratified_sample(l_codes, n_l, max_cells, np.random.default_rng(seed), min_per_group=50)
    scores = []
    for y in range(n_l):
        members = cells[l_codes[cells] == y]
        b = b_codes[members]
        n_batches = np.unique(b).size
        if n_batches < 2 or n_batches >= members.size:
            continue  # as scIB: a label seen in one batch (or one cell per batch) says nothing
        scores.append(float(np.mean(1.0 - np.abs(silhouette_samples(z[members], b)))))
    return float(np.mean(scores)) if scores else float("nan")


def _clustering(z: np.ndarray, codes: np.ndarray, n_l: int, max_cells: int, seed: int) -> dict[str, float]:
    cells = stratified_sample(codes, n_l, max_cells, np.random.default_rng(seed), min_per_group=50)
    sub = codes[cells]
    n_clusters = int(np.unique(sub).size)
    if n_clusters < 2:
        return {"nmi": float("nan"), "ari": float("nan")}
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(z[cells])
    return {
        "nmi": float(normalized_mutual_info_score(sub, km.labels_, average_method="arithmetic")),
        "ari": float(adjusted_rand_score(sub, km.labels_)),
    }


def _tree(z: np.ndarray) -> cKDTree:
    return kd_tree(z, compact_nodes=True)


def entropy_batch_mixing(latent: np.ndarray, batch: np.ndarray, *, k: int = 50, n_pools: int = 50,
                         pool_size: int = 100, seed: int = 0, workers: int = -1) -> float:
    """EBM in [0, 1] (see module docstring); NaN for a single batch."""
    z = _latent(latent)
    codes, n_b = _codes(batch, z.shape[0], "batch")
    return _ebm(z, codes, n_b, _tree(z), k, n_pools, pool_size, seed, resolve_workers(workers))


def knn_purity(latent: np.ndarray, labels: np.ndarray, *, k: int = 30, max_cells: int = 20_000,
               seed: int = 0, workers: int = -1) -> float:
    """Mean over labels of the mean fraction of same-label neighbours (scArches)."""
    z = _latent(latent)
    codes, n_l = _codes(labels, z.shape[0], "labels")
    return _purity(z, codes, n_l, _tree(z), k, max_cells, seed, resolve_workers(workers))


def silhouette_celltype(latent: np.ndarray, labels: np.ndarray, *, max_cells: int = 20_000,
                        seed: int = 0) -> float:
    """scIB cell-type ASW, rescaled to [0, 1]; NaN unless 2 <= labels < cells."""
    z = _latent(latent)
    codes, n_l = _codes(labels, z.shape[0], "labels")
    return _asw_celltype(z, codes, n_l, max_cells, seed)


def silhouette_batch(latent: np.ndarray, batch: np.ndarray, labels: np.ndarray, *,
                     max_cells: int = 20_000, seed: int = 0) -> float:
    """scIB batch ASW: per label ``1 - |silhouette of batches|``, mean per label then over labels."""
    z = _latent(latent)
    b_codes, _ = _codes(batch, z.shape[0], "batch")
    l_codes, n_l = _codes(labels, z.shape[0], "labels")
    return _asw_batch(z, b_codes, l_codes, n_l, max_cells, seed)


def clustering_scores(latent: np.ndarray, labels: np.ndarray, *, max_cells: int = 20_000,
                      seed: int = 0) -> dict[str, float]:
    """KMeans (k = number of labels, n_init=10, seeded) vs labels: NMI and ARI."""
    z = _latent(latent)
    codes, n_l = _codes(labels, z.shape[0], "labels")
    return _clustering(z, codes, n_l, max_cells, seed)


def integration_metrics(
    latent: np.ndarray,
    batch: np.ndarray,
    labels: np.ndarray,
    k: int = 50,
    *,
    k_purity: int = 30,
    n_pools: int = 50,
    pool_size: int = 100,
    max_cells: int = 20_000,
    seed: int = 0,
    workers: int = -1,
) -> dict[str, float]:
    """All metrics of the module docstring: ``ebm``, ``knn_purity``, ``asw_celltype``,
    ``asw_batch``, ``nmi``, ``ari`` (floats; NaN where a metric is undefined, e.g.
    EBM with one batch).

    ``k`` is the EBM neighbourhood (trVAE/scArches default 50), ``k_purity`` the
    kNN-purity neighbourhood (scArches default 30). Results depend only on the
    inputs and ``seed``; ``workers`` (-1 = all cores) only changes speed.
    """
    z = _latent(latent)
    n = z.shape[0]
    b_codes, n_b = _codes(batch, n, "batch")
    l_codes, n_l = _codes(labels, n, "labels")
    w = resolve_workers(workers)
    tree = _tree(z)
    out = {
        "ebm": _ebm(z, b_codes, n_b, tree, k, n_pools, pool_size, seed, w),
        "knn_purity": _purity(z, l_codes, n_l, tree, k_purity, max_cells, seed, w),
        "asw_celltype": _asw_celltype(z, l_codes, n_l, max_cells, seed),
        "asw_batch": _asw_batch(z, b_codes, l_codes, n_l, max_cells, seed),
    }
    out.update(_clustering(z, l_codes, n_l, max_cells, seed))
    return out
