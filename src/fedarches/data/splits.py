"""Reference/query splits of the shared real datasets used by tests, examples and
benchmarks, defined once so every tool is measured on exactly the same cells."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad


@dataclass(frozen=True)
class Split:
    """Which studies build the reference, which are the query, and which cell
    types are removed from the reference (so the query holds types it never saw)."""

    name: str
    file: str
    reference_studies: tuple[str, ...]
    query_studies: tuple[str, ...]
    held_out_types: tuple[str, ...] = ()
    description: str = ""
    study_key: str = "study"
    label_key: str = "cell_type"

    def apply(self, adata: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
        study = adata.obs[self.study_key].astype(str)
        ctype = adata.obs[self.label_key].astype(str)
        ref = study.isin(self.reference_studies) & ~ctype.isin(self.held_out_types)
        query = study.isin(self.query_studies)
        return adata[ref.to_numpy()].copy(), adata[query.to_numpy()].copy()

    def load(self, path: str | Path) -> tuple[ad.AnnData, ad.AnnData]:
        return self.apply(ad.read_h5ad(path))


CELLBENCH = Split(
    name="cellbench",
    file="cellbench_lung_celllines.h5ad",
    reference_studies=("CELseq2_3cl", "Dropseq_3cl", "CELseq2_5cl_p1"),
    query_studies=("CELseq2_5cl_p2", "CELseq2_5cl_p3"),
    held_out_types=("A549",),
    description="CellBench lung cell lines: reference CELseq2_3cl + Dropseq_3cl + CELseq2_5cl_p1 "
    "without A549; query CELseq2_5cl_p2 + CELseq2_5cl_p3; A549 never seen by the reference",
)
PBMC_CHEMISTRY = Split(
    name="pbmc-chemistry",
    file="symphony_pbmc_3chem.h5ad",
    reference_studies=("3pv1", "3pv2"),
    query_studies=("5p",),
    description="Symphony PBMC, by 10x chemistry: reference 3' v1 + 3' v2; query 5'",
)
PBMC_HOLDOUT = Split(
    name="pbmc",
    file=PBMC_CHEMISTRY.file,
    reference_studies=PBMC_CHEMISTRY.reference_studies,
    query_studies=PBMC_CHEMISTRY.query_studies,
    held_out_types=("B",),
    description="Symphony PBMC, by 10x chemistry: reference 3' v1 + 3' v2 without B cells; "
    "query 5' (all types); B cells never seen by the reference",
)
#: The splits the benchmarks run, by name.
BENCHMARK_SPLITS = {s.name: s for s in (CELLBENCH, PBMC_HOLDOUT)}

CELLBENCH_REFERENCE = CELLBENCH.reference_studies
CELLBENCH_QUERY = CELLBENCH.query_studies
CELLBENCH_HELD_OUT = CELLBENCH.held_out_types[0]
PBMC_REFERENCE = PBMC_CHEMISTRY.reference_studies
PBMC_QUERY = PBMC_CHEMISTRY.query_studies


def cellbench_holdout(path: str | Path) -> tuple[ad.AnnData, ad.AnnData]:
    """The scArches paper's hold-out design on CellBench: reference = two 3-cell-line
    plates and one 5-cell-line plate with every A549 cell removed; query = the other
    two 5-cell-line plates, so A549 is a cell type the reference never saw."""
    return CELLBENCH.load(path)


def pbmc_chemistry(path: str | Path) -> tuple[ad.AnnData, ad.AnnData]:
    """PBMC from three 10x chemistries: reference = 3' v1 + v2, query = 5'."""
    return PBMC_CHEMISTRY.load(path)
