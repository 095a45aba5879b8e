"""The kNN label weights of the scArches paper (Lotfollahi et al. 2022, Methods eqs. 17-21).

Shared by prediction and by the IVF index's nprobe tuning, which judges an
approximate search by the labels these weights produce.
"""

from __future__ import annotations

import numpy as np

__all__ = ["knn_weights", "label_probabilities"]


def knn_weights(distances: np.ndarray) -> np.ndarray:
    """Paper eqs. 17-20: normalised Gaussian-kernel weights of each row's k distances.

    ``exp(-d_i / (2/s)^2) / sum_j exp(-d_j / (2/s)^2)`` with ``s = std(d)``, evaluated
    as a shifted softmax of ``-d * s^2 / 4``: the same value, but no ``0/0`` when ``s``
    is large, and uniform weights (the limit) when ``s == 0``.
    """
    d = np.asarray(distances, dtype=np.float64)
    s = d.std(axis=1, keepdims=True)
    logits = -d * (s * s / 4.0)
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    return w


def label_probabilities(dist: np.ndarray, neighbour_codes: np.ndarray, n_labels: int) -> np.ndarray:
    """Paper eq. 21: p(y) = sum of the kernel weights of neighbours labelled y."""
    n = dist.shape[0]
    w = knn_weights(dist)
    flat = (np.arange(n, dtype=np.int64)[:, None] * n_labels + neighbour_codes).ravel()
    return np.bincount(flat, weights=w.ravel(), minlength=n * n_labels).reshape(n, n_labels)
