"""Which genes a model uses, and how a new dataset is lined up with them.

The reference picks its own highly variable genes (study-aware, so a gene that is
variable only because studies differ does not crowd out biology) and stores the
list; every later dataset is matched to that list by name, so users hand in whole
count matrices and never pre-subset anything.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from fedarches.errors import GeneOverlapError

OVERLAP_WARN = 0.8
OVERLAP_FLOOR = 0.5


def select_genes(x: sp.csr_matrix, genes: Sequence[str], batches: np.ndarray, n_genes: int) -> list[str]:
    """``n_genes`` highly variable genes chosen on counts, per study then combined
    (scanpy's seurat_v3 with ``batch_key``, as scvi-tools' tutorials do). 0 keeps all."""
    genes = list(genes)
    if n_genes <= 0 or n_genes >= len(genes):
        return genes
    tmp = ad.AnnData(X=x, obs=pd.DataFrame({"batch": pd.Categorical(batches)}, index=np.arange(x.shape[0]).astype(str)),
                     var=pd.DataFrame(index=pd.Index(genes)))
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hvg = sc.pp.highly_variable_genes(
                tmp, n_top_genes=n_genes, flavor="seurat_v3", batch_key="batch", inplace=False, span=1.0
            )
        except (ValueError, ZeroDivisionError, np.linalg.LinAlgError):
            # seurat_v3's loess can fail on tiny or degenerate studies; fall back to
            # dispersion-based selection on log-normalised data, still study-aware.
            tmp.X = tmp.X.copy()
            sc.pp.normalize_total(tmp, target_sum=1e4)
            sc.pp.log1p(tmp)
            hvg = sc.pp.highly_variable_genes(
                tmp, n_top_genes=n_genes, flavor="seurat", batch_key="batch", inplace=False
            )
    if isinstance(hvg, pd.DataFrame) and "highly_variable" in hvg:
        mask = hvg["highly_variable"].to_numpy()
    else:  # pragma: no cover - scanpy API drift: a broken install, not the user's data
        raise RuntimeError("scanpy.pp.highly_variable_genes returned no 'highly_variable' column")
    chosen = [g for g, keep in zip(genes, mask) if keep]
    return chosen


def align_genes(
    x: sp.csr_matrix,
    genes: Sequence[str],
    model_genes: Sequence[str],
    *,
    floor: float = OVERLAP_FLOOR,
) -> tuple[sp.csr_matrix, float]:
    """Columns of ``x`` reordered to ``model_genes``: missing genes are zero-filled,
    extra genes dropped. Warns below 80% overlap, refuses below ``floor``.

    Returns the aligned matrix and the fraction of model genes present.
    """
    pos = pd.Index(genes).get_indexer(pd.Index(model_genes))
    present = pos >= 0
    overlap = float(present.mean()) if len(model_genes) else 0.0
    if overlap < floor:
        raise GeneOverlapError(
            f"gene overlap check failed: only {present.sum()} of the model's {len(model_genes)} genes ({overlap:.0%}) are in the data; "
            f"below the {floor:.0%} floor. Check that var_names are gene symbols of the same kind as the "
            "reference's (e.g. not Ensembl ids against symbols)"
        )
    if overlap < OVERLAP_WARN:
        warnings.warn(
            f"{len(model_genes) - int(present.sum())} of {len(model_genes)} model genes are missing from the "
            f"data ({overlap:.0%} overlap) and are filled with zeros; mapping quality may suffer",
            UserWarning,
            stacklevel=2,
        )
    if present.all() and len(genes) == len(model_genes) and (pos == np.arange(len(pos))).all():
        return x, overlap
    cols = np.nonzero(present)[0]
    selector = sp.csr_matrix(
        (np.ones(len(cols), dtype=np.float32), (pos[cols], cols)), shape=(len(genes), len(model_genes))
    )
    aligned = (x @ selector).tocsr()
    aligned.sort_indices()
    return aligned.astype(np.float32, copy=False), overlap
