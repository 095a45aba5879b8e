"""Minibatches from a sparse matrix: the matrix stays CSR, and only the rows of
one minibatch are ever dense, so a million-cell reference fits in memory."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import gammaln

from fedarches.models.losses import RECURRENCE_COUNTS, Nonzeros


def dense_rows(x: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    """Rows of ``x`` as a dense float32 tensor, without densifying anything else."""
    return torch.from_numpy(x[rows].toarray().astype(np.float32, copy=False))


def canonical_csr(x: sp.csr_matrix) -> sp.csr_matrix:
    """``x`` with sorted, unique column indices per row (a copy only when needed).

    The NB likelihood reads counts straight from the stored entries (:func:`count_rows`);
    a duplicated entry would split one count in two there, while ``toarray`` sums it.
    """
    if x.has_canonical_format:
        return x
    x = x.copy()
    x.sum_duplicates()
    return x


def lgamma_counts_per_row(x: sp.csr_matrix) -> np.ndarray:
    """Per row: sum of lgamma(x + 1) over its stored counts (a constant of the data that
    the NB likelihood needs every step; computed once, in float64)."""
    vals = gammaln(np.asarray(x.data, dtype=np.float64) + 1.0)
    return np.add.reduceat(np.append(vals, 0.0), x.indptr[:-1]) * (np.diff(x.indptr) > 0)


def count_rows(x: sp.csr_matrix, rows: np.ndarray, lgamma_x1: np.ndarray) -> tuple[torch.Tensor, Nonzeros]:
    """Dense rows (as :func:`dense_rows`) plus where they are nonzero, from the CSR structure
    (``x`` in canonical format: see :func:`canonical_csr`)."""
    sub = x[rows]
    dense = torch.from_numpy(sub.toarray().astype(np.float32, copy=False))
    row_of = np.repeat(np.arange(len(rows), dtype=np.int64), np.diff(sub.indptr))
    flat = row_of * x.shape[1] + sub.indices.astype(np.int64)
    values = sub.data.astype(np.float32, copy=False)
    order, above = _by_count(values)
    if order is not None:
        flat, values = flat[order], values[order]
    nz = Nonzeros(flat=torch.from_numpy(flat), values=torch.from_numpy(values),
                  lgamma_x1=torch.tensor(float(lgamma_x1[rows].sum()), dtype=torch.float32), above=above)
    return dense, nz


def _by_count(values: np.ndarray) -> tuple[np.ndarray | None, tuple[int, ...] | None]:
    """An order of the entries, largest counts first in buckets 1 .. RECURRENCE_COUNTS + 1
    (larger counts share the top bucket), and ``above[k]`` = how many exceed k: what
    ``Nonzeros.above`` promises. (None, None) unless every entry is a whole count."""
    k_max = RECURRENCE_COUNTS
    if values.size == 0 or not np.array_equal(values, np.floor(values)) or values.min() < 0:
        return None, None
    bucket = np.minimum(values, k_max + 1).astype(np.int8)
    order = np.argsort(-bucket, kind="stable")
    per = np.bincount(bucket, minlength=k_max + 2)  # entries with bucket 0 .. k_max + 1
    above = np.cumsum(per[::-1])[::-1][1:]  # above[k] = entries with bucket > k, k = 0 .. k_max
    return order, tuple(int(v) for v in above)


def minibatch_indices(indices: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    """Shuffled (when ``rng`` is given) minibatches of ``indices``; a trailing batch of one
    cell is merged into the previous one because batch norm cannot use it."""
    order = rng.permutation(indices) if rng is not None else indices
    n = len(order)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < 2:
        starts.pop()
    for i, s in enumerate(starts):
        e = starts[i + 1] if i + 1 < len(starts) else n
        yield order[s:e]


def chunked_rows(n: int, chunk: int = 8192) -> Iterator[np.ndarray]:
    for s in range(0, n, chunk):
        yield np.arange(s, min(n, s + chunk))
