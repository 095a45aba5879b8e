"""Class Gaussians from per-site moments (`labels.moments`, `federation.reference_calibration`):
the pooled mean and OAS covariance equal the central fit on the pooled cells, the fold
complements the central cross-validation's, and the thresholds the central quantile within
a bin."""

from __future__ import annotations

import numpy as np
from sklearn.covariance import OAS

from fedarches.federation.reference_calibration import (
    STEP_MOMENTS,
    STEP_STATISTICS,
    component_origins,
    gaussians_from_histograms,
    shared_labels,
    site_histograms,
)
from fedarches.labels.binned import BIN_DECADES
from fedarches.labels.moments import FOLDS, LabelMoments, fold_of_cells, oas_covariance, pooled_gaussians
from fedarches.labels.novelty import ClassGaussianNovelty, _whitener
from fedarches.labels.summaries import ClassSummaries, SummaryOptions


def test_oas_from_the_empirical_covariance_is_scikit_learns():
    rng = np.random.default_rng(0)
    for n in (12, 300):
        x = rng.normal(size=(n, 6)) @ rng.normal(size=(6, 6))
        emp = np.cov(x, rowvar=False, bias=True)
        np.testing.assert_allclose(oas_covariance(emp, n), OAS().fit(x).covariance_, rtol=1e-10, atol=1e-12)


def _sites():
    rng = np.random.default_rng(1)
    z0 = np.vstack([rng.normal(0, 1, (200, 4)), rng.normal(5, 1, (120, 4))])
    y0 = np.array(["A"] * 200 + ["B"] * 120)
    z1 = np.vstack([rng.normal(0.7, 1.3, (150, 4)), rng.normal(-5, 1, (12, 4))])
    y1 = np.array(["A"] * 150 + ["C"] * 12)
    return (z0, y0), (z1, y1)


def test_pooled_gaussians_are_the_central_fit_on_the_pooled_cells():
    (z0, y0), (z1, y1) = _sites()
    cats = ["A", "B", "C"]
    codes = [np.array([cats.index(v) for v in y]) for y in (y0, y1)]
    folds = [fold_of_cells(c, 3, seed) for c, seed in zip(codes, (5, 6))]
    m = LabelMoments.of(z0, codes[0], folds[0], 3) + LabelMoments.of(z1, codes[1], folds[1], 3)
    g = pooled_gaussians(m, np.array([0, 1, 2]))
    z, c, f = np.vstack([z0, z1]), np.concatenate(codes), np.concatenate(folds)
    central = ClassGaussianNovelty().fit(z, c, 3)
    np.testing.assert_allclose(g["means"], central.means, atol=1e-10)
    np.testing.assert_allclose(g["whiten"], central.whiten, rtol=1e-6, atol=1e-9)
    assert g["cross"].tolist() == [1, 1, 0]  # C: 12 cells, too few for a cross-validated threshold
    for k in range(FOLDS):
        rest = z[(c == 0) & (f != k)]
        np.testing.assert_allclose(g["fold_means"][0, k], rest.mean(0), atol=1e-10)
        np.testing.assert_allclose(g["fold_whiten"][0, k], _whitener(OAS().fit(rest).covariance_), rtol=1e-6, atol=1e-9)


def test_sites_thresholds_place_the_central_cross_validated_quantile():
    (z0, y0), (z1, y1) = _sites()
    opts = SummaryOptions(k_min=20, small_labels="drop")
    s0 = ClassSummaries.fit(z0, y0, label_categories=["A", "B"], options=opts)
    s1 = ClassSummaries.fit(z1[:150], y1[:150], label_categories=["A"], options=opts)
    merged = s0.merged(s1)
    origin = component_origins(merged, [(0, s0), (1, s1)])
    labels = shared_labels(merged, origin)
    assert labels.tolist() == [0]
    parts = [(z0, y0, 11), (z1, y1, 12)]
    m = None
    for me, (z, y, seed) in enumerate(parts):
        st = LabelMoments.from_state(site_histograms(merged, origin, me, z, y, 20, STEP_MOMENTS, seed=seed))
        m = st if m is None else m + st
    g = pooled_gaussians(m, labels)
    hist = sum(site_histograms(merged, origin, me, z, y, 20, STEP_STATISTICS, gaussians=g, seed=seed)["gauss"]
               for me, (z, y, seed) in enumerate(parts))
    assert hist[0].sum() == 350 and hist[1].sum() == 0  # B is held by one site: not asked
    out, done = gaussians_from_histograms(merged, labels, g, hist)
    assert done == [0]
    # the central threshold from the same folds: each cell against its fold's complement
    z = np.vstack([z0[:200], z1[:150]])
    f = np.concatenate([fold_of_cells(np.zeros(200, dtype=int), 1, 11), fold_of_cells(np.zeros(150, dtype=int), 1, 12)])
    d = np.empty(len(z))
    for k in range(FOLDS):
        rest = z[f != k]
        d[f == k] = np.sqrt(np.square((z[f == k] - rest.mean(0)) @ _whitener(OAS().fit(rest).covariance_)).sum(1))
    want = np.quantile(d, 0.99)
    tol = 10 ** BIN_DECADES
    assert want / tol ** 2 <= out.gaussian.thresholds[0] <= want * tol ** 2
    np.testing.assert_allclose(out.gaussian.means[0], z.mean(0), atol=1e-10)
    # B keeps its site's Gaussian
    assert out.gaussian.thresholds[1] == merged.gaussian.thresholds[1]


def test_moments_without_a_positive_definite_covariance_leave_the_label_to_its_site():
    (z0, y0), _ = _sites()
    cats = ["A", "B"]
    codes = np.array([cats.index(v) for v in y0])
    m = LabelMoments.of(z0, codes, fold_of_cells(codes, 2, 0), 2)
    bad = LabelMoments(m.count, m.total, m.outer.copy())
    bad.outer[1] *= -1.0  # a site's sums of outer products that no cells can have
    g = pooled_gaussians(bad, np.array([0, 1]))
    assert g["fitted"].tolist() == [1, 0] and g["cross"].tolist() == [1, 0]
    assert not g["means"][1].any() and not g["fold_whiten"][1].any()
