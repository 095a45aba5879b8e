"""What a site's mapped model adds to the atlas version it mapped onto.

Why the bundle is computed by *diffing* the site's mapped model against the
fetched parent instead of asking the model for "the new rows": the diff proves
invariant 2 at the point where it matters. Every tensor of the parent is
compared by sha256 with the site's model; for strategy ``conditions`` any
difference outside the new condition vectors is refused before anything is
signed, so a training bug can never ship altered shared weights under a
"conditions only" label. For ``input-layers`` / ``full`` the changed tensors
are exactly what goes into the (branch) bundle.
"""

from __future__ import annotations

import os

import torch

from fedarches.config import Strategy
from fedarches.errors import ContributionContentError, FrozenWeightsError
from fedarches.format.canonical import tensor_sha256
from fedarches.format.model_dir import CONDITIONS, WEIGHTS, load_model_dir
from fedarches.format.identity import condition_id
from fedarches.format.tensor_keys import condition_key, shared_key, split_condition_key


def _own_name(cid: str, site: str | None) -> str:
    """The site's own name for a new condition id (bundles carry names; intake qualifies them)."""
    prefix = condition_id(site, "")
    return cid[len(prefix):] if prefix and cid.startswith(prefix) else cid


def contribution_tensors(
    parent_dir: str | os.PathLike[str],
    site_model_dir: str | os.PathLike[str],
    strategy: Strategy,
    site: str | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What the site's model adds to (and, for branch strategies, changes in) the parent.

    Returns ``(tensors, new_condition_names)`` with bundle keys: the new
    conditions under the site's own names (their ids in the site's model are
    qualified by ``site``). Raises ``FrozenWeightsError`` when a ``conditions``
    mapping moved any shared tensor.
    """
    pman, pblobs = load_model_dir(parent_dir)
    sman, sblobs = load_model_dir(site_model_dir)
    if sman.genes != pman.genes or sman.config != pman.config:
        raise ContributionContentError(
            "contribution check failed: the site model's genes or architecture differ from the atlas version"
        )
    if sman.conditions[: len(pman.conditions)] != pman.conditions:
        raise ContributionContentError(
            "contribution check failed: the site model does not extend the atlas version's conditions"
        )
    held = set(pman.conditions)
    new = [c for c in sman.conditions if c not in held]
    if not new:
        raise ContributionContentError("contribution check failed: the site model adds no condition")
    tensors: dict[str, torch.Tensor] = {}
    for k, t in sblobs[CONDITIONS].items():
        table, cid = split_condition_key(k)
        if cid in new:
            tensors[condition_key(table, _own_name(cid, site))] = t
    changed: list[str] = []
    for blob in (WEIGHTS, CONDITIONS):
        for key, before in pblobs[blob].items():
            after = sblobs[blob].get(key)
            if after is None:
                raise ContributionContentError(f"contribution check failed: the site model lost tensor {blob}/{key}")
            if tensor_sha256(after) != tensor_sha256(before):
                changed.append(f"{blob}/{key}")
                tensors[shared_key(blob, key)] = after
    if changed and strategy == "conditions":
        raise FrozenWeightsError(
            f"frozen weights check failed: strategy 'conditions' must leave every shared tensor byte-identical, "
            f"but {len(changed)} changed (first: {changed[0]}); refusing to sign this contribution"
        )
    return tensors, [_own_name(c, site) for c in new]


__all__ = ["contribution_tensors"]
