"""The coordinator's merge of the sites' class summaries in a federated reference build: every
label is the reference's own, so none is treated as added by a site after the reference (which
would make the query-shift guard read a query against the largest site's labels only)."""

from __future__ import annotations

import numpy as np
import pytest

from fedarches.errors import ContributionContentError
from fedarches.federation.reference_assembly import merge_reference_summaries
from fedarches.labels.calibration import MODE_SITE
from fedarches.labels.summaries import ClassSummaries

CENTRES = {"a": [0, 0, 0, 0], "b": [4, 0, 0, 0], "c": [0, 4, 0, 0], "new": [0, 0, 4, 4]}


def _cells(rng, label: str, n: int) -> np.ndarray:
    return (rng.normal(size=(n, 4)) * 0.4 + np.asarray(CENTRES[label], float)).astype(np.float32)


def _site(rng, labels: tuple[str, ...], n: int = 200) -> ClassSummaries:
    z = np.vstack([_cells(rng, t, n) for t in labels])
    return ClassSummaries.fit(z, np.repeat(labels, n), ref_batches=np.repeat("study", len(labels) * n))


def test_non_iid_sites_keep_their_labels_calibration():
    rng = np.random.default_rng(0)
    big, small = _site(rng, ("a", "b"), 300), _site(rng, ("b", "c"))  # the largest site lacks c
    plain = big.merged(small)
    assert plain.thresholds.label_calibration_mode[plain.label_categories.index("c")] == MODE_SITE
    ours = merge_reference_summaries([big, small], ["a", "b", "c"])
    assert ours.label_categories == ["a", "b", "c"] and MODE_SITE not in ours.thresholds.label_calibration_mode
    modes = dict(zip(ours.label_categories, ours.thresholds.label_calibration_mode))
    assert modes["c"] == small.thresholds.label_calibration_mode[small.label_categories.index("c")]
    assert modes["b"] == big.thresholds.label_calibration_mode[big.label_categories.index("b")]
    # a query of every known type plus a never-seen one: half of it is c, which the plain merge's
    # guard reads against a and b only and takes for a shifted state
    query = np.vstack([_cells(rng, t, 150) for t in ("a", "b", "c", "c", "new")])
    new = np.arange(len(query)) >= 4 * 150
    guarded, fixed = plain.restricted(["a", "b", "c"]).predict(query), ours.predict(query)
    assert np.median(fixed.query_shift) < np.median(guarded.query_shift)
    assert guarded.is_unknown[new].mean() < 0.5  # the plain merge hides the never-seen type
    assert fixed.is_unknown[new].mean() > 0.9 and fixed.is_unknown[~new].mean() < 0.1


def test_a_label_no_site_summarised_is_refused():
    rng = np.random.default_rng(1)
    with pytest.raises(ContributionContentError, match="no site summarised labels"):
        merge_reference_summaries([_site(rng, ("a", "b"))], ["a", "b", "c"])
    assert merge_reference_summaries([], ["a"]) is None


def test_a_label_no_site_holds_enough_cells_of_joins_with_no_component():
    """The classifier knows every label a site has; one that no site could summarise
    k-anonymously is in the label knowledge with no component and the global threshold, as
    a central build keeps a label below k_min cells, and it is never predicted from summaries."""
    from fedarches.labels.calibration import KIND_EMPTY

    rng = np.random.default_rng(2)
    merged = merge_reference_summaries([_site(rng, ("a", "b"))], ["a", "b", "rare"], unsummarised=["rare"])
    assert merged.label_categories == ["a", "b", "rare"]
    assert not (merged.components.label == 2).any()
    t = merged.thresholds
    assert t.label_threshold_kind[2] == KIND_EMPTY and t.label_thresholds[2] == t.global_threshold
    assert t.calibration_counts[2] == 0 and not merged.gaussian.fitted[2]
    query = np.vstack([_cells(rng, "a", 50), _cells(rng, "b", 50)])
    res = merged.predict(query)
    assert set(np.asarray(res.knn_prediction).astype(str)) <= {"a", "b"} and (res.prediction != "rare").all()
    # a missing label that is not declared unsummarised is still refused
    with pytest.raises(ContributionContentError, match="no site summarised labels"):
        merge_reference_summaries([_site(rng, ("a", "b"))], ["a", "b", "c", "rare"], unsummarised=["rare"])


def test_a_site_summarises_labels_of_half_k_min_cells_padded():
    from fedarches.federation.reference_site import summarisable

    assert summarisable(20, 20) and summarisable(10, 20) and not summarisable(9, 20)
