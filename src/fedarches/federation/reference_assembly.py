"""The coordinator's last step: verified site slices + final shared weights -> a model directory.

Every bundle goes through ``format.bundle.read_bundle`` (format, canonical manifest,
tensor hashes) and then the checks that make it this build's: the signing site is
enrolled at this atlas and its key signed it, its parent is the digest of the final
shared weights (so slices trained against other weights never join them), it holds
exactly the studies the site declared in the statistics exchange, with this
model's shapes. The label parts are merged by label name (``ClassSummaries.merged``,
largest site first, so a label's calibration comes from the site with most cells
that introduced it), every label kept as the reference's own (`merged_summaries`), and
put in the label order of the model's classifier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fedarches.config import ModelConfig, TrainConfig
from fedarches.errors import AtlasMismatchError, ContributionContentError, EnrollmentError, ParentError, TensorShapeError
from fedarches.format.bundle import Bundle, read_bundle
from fedarches.format.tensor_keys import condition_key
from fedarches.labels.calibration import MODE_LEAVE_ONE_OUT
from fedarches.labels.summaries import ClassSummaries
from fedarches.models.cvae import CVAE
from fedarches.server.registry import SiteRegistry


@dataclass(frozen=True)
class SiteSlices:
    """One site's verified final contribution."""

    site: str
    studies: list[str]
    n_cells: int
    bundle: Bundle


def verify_slices(data: bytes, *, site: str, studies: Sequence[str], atlas: str, parent: str,
                  registry: SiteRegistry, config: ModelConfig, n_cells: int) -> SiteSlices:
    """One site's bundle, every check of this build (module docstring), or the check's error."""
    b = read_bundle(data)
    m = b.manifest
    if m.atlas != atlas:
        raise AtlasMismatchError(f"atlas check failed: the bundle of {site!r} is for atlas {m.atlas!r}, not {atlas!r}")
    if m.site != site or site not in registry.sites:
        raise EnrollmentError(f"enrollment check failed: the bundle names site {m.site!r}; the statistics came "
                              f"from {site!r}, enrolled: {site in registry.sites}")
    b.verify_signature(registry.sites[site].key())
    if m.parent != parent:
        raise ParentError(f"parent check failed: site {site!r} trained its slices against shared weights "
                          f"{m.parent[:12]}..., the build ended with {parent[:12]}...")
    if sorted(m.conditions) != sorted(studies):
        raise ContributionContentError(f"contribution content check failed: site {site!r} sent {m.conditions}, "
                                       f"it declared {sorted(studies)}")
    widths = {"encoder": config.hidden[0], "decoder": config.hidden[-1], "dispersion": config.n_genes}
    tables = ("encoder", "decoder", "dispersion") if config.kind == "nb" else ("encoder", "decoder")
    for s in studies:
        for t in tables:
            tensor = b.tensors.get(condition_key(t, s))
            if tensor is None or tuple(tensor.shape) != (widths[t],):
                raise TensorShapeError(f"tensor shape check failed: site {site!r} sent no {widths[t]}-vector "
                                       f"{condition_key(t, s)}")
    return SiteSlices(site=site, studies=list(studies), n_cells=int(n_cells), bundle=b)


def site_summaries(slices: Sequence[SiteSlices]) -> list[tuple[str, ClassSummaries]]:
    """(site, its class summaries) of every site that sent some, largest site first."""
    parts = [(s.n_cells, s.site, s.bundle) for s in slices if s.bundle.manifest.labels]
    return [(site, ClassSummaries.from_state({k: v.numpy() for k, v in b.label_tensors().items()},
                                             list(b.manifest.labels)))
            for _, site, b in sorted(parts, key=lambda p: (-p[0], p[1]))]


def merged_summaries(slices: Sequence[SiteSlices], categories: Sequence[str],
                     unsummarised: Sequence[str] = ()) -> ClassSummaries | None:
    """The sites' class summaries merged by label name (largest site first), in the
    classifier's label order (`merge_reference_summaries`)."""
    return merge_reference_summaries([p for _, p in site_summaries(slices)], categories, unsummarised)


def merge_reference_summaries(parts: Sequence[ClassSummaries], categories: Sequence[str],
                              unsummarised: Sequence[str] = ()) -> ClassSummaries | None:
    """``parts`` merged in this order by label name, restricted to ``categories`` (in that order).
    ``unsummarised``: labels of the classifier no site could summarise (`reference_site.summarisable`); they
    join with no component (`ClassSummaries.with_empty_labels`), as in a central build.

    ``ClassSummaries.merged`` marks a label that a later part introduces as added by a site
    after the reference (``MODE_SITE``), and the query-shift guard then reads scores only
    against the first part's labels. Here every label is the reference's own, trained by
    this model and calibrated at a site that holds it, so each keeps the calibration mode
    its site fitted. Why: with non-IID sites the largest site lacks some types, the guard
    took every query cell of those as a shifted state and divided all novelty scores by
    ~1.5, hiding the never-seen type (benchmarks/FEDERATED_REFERENCE.md, gen-noniid)."""
    merged: ClassSummaries | None = None
    modes: dict[str, int] = {}
    for part in parts:
        for label, mode in zip(part.label_categories, part.thresholds.label_calibration_mode):
            modes.setdefault(label, int(mode))  # the calibration of the part that introduced it
        merged = part if merged is None else merged.merged(part)
    if merged is None:
        return None
    merged = merged.with_empty_labels([c for c in unsummarised if c in categories])
    missing = sorted(set(categories) - set(merged.label_categories))
    if missing:
        raise ContributionContentError(f"contribution content check failed: no site summarised labels {missing}")
    own = np.array([modes.get(c, MODE_LEAVE_ONE_OUT) for c in merged.label_categories], dtype=np.int64)
    merged = replace(merged, thresholds=replace(merged.thresholds, label_calibration_mode=own))
    return merged.restricted(list(categories))


def assemble_module(config: ModelConfig, studies: Sequence[str], shared: Mapping[str, torch.Tensor],
                    slices: Sequence[SiteSlices]) -> CVAE:
    """The reference CVAE: final shared weights and every site's condition rows, by name."""
    module = CVAE(config, list(studies))
    state = module.state_dict()
    missing = sorted(set(module.shared_state_dict()) - set(shared) - {k for k in state if k.endswith("num_batches_tracked")})
    if missing:
        raise ContributionContentError(f"contribution content check failed: shared tensors {missing[:4]} missing")
    module.load_state_dict({**state, **{k: v.to(state[k].dtype) for k, v in shared.items()}})
    rows = {k: v for s in slices for k, v in s.bundle.condition_tensors().items()}
    with torch.no_grad():
        for tname, table in module.condition_tables().items():
            table.blocks[0].copy_(torch.stack([rows[condition_key(tname, n)] for n in table.names]))
    module.eval()
    return module


def save_reference(out: Path, module: CVAE, *, genes: list[str], condition_key_: str, label_key: str,
                   summaries: ClassSummaries | None, train: TrainConfig) -> Path:
    """The model directory ``Atlas.publish_federated_reference`` publishes."""
    from fedarches.model import FedArchesModel, SummaryIndex

    reference = None if summaries is None else SummaryIndex(categories=list(summaries.label_categories),
                                                            summaries=summaries)
    model = FedArchesModel(module, genes=genes, condition_key=condition_key_, train_config=train,
                           label_key=label_key if reference is not None else None, reference=reference)
    model.save(out)
    return out


def weighted_mean(parts: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Cell-weighted mean with Flower's own aggregation (FedBN's batch norm at the end)."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    records = [RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in p.items()}),
                           "metrics": MetricRecord({"num-examples": int(n)})}) for p, n in parts]
    return {k: v.numpy() for k, v in aggregate_arrayrecords(records, "num-examples").items()}


__all__ = ["SiteSlices", "assemble_module", "merge_reference_summaries", "merged_summaries", "site_summaries", "save_reference", "verify_slices", "weighted_mean"]
