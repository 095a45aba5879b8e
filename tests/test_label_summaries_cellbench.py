"""Label summaries on the CellBench hold-out split (issue 9): from summaries alone the reference
finds the unseen A549, and after site 1's labelled cells are summarised and merged in, site 2's
A549 cells are labelled A549 (the library path; the same through `site map --share-labels`,
intake and merge: tests/test_label_growth_cellbench.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_data


@pytest.fixture(scope="module")
def mapped():
    from fedarches.config import TrainConfig
    from fedarches.data.splits import CELLBENCH
    from fedarches.model import LATENT_KEY, FedArchesModel, SummaryIndex

    ref, query = CELLBENCH.load(shared_data(CELLBENCH.file))
    model = FedArchesModel.train_reference(ref, "study", "cell_type", kind="trvae", progress=False,
                                           train=TrainConfig(seed=0, threads=1), label_knowledge="summaries")
    assert isinstance(model.reference, SummaryIndex)
    res = model.map_query(query, "study", seed=0, threads=1, progress=False)
    z = np.asarray(res.adata.obsm[LATENT_KEY])
    return model, res, z, query.obs["study"].astype(str).to_numpy(), query.obs["cell_type"].astype(str).to_numpy()


@pytest.mark.slow
def test_summaries_find_a549_and_keep_known_types(mapped):
    _, res, _, _, truth = mapped
    lt = res.report.label_transfer
    assert lt.accuracy_known >= 0.95, lt
    assert lt.unseen_called_unknown >= 0.95, lt
    assert lt.known_called_unknown <= 0.05, lt


@pytest.mark.slow
def test_site_label_summaries_teach_the_next_site_a549(mapped):
    from fedarches.labels.summaries import ClassSummaries

    model, _, z, study, truth = mapped
    site1, site2 = study == "CELseq2_5cl_p2", study == "CELseq2_5cl_p3"
    grown = model.reference.summaries.merged(ClassSummaries.fit(z[site1], truth[site1]))
    assert "A549" in grown.label_categories and grown.components.count.min() >= 20
    probs = model._classifier_probabilities(z[site2])  # the reference classifier: 4 labels
    assert probs.shape[1] == len(model.reference.categories) == 4
    pred = grown.predict(z[site2], classifier_probabilities=probs).prediction.astype(str)
    a549 = truth[site2] == "A549"
    assert (pred[a549] == "A549").mean() >= 0.9
    v1 = model.reference.summaries.predict(z[site2], classifier_probabilities=probs).prediction.astype(str)
    assert (v1[a549] == "A549").mean() == 0.0
