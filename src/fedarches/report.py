"""Typed reports of a mapping and of a site's contribution.

Why typed: the map report is read by the CLI, written to ``report.json`` and
(in part) signed into bundles. With a dict, renaming a key silently dropped a
metric from every bundle; here the fields that travel in a bundle are marked on
the fields themselves (``metadata={"bundle": True}``) and a test pins their
names, so a rename breaks a test instead. ``to_dict`` keeps the key names
``report.json`` has always had, so existing readers keep working.

Timings and cell counts never travel: timings make equal inputs give unequal
bundles, and a count of a site's cells is information about its private data
that the merge does not need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedarches.format.metrics import MetricValue, sanitize_metrics

_BUNDLE = {"bundle": True}


def _travels() -> Any:
    """A required field that goes into bundle metrics."""
    return field(metadata=_BUNDLE)


@dataclass(frozen=True)
class LabelTransferSummary:
    """Label transfer on a query whose true labels are known (a benchmark or a QC run)."""

    n_known: int
    n_unseen: int
    accuracy_known: float | None = field(default=None, metadata=_BUNDLE)
    unseen_called_unknown: float | None = field(default=None, metadata=_BUNDLE)
    known_called_unknown: float | None = field(default=None, metadata=_BUNDLE)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MapReport:
    """What ``map_query`` did: surgery, training and (optionally) label transfer."""

    strategy: str = _travels()
    model: str = _travels()
    new_conditions: list[str] = field(default_factory=list)
    n_cells: int = 0
    n_cells_trained: int = 0
    gene_overlap: float = field(default=1.0, metadata=_BUNDLE)
    trainable_parameters: int = field(default=0, metadata=_BUNDLE)
    total_parameters: int = 0
    expected_trainable_parameters: int | None = None
    epochs: int = field(default=0, metadata=_BUNDLE)
    best_epoch: int | None = field(default=None, metadata=_BUNDLE)
    stopped_early: bool = field(default=False, metadata=_BUNDLE)
    seconds: float = 0.0
    setup_seconds: float = 0.0
    seconds_per_epoch: float | None = None
    final_loss: float | None = field(default=None, metadata=_BUNDLE)
    label_transfer: LabelTransferSummary | None = field(default=None, metadata=_BUNDLE)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.label_transfer is None:
            del out["label_transfer"]
        return out

    def bundle_metrics(self) -> dict[str, MetricValue]:
        """The marked fields, flattened with dotted names (``label_transfer.accuracy_known``)."""
        return sanitize_metrics(_marked(self))


def _marked(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if not f.metadata.get("bundle"):
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_marked(value, f"{prefix}{f.name}."))
        elif value is not None:
            out[f"{prefix}{f.name}"] = value
    return out


class PlanView(Protocol):
    """What a report needs of a ``client.plan.ContributionPlan`` (kept as a protocol
    so this module, which ``model.py`` imports, does not import ``client``)."""

    present: list[str]
    held: list[str]
    new: list[str]


@dataclass(frozen=True)
class AtlasRef:
    """The atlas version a site mapped onto."""

    name: str
    version: int
    id: str
    branch: str
    url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BundleInfo:
    """The signed bundle a site wrote: its size against the paper's formula, digest and key."""

    file: str
    bytes: int
    header_bytes: int
    tensor_bytes: int
    formula_tensor_bytes: int | None
    digest: str
    key_id: str
    metrics: dict[str, MetricValue]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "metrics": dict(self.metrics)}


@dataclass(frozen=True)
class SiteReport:
    """``report.json`` of ``fedarches site map``: the outcome, the plan and (when mapped) the rest."""

    status: str
    site: str
    atlas: AtlasRef
    plan: PlanView
    map: MapReport | None = None
    bundle: BundleInfo | None = None
    # --share-labels: the key, k_min, labels shared and left out with their cell counts (stays here)
    labels: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = self.map.to_dict() if self.map is not None else {}
        out["status"] = self.status
        out["site"] = self.site
        out["atlas"] = self.atlas.to_dict()
        out["plan"] = {"present": list(self.plan.present), "held": list(self.plan.held), "new": list(self.plan.new)}
        if self.bundle is not None:
            out["bundle"] = self.bundle.to_dict()
        if self.labels is not None:
            out["labels"] = dict(self.labels)
        return out


__all__ = [
    "AtlasRef",
    "BundleInfo",
    "LabelTransferSummary",
    "MapReport",
    "PlanView",
    "SiteReport",
]
