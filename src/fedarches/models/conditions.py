"""Condition weights held per condition NAME, apart from the expression weights.

A column of W_s in f(x, s) = act(W_x x + W_s s + b) is just a vector added to the
pre-activation for cells of condition s. Holding those vectors as rows keyed by
name (instead of columns of one wide input matrix) makes architecture surgery an
append, makes freezing structural (old rows live in blocks the optimiser never
sees) and lets a coordinator merge two sites' additions by name without index
collisions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConditionTable(nn.Module):
    """Rows of per-condition vectors, stored in blocks.

    Block 0 holds the conditions the model was built or loaded with; each
    surgery appends one block. ``trainable_block()`` is the newest block, which is
    all a ``conditions`` fine-tuning ever hands to the optimiser.
    """

    def __init__(self, width: int, names: Sequence[str] = (), init_std: float = 0.05) -> None:
        super().__init__()
        self.width = int(width)
        self.names: list[str] = []
        self.blocks = nn.ParameterList()
        if names:
            rows = torch.randn(len(names), self.width) * init_std
            self._append(list(names), rows)

    def _append(self, names: list[str], rows: torch.Tensor) -> nn.Parameter:
        dup = set(names) & set(self.names)
        if dup or len(set(names)) != len(names):
            raise ValueError(f"condition names already present or repeated: {sorted(dup) or names}")
        if rows.shape != (len(names), self.width):
            raise ValueError(f"rows have shape {tuple(rows.shape)}, expected ({len(names)}, {self.width})")
        param = nn.Parameter(rows.detach().clone().float())
        self.blocks.append(param)
        self.names.extend(names)
        return param

    def add_conditions(self, names: Sequence[str], rows: torch.Tensor | None = None) -> nn.Parameter:
        """Surgery: append new conditions. By default a new row starts at the mean of
        the existing rows, i.e. "an average study", a neutral start for fine-tuning."""
        names = list(names)
        if rows is None:
            base = self.weight().detach()
            start = base.mean(0) if base.shape[0] else torch.zeros(self.width)
            rows = start.expand(len(names), self.width).clone()
        return self._append(names, rows)

    def weight(self) -> torch.Tensor:
        if len(self.blocks) == 0:
            return torch.zeros(0, self.width)
        if len(self.blocks) == 1:
            return self.blocks[0]
        return torch.cat(list(self.blocks), dim=0)

    def trainable_block(self) -> nn.Parameter:
        return self.blocks[-1]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Vectors for the given condition indices (the one-hot product W_s s)."""
        return self.weight()[index]

    def rows(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Name -> row (detached copies), for saving and for contribution bundles."""
        w = self.weight().detach()
        wanted = self.names if names is None else list(names)
        pos = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in wanted if n not in pos]
        if missing:
            raise KeyError(f"conditions not in this table: {missing}")
        return {n: w[pos[n]].clone() for n in wanted}
