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
