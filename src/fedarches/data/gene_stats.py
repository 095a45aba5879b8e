"""Highly variable genes chosen from per-study summary statistics, without pooling cells.

Why this is exact: ``select_genes`` runs scanpy's seurat_v3 with one batch per
study, and seurat_v3 fits its mean-variance trend (the loess) and clips each
study's counts *within that study only*. Every number the choice needs about a
study (its clipped, trend-standardised variance per gene) is therefore computable
by whoever holds that study's cells; only the last step (rank per study, median
rank, number of studies that call a gene variable, sort) looks across studies,
and it needs nothing but those per-gene vectors. So a site computes
`study_gene_stats` on its own studies (one exchange, per-gene vectors: never a
cell), and the coordinator's `choose_genes` picks the same genes as
``select_genes`` on the pooled cells.

seurat_v3's loess can fail on a tiny or degenerate study; ``select_genes`` then
falls back to a dispersion-based choice computed over the pooled cells, which has
no per-study decomposition: here that study's site refuses, naming
it instead (``EmptyDataError``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from fedarches.errors import EmptyDataError, ProtocolError

@dataclass(frozen=True)
class StudyGeneStats:
    """One study's per-gene summary: what the seurat_v3 choice needs, and nothing per cell."""

    study: str
    n_cells: int
    mean: np.ndarray  # float64 [genes]
    variance: np.ndarray  # float64 [genes]
    variance_norm: np.ndarray  # float64 [genes]: clipped variance standardised by the study's own trend

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "variance": self.variance, "variance-norm": self.variance_norm}


def _one_study(x: sp.csr_matrix, genes: list[str], study: str) -> StudyGeneStats:
    import scanpy as sc

    tmp = ad.AnnData(X=x, var=pd.DataFrame(index=pd.Index(genes)),
                     obs=pd.DataFrame(index=np.arange(x.shape[0]).astype(str)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            df = sc.pp.highly_variable_genes(tmp, n_top_genes=min(len(genes), 2), flavor="seurat_v3",
                                             inplace=False, span=1.0)
        except (ValueError, ZeroDivisionError, np.linalg.LinAlgError) as exc:
            raise EmptyDataError(
                f"data shape check failed: seurat_v3's trend cannot be fitted on study {study!r} "
                f"({x.shape[0]} cells): {exc}; the federated gene choice needs it for every study"
            ) from None
    return StudyGeneStats(study=study, n_cells=int(x.shape[0]),
                          mean=df["means"].to_numpy(np.float64), variance=df["variances"].to_numpy(np.float64),
                          variance_norm=df["variances_norm"].to_numpy(np.float64))


def study_gene_stats(x: sp.csr_matrix, genes: Sequence[str], studies: np.ndarray) -> list[StudyGeneStats]:
    """Per-study statistics of raw counts ``x`` (cells x ``genes``), studies in sorted order."""
    genes = list(genes)
    studies = np.asarray(studies).astype(str)
    return [_one_study(x[studies == s], genes, str(s)) for s in np.unique(studies)]


def choose_genes(stats: Sequence[StudyGeneStats], genes: Sequence[str], n_genes: int) -> list[str]:
    """``n_genes`` genes from every study's statistics, combined as seurat_v3 with a batch key
    does (SelectIntegrationFeatures: median rank among the studies that rank a gene in their
    top ``n_genes``, then how many do). 0 (or at least all genes) keeps every gene."""
    genes = list(genes)
    if n_genes <= 0 or n_genes >= len(genes):
        return genes
    if not stats:
        raise ProtocolError("protocol check failed: no study statistics to choose genes from")
    for s in stats:
        if s.variance_norm.shape != (len(genes),):
            raise ProtocolError(f"protocol check failed: study {s.study!r} has statistics for "
                                 f"{s.variance_norm.shape[0]} genes, expected {len(genes)}")
    # np.unique's study order, as scanpy loops over batches (the ranks do not depend on it)
    ordered = sorted(stats, key=lambda s: s.study)
    norm = np.concatenate([s.variance_norm.reshape(1, -1) for s in ordered], axis=0)
    ranked = np.argsort(np.argsort(-norm, axis=1), axis=1).astype(np.float32)
    n_high = np.sum((ranked < n_genes).astype(int), axis=0)
    ranked[ranked >= n_genes] = np.nan
    median = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    df = pd.DataFrame({"highly_variable_rank": median, "highly_variable_nbatches": n_high},
                      index=pd.Index(genes))
    cols = ["highly_variable_rank", "highly_variable_nbatches"]
    chosen = set(df[cols].sort_values(cols, ascending=[True, False], na_position="last").index[:int(n_genes)])
    return [g for g in genes if g in chosen]


__all__ = ["StudyGeneStats", "choose_genes", "study_gene_stats"]
