"""A reference ``.h5ad`` read from disk in row blocks, never whole.

Why: reference training held the whole CSR matrix (and its normalised copy) in
memory, so the number of cells a machine could train on was bounded by its RAM.
Here the matrix stays in the file; only ``indptr`` and a few per-cell vectors
(condition, library size, labels, the final latent) are held, and every pass over
the counts (value checks, gene statistics, minibatches, the final encoder pass)
reads contiguous row blocks of ``chunk_cells`` cells through h5py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from fedarches.errors import ColumnError, DataFileError, SettingError

#: Rows apart beyond which two wanted rows are read with two reads instead of one.
READ_GAP = 4096
#: Most file rows one read covers (a wanted run longer than this is read in pieces).
READ_SPAN = 16384


@dataclass(frozen=True)
class ChunkSettings:
    """How much of the matrix is in memory at once: ``buffer_chunks`` blocks of ``chunk_cells``
    cells while training (minibatches are shuffled within that buffer), one block in the other
    passes. ``max_steps``: minibatches per epoch (None: every training cell once)."""

    chunk_cells: int = 65536
    buffer_chunks: int = 4
    max_steps: int | None = None

    def check(self) -> "ChunkSettings":
        for name in ("chunk_cells", "buffer_chunks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise SettingError(f"setting check failed: {name} must be a positive integer, got {v!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, (int, np.integer)) or self.max_steps < 1):
            raise SettingError(f"setting check failed: max_steps must be a positive integer or None, "
                               f"got {self.max_steps!r}")
        return self


class CSRFile:
    """Row blocks of the CSR matrix ``X`` (or ``layers/<layer>``) of an ``.h5ad``, via h5py."""

    def __init__(self, path: str | os.PathLike[str], layer: str | None = None) -> None:
        self.path = Path(path)
        self._file = h5py.File(self.path, "r")
        name = "X" if layer is None else f"layers/{layer}"
        if name not in self._file:
            self.close()
            raise ColumnError(f"obs column check failed: {self.path} has no {name!r} matrix")
        group = self._file[name]
        kind = group.attrs.get("encoding-type", "") if isinstance(group, h5py.Group) else "array"
        if kind != "csr_matrix":
            self.close()
            raise SettingError(
                f"setting check failed: out-of-core training reads a CSR matrix, but {name} in {self.path} is "
                f"{kind or 'not a sparse matrix'}; rewrite it as CSR (adata.X = scipy.sparse.csr_matrix(adata.X); "
                "adata.write_h5ad(...)) or train in memory"
            )
        self.shape = tuple(int(v) for v in group.attrs["shape"])
        self._data, self._indices = group["data"], group["indices"]
        self.indptr = np.asarray(group["indptr"][...], dtype=np.int64)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "CSRFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def range(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as float32 CSR (one read of each array)."""
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        data = np.asarray(self._data[a:b], dtype=np.float32)
        indices = np.asarray(self._indices[a:b], dtype=np.int32)
        return sp.csr_matrix((data, indices, self.indptr[start: stop + 1] - a), shape=(stop - start, self.shape[1]))

    def rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Sorted ``rows``, reading each run of nearby rows once, at most ``READ_SPAN`` file rows
        per read (so a sparse selection, such as the validation cells, never reads a whole
        stretch of the file into memory at once)."""
        if len(rows) == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        cuts = np.flatnonzero((np.diff(rows) > READ_GAP) | (np.diff(rows // READ_SPAN) != 0)) + 1
        parts = []
        for run in np.split(rows, cuts):
            lo, hi = int(run[0]), int(run[-1]) + 1
            block = self.range(lo, hi)
            parts.append(block if len(run) == hi - lo else block[run - lo])
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")


@dataclass
class BackedData:
    """An ``.h5ad`` whose cell and gene tables are in memory and whose matrix is not.

    ``rows``: the file rows it stands for (sorted), e.g. the reference studies of a file
    that holds more; None = every row.
    """

    path: Path
    obs: pd.DataFrame
    var_names: pd.Index
    layer: str | None = None
    rows: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], layer: str | None = None) -> "BackedData":
        try:
            from anndata.io import read_elem
        except ImportError:  # anndata < 0.11
            from anndata.experimental import read_elem

        p = Path(path)
        if not p.is_file():
            raise DataFileError(f"data file check failed: data file {p} does not exist")
        try:
            with h5py.File(p, "r") as f:
                obs, var = read_elem(f["obs"]), read_elem(f["var"])
        except Exception as exc:  # h5py/anndata raise many types for a foreign file
            raise DataFileError(f"data file check failed: {p} is not a readable .h5ad file "
                                f"({type(exc).__name__}: {exc})") from exc
        return cls(path=p, obs=obs, var_names=pd.Index(var.index.astype(str)), layer=layer)

    @classmethod
    def from_anndata(cls, adata: ad.AnnData, layer: str | None = None) -> "BackedData":
        """A backed AnnData (``read_h5ad(path, backed="r")``) or a row subset (view) of one."""
        full = cls.open(adata.filename, layer)
        if not adata.is_view:
            return full
        pos = full.obs.index.get_indexer(adata.obs_names)
        return full.subset(np.unique(pos))

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        return len(self.var_names)

    def file_rows(self) -> np.ndarray:
        return np.arange(self.n_obs, dtype=np.int64) if self.rows is None else self.rows

    def subset(self, positions: np.ndarray) -> "BackedData":
        """The cells at sorted ``positions`` (of this object's cells)."""
        return replace(self, obs=self.obs.iloc[positions], rows=self.file_rows()[positions])

    def select(self, key: str, names: Sequence[str] | None) -> "BackedData":
        """As ``data.conditions.select_conditions``: the cells whose ``obs[key]`` is one of ``names``."""
        if names is None:
            return self
        from fedarches.data.conditions import select_conditions

        # the same checks and messages, on a matrix-free AnnData of the obs table
        probe = ad.AnnData(obs=self.obs[[key]] if key in self.obs else self.obs.iloc[:, :0])
        select_conditions(probe, key, names)
        keep = np.flatnonzero(np.isin(self.obs[key].astype(str).to_numpy(), list(names)))
        return self.subset(keep)

    def matrix(self) -> CSRFile:
        return CSRFile(self.path, self.layer)

    def blocks(self, reader: CSRFile, chunk_cells: int) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """(positions among this object's cells, their raw rows) in order, ``chunk_cells`` at a time."""
        rows = self.file_rows()
        for s in range(0, len(rows), chunk_cells):
            pos = np.arange(s, min(len(rows), s + chunk_cells))
            yield pos, reader.rows(rows[pos])


def is_backed(data: object) -> bool:
    """Data that :func:`as_backed` takes: a path, a :class:`BackedData` or a backed AnnData."""
    return isinstance(data, (str, os.PathLike, BackedData)) or (isinstance(data, ad.AnnData) and data.isbacked)


def as_backed(data: object, layer: str | None = None) -> BackedData:
    if isinstance(data, BackedData):
        return data if layer is None else replace(data, layer=layer)
    if isinstance(data, ad.AnnData):
        return BackedData.from_anndata(data, layer)
    return BackedData.open(data, layer)  # type: ignore[arg-type]


def scan_reference(data: BackedData, reader: CSRFile, conditions: np.ndarray, n_genes: int, *,
                   require_integers: bool, chunk_cells: int) -> list[str]:
    """The input checks and the gene choice of the in-memory path, in streamed passes.

    Pass 1 checks every value (``validation``'s rules) and sums what the checks and the
    gene statistics need; pass 2 (only when genes are chosen) sums the clipped counts.
    Returns the model's genes: the same list ``select_genes`` picks on the whole matrix.
    """
    from fedarches.data.genes import StreamedGeneStats
    from fedarches.data.validation import _check_entries, check_signal

    genes = data.var_names.tolist()
    stats = StreamedGeneStats(conditions, len(genes)) if 0 < n_genes < len(genes) else None
    totals = np.zeros(data.n_obs)
    for pos, x in data.blocks(reader, chunk_cells):
        _check_entries(x.data, require_integers=require_integers, what="the count matrix")
        totals[pos] = np.asarray(x.sum(axis=1)).ravel()
        if stats is not None:
            stats.add(x, conditions[pos])
    check_signal(sp.csr_matrix(totals[:, None]), conditions)
    if stats is None:
        return genes
    try:
        reg_std = stats.fit()
    except (ValueError, ZeroDivisionError, np.linalg.LinAlgError) as exc:
        raise SettingError(
            f"setting check failed: the streamed gene selection (seurat_v3 per study) failed on this data "
            f"({type(exc).__name__}: {exc}); a study may be too small or degenerate. Train in memory (which "
            "falls back to dispersion-based selection) or pass n_genes=0 (--n-genes 0) to keep every gene"
        ) from exc
    for pos, x in data.blocks(reader, chunk_cells):
        stats.add_clipped(x, conditions[pos])
    return stats.select(genes, n_genes, reg_std)
