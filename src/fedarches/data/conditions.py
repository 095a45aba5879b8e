"""Condition (study) names in a dataset: their order, and choosing studies by name.

Why one order function: the order decides which conditions a round maps first
and the order surgery appends them in, so the CLI, the Python API and the
Flower client must agree on it byte for byte. Why a selection function and not
"subset it in Python first": a coordinator with one h5ad of many studies should
say on the command line which of them the reference holds, and get a message
naming the study it mistyped.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from fedarches.errors import ColumnError, SettingError


def ordered_conditions(column: pd.Series) -> list[str]:
    """Names present in ``column``: category order when categorical (what users see), else sorted."""
    values = set(column.astype(str).tolist())
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [str(c) for c in column.cat.categories if str(c) in values]
    return sorted(values)


def parse_names(text: str | None) -> list[str] | None:
    """``"A,B , C"`` -> ``["A", "B", "C"]``; None or empty -> None (keep everything)."""
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    return names or None


def select_conditions(adata: ad.AnnData, key: str, names: Sequence[str] | None) -> ad.AnnData:
    """The cells of ``adata`` whose ``obs[key]`` is one of ``names`` (all cells when None)."""
    if names is None:
        return adata
    if key not in adata.obs:
        raise ColumnError(
            f"obs column check failed: {key!r} is not a column of the data "
            f"(obs has: {', '.join(map(str, list(adata.obs.columns)[:12]))})"
        )
    values = adata.obs[key].astype(str).to_numpy()
    present = sorted(set(values.tolist()))
    unknown = [n for n in names if n not in set(present)]
    if unknown:
        raise SettingError(
            f"setting check failed: --reference-studies {unknown} are not values of {key!r} "
            f"(it has {', '.join(present[:20])}{'...' if len(present) > 20 else ''})"
        )
    return adata[np.isin(values, list(names))].copy()
