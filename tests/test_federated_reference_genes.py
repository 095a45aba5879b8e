"""Issue 10: genes chosen without pooling cells. Each "site" computes per-study statistics
of its own studies; the coordinator's choice equals ``select_genes`` on the pooled cells."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_data
from fedarches.data.gene_stats import choose_genes, study_gene_stats
from fedarches.data.genes import select_genes
from fedarches.data.splits import CELLBENCH, PBMC_CHEMISTRY
from fedarches.data.validation import get_matrix


def _federated(ref, key, site_studies, n_genes):
    genes = ref.var_names.astype(str).tolist()
    stats = []
    for studies in site_studies:  # what each site computes on its own cells only
        part = ref[ref.obs[key].astype(str).isin(studies).to_numpy()]
        stats += study_gene_stats(get_matrix(part, None), genes, part.obs[key].astype(str).to_numpy())
    return choose_genes(stats, genes, n_genes)


@pytest.mark.parametrize("n_genes", [500, 2000])
def test_cellbench_three_sites_pick_the_pooled_genes(n_genes):
    ref, _ = CELLBENCH.load(shared_data(CELLBENCH.file))
    key = CELLBENCH.study_key
    pooled = select_genes(get_matrix(ref, None), ref.var_names.astype(str).tolist(),
                          ref.obs[key].astype(str).to_numpy(), n_genes)
    fed = _federated(ref, key, [[s] for s in CELLBENCH.reference_studies], n_genes)
    assert fed == pooled


def test_pbmc_one_chemistry_per_site_and_one_site_with_two():
    ref, _ = PBMC_CHEMISTRY.load(shared_data(PBMC_CHEMISTRY.file))
    key = PBMC_CHEMISTRY.study_key
    genes = ref.var_names.astype(str).tolist()
    pooled = select_genes(get_matrix(ref, None), genes, ref.obs[key].astype(str).to_numpy(), 1000)
    assert _federated(ref, key, [[s] for s in PBMC_CHEMISTRY.reference_studies], 1000) == pooled
    assert _federated(ref, key, [list(PBMC_CHEMISTRY.reference_studies)], 1000) == pooled


def test_statistics_are_per_gene_vectors_only():
    ref, _ = CELLBENCH.load(shared_data(CELLBENCH.file))
    stats = study_gene_stats(get_matrix(ref, None), ref.var_names.astype(str).tolist(),
                             ref.obs[CELLBENCH.study_key].astype(str).to_numpy())
    assert [s.study for s in stats] == sorted(CELLBENCH.reference_studies)
    for s in stats:
        assert all(a.shape == (ref.n_vars,) and np.isfinite(a).all() for a in s.arrays().values())
    assert choose_genes(stats, ref.var_names.astype(str).tolist(), 0) == ref.var_names.astype(str).tolist()
