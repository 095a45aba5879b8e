"""Input checks that run before anything is trained or written.

Each check raises ``InputDataError`` with a message that names the column,
layer or value at fault and what to do, because the person reading it is a
biologist with an h5ad file, not the author of this code.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from fedarches.errors import ColumnError, CountValueError, EmptyDataError, GeneNameError


def get_matrix(adata: ad.AnnData, layer: str | None) -> sp.csr_matrix:
    """The count matrix as float32 CSR (a view-free copy only when needed)."""
    if layer is not None:
        if layer not in adata.layers:
            raise ColumnError(
                f"obs column check failed: layer {layer!r} not found; available layers: {sorted(adata.layers.keys()) or 'none'}"
            )
        x = adata.layers[layer]
    else:
        x = adata.X
    if x is None:
        raise EmptyDataError("data shape check failed: the AnnData has no .X; pass --layer with the name of the counts layer")
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32) if (x.format != "csr" or x.dtype != np.float32) else x
    else:
        x = sp.csr_matrix(np.asarray(x, dtype=np.float32))
    return x


def check_shape(adata: ad.AnnData) -> None:
    if adata.n_obs == 0:
        raise EmptyDataError("data shape check failed: the data has zero cells; nothing to train or map")
    if adata.n_vars == 0:
        raise EmptyDataError("data shape check failed: the data has zero genes; check var_names and the matrix")


def check_gene_names(genes: Sequence[str] | pd.Index) -> None:
    index = pd.Index(genes)
    if index.has_duplicates:
        dups = index[index.duplicated()].unique()[:5].tolist()
        raise GeneNameError(
            f"gene name check failed: duplicate gene names in var_names (e.g. {dups}); make them unique first "
            "(adata.var_names_make_unique()) or aggregate the duplicates"
        )


def check_signal(x: sp.csr_matrix, conditions: np.ndarray | None = None, *, what: str = "the count matrix") -> None:
    """Refuse a matrix (or one condition of it) whose every cell has zero counts.

    Such data trains or maps to noise without any error (an all-zero query maps
    with accuracy 0 and would still be contributed), so it is refused before
    anything runs. Call after ``check_values``-style checks so sums are finite.
    """
    totals = np.asarray(x.sum(axis=1)).ravel()
    if x.shape[0] and not (totals > 0).any():
        raise CountValueError(
            f"count value check failed: {what} has zero counts in all {x.shape[0]} cells; "
            "check --layer (the counts may be in another layer) and the gene names"
        )
    if conditions is None:
        return
    names, codes = np.unique(np.asarray(conditions).astype(str), return_inverse=True)
    cells = np.bincount(codes, minlength=len(names))
    with_signal = np.bincount(codes, weights=(totals > 0).astype(np.float64), minlength=len(names))
    empty = np.flatnonzero(with_signal == 0)
    if empty.size:
        more = f" (and {empty.size - 1} more conditions like it)" if empty.size > 1 else ""
        raise CountValueError(
            f"count value check failed: condition {str(names[empty[0]])!r} has zero counts in all its "
            f"{int(cells[empty[0]])} cells{more} in {what}; remove it or check that its counts were loaded"
        )


def check_values(
    x: sp.csr_matrix, *, require_integers: bool, what: str = "the count matrix", conditions: np.ndarray | None = None
) -> None:
    """NaN/inf, negative values, (for count likelihoods) non-integer values, then empty signal."""
    _check_entries(x.data, require_integers=require_integers, what=what)
    check_signal(x, conditions, what=what)


#: entries checked at a time: whole-array temporaries of a million-cell matrix (hundreds of
#: millions of entries) cost more in page faults than the checks themselves (docs/SPEED.md)
CHECK_CHUNK = 1 << 20


def _check_entries(data: np.ndarray, *, require_integers: bool, what: str) -> None:
    if data.size == 0:
        return
    exact_integers = np.issubdtype(data.dtype, np.integer) or data.dtype == np.bool_
    for start in range(0, data.size, CHECK_CHUNK):
        _check_chunk(data[start:start + CHECK_CHUNK], data, exact_integers=exact_integers,
                     require_integers=require_integers, what=what)


def _check_chunk(chunk: np.ndarray, data: np.ndarray, *, exact_integers: bool, require_integers: bool,
                 what: str) -> None:
    """One chunk of ``data``'s entries; a failure is reported for the whole of ``data``."""
    if not exact_integers and not np.isfinite(chunk).all():
        n_bad = int(sum(int((~np.isfinite(data[s:s + CHECK_CHUNK])).sum()) for s in range(0, data.size, CHECK_CHUNK)))
        raise CountValueError(f"count value check failed: {what} contains {n_bad} NaN or infinite values; remove or impute them first")
    if chunk.min() < 0:
        raise CountValueError(
            f"count value check failed: {what} contains negative values (min {float(data.min()):g}); fedarches expects raw counts, "
            "not scaled or centred data (use the raw counts layer with --layer)"
        )
    if require_integers and not exact_integers:
        frac = np.abs(chunk - np.rint(chunk))
        if (frac > 1e-3).any():
            example = float(chunk[frac > 1e-3][0])
            raise CountValueError(
                f"count value check failed: {what} contains non-integer values (e.g. {example:g}) but the NB model needs raw "
                "integer counts; pass the counts layer with --layer, or use --model trvae for "
                "non-integer expression (e.g. RSEM estimates)"
            )


def condition_labels(adata: ad.AnnData, key: str, what: str = "condition") -> np.ndarray:
    """Per-cell condition (or label) names as a string array; refuses missing columns and values."""
    if key not in adata.obs.columns:
        cols = list(adata.obs.columns)
        shown = cols[:10] + (["..."] if len(cols) > 10 else [])
        raise ColumnError(f"obs column check failed: {what} key {key!r} is not a column of .obs (columns: {shown or 'none'})")
    col = adata.obs[key]
    if col.isna().any():
        raise ColumnError(
            f"obs column check failed: {what} column {key!r} has {int(col.isna().sum())} missing values; every cell needs a {what}"
        )
    return col.astype(str).to_numpy()

