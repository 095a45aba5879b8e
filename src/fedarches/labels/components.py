"""Latent components of one label: k-means cells with shrunk covariances, each of >= k_min cells.

Why k-means cells and not one Gaussian per label: a cell type is often not one blob in
the latent (sub-states, studies integrated imperfectly), and the novelty test reads
the distance to the nearest piece of a type. Why a floor of ``k_min`` cells per
component: a component is published, and one that stands for a handful of cells is a
near-disclosure of those cells; so a component below the floor gives its cells to the
nearest remaining centre and is refitted, and a label with fewer than ``k_min`` cells
gets none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp
from sklearn.cluster import KMeans
from sklearn.covariance import OAS

__all__ = ["STATISTICS", "Components", "QuadraticForms", "component_distance", "fit_components", "gaussians",
           "label_parts", "label_statistic", "log_density", "mahalanobis"]

#: How the distance novelty statistic reads the components (a code is stored in the state).
STATISTICS = ("mahalanobis", "euclidean", "density")

KMEANS_SAMPLE = 20_000  # k-means of a larger label is fitted on a seeded sample, then assigns all
RIDGE = 1e-6  # relative ridge on every covariance, so a flat component stays invertible


@dataclass(frozen=True)
class Components:
    """Gaussian components (rows) of one or more labels."""

    label: np.ndarray  # int64 [C], label code of each component
    count: np.ndarray  # int64 [C], cells each component stands for
    means: np.ndarray  # float64 [C, d]
    whiten: np.ndarray  # float64 [C, d, d], Cholesky factor of each precision
    log_det: np.ndarray  # float64 [C], log determinant of each covariance

    @property
    def n(self) -> int:
        return int(self.label.shape[0])

    @staticmethod
    def empty(dims: int) -> Components:
        return Components(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dims)),
                          np.zeros((0, dims, dims)), np.zeros(0))

    @staticmethod
    def concat(parts: list[Components], dims: int) -> Components:
        parts = [p for p in parts if p.n]
        if not parts:
            return Components.empty(dims)
        return Components(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                            ("label", "count", "means", "whiten", "log_det")))


def _gaussian(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    d = z.shape[1]
    cov = OAS().fit(z).covariance_ if len(z) > 1 else np.eye(d)
    cov = cov + RIDGE * max(float(np.trace(cov)) / d, 1e-12) * np.eye(d)
    sign, log_det = np.linalg.slogdet(cov)
    return z.mean(0), np.linalg.cholesky(np.linalg.inv(cov)), float(log_det)


def _assignments(z: np.ndarray, n_parts: int, k_min: int, seed: int) -> np.ndarray:
    """k-means labels with every part >= k_min cells (small parts merged into the nearest other)."""
    if n_parts <= 1:
        return np.zeros(len(z), dtype=np.int64)
    km = KMeans(n_clusters=n_parts, n_init=3, random_state=seed)
    if len(z) > KMEANS_SAMPLE:  # the centres of <= 32 parts are placed as well from a seeded sample
        rows = np.random.default_rng(seed).choice(len(z), KMEANS_SAMPLE, replace=False)
        assign = km.fit(z[np.sort(rows)]).predict(z).astype(np.int64)
    else:
        assign = km.fit(z).labels_.astype(np.int64)
    centres = km.cluster_centers_
    while True:
        sizes = np.bincount(assign, minlength=len(centres))
        alive = np.flatnonzero(sizes > 0)
        small = alive[sizes[alive] < k_min]
        if small.size == 0 or alive.size == 1:
            break
        drop = small[np.argmin(sizes[small])]
        keep = alive[alive != drop]
        rows = assign == drop
        dist = ((z[rows, None, :] - centres[None, keep, :]) ** 2).sum(-1)
        assign[rows] = keep[dist.argmin(1)]
        centres[keep] = np.stack([z[assign == c].mean(0) for c in keep])
    return np.unique(assign, return_inverse=True)[1].ravel().astype(np.int64)


def label_parts(z: np.ndarray, *, k_min: int, cells_per_component: int, max_components: int,
                seed: int = 0) -> np.ndarray:
    """Part (k-means cell) of each of one label's cells, every part >= ``k_min`` cells; all -1
    when the label has fewer than ``k_min`` cells."""
    if len(z) < max(k_min, 1):
        return np.full(len(z), -1, dtype=np.int64)
    n_parts = int(min(max_components, max(1, len(z) // max(cells_per_component, k_min))))
    return _assignments(np.asarray(z, dtype=np.float64), n_parts, k_min, seed)


def gaussians(members: list[np.ndarray], labels: list[int]) -> Components:
    """One Gaussian component per array of member cells."""
    fits = [_gaussian(np.asarray(m, dtype=np.float64)) for m in members]
    return Components(label=np.asarray(labels, dtype=np.int64),
                      count=np.array([len(m) for m in members], dtype=np.int64),
                      means=np.stack([f[0] for f in fits]), whiten=np.stack([f[1] for f in fits]),
                      log_det=np.array([f[2] for f in fits], dtype=np.float64))


def fit_components(z: np.ndarray, label: int, *, k_min: int, cells_per_component: int,
                   max_components: int, seed: int = 0) -> Components:
    """Components of one label's cells ``z``; none when it has fewer than ``k_min`` cells."""
    z = np.asarray(z, dtype=np.float64)
    parts = label_parts(z, k_min=k_min, cells_per_component=cells_per_component, max_components=max_components,
                        seed=seed)
    if parts.size == 0 or parts.max() < 0:
        return Components.empty(z.shape[1])
    n_parts = int(parts.max()) + 1
    return gaussians([z[parts == c] for c in range(n_parts)], [label] * n_parts)


@dataclass(frozen=True)
class QuadraticForms:
    """Squared Mahalanobis distances of cells to many Gaussians as ONE matrix product.

    Why: label transfer from summaries measures every query cell against every
    component (hundreds) and every class Gaussian; a loop over Gaussians, or a product
    over all ``d^2`` entries of each precision, reads the cells once per Gaussian. Here
    ``(z - m)' P (z - m) = sum_{i<=j} w_ij P_ij z_i z_j - 2 (P m)' z + m' P m`` on
    coordinates centred on the Gaussians' mean (so the terms stay small and the float64
    result matches the direct form to rounding): one product of the ``d(d+1)/2 + d``
    features of each cell with a fixed matrix.
    """

    centre: np.ndarray  # [d]
    weights: np.ndarray  # [d (d + 1) / 2 + d, C]
    offset: np.ndarray  # [C]

    @classmethod
    def of(cls, means: np.ndarray, whiten: np.ndarray) -> QuadraticForms:
        """From means [C, d] and Cholesky factors of the precisions [C, d, d]."""
        means, whiten = np.asarray(means, dtype=np.float64), np.asarray(whiten, dtype=np.float64)
        d = means.shape[1]
        centre = means.mean(axis=0) if len(means) else np.zeros(d)
        mu = means - centre
        precision = whiten @ np.swapaxes(whiten, 1, 2)  # [C, d, d]
        pm = np.einsum("cij,cj->ci", precision, mu)
        iu, ju = np.triu_indices(d)
        pairs = precision[:, iu, ju] * np.where(iu == ju, 1.0, 2.0)[None, :]
        weights = np.ascontiguousarray(np.concatenate([pairs, -2.0 * pm], axis=1).T)
        return cls(centre=centre, weights=weights, offset=np.einsum("ci,ci->c", mu, pm))

    @property
    def n(self) -> int:
        return int(self.offset.shape[0])

    def squared(self, z: np.ndarray) -> np.ndarray:
        """[n, C] squared Mahalanobis distances (never below 0)."""
        z = np.asarray(z, dtype=np.float64)
        if self.n == 0 or len(z) == 0:
            return np.zeros((len(z), self.n), dtype=np.float64)
        d = z.shape[1]
        iu, ju = np.triu_indices(d)
        zc = z - self.centre
        feats = np.empty((len(z), iu.size + d), dtype=np.float64)
        np.multiply(zc[:, iu], zc[:, ju], out=feats[:, :iu.size])
        feats[:, iu.size:] = zc
        sq = feats @ self.weights
        sq += self.offset[None, :]
        return np.maximum(sq, 0.0, out=sq)


def mahalanobis(z: np.ndarray, comps: Components) -> np.ndarray:
    """[n, C] Mahalanobis distance of each cell to each component (:class:`QuadraticForms`)."""
    return np.sqrt(QuadraticForms.of(comps.means, comps.whiten).squared(z))


def euclidean(z: np.ndarray, comps: Components) -> np.ndarray:
    """[n, C] Euclidean distance of each cell to each component's mean."""
    sq = (np.square(z).sum(1)[:, None] - 2.0 * z @ comps.means.T + np.square(comps.means).sum(1)[None, :])
    return np.sqrt(np.maximum(sq, 0.0))


def component_distance(z: np.ndarray, comps: Components, statistic: str) -> np.ndarray:
    """[n, C] the novelty statistic's distance of each cell to each component."""
    return mahalanobis(z, comps) if statistic == "mahalanobis" else euclidean(z, comps)


def label_statistic(z: np.ndarray, comps: Components, labels: np.ndarray, statistic: str,
                    maha: np.ndarray | None = None) -> np.ndarray:
    """[n, len(labels)] the novelty statistic of each cell against each label's components.

    "mahalanobis" / "euclidean": the distance to the label's nearest component. "density":
    ``sqrt(2 (peak - log p(z | label)))`` with ``p(z | label)`` the label's count-weighted
    mixture and ``peak`` its largest component term at that component's mean (a smooth
    Mahalanobis-like distance that does not jump where the nearest component changes).
    """
    if statistic == "density":
        maha = mahalanobis(z, comps) if maha is None else maha
        dens = log_density(maha, comps)
        peak = log_density(np.zeros((1, comps.n)), comps)[0]
    else:
        dist = component_distance(z, comps, statistic) if maha is None or statistic != "mahalanobis" else maha
    out = np.full((len(z), len(labels)), np.inf)
    for j, y in enumerate(labels):
        members = comps.label == y
        if not members.any():
            continue
        if statistic == "density":
            total = np.log(comps.count[members].sum())
            lp = logsumexp(dens[:, members], axis=1) - total
            out[:, j] = np.sqrt(2.0 * np.maximum(peak[members].max() - total - lp, 0.0))
        else:
            out[:, j] = dist[:, members].min(axis=1)
    return out


def log_density(maha: np.ndarray, comps: Components) -> np.ndarray:
    """[n, C] log N(z; component) + log(count), from the Mahalanobis distances."""
    dims = comps.means.shape[1]
    return (-0.5 * maha ** 2 - 0.5 * comps.log_det[None, :] - 0.5 * dims * np.log(2 * np.pi)
            + np.log(np.maximum(comps.count, 1))[None, :])
