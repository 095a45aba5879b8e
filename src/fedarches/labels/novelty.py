"""Class-conditional novelty test in latent space.

Why: the kNN uncertainty only compares neighbour labels, and raw neighbour
distance misses unseen types that sit within reference-scale distances of a
known type. What separates them is *shape*: each known type occupies an elongated
region, and an unseen type sits off every one of them. One Gaussian per reference
label (mean + OAS-shrunk covariance); a query cell is novel when no label accepts it.

Why the thresholds are cross-validated: a label's own cells lie closer to a
Gaussian fitted on them than new cells of the same type do, and the gap grows as
the label shrinks (with 18 cells in 10 dimensions the in-sample 99th percentile is
far inside the honest one), so in-sample thresholds flag a small known type of a
new study as novel. Each label's threshold is the ``1 - fpr`` quantile of its cells'
distances to a Gaussian fitted without them (``FOLDS``-fold).

Why small labels share a shape and a threshold: a label with too few cells for its
own covariance (fewer than ``own_shape_cells``) would get an honest threshold so
wide that it accepts every unseen type in the latent. Such labels use the pooled
within-label covariance and one threshold, the ``1 - fpr`` quantile of every
reference cell's cross-validated distance under that pooled shape. Measured effect:
docs/LABELS.md.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import OAS

from fedarches.errors import SettingError

FOLDS = 5  # cross-validation folds of the thresholds


def own_shape_cells(dims: int) -> int:
    """Cells a label needs for its own covariance and threshold: three per latent
    dimension, and never fewer than 30."""
    return max(30, 3 * dims)


def _whitener(cov: np.ndarray) -> np.ndarray:
    """Cholesky factor of the precision of ``cov``, lightly regularised."""
    d = cov.shape[0]
    cov = cov + 1e-6 * np.trace(cov) / d * np.eye(d)
    return np.linalg.cholesky(np.linalg.inv(cov))


def _held_out_distances(zc: np.ndarray, folds: np.ndarray, shape) -> np.ndarray:
    """Each cell's Mahalanobis distance to the label's mean (and, through ``shape``,
    covariance) estimated without its fold: what a new cell of the label would show."""
    out = np.empty(len(zc))
    for k in np.unique(folds):
        part = zc[folds != k]
        w = shape(part)
        out[folds == k] = np.sqrt(np.square((zc[folds == k] - part.mean(0)) @ w).sum(1))
    return out


class ClassGaussianNovelty:
    """Per-label Gaussians with per-label thresholds at a stated false-positive rate."""

    def __init__(self) -> None:
        self.means = np.zeros((0, 0), dtype=np.float64)
        self.whiten = np.zeros((0, 0, 0), dtype=np.float64)  # Cholesky factors of the precisions
        self.thresholds = np.zeros(0, dtype=np.float64)
        self.fitted = np.zeros(0, dtype=bool)  # labels with enough cells to have a Gaussian
        self.fpr = 0.01

    def fit(self, latent: np.ndarray, codes: np.ndarray, n_labels: int, fpr: float = 0.01) -> "ClassGaussianNovelty":
        """``codes`` are integer label codes in ``[0, n_labels)``."""
        if not 0.0 < fpr < 1.0:
            raise SettingError(f"setting check failed: fpr must be in (0, 1), got {fpr}")
        z = np.asarray(latent, dtype=np.float64)
        d = z.shape[1]
        self.fpr = float(fpr)
        self.means = np.zeros((n_labels, d))
        self.whiten = np.zeros((n_labels, d, d))
        self.thresholds = np.full(n_labels, np.inf)
        self.fitted = np.zeros(n_labels, dtype=bool)
        rng = np.random.default_rng(0)
        members = [np.flatnonzero(codes == c) for c in range(n_labels)]
        folds = [rng.permutation(len(m)) % FOLDS for m in members]
        centred = [z[m] - z[m].mean(0) for m in members if len(m) > 1]
        pooled = _whitener(OAS().fit(np.vstack(centred)).covariance_ if centred else np.eye(d))
        own_shape = own_shape_cells(d)
        shared: list[np.ndarray] = []  # cross-validated distances under the pooled shape
        for c, m in enumerate(members):
            if len(m) == 0:
                continue
            zc = z[m]
            self.means[c] = zc.mean(0)
            self.fitted[c] = True
            if len(m) >= 2:
                shared.append(_held_out_distances(zc, folds[c], lambda part: pooled))
            if len(m) >= own_shape:
                self.whiten[c] = _whitener(OAS().fit(zc).covariance_)
                own = _held_out_distances(zc, folds[c], lambda part: _whitener(OAS().fit(part).covariance_))
                self.thresholds[c] = max(float(np.quantile(own, 1.0 - fpr)), 1e-12)
            else:
                self.whiten[c] = pooled
        small = self.fitted & ~np.isfinite(self.thresholds)
        if small.any():
            pooled_threshold = float(np.quantile(np.concatenate(shared), 1.0 - fpr)) if shared else np.inf
            self.thresholds[small] = max(pooled_threshold, 1e-12)
        return self

    def _distance(self, z: np.ndarray, c: int) -> np.ndarray:
        return np.sqrt(np.square((z - self.means[c]) @ self.whiten[c]).sum(1))

    def score(self, latent: np.ndarray, chunk: int = 262144) -> np.ndarray:
        """min over labels of Mahalanobis distance / label threshold; > 1 means novel."""
        z = np.asarray(latent, dtype=np.float64)
        out = np.full(len(z), np.inf)
        labels = np.nonzero(self.fitted)[0]
        for s in range(0, len(z), chunk):
            zc = z[s:s + chunk]
            best = np.full(len(zc), np.inf)
            for c in labels:
                np.minimum(best, self._distance(zc, c) / self.thresholds[c], out=best)
            out[s:s + chunk] = best
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {
            "means": self.means.astype(np.float64),
            "whiten": self.whiten.astype(np.float64),
            "thresholds": self.thresholds.astype(np.float64),
            "fitted": self.fitted.astype(np.uint8),
            "fpr": np.array([self.fpr], dtype=np.float64),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "ClassGaussianNovelty":
        self = cls()
        self.means = np.asarray(state["means"], dtype=np.float64)
        self.whiten = np.asarray(state["whiten"], dtype=np.float64)
        self.thresholds = np.asarray(state["thresholds"], dtype=np.float64)
        self.fitted = np.asarray(state["fitted"]).astype(bool)
        self.fpr = float(np.asarray(state["fpr"]).ravel()[0])
        return self
