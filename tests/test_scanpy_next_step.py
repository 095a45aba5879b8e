"""A scanpy user's next step after mapping works in this environment (the scanpy-extras extra)."""

from __future__ import annotations

import scanpy as sc


def test_leiden_runs_on_the_fedarches_latent(trvae_model, tiny_data):
    res = trvae_model.map_query(tiny_data[1], "study", epochs=2, progress=False)
    adata = res.adata
    sc.pp.neighbors(adata, use_rep="X_fedarches", n_neighbors=10)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False)
    assert adata.obs["leiden"].nunique() >= 2
