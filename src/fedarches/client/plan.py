"""Which of a site's conditions an atlas version still lacks: THE new-condition detection.

Why one function: the CLI, the Python API and the Flower client must reach the
same verdict on the same data ("nothing new" is an outcome, not an error, in
all three), and map the same cells in the same order. It is also where the
name policy (``format.names``) meets every new condition name, so a bad name
is refused before any training, not after.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from anndata import AnnData

from fedarches.data.conditions import ordered_conditions
from fedarches.errors import ColumnError
from fedarches.format.names import check_new_names


@dataclass(frozen=True)
class ContributionPlan:
    """What a site's data holds relative to one atlas version."""

    present: list[str]  # conditions in the data, in the column's category order (else sorted)
    held: list[str]  # of those, the ones the atlas version already holds
    new: list[str]  # the ones to map now

    @property
    def nothing_new(self) -> bool:
        return not self.new

    def to_dict(self) -> dict[str, list[str]]:
        return {"present": list(self.present), "held": list(self.held), "new": list(self.new)}


def plan_contribution(
    adata: AnnData, condition_key: str, held_conditions: Iterable[str], *, conditions_per_round: int = 0
) -> ContributionPlan:
    """Split the data's conditions into held and new; ``conditions_per_round`` > 0 caps the new ones.

    Every new name (also those past the cap) must pass ``check_name`` against
    the held ones and each other: raises ``InvalidNameError`` otherwise.
    """
    if condition_key not in adata.obs.columns:
        cols = [str(c) for c in adata.obs.columns]
        shown = cols[:10] + (["..."] if len(cols) > 10 else [])
        raise ColumnError(
            f"obs column check failed: condition key {condition_key!r} is not a column of .obs "
            f"(columns: {shown or 'none'})"
        )
    column = adata.obs[condition_key]
    if column.isna().any():
        raise ColumnError(
            f"obs column check failed: condition column {condition_key!r} has {int(column.isna().sum())} "
            "missing values; every cell needs a condition"
        )
    if conditions_per_round < 0:
        raise ValueError(f"conditions_per_round must be >= 0, got {conditions_per_round}")
    present = ordered_conditions(column)
    known = set(held_conditions)
    held = [c for c in present if c in known]
    new = check_new_names([c for c in present if c not in known], kind="condition", existing=known)
    if conditions_per_round > 0:
        new = new[:conditions_per_round]
    return ContributionPlan(present=present, held=held, new=new)


__all__ = ["ContributionPlan", "ordered_conditions", "plan_contribution"]
