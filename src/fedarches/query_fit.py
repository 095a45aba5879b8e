"""Which query cells fit the new condition rows, and when that fit has converged.

Why a subsample: with strategy ``conditions`` only the new conditions' rows train,
a few hundred to a few thousand numbers per study. They are study-level
parameters: a few hundred cells of a study determine them as well as a million
do, so fitting on every cell buys nothing but time. The subsample is drawn per
new condition (each study keeps its own cells, a small study all of them) and is
seeded, so the same input and seed give the same rows and the same bundle. Every
cell is embedded afterwards with the fitted rows (``FedArchesModel._latent``).

Why a convergence rule: a fixed schedule (400 epochs below 20k cells) keeps
stepping long after those few numbers stopped moving. Training stops once the
trained parameters change by less than ``tol`` (relative, over one epoch) for
``patience`` epochs in a row (:class:`Convergence`); the validation loss still picks
the epoch that is kept. docs/SPEED.md has the measurements behind the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedarches.config import CONVERGE_PATIENCE, DEFAULT_CONVERGE_TOL, DEFAULT_FIT_CELLS
from fedarches.errors import SettingError

__all__ = ["CONVERGE_PATIENCE", "DEFAULT_CONVERGE_TOL", "DEFAULT_FIT_CELLS", "Convergence", "check_fit_settings", "fit_rows"]



def check_fit_settings(fit_cells: object, converge_tol: object, lr: object = None) -> None:
    """``fit_cells``: a non-negative integer; ``converge_tol``: a finite number >= 0 (0: off);
    ``lr``: None (the reference's) or a finite number > 0."""
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                           or lr <= 0):
        raise SettingError(f"setting check failed: learning rate must be a finite number > 0, got {lr!r}")
    if isinstance(fit_cells, bool) or not isinstance(fit_cells, int) or fit_cells < 0:
        raise SettingError(f"setting check failed: fit cells must be an integer >= 0 (0 = every cell), "
                           f"got {fit_cells!r}")
    if isinstance(converge_tol, bool) or not isinstance(converge_tol, (int, float)) \
            or not math.isfinite(converge_tol) or converge_tol < 0:
        raise SettingError(f"setting check failed: convergence tolerance must be a finite number >= 0 "
                           f"(0 = off), got {converge_tol!r}")


def fit_rows(conditions: np.ndarray, rows: np.ndarray, fit_cells: int, seed: int) -> np.ndarray:
    """``rows`` (sorted indices of the new conditions' cells), at most ``fit_cells`` per
    condition, drawn without replacement with ``seed``; 0 keeps every row."""
    check_fit_settings(fit_cells, 0.0)
    rows = np.asarray(rows, dtype=np.int64)
    if fit_cells == 0:
        return rows
    rng = np.random.default_rng(seed)
    of_row = np.asarray(conditions)[rows]
    keep = []
    for name in sorted(set(of_row.tolist())):
        mine = rows[of_row == name]
        keep.append(mine if len(mine) <= fit_cells else rng.choice(mine, size=fit_cells, replace=False))
    return np.sort(np.concatenate(keep)) if keep else rows


@dataclass
class Convergence:
    """Relative change of the trained parameters per epoch, and whether it stayed below
    ``tol`` for ``patience`` epochs in a row."""

    tol: float
    patience: int = CONVERGE_PATIENCE

    def __post_init__(self) -> None:
        self._previous: list[torch.Tensor] | None = None
        self._below = 0

    def start(self, params: list[torch.nn.Parameter]) -> None:
        self._previous = [p.detach().clone() for p in params]
        self._below = 0

    def step(self, params: list[torch.nn.Parameter]) -> tuple[float, bool]:
        """After an epoch: (relative change since the last call, converged?)."""
        if self._previous is None:
            self.start(params)
            return math.inf, False
        with torch.no_grad():
            moved = math.sqrt(sum(float((p - q).pow(2).sum()) for p, q in zip(params, self._previous)))
            size = math.sqrt(sum(float(q.pow(2).sum()) for q in self._previous))
        change = moved / max(size, 1e-12)
        self._previous = [p.detach().clone() for p in params]
        self._below = self._below + 1 if change < self.tol else 0
        return change, self.tol > 0 and self._below >= self.patience
