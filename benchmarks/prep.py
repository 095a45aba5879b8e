"""Data preparation for the benchmarks (runs in fedarches' venv).

Every tool gets the SAME files: reference and query AnnData restricted to the same
genes (at most 2,000 highly variable genes chosen on the reference only, with
fedarches' own selector, which is scanpy's seurat_v3 with the study as batch key,
as in scvi-tools' tutorials), raw counts in ``.X`` (float32 CSR) and
log1p(CP10k) in ``layers["lognorm"]`` for MSE models.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from fedarches.data import splits as _splits
from fedarches.data.genes import select_genes
from fedarches.data.splits import BENCHMARK_SPLITS, Split


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.exists():  # a checkout elsewhere: the documented sibling path
    DATA = Path("/work/shared/data")

# The splits are defined once, in fedarches.data.splits.
SPLITS: dict[str, Split] = BENCHMARK_SPLITS


def lognorm(x: sp.csr_matrix) -> sp.csr_matrix:
    x = sp.csr_matrix(x, dtype=np.float32, copy=True)
    lib = np.asarray(x.sum(axis=1)).ravel()
    scale = (1e4 / np.maximum(lib, 1.0)).astype(np.float32)
    x = sp.diags(scale) @ x
    x = sp.csr_matrix(x, dtype=np.float32)
    np.log1p(x.data, out=x.data)
    return x


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


def _write_pair(ref: ad.AnnData, query: ad.AnnData, out_dir: Path, n_genes: int) -> dict:
    """Genes chosen on the reference only; both files restricted to them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_available = int(ref.n_vars)
    genes = select_genes(sp.csr_matrix(ref.X), list(ref.var_names), ref.obs["study"].astype(str).to_numpy(), n_genes)
    ref, query = _clean(ref, genes), _clean(query, genes)
    ref.write_h5ad(out_dir / "ref.h5ad")
    query.write_h5ad(out_dir / "query.h5ad")
    held = sorted(set(query.obs["cell_type"].astype(str)) - set(ref.obs["cell_type"].astype(str)))
    return {
        "n_reference_cells": int(ref.n_obs),
        "n_query_cells": int(query.n_obs),
        "n_genes": len(genes),
        "n_genes_available": n_available,
        "query_types_not_in_reference": held,
        "ref": str(out_dir / "ref.h5ad"),
        "query": str(out_dir / "query.h5ad"),
    }


def prepare_split(split: Split, out_dir: Path, n_genes: int = 2000) -> dict:
    ref, query = split.apply(ad.read_h5ad(DATA / split.file))
    return {
        "name": split.name,
        "description": split.description,
        "reference_studies": list(split.reference_studies),
        "query_studies": list(split.query_studies),
        "held_out_types": list(split.held_out_types),
        **_write_pair(ref, query, out_dir, n_genes),
    }


# ----------------------------------------------------------------------------- quality splits

def quality_splits() -> dict:
    """fedarches.data.splits.QUALITY_SPLITS by name (real `Split`s and simulated
    splits with `.make(seed)`); an older fedarches without it: the benchmark splits."""
    qs = getattr(_splits, "QUALITY_SPLITS", BENCHMARK_SPLITS)
    return dict(qs) if isinstance(qs, dict) else {s.name: s for s in qs}


def is_simulated(split) -> bool:
    """Simulated splits draw new cells per seed; real splits are the same cells every seed."""
    return callable(getattr(split, "make", None))


def prepare_quality(split, seed: int, out_dir: Path, n_genes: int = 2000) -> dict:
    """One (split, seed)'s files: simulated splits with data seed = run seed."""
    if not is_simulated(split):
        return {**prepare_split(split, out_dir, n_genes), "simulated": False}
    ref, query = split.make(seed)
    return {
        "name": split.name,
        "description": getattr(split, "description", ""),
        "held_out_types": list(getattr(split, "held_out_types", ()) or ()),
        "simulated": True,
        "data_seed": int(seed),
        **_write_pair(ref, query, out_dir, n_genes),
    }
