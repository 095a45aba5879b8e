"""Merging condition vectors by name: the one merge both the coordinator and the Python API use.

Why by name: a condition is a row per condition table (``encoder``,
``decoder``, for NB models ``dispersion``) keyed ``"<table>/<name>"``, so two
sites that each add their own studies never collide on a column index. Why
sorted: new names are appended in sorted order, so the same additions merged
in any order give the same tensors, the same manifest and the same version id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedarches.errors import ConditionCollisionError, TensorShapeError, TensorValueError
from fedarches.format.tensor_keys import condition_key, split_condition_key


def table_templates(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One vector per table of ``tensors``: the width and dtype a new condition needs there."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        out.setdefault(split_condition_key(key)[0], t)
    return out


def _group_by_name(
    addition: Mapping[str, torch.Tensor], tables: Mapping[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{name: {table: vector}}`` after checking every vector fits its table."""
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in addition.items():
        table, name = split_condition_key(key)
        ref = tables.get(table)
        if ref is None:
            raise TensorShapeError(
                f"tensor shape check failed: {key} names table {table!r}; the model has {sorted(tables)}"
            )
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise TensorShapeError(
                f"tensor shape check failed: {key} is {t.dtype}{list(t.shape)}, the model needs "
                f"{ref.dtype}{list(ref.shape)}"
            )
        if not torch.isfinite(t).all():
            raise TensorValueError(f"tensor value check failed: {key} has NaN or infinite values")
        by_name.setdefault(name, {})[table] = t
    for name, parts in by_name.items():
        if set(parts) != set(tables):
            missing = sorted(set(tables) - set(parts))
            raise TensorShapeError(
                f"tensor shape check failed: condition {name!r} lacks its vectors for tables {missing} "
                "(one vector per condition table)"
            )
    return by_name


def merge_conditions(
    conditions: Sequence[str],
    tensors: Mapping[str, torch.Tensor],
    additions: Sequence[Mapping[str, torch.Tensor]],
    *,
    tables: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``conditions`` plus every condition in ``additions``, and the merged name-keyed tensors.

    ``tensors`` holds ``"<table>/<name>"`` vectors of ``conditions``;
    ``tables`` (default: taken from ``tensors``) gives one vector per table
    whose shape and dtype every new vector must have. Refuses a name already
    present or claimed by two additions. New names come after the old ones,
    sorted, whatever the order of ``additions``.
    """
    tables = dict(tables) if tables is not None else table_templates(tensors)
    present = set(conditions)
    claimed: dict[str, int] = {}
    merged = dict(tensors)
    for i, addition in enumerate(additions):
        for name, parts in _group_by_name(addition, tables).items():
            if name in present:
                raise ConditionCollisionError(f"condition collision: {name!r} is already in the model")
            if name in claimed:
                raise ConditionCollisionError(
                    f"condition collision: {name!r} is claimed by additions {claimed[name]} and {i}"
                )
            claimed[name] = i
            merged.update({condition_key(table, name): t for table, t in parts.items()})
    return [*conditions, *sorted(claimed)], merged


__all__ = ["merge_conditions", "table_templates"]
