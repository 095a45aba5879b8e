"""Data preparation for the benchmarks (runs in fedarches' venv).

Every tool gets the SAME files: reference and query AnnData restricted to the same
genes (at most 2,000 highly variable genes chosen on the reference only, with
fedarches' own selector, which is scanpy's seurat_v3 with the study as batch key,
as in scvi-tools' tutorials), raw counts in ``.X`` (float32 CSR) and
log1p(CP10k) in ``layers["lognorm"]`` for MSE models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class Split:
    name: str
    path: str
    reference_studies: list[str]
    query_studies: list[str]
    held_out_types: list[str] = field(default_factory=list)  # removed from the reference
    description: str = ""


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.exists():  # a checkout elsewhere: the documented sibling path
    DATA = Path("/work/shared/data")

SPLITS = {
    "cellbench": Split(
        name="cellbench",
        path=str(DATA / "cellbench_lung_celllines.h5ad"),
        reference_studies=["CELseq2_3cl", "Dropseq_3cl", "CELseq2_5cl_p1"],
        query_studies=["CELseq2_5cl_p2", "CELseq2_5cl_p3"],
        held_out_types=["A549"],
        description="CellBench lung cell lines: reference CELseq2_3cl + Dropseq_3cl + CELseq2_5cl_p1 "
        "without A549; query CELseq2_5cl_p2 + CELseq2_5cl_p3; A549 never seen by the reference",
    ),
    "pbmc": Split(
        name="pbmc",
        path=str(DATA / "symphony_pbmc_3chem.h5ad"),
        reference_studies=["3pv1", "3pv2"],
        query_studies=["5p"],
        held_out_types=["B"],
        description="Symphony PBMC, by 10x chemistry: reference 3' v1 + 3' v2 without B cells; "
        "query 5' (all types); B cells never seen by the reference",
    ),
}


def lognorm(x: sp.csr_matrix) -> sp.csr_matrix:
    x = sp.csr_matrix(x, dtype=np.float32, copy=True)
    lib = np.asarray(x.sum(axis=1)).ravel()
    scale = (1e4 / np.maximum(lib, 1.0)).astype(np.float32)
    x = sp.diags(scale) @ x
    x = sp.csr_matrix(x, dtype=np.float32)
    np.log1p(x.data, out=x.data)
    return x


def select_genes(x, genes, batches, n_genes):
    try:
        from fedarches.data.genes import select_genes as sel
    except ImportError:  # pragma: no cover - fedarches not installed yet
        sel = None
    if sel is not None:
        return sel(x, genes, batches, n_genes)
    import scanpy as sc

    tmp = ad.AnnData(X=x, obs=pd.DataFrame({"b": pd.Categorical(batches)}, index=np.arange(x.shape[0]).astype(str)),
                     var=pd.DataFrame(index=pd.Index(list(genes))))
    if n_genes >= tmp.n_vars:
        return list(genes)
    h = sc.pp.highly_variable_genes(tmp, n_top_genes=n_genes, flavor="seurat_v3", batch_key="b", inplace=False, span=1.0)
    return [g for g, k in zip(genes, h["highly_variable"].to_numpy()) if k]


def _clean(a: ad.AnnData, genes: list[str]) -> ad.AnnData:
    a = a[:, genes].copy()
    x = sp.csr_matrix(a.X, dtype=np.float32)
    obs = pd.DataFrame(
        {
            "study": pd.Categorical(a.obs["study"].astype(str)),
            "cell_type": pd.Categorical(a.obs["cell_type"].astype(str)),
        },
        index=a.obs_names.astype(str),
    )
    out = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    out.layers["lognorm"] = lognorm(x)
    return out


def prepare_split(split: Split, out_dir: Path, n_genes: int = 2000) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    full = ad.read_h5ad(split.path)
    study = full.obs["study"].astype(str)
    ctype = full.obs["cell_type"].astype(str)
    ref_mask = study.isin(split.reference_studies) & ~ctype.isin(split.held_out_types)
    q_mask = study.isin(split.query_studies)
    ref = full[ref_mask.to_numpy()].copy()
    query = full[q_mask.to_numpy()].copy()
    genes = select_genes(sp.csr_matrix(ref.X), list(ref.var_names), ref.obs["study"].astype(str).to_numpy(), n_genes)
    ref, query = _clean(ref, genes), _clean(query, genes)
    ref.write_h5ad(out_dir / "ref.h5ad")
    query.write_h5ad(out_dir / "query.h5ad")
    return {
        "name": split.name,
        "description": split.description,
        "reference_studies": split.reference_studies,
        "query_studies": split.query_studies,
        "held_out_types": split.held_out_types,
        "n_reference_cells": int(ref.n_obs),
        "n_query_cells": int(query.n_obs),
        "n_genes": len(genes),
        "n_genes_available": int(full.n_vars),
        "ref": str(out_dir / "ref.h5ad"),
        "query": str(out_dir / "query.h5ad"),
    }
