"""Reference/query splits of the shared real datasets used by tests, examples and
benchmarks, defined once so every tool is measured on exactly the same cells."""

from __future__ import annotations

from pathlib import Path

import anndata as ad

CELLBENCH_REFERENCE = ("CELseq2_3cl", "Dropseq_3cl", "CELseq2_5cl_p1")
CELLBENCH_QUERY = ("CELseq2_5cl_p2", "CELseq2_5cl_p3")
CELLBENCH_HELD_OUT = "A549"
PBMC_REFERENCE = ("3pv1", "3pv2")
PBMC_QUERY = ("5p",)


def cellbench_holdout(path: str | Path) -> tuple[ad.AnnData, ad.AnnData]:
    """The scArches paper's hold-out design on CellBench: reference = two 3-cell-line
    plates and one 5-cell-line plate with every A549 cell removed; query = the other
    two 5-cell-line plates, so A549 is a cell type the reference never saw."""
    adata = ad.read_h5ad(path)
    study = adata.obs["study"].astype(str)
    ctype = adata.obs["cell_type"].astype(str)
    ref = adata[study.isin(CELLBENCH_REFERENCE) & (ctype != CELLBENCH_HELD_OUT)].copy()
    query = adata[study.isin(CELLBENCH_QUERY)].copy()
    return ref, query


def pbmc_chemistry(path: str | Path) -> tuple[ad.AnnData, ad.AnnData]:
    """PBMC from three 10x chemistries: reference = 3' v1 + v2, query = 5'."""
    adata = ad.read_h5ad(path)
    study = adata.obs["study"].astype(str)
    return adata[study.isin(PBMC_REFERENCE)].copy(), adata[study.isin(PBMC_QUERY)].copy()
