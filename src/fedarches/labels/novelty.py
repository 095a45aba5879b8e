"""Class-conditional novelty test in latent space.

Why: the kNN uncertainty only compares neighbour labels, and raw neighbour
distance misses unseen types that sit within reference-scale distances of a
known type. What separates them is *shape*: each known type occupies an elongated
region, and an unseen type sits off every one of them. One Gaussian per reference
label (mean + OAS-shrunk covariance, so small classes get a stable estimate); each
label's threshold is the (1 - fpr) quantile of its own cells' Mahalanobis
distances, so a fraction ``fpr`` of each label's reference cells would be called
novel. A query cell is novel when no label accepts it. Measured effect:
docs/LABELS.md.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import OAS

from fedarches.errors import SettingError

MIN_CELLS = 5


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
        # A pooled within-label covariance stands in for labels too small for their own.
        centred = [z[codes == c] - z[codes == c].mean(0) for c in range(n_labels) if (codes == c).sum() > 1]
        pooled = OAS().fit(np.vstack(centred)).covariance_ if centred else np.eye(d)
        for c in range(n_labels):
            zc = z[codes == c]
            if len(zc) == 0:
                continue
            cov = OAS().fit(zc).covariance_ if len(zc) >= MIN_CELLS else pooled
            cov = cov + 1e-6 * np.trace(cov) / d * np.eye(d)
            self.means[c] = zc.mean(0)
            self.whiten[c] = np.linalg.cholesky(np.linalg.inv(cov))
            self.fitted[c] = True
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
