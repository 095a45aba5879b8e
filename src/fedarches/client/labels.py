"""A site's label knowledge for the bundle (``site map --share-labels KEY``): class summaries of
its own labelled cells in the atlas latent.

Why planned before training: whether the version can take label summaries (it must hold
summaries itself), which labels have ``k_min`` cells and whether their names pass the name
policy are all known from the data and the fetched version, so a refusal costs no training.
Why only labels with >= ``k_min`` cells, fitted with nothing padded in: every component that
leaves the site must stand for at least ``k_min`` of its own cells of that label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from safetensors.numpy import load_file

from fedarches.data.validation import condition_labels
from fedarches.errors import LabelShareError
from fedarches.format.model_dir import LABELS
from fedarches.format.names import check_new_names
from fedarches.format.tensor_keys import label_key
from fedarches.format.version import AtlasVersion
from fedarches.labels.summaries import ClassSummaries, SummaryOptions


@dataclass(frozen=True)
class LabelSharePlan:
    """Which of the site's labels travel (>= ``k_min`` cells) and which stay (counts stay here);
    cells without a label (missing, or "Unknown") are not summarised."""

    key: str
    k_min: int
    shared: dict[str, int]
    left_out: dict[str, int]
    labels: np.ndarray = field(repr=False)  # per query cell

    def to_dict(self) -> dict[str, object]:
        return {"key": self.key, "k_min": self.k_min, "shared": dict(self.shared), "left_out": dict(self.left_out),
                "unlabelled": int((self.labels == UNLABELLED).sum())}


#: What a cell without a label of the site's own becomes (a missing value, or "Unknown": a call,
#: not an annotation); such cells are not summarised.
UNLABELLED = ""


def _site_labels(query: ad.AnnData, key: str) -> np.ndarray:
    if key not in query.obs.columns:
        condition_labels(query, key, what="label")  # the one missing-column message
    col = query.obs[key]
    labels = col.astype(str).to_numpy().astype(object)
    labels[col.isna().to_numpy() | np.isin(np.char.lower(labels.astype(str)), ["unknown", ""])] = UNLABELLED
    return labels


def _atlas_k_min(parent_dir: str | os.PathLike[str]) -> int:
    state = load_file(str(Path(parent_dir) / LABELS))
    return int(state["summaries/k_min"].reshape(-1)[0])


def plan_label_share(parent_dir: str | os.PathLike[str], parent: AtlasVersion, query: ad.AnnData,
                     key: str, strategy: str = "conditions") -> LabelSharePlan:
    """Refuse (``LabelShareError``) a version without label summaries, a branch strategy or data
    without a label of ``k_min`` cells; check the names of the labels that would travel."""
    if strategy != "conditions":
        raise LabelShareError(f"label share check failed: --share-labels needs --strategy conditions (a "
                              f"{strategy!r} contribution becomes a branch, which holds no label knowledge)")
    if LABELS not in parent.model.files:
        raise LabelShareError(
            f"label share check failed: atlas version {parent.number} holds its label knowledge as reference "
            "cells (--label-knowledge cells), which cannot take a site's label summaries; map without "
            "--share-labels, or ask the coordinator for an atlas built with --label-knowledge summaries"
        )
    k_min = _atlas_k_min(parent_dir)
    labels = _site_labels(query, key)
    names, counts = np.unique(labels[labels != UNLABELLED], return_counts=True)
    shared = {str(n): int(c) for n, c in zip(names, counts) if c >= k_min}
    left = {str(n): int(c) for n, c in zip(names, counts) if c < k_min}
    if not shared:
        raise LabelShareError(
            f"label share check failed: no label in column {key!r} has {k_min} cells (k_min of this atlas) "
            f"among the cells mapped now ({dict(sorted(left.items())[:5])}); map without --share-labels"
        )
    check_new_names(sorted(shared), kind="label")
    return LabelSharePlan(key=key, k_min=k_min, shared=shared, left_out=left, labels=labels)


def label_part(plan: LabelSharePlan, latent: np.ndarray, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The bundle's label tensors (``"labels/<field>"``) and label names in code order."""
    keep = np.isin(plan.labels, list(plan.shared))
    cats = sorted(plan.shared)
    summaries = ClassSummaries.fit(np.asarray(latent)[keep], plan.labels[keep], label_categories=cats,
                                   options=SummaryOptions(k_min=plan.k_min, small_labels="drop"), seed=seed)
    tensors = {label_key(k): torch.from_numpy(np.ascontiguousarray(v)) for k, v in summaries.state().items()}
    return tensors, list(summaries.label_categories)


__all__ = ["LabelSharePlan", "label_part", "plan_label_share"]
