"""The order condition names are listed in, shared by the model and the site planner.

Why one function: the order decides which conditions a round maps first and
the order surgery appends them in, so the CLI, the Python API and the Flower
client must agree on it byte for byte.
"""

from __future__ import annotations

import pandas as pd


def ordered_conditions(column: pd.Series) -> list[str]:
    """Names present in ``column``: category order when categorical (what users see), else sorted."""
    values = set(column.astype(str).tolist())
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [str(c) for c in column.cat.categories if str(c) in values]
    return sorted(values)
