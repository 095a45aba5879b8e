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


class StreamedGeneStats:
    """What ``select_genes`` computes from the matrix, accumulated block by block.

    scanpy's seurat_v3 with a batch key needs, per study and gene, the mean and variance
    of the counts (pass 1: sums of x and x^2), then a loess fit of log variance on log mean
    and the sums of the counts clipped at ``mean + sqrt(n) * fitted sd`` (pass 2). Both are
    sums over cells, so two streamed passes over an ``.h5ad`` choose the same genes as the
    in-memory path without the matrix in memory. Studies are sorted by name (``np.unique``).
    """

    def __init__(self, studies: Sequence[str], n_genes: int) -> None:
        self.studies = sorted(set(map(str, studies)))
        self.n_genes = n_genes
        shape = (len(self.studies), n_genes)
        self.cells = np.zeros(len(self.studies), dtype=np.int64)
        self.sum, self.sum_sq = np.zeros(shape), np.zeros(shape)
        self.clip_sum, self.clip_sum_sq = np.zeros(shape), np.zeros(shape)
        self.clip: np.ndarray | None = None

    def codes(self, batches: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.studies, np.asarray(batches).astype(str))

    def _flat(self, x: sp.csr_matrix, codes: np.ndarray) -> np.ndarray:
        return np.repeat(codes, np.diff(x.indptr)) * self.n_genes + x.indices

    def add(self, x: sp.csr_matrix, batches: np.ndarray) -> None:
        """Pass 1: one block of raw counts and its cells' studies."""
        codes = self.codes(batches)
        size = self.sum.size
        flat, v = self._flat(x, codes), x.data.astype(np.float64)
        self.sum += np.bincount(flat, weights=v, minlength=size).reshape(self.sum.shape)
        self.sum_sq += np.bincount(flat, weights=v * v, minlength=size).reshape(self.sum.shape)
        self.cells += np.bincount(codes, minlength=len(self.studies))

    def mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.cells[:, None].astype(np.float64)
        mean = self.sum / n
        var = np.maximum(self.sum_sq / n - mean**2, 0.0)
        return mean, var * n / np.maximum(n - 1, 1)  # scanpy's unbiased variance

    def fit(self, span: float = 1.0) -> np.ndarray:
        """After pass 1: the loess fits and the per-study clip values; returns the fitted sd."""
        from skmisc.loess import loess

        mean, var = self.mean_var()
        reg_std = np.ones_like(mean)
        for b in range(len(self.studies)):
            ok = var[b] > 0
            model = loess(np.log10(mean[b, ok]), np.log10(var[b, ok]), span=span, degree=2)
            model.fit()
            est = np.zeros(self.n_genes)
            est[ok] = model.outputs.fitted_values
            reg_std[b] = np.sqrt(10**est)
        self.clip = reg_std * np.sqrt(self.cells[:, None].astype(np.float64)) + mean
        return reg_std

    def add_clipped(self, x: sp.csr_matrix, batches: np.ndarray) -> None:
        """Pass 2 (after :meth:`fit`): the same blocks again, counts clipped per study."""
        assert self.clip is not None, "fit() before add_clipped()"
        flat = self._flat(x, self.codes(batches))
        v = np.minimum(x.data.astype(np.float64), self.clip.ravel()[flat])
        size = self.sum.size
        self.clip_sum += np.bincount(flat, weights=v, minlength=size).reshape(self.sum.shape)
        self.clip_sum_sq += np.bincount(flat, weights=v * v, minlength=size).reshape(self.sum.shape)

    def select(self, genes: Sequence[str], n_top: int, reg_std: np.ndarray) -> list[str]:
        """seurat_v3's per-study standardised variances from the sums, ranked across studies by
        ``data.gene_stats.choose_genes`` (the one cross-study ranking, shared with the federated build)."""
        from fedarches.data.gene_stats import StudyGeneStats, choose_genes

        mean, var = self.mean_var()
        n = self.cells[:, None].astype(np.float64)
        norm_var = (n * mean**2 + self.clip_sum_sq - 2 * self.clip_sum * mean) / ((n - 1) * reg_std**2)
        stats = [StudyGeneStats(study=s, n_cells=int(self.cells[b]), mean=mean[b], variance=var[b],
                                variance_norm=norm_var[b]) for b, s in enumerate(self.studies)]
        return choose_genes(stats, genes, n_top)
