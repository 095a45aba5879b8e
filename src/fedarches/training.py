"""Training loops for reference building and query fine-tuning.

One loop serves both; what differs is the data source. Reference training (and
query strategies that train the first encoder layer) reads dense minibatches
from the sparse matrix. Query training with frozen expression weights reads a
per-cell projection ``W_x x + b`` computed once (the first layer's expression
part cannot change), and for trVAE the reconstruction terms in the hidden
dimension, so later epochs never touch the gene dimension of the encoder (and,
for trVAE, of the decoder either).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from fedarches.config import TrainConfig
from fedarches.device import on_device, to_device
from fedarches.data.batches import (
    canonical_csr,
    chunked_rows,
    count_rows,
    dense_rows,
    lgamma_counts_per_row,
    minibatch_indices,
)
from fedarches.models.cvae import CVAE, MSETerms
from fedarches.query_fit import Convergence
from fedarches.threads import thread_limits


def default_epochs(n_cells: int) -> int:
    """scvi-tools' heuristic: about 400 epochs for 20k cells or fewer, fewer for larger data."""
    return int(min(400, max(10, round(20000 / max(n_cells, 1) * 400))))


class BatchSource(Protocol):
    n_cells: int

    def minibatches(self, rows: np.ndarray, batch_size: int,
                    rng: np.random.Generator | None) -> Iterator[np.ndarray]: ...

    def loss_kwargs(self, rows: np.ndarray) -> dict[str, object]: ...


class InMemoryBatches:
    """Any order of rows is cheap when the matrix is in memory: plain shuffled minibatches."""

    def minibatches(self, rows: np.ndarray, batch_size: int,
                    rng: np.random.Generator | None) -> Iterator[np.ndarray]:
        return minibatch_indices(rows, batch_size, rng)


def _count_terms(x: sp.csr_matrix, library: np.ndarray | None) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """NB sources read counts from the CSR's stored entries: canonicalise (no duplicate
    entries) and precompute each cell's constant sum of lgamma(x + 1) once."""
    if library is None:
        return x, None
    x = canonical_csr(x)
    return x, lgamma_counts_per_row(x)


def _cell_batch(condition: np.ndarray, labels: np.ndarray | None, rows: np.ndarray) -> dict[str, object]:
    kw: dict[str, object] = {"condition": torch.from_numpy(condition[rows])}
    if labels is not None:
        kw["labels"] = torch.from_numpy(labels[rows])
    return kw


def _matrix_batch(module: CVAE, x: sp.csr_matrix, library: np.ndarray | None, lgamma_x1: np.ndarray | None,
                  pos: np.ndarray, kw: dict[str, object]) -> dict[str, object]:
    """A minibatch's expression tensors from rows ``pos`` of ``x`` (what every matrix source trains on)."""
    if library is not None:
        assert lgamma_x1 is not None
        xb, kw["nonzeros"] = count_rows(x, pos, lgamma_x1)
        kw["library"] = torch.from_numpy(library[pos])
    else:
        xb = dense_rows(x, pos)
    kw["x_in"] = module.encoder_input(xb)
    kw["target"] = xb
    return kw


@dataclass
class MatrixSource(InMemoryBatches):
    """Minibatches straight from the (normalised, for trVAE) sparse matrix."""

    module: CVAE
    x: sp.csr_matrix
    condition: np.ndarray  # int64 condition indices
    library: np.ndarray | None  # float32, NB only
    labels: np.ndarray | None = None  # int64 label codes (-1 = unlabelled), label-aware reference only
    n_cells: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_cells = self.x.shape[0]
        self.x, self.lgamma_x1 = _count_terms(self.x, self.library)

    def loss_kwargs(self, rows: np.ndarray) -> dict[str, object]:
        return _matrix_batch(self.module, self.x, self.library, self.lgamma_x1, rows,
                             _cell_batch(self.condition, self.labels, rows))


@dataclass
class PreparedRows:
    """Rows of a matrix as the model trains on them (what a :class:`BackedSource` holds)."""

    rows: np.ndarray  # sorted file rows
    x: sp.csr_matrix  # normalised (trVAE) or canonical counts (NB), one row per entry of ``rows``
    library: np.ndarray | None
    lgamma_x1: np.ndarray | None


@dataclass
class BackedSource:
    """Minibatches from a matrix on disk, a buffer of a few row blocks at a time.

    Random rows of an ``.h5ad`` are one disk read each; contiguous blocks are one read
    per block. So an epoch visits the training rows in blocks of ``chunk_cells`` in a
    shuffled order, ``buffer_chunks`` blocks at a time, and shuffles minibatches within
    that buffer: memory is bounded by the buffer, not by the number of cells. With one
    block holding every row, the minibatches are exactly :class:`MatrixSource`'s.
    ``read``: sorted file rows -> :class:`PreparedRows` (normalisation per chunk).
    """

    module: CVAE
    read: Callable[[np.ndarray], PreparedRows]
    n_cells: int
    condition: np.ndarray  # int64 per file row
    labels: np.ndarray | None = None
    chunk_cells: int = 65536
    buffer_chunks: int = 4
    max_batches: int | None = None  # per call of minibatches (a fixed number of steps per epoch)
    buffer: PreparedRows | None = field(default=None, init=False, repr=False)

    def minibatches(self, rows: np.ndarray, batch_size: int,
                    rng: np.random.Generator | None) -> Iterator[np.ndarray]:
        blocks = [rows[s: s + self.chunk_cells] for s in range(0, len(rows), self.chunk_cells)]
        if rng is not None and len(blocks) > 1:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        done = 0
        for g in range(0, len(blocks), self.buffer_chunks):
            group = np.sort(np.concatenate(blocks[g: g + self.buffer_chunks]))
            self.buffer = None  # free the last buffer before reading the next
            self.buffer = self.read(group)
            for b in minibatch_indices(group, batch_size, rng):
                if self.max_batches is not None and rng is not None and done >= self.max_batches:
                    return
                done += 1
                yield b
        self.buffer = None

    def loss_kwargs(self, rows: np.ndarray) -> dict[str, object]:
        buf = self.buffer
        assert buf is not None, "loss_kwargs outside minibatches()"
        return _matrix_batch(self.module, buf.x, buf.library, buf.lgamma_x1, np.searchsorted(buf.rows, rows),
                             _cell_batch(self.condition, self.labels, rows))


def prepared_rows(rows: np.ndarray, x: sp.csr_matrix, library: np.ndarray | None) -> PreparedRows:
    """What :class:`MatrixSource` precomputes, for one buffer of rows."""
    x, lgamma = _count_terms(x, library)
    return PreparedRows(rows=rows, x=x, library=library, lgamma_x1=lgamma)


@dataclass
class ProjectedSource(InMemoryBatches):
    """Query data with the first encoder layer's expression part precomputed.

    Valid only while ``enc_in`` is frozen. For trVAE with a frozen output layer it
    also holds the MSE terms, so no gene-sized tensor is touched per step.
    """

    module: CVAE
    x: sp.csr_matrix
    condition: np.ndarray
    library: np.ndarray | None
    use_mse_terms: bool
    n_cells: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_cells = self.x.shape[0]
        self.x, self.lgamma_x1 = _count_terms(self.x, self.library)
        m = self.module
        h0 = m.config.hidden[0]
        self.projection = torch.empty(self.n_cells, h0)
        if self.use_mse_terms:
            self.c0 = torch.empty(self.n_cells)
            self.v = torch.empty(self.n_cells, m.out.in_features)
            self.gram = (m.out.weight.detach().t() @ m.out.weight.detach()).contiguous()
        with torch.no_grad():
            for rows in chunked_rows(self.n_cells):
                x = dense_rows(self.x, rows)
                sl = slice(int(rows[0]), int(rows[-1]) + 1)
                self.projection[sl] = m.encoder_projection(m.encoder_input(x))
                if self.use_mse_terms:
                    t = m.mse_terms(x)
                    self.c0[sl], self.v[sl] = t.c0, t.v

    def loss_kwargs(self, rows: np.ndarray) -> dict[str, object]:
        idx = torch.from_numpy(rows)
        kw: dict[str, object] = {
            "condition": torch.from_numpy(self.condition[rows]),
            "projection": self.projection[idx],
        }
        if self.use_mse_terms:
            kw["mse"] = MSETerms(c0=self.c0[idx], v=self.v[idx], gram=self.gram)
        elif self.library is not None:
            assert self.lgamma_x1 is not None
            kw["target"], kw["nonzeros"] = count_rows(self.x, rows, self.lgamma_x1)
            kw["library"] = torch.from_numpy(self.library[rows])
        else:
            kw["target"] = dense_rows(self.x, rows)
        return kw


@dataclass
class TrainHistory:
    epochs: int = 0
    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    setup_seconds: float = 0.0
    stopped_early: bool = False
    best_epoch: int = 0
    param_change: list[float] = field(default_factory=list)  # with a convergence rule: per epoch
    converged: bool = False


def _freeze_norm_statistics(module: nn.Module) -> None:
    """Batch-norm layers use (and keep) the reference's running statistics."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _batch(source: BatchSource, rows: np.ndarray, device: torch.device) -> dict[str, object]:
    return to_device(source.loss_kwargs(rows), device)  # type: ignore[no-any-return]


def _mean_loss(module: CVAE, source: BatchSource, rows: np.ndarray, batch_size: int, kl_weight: float,
               device: torch.device) -> float:
    was_training = module.training
    module.eval()
    total, n = 0.0, 0
    # The MMD is pairwise: its cost is quadratic in the batch size and its estimate
    # depends on it, so an MMD model is validated at the training batch size (the same
    # objective it is trained on); without MMD the loss is a sum over cells and the batch
    # size only sets speed: 256 cells keep the cell x gene intermediates in cache, where
    # 1024 measured slower per cell (benchmarks/NB_EPOCH.md).
    size = batch_size if module.config.mmd_weight > 0 else max(batch_size, 256)
    with torch.no_grad():
        for b in source.minibatches(rows, size, None):
            parts = module.loss(kl_weight=kl_weight, **_batch(source, b, device))
            total += float(parts.total) * len(b)
            n += len(b)
    module.train(was_training)
    return total / max(n, 1)


def train(
    module: CVAE,
    source: BatchSource,
    params: list[nn.Parameter],
    cfg: TrainConfig,
    *,
    query: bool,
    progress: bool = True,
    description: str = "training",
    converge: Convergence | None = None,
) -> TrainHistory:
    """Adam on ``params`` only, with gradient clipping, KL warm-up (reference only),
    a seeded validation split and early stopping that restores the best epoch.

    In query mode batch-norm statistics stay frozen: the reference's normalisation
    must not drift, or frozen tensors would change (invariant 2).
    ``converge``: also stop once the trained parameters stopped moving (``fedarches.query_fit``).
    """
    with thread_limits(cfg.threads, "training"), on_device(module, cfg.device) as device:
        return _train(module, source, params, cfg, query=query, progress=progress, description=description,
                      device=device, converge=converge)


def _train(module: CVAE, source: BatchSource, params: list[nn.Parameter], cfg: TrainConfig, *,
           query: bool, progress: bool, description: str, device: torch.device,
           converge: Convergence | None = None) -> TrainHistory:
    c = module.config
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    n = source.n_cells
    epochs = cfg.epochs if cfg.epochs is not None else default_epochs(n)
    order = rng.permutation(n)
    n_val = int(round(n * cfg.validation_fraction)) if n >= 50 else 0
    val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    warmup = 0 if query else (cfg.kl_warmup_epochs if cfg.kl_warmup_epochs is not None else max(1, epochs // 3))
    # fused: one kernel per step for all parameters instead of ~10 small ops per tensor
    # (a query step trains two or three small tensors and is dispatch-bound: 0.22 -> 0.09 ms)
    optim = torch.optim.Adam(params, lr=cfg.lr, eps=0.01, weight_decay=0.0 if query else cfg.weight_decay,
                             fused=True)
    history = TrainHistory()
    best = math.inf
    best_state = [p.detach().clone() for p in params]
    since_best = 0
    start = time.perf_counter()
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not progress, transient=False,
    )
    if converge is not None:
        converge.start(params)
    with bar:
        task = bar.add_task(description, total=epochs, loss="-")
        for epoch in range(epochs):
            t0 = time.perf_counter()
            kl_weight = c.kl_weight * (min(1.0, (epoch + 1) / warmup) if warmup else 1.0)
            module.train()
            if query:
                _freeze_norm_statistics(module)
            running, seen = 0.0, 0
            for rows in source.minibatches(train_rows, cfg.batch_size, rng):
                parts = module.loss(kl_weight=kl_weight, **_batch(source, rows, device))  # type: ignore[arg-type]
                optim.zero_grad(set_to_none=True)
                parts.total.backward()
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, c.grad_clip, foreach=True)
                optim.step()
                running += float(parts.total.detach()) * len(rows)
                seen += len(rows)
            train_loss = running / max(seen, 1)
            history.train_loss.append(train_loss)
            monitor = train_loss
            if n_val:
                monitor = _mean_loss(module, source, val_rows, cfg.batch_size, kl_weight, device)
                history.validation_loss.append(monitor)
            history.epoch_seconds.append(time.perf_counter() - t0)
            history.epochs = epoch + 1
            bar.update(task, advance=1, loss=f"{monitor:.4g}")
            # Early stopping only once the KL weight has reached its final value:
            # before that, losses of different epochs are not comparable.
            if epoch + 1 >= warmup:
                if monitor < best - 1e-4 * abs(best if math.isfinite(best) else 1.0):
                    best, since_best, history.best_epoch = monitor, 0, epoch + 1
                    best_state = [p.detach().clone() for p in params]
                else:
                    since_best += 1
                    if since_best >= cfg.early_stopping_patience:
                        history.stopped_early = True
                        break
            if converge is not None:
                change, done = converge.step(params)
                history.param_change.append(change)
                if done:
                    history.stopped_early = history.converged = True
                    break
    with torch.no_grad():
        for p, b in zip(params, best_state):
            p.copy_(b)
    module.eval()
    history.seconds = time.perf_counter() - start
    return history


def copy_module(module: CVAE) -> CVAE:
    """A deep copy, so surgery never mutates the model a caller still holds."""
    return copy.deepcopy(module)
