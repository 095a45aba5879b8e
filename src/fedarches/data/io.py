"""Reading user data files, with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad

from fedarches.errors import DataFileError


def read_h5ad(data: ad.AnnData | str | os.PathLike[str], what: str = "data file") -> ad.AnnData:
    """An AnnData passes through; a path is read, refusing a missing or foreign file."""
    if isinstance(data, ad.AnnData):
        return data
    p = Path(data)
    if not p.is_file():
        raise DataFileError(f"data file check failed: {what} {p} does not exist")
    try:
        return ad.read_h5ad(p)
    except Exception as exc:  # h5py/anndata raise many types for a foreign file
        raise DataFileError(f"data file check failed: {p} is not a readable .h5ad file ({type(exc).__name__}: {exc})") from exc
