"""Minibatches from a sparse matrix: the matrix stays CSR, and only the rows of
one minibatch are ever dense, so a million-cell reference fits in memory."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch


def dense_rows(x: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    """Rows of ``x`` as a dense float32 tensor, without densifying anything else."""
    return torch.from_numpy(x[rows].toarray().astype(np.float32, copy=False))


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
