"""Integration metrics: EBM, kNN purity, silhouettes, NMI/ARI."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.stats import entropy
from sklearn.neighbors import NearestNeighbors

from fedarches.errors import ColumnError, LatentError
from fedarches.metrics import entropy_batch_mixing, integration_metrics, knn_purity


def clusters(seed: int = 0, n: int = 3000, n_labels: int = 4, n_batches: int = 3, dims: int = 10,
             batch_offset: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Well-separated label clusters; batches random (mixed) or, with an offset, apart."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n)
    batch = rng.integers(0, n_batches, n)
    centers = rng.normal(0.0, 10.0, (n_labels, dims))
    z = centers[labels] + rng.normal(0.0, 1.0, (n, dims))
    z[:, 0] += batch_offset * batch
    return z, batch.astype(str), np.array([f"t{i}" for i in labels])


def test_mixed_batches_score_high_and_separated_batches_zero():
    z, b, labels = clusters()
    mixed = integration_metrics(z, b, labels, workers=1)
    assert mixed["ebm"] > 0.9  # three equal batches, 50 neighbours: E[entropy] ~ 0.97
    assert mixed["asw_batch"] > 0.9
    z_sep, _, _ = clusters(batch_offset=200.0)
    apart = integration_metrics(z_sep, b, labels, workers=1)
    assert apart["ebm"] == 0.0
    assert apart["asw_batch"] < 0.2
    # labels are clean in both
    for m in (mixed, apart):
        assert m["knn_purity"] == 1.0
    assert mixed["asw_celltype"] > 0.8 and mixed["nmi"] == pytest.approx(1.0) and mixed["ari"] == pytest.approx(1.0)


def test_labels_without_structure_score_at_chance():
    z, b, labels = clusters()
    rng = np.random.default_rng(1)
    shuffled = rng.permutation(labels)
    m = integration_metrics(z, b, shuffled, workers=1)
    assert m["knn_purity"] == pytest.approx(0.25, abs=0.05)  # 4 labels
    assert m["asw_celltype"] == pytest.approx(0.5, abs=0.05)
    assert abs(m["ari"]) < 0.05 and m["nmi"] < 0.05


def test_ebm_and_purity_match_the_reference_definitions():
    """Brute force with sklearn + scipy.stats.entropy(base=n_batches), every cell once."""
    rng = np.random.default_rng(2)
    n = 600
    z = rng.normal(size=(n, 5))
    b = rng.integers(0, 3, n)
    z[:, 0] += 1.5 * b  # partly mixed
    labels = (z[:, 1] > 0).astype(int) + 2 * (z[:, 2] > 0.5).astype(int)
    nn = NearestNeighbors(n_neighbors=51).fit(z)
    idx = nn.kneighbors(z, return_distance=False)[:, 1:]
    expected_ebm = np.mean([entropy(np.unique(b[row], return_counts=True)[1], base=3) for row in idx])
    got = entropy_batch_mixing(z, b, k=50, n_pools=1, pool_size=n, workers=1)
    assert got == pytest.approx(expected_ebm, abs=1e-9)

    idx30 = idx[:, :30]
    per_cell = (labels[idx30] == labels[:, None]).mean(axis=1)
    expected_purity = np.mean([per_cell[labels == y].mean() for y in np.unique(labels)])
    assert knn_purity(z, labels, k=30, workers=1) == pytest.approx(expected_purity, abs=1e-9)


def test_deterministic_and_subsampling_stays_close():
    z, b, labels = clusters(n=4000, batch_offset=3.0)
    full = integration_metrics(z, b, labels, workers=1, max_cells=10_000)
    again = integration_metrics(z, b, labels, workers=1, max_cells=10_000)
    assert full == again
    sub = integration_metrics(z, b, labels, workers=1, max_cells=1000)
    for key in ("knn_purity", "asw_celltype", "asw_batch"):
        assert sub[key] == pytest.approx(full[key], abs=0.05), key


def test_undefined_metrics_are_nan_and_bad_input_is_refused():
    z, _, labels = clusters(n=300)
    one_batch = integration_metrics(z, np.zeros(300), labels, workers=1)
    assert np.isnan(one_batch["ebm"]) and np.isnan(one_batch["asw_batch"])
    with pytest.raises(ColumnError, match="entries"):
        integration_metrics(z, np.zeros(299), labels)
    bad = z.copy()
    bad[0, 0] = np.inf
    with pytest.raises(LatentError, match="NaN or infinite"):
        integration_metrics(bad, np.zeros(300), labels)
    with pytest.raises(ColumnError, match="missing"):
        integration_metrics(z, np.zeros(300), np.where(np.arange(300) == 1, None, labels).astype(object))


def test_thousand_cells_are_fast():
    z, b, labels = clusters(n=1000)
    t0 = time.perf_counter()
    integration_metrics(z, b, labels, workers=1)
    assert time.perf_counter() - t0 < 5.0
