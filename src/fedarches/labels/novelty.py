"""Class-conditional novelty test in latent space.

Why: the kNN uncertainty only compares neighbour labels, and raw neighbour
distance misses unseen types that sit within reference-scale distances of a
known type. What separates them is *shape*: each known type occupies an elongated
region, and an unseen type sits off every one of them. One Gaussian per reference
label (mean + OAS-shrunk covariance); a query cell is novel when no label accepts it.

Why thresholds are cross-validated for labels large enough to have their own shape
(``own_shape_cells``): a label's own cells lie closer to a Gaussian fitted on them
than new cells of the same type do, so an in-sample quantile flags that type's cells
from a new study. Such a label's threshold is the ``1 - fpr`` quantile of its cells'
distances to a Gaussian fitted without them (``FOLDS``-fold).

Why smaller labels keep the in-sample quantile: with a few dozen cells or fewer, the
honest region is so wide that it accepts the unseen types that sit next to the label
in the latent (on PBMC, B cells inside the region of 18 DC cells). A small label is
kept conservative on purpose: it accepts only what lies within the spread of the
cells it has, and pays with some false alarms on its own new cells. Labels with
fewer than ``MIN_CELLS`` cells use the pooled within-label covariance. Measured
effect: docs/LABELS.md.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import OAS

from fedarches.errors import SettingError

MIN_CELLS = 5  # fewer cells: the pooled within-label covariance
FOLDS = 5  # cross-validation folds of the thresholds


def own_shape_cells(dims: int) -> int:
    """Cells a label needs for a cross-validated threshold: three per latent dimension,
    and never fewer than 30."""
    return max(30, 3 * dims)


def _whitener(cov: np.ndarray) -> np.ndarray:
    """Cholesky factor of the precision of ``cov``, lightly regularised."""
    d = cov.shape[0]
    cov = cov + 1e-6 * np.trace(cov) / d * np.eye(d)
    return np.linalg.cholesky(np.linalg.inv(cov))


def _held_out_distances(zc: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each cell's Mahalanobis distance to the label's mean and covariance estimated
    without its fold: what a new cell of the label would show."""
    out = np.empty(len(zc))
    for k in np.unique(folds):
        part = zc[folds != k]
        w = _whitener(OAS().fit(part).covariance_)
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
        centred = [z[m] - z[m].mean(0) for m in members if len(m) > 1]
        pooled = _whitener(OAS().fit(np.vstack(centred)).covariance_ if centred else np.eye(d))
        own_shape = own_shape_cells(d)
        for c, m in enumerate(members):
            if len(m) == 0:
                continue
            zc = z[m]
            self.means[c] = zc.mean(0)
            self.fitted[c] = True
            self.whiten[c] = _whitener(OAS().fit(zc).covariance_) if len(m) >= MIN_CELLS else pooled
            if len(m) >= own_shape:
                folds = rng.permutation(len(m)) % FOLDS
                own = _held_out_distances(zc, folds)
            else:
                own = self._distance(zc, c)
            self.thresholds[c] = max(float(np.quantile(own, 1.0 - fpr)), 1e-12)
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
