"""Class Gaussians from sufficient statistics: the central build's class Gaussian for a label
whose cells are spread over sites.

Why: the novelty test's class Gaussian (`novelty.ClassGaussianNovelty`) is one mean and
OAS-shrunk covariance over ALL the label's reference cells, with a threshold cross-validated
over folds of them. A site that summarises its own cells fits it on its cells alone: a
tighter Gaussian, which then flags the label's cells of every other study (PBMC, a
federated trVAE build: most known cells called Unknown were rejected by a single site's
class Gaussian, benchmarks/FEDERATED_REFERENCE.md). Per label and fold, the count, the sum
and the sum of outer products of the latent are sufficient for the mean, the empirical
covariance and so the OAS covariance, so a coordinator that adds them over sites fits the
pooled Gaussian exactly (and the fold-held-out ones its threshold needs) without any cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedarches.labels.novelty import FOLDS, MIN_CELLS, _whitener, own_shape_cells

__all__ = ["FOLDS", "LabelMoments", "fold_of_cells", "oas_covariance", "pooled_gaussians"]


def oas_covariance(emp: np.ndarray, n: int) -> np.ndarray:
    """The Oracle Approximating Shrinkage covariance of ``n`` samples from their empirical
    covariance (Chen et al. 2010, eq. 23; the formula of scikit-learn's ``OAS``, which needs
    the samples themselves)."""
    emp = np.asarray(emp, dtype=np.float64)
    p = emp.shape[0]
    alpha = float(np.mean(emp ** 2))
    mu = float(np.trace(emp)) / p
    num = alpha + mu ** 2
    den = (n + 1) * (alpha - mu ** 2 / p)
    shrinkage = 1.0 if den == 0 else min(num / den, 1.0)
    out = (1.0 - shrinkage) * emp
    out.flat[:: p + 1] += shrinkage * mu
    return out


def fold_of_cells(codes: np.ndarray, n_labels: int, seed: int) -> np.ndarray:
    """Each cell's fold (``FOLDS`` per label, as the central threshold's folds); -1 for cells
    without a label in ``[0, n_labels)``. Seeded, so a site draws the same folds each time it is asked."""
    rng = np.random.default_rng(seed)
    out = np.full(len(codes), -1, dtype=np.int64)
    for y in range(n_labels):
        rows = np.flatnonzero(codes == y)
        out[rows] = rng.permutation(rows.size) % FOLDS
    return out


@dataclass(frozen=True)
class LabelMoments:
    """Per label and fold: cells, sum of their latent and sum of its outer products."""

    count: np.ndarray  # int64 [L, FOLDS]
    total: np.ndarray  # float64 [L, FOLDS, d]
    outer: np.ndarray  # float64 [L, FOLDS, d, d]

    @classmethod
    def of(cls, latent: np.ndarray, codes: np.ndarray, folds: np.ndarray, n_labels: int) -> "LabelMoments":
        z = np.asarray(latent, dtype=np.float64)
        d = z.shape[1]
        count = np.zeros((n_labels, FOLDS), dtype=np.int64)
        total = np.zeros((n_labels, FOLDS, d))
        outer = np.zeros((n_labels, FOLDS, d, d))
        for y in range(n_labels):
            for k in range(FOLDS):
                zk = z[(codes == y) & (folds == k)]
                count[y, k] = len(zk)
                total[y, k] = zk.sum(axis=0)
                outer[y, k] = zk.T @ zk
        return cls(count, total, outer)

    def __add__(self, other: "LabelMoments") -> "LabelMoments":
        return LabelMoments(self.count + other.count, self.total + other.total, self.outer + other.outer)

    def state(self) -> dict[str, np.ndarray]:
        return {"count": self.count, "total": self.total, "outer": self.outer}

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> "LabelMoments":
        return cls(np.asarray(state["count"], dtype=np.int64), np.asarray(state["total"], dtype=np.float64),
                   np.asarray(state["outer"], dtype=np.float64))

    def check(self, n_labels: int, dims: int) -> bool:
        """Shapes of ``n_labels`` labels in ``dims`` dimensions, finite, counts >= 0."""
        return (self.count.shape == (n_labels, FOLDS) and self.total.shape == (n_labels, FOLDS, dims)
                and self.outer.shape == (n_labels, FOLDS, dims, dims) and bool((self.count >= 0).all())
                and bool(np.isfinite(self.total).all() and np.isfinite(self.outer).all()))


def _gaussian(n: int, total: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = total / n
    emp = outer / n - np.outer(mean, mean)
    return mean, _whitener(oas_covariance((emp + emp.T) / 2, n))


def pooled_gaussians(m: LabelMoments, labels: np.ndarray) -> dict[str, np.ndarray]:
    """For each label in ``labels`` with >= ``MIN_CELLS`` cells: the pooled mean and whitener
    (``means``, ``whiten``), and, for those with the cells for a cross-validated threshold
    (``own_shape_cells``), the Gaussian of every fold's complement (``fold_means``,
    ``fold_whiten``; ``cross`` marks them). Rows of other labels are zero, as are those of a
    label whose summed moments give no positive-definite covariance (moments a site sent
    wrong): that label keeps its site's Gaussian instead of stopping the build."""
    n_labels, _, d = m.total.shape
    out = {"fitted": np.zeros(n_labels, dtype=np.uint8), "cross": np.zeros(n_labels, dtype=np.uint8),
           "means": np.zeros((n_labels, d)), "whiten": np.zeros((n_labels, d, d)),
           "fold_means": np.zeros((n_labels, FOLDS, d)), "fold_whiten": np.zeros((n_labels, FOLDS, d, d))}
    for y in labels:
        n = int(m.count[y].sum())
        if n < MIN_CELLS:
            continue
        try:
            mean, white = _gaussian(n, m.total[y].sum(0), m.outer[y].sum(0))
            cross = n >= own_shape_cells(d)
            folds = [_gaussian(n - int(m.count[y, k]), m.total[y].sum(0) - m.total[y, k],
                               m.outer[y].sum(0) - m.outer[y, k]) for k in range(FOLDS)] if cross else []
        except np.linalg.LinAlgError:
            continue
        out["fitted"][y], out["means"][y], out["whiten"][y] = 1, mean, white
        if cross:
            out["cross"][y] = 1
            for k, (fm, fw) in enumerate(folds):
                out["fold_means"][y, k], out["fold_whiten"][y, k] = fm, fw
    return out
