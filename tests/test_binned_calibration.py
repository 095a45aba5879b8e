"""Novelty calibration from histograms (`labels.binned`, `federation.reference_calibration`):
the quantiles and thresholds the centralized calibration sets from cells, placed from
binned counts within a bin's width; a site answers only for labels it summarises
(>= k_min / 2 of its cells)."""

from __future__ import annotations

import numpy as np
import pytest

from fedarches.federation.reference_calibration import (
    STEP_SCORES,
    STEP_STATISTICS,
    component_origins,
    shared_labels,
    site_histograms,
    thresholds_from_histograms,
)
from fedarches.labels.binned import BIN_DECADES, N_BINS, binned_quantile, binned_thresholds, histogram
from fedarches.labels.calibration import MODE_CROSS_STUDY, label_thresholds
from fedarches.labels.summaries import ClassSummaries, SummaryOptions

TOL = 10 ** BIN_DECADES  # one bin, relative


def test_binned_quantiles_and_thresholds_match_the_cell_level_ones():
    rng = np.random.default_rng(0)
    v = rng.lognormal(0.5, 0.4, 6000)
    codes = rng.integers(0, 3, 6000)
    codes[(codes == 2) & (np.arange(6000) < 5900)] = 0  # label 2: a few dozen cells (scaled threshold)
    h = histogram(v, codes, 3)
    assert h.shape == (3, N_BINS) and h.sum() == 6000
    for y in range(3):
        for q in (0.1, 0.5, 0.99):
            got, want = binned_quantile(h[y], q), np.quantile(v[codes == y], q)
            assert want / TOL <= got <= want * TOL or (y == 2 and q == 0.99)
    b = binned_thresholds(h, 0.01, 100)
    t = label_thresholds(v, v, codes, np.full(3, MODE_CROSS_STUDY), 3, 0.01, 100)
    np.testing.assert_array_equal(b["label_threshold_kind"], t.label_threshold_kind)
    np.testing.assert_allclose(b["label_thresholds"], t.label_thresholds, rtol=0.02)
    np.testing.assert_allclose(b["global_threshold"][0], t.global_threshold, rtol=0.02)
    np.testing.assert_allclose(b["pooled_ratio_quantile"][0], t.pooled_ratio_quantile[0], rtol=0.03)
    assert np.isnan(binned_quantile(np.zeros(N_BINS), 0.5))
    # non-positive and NaN values are skipped, +inf lands in the last bin
    assert histogram(np.array([0.0, -1.0, np.nan, np.inf]), np.zeros(4), 1)[0, -1] == 1


@pytest.fixture()
def two_sites():
    """Two sites' summaries in one latent: label A at both, B at site 0 only; site 1's A
    cells sit a little off site 0's (a study effect), C has too few cells at site 1."""
    rng = np.random.default_rng(2)
    z0 = np.vstack([rng.normal(0, 1, (400, 4)), rng.normal(6, 1, (300, 4))])
    y0 = np.array(["A"] * 400 + ["B"] * 300)
    z1 = np.vstack([rng.normal(0.8, 1, (500, 4)), rng.normal(-6, 1, (8, 4))])
    y1 = np.array(["A"] * 500 + ["C"] * 8)
    opts = SummaryOptions(k_min=20, small_labels="drop")
    s0 = ClassSummaries.fit(z0, y0, ref_batches=np.zeros(700), label_categories=["A", "B"], options=opts)
    s1 = ClassSummaries.fit(z1[:500], y1[:500], ref_batches=np.zeros(500), label_categories=["A"], options=opts)
    merged = s0.merged(s1)
    origin = component_origins(merged, [(0, s0), (1, s1)])
    return {"z": (z0, z1), "y": (y0, y1), "merged": merged, "origin": origin, "parts": (s0, s1)}


def test_sites_answer_with_histograms_of_their_labels_only(two_sites):
    merged, origin = two_sites["merged"], two_sites["origin"]
    s0, s1 = two_sites["parts"]
    assert origin.tolist() == [0] * s0.components.n + [1] * s1.components.n
    assert shared_labels(merged, origin).tolist() == [0]
    z1, y1 = two_sites["z"][1], two_sites["y"][1]
    h = site_histograms(merged, origin, 1, z1, y1, 20, STEP_STATISTICS)
    assert set(h) == {"cross", "loo"}
    # A: all 500 cells; B (not held here) and C (8 < k_min / 2 cells, not a label of the model) nothing
    assert h["cross"][0].sum() == 500 and h["cross"][1].sum() == 0 and h["loo"].sum() == 500
    s = site_histograms(merged, origin, 1, z1, y1, 20, STEP_SCORES)
    assert s["score"].shape == (1, N_BINS) and s["score"].sum() == 500


def test_pooled_and_cross_site_thresholds(two_sites):
    merged, origin = two_sites["merged"], two_sites["origin"]
    labels = shared_labels(merged, origin)
    hists: dict[str, np.ndarray] = {}
    for me, (z, y) in enumerate(zip(two_sites["z"], two_sites["y"])):
        for k, v in site_histograms(merged, origin, me, z, y, 20, STEP_STATISTICS).items():
            hists[k] = hists[k] + v if k in hists else v
    t0 = merged.thresholds
    pooled = thresholds_from_histograms(merged, labels, hists, 100, "loo").thresholds
    cross = thresholds_from_histograms(merged, labels, hists, 100, "cross").thresholds
    # A is measured on both sites' 900 cells; against the other site's components only, the
    # shift between the sites widens it
    assert pooled.calibration_counts[0] == cross.calibration_counts[0] == 900
    assert cross.label_thresholds[0] > pooled.label_thresholds[0]
    assert cross.label_calibration_mode[0] == MODE_CROSS_STUDY
    assert pooled.label_calibration_mode[0] == t0.label_calibration_mode[0]
    # the pooled threshold is the in-sample quantile of all of A's cells against all its components
    from fedarches.labels.components import label_statistic

    a = merged.components.label == 0
    comps = type(merged.components)(*(getattr(merged.components, f)[a] for f in ("label", "count", "means", "whiten",
                                                                                  "log_det")))
    z = np.vstack([two_sites["z"][0][:400], two_sites["z"][1][:500]])
    want = np.quantile(label_statistic(z, comps, np.array([0]), "mahalanobis")[:, 0], 0.99)
    assert want / TOL ** 2 <= pooled.label_thresholds[0] <= want * TOL ** 2
    # B, held by one site, keeps its site's calibration either way
    assert pooled.label_thresholds[1] == cross.label_thresholds[1] == t0.label_thresholds[1]
