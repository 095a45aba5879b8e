"""Label knowledge at the coordinator: checking a bundle's label part and merging it by name.

Why the coordinator judges conflicts itself rather than trusting a site's report: it holds
the atlas' summaries and the site's components (means standing for >= k_min cells each), so
it can ask the atlas what it calls each component. A site label whose cells the atlas calls
another known label with confidence (more than half of the label's cells, counted by
component, in components whose mean the atlas calls one other label, not Unknown: low
uncertainty and not novel) is a naming clash or an annotation error; merging it would teach every later site a
wrong name, so it is reported and left out, and the rest of the bundle merges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedarches.errors import LabelPartError, LabelStateError
from fedarches.format.bundle import Bundle, label_values_finite
from fedarches.format.canonical import sha256_bytes
from fedarches.format.model_dir import LABELS
from fedarches.format.names import check_new_names
from fedarches.format.version import AtlasVersion, BlobRef, LabelRecord
from fedarches.labels.summaries import ClassSummaries
from fedarches.server.store import VersionStore, save_tensors

#: A site label is a conflict when more than this share of its cells lie in components the
#: atlas calls one other known label, not Unknown (uncertainty within the atlas' own
#: threshold and not novel: what a site mapping those cells would be told).
CONFLICT_SHARE = 0.5
_STATE_PREFIX = "summaries/"
_PER_LABEL_FIELDS = ("label_thresholds", "label_calibration_mode", "label_threshold_kind", "calibration_counts")


@dataclass(frozen=True)
class LabelConflict:
    """A site label the atlas already calls another label: reported, not merged."""

    site: str
    label: str
    called: str
    share: float  # of the label's site cells, counted by component
    contribution: str

    def line(self) -> str:
        return (f"label conflict: site {self.site!r} label {self.label!r}: the atlas calls {self.share:.0%} of its "
                f"cells {self.called!r}; not merged (rename or re-annotate it and map again)")


def atlas_summaries(version: AtlasVersion, store: VersionStore) -> ClassSummaries | None:
    """The version's label summaries, or None for a version without them (``cells``, branches)."""
    if LABELS not in version.blobs or not version.model.label_key:
        return None
    state = {k[len(_STATE_PREFIX):]: v.numpy() for k, v in store.tensors(version, LABELS).items()
             if k.startswith(_STATE_PREFIX)}
    return ClassSummaries.from_state(state, version.model.label_categories)


def check_label_part(bundle: Bundle, target: AtlasVersion, atlas: ClassSummaries | None) -> ClassSummaries | None:
    """The bundle's label summaries, checked against the version they land on (None without a part).

    Refuses (``LabelPartError``): a part for a version without summaries, fields other than the
    atlas state's, other dtypes, values that are not finite, a state ``from_state`` refuses,
    another latent dimension, a k_min below the atlas' or a component below it, a label
    without a component, a new name that clashes with an atlas label by case or look-alike.
    """
    names = list(bundle.manifest.labels)
    if not names:
        return None
    where = f"label part check failed: bundle {bundle.source}"
    if atlas is None:
        raise LabelPartError(f"{where} shares labels, but version {target.number} holds no label summaries "
                             "(built with --label-knowledge cells, or a branch); map without --share-labels")
    part = bundle.label_tensors()
    expected = {k: np.asarray(v) for k, v in atlas.state().items()}
    if set(part) != set(expected):
        raise LabelPartError(f"{where} has label fields missing {sorted(set(expected) - set(part))[:5]}, "
                             f"unknown {sorted(set(part) - set(expected))[:5]}")
    for k, t in part.items():
        if str(t.dtype).removeprefix("torch.") != str(expected[k].dtype) or t.ndim != expected[k].ndim:
            raise LabelPartError(f"{where}: field {k} is {t.dtype} with {t.ndim} dimensions, expected "
                                 f"{expected[k].dtype} with {expected[k].ndim}")
        want = _expected_shape(k, expected[k].shape, len(names), part)
        if tuple(t.shape) != want:
            raise LabelPartError(f"{where}: field {k} has shape {tuple(t.shape)}, expected {want}")
        if not label_values_finite(k, t):
            raise LabelPartError(f"{where}: field {k} holds values that are not finite")
    try:
        added = ClassSummaries.from_state({k: t.numpy() for k, t in part.items()}, names)
    except (LabelStateError, ValueError, IndexError) as exc:
        raise LabelPartError(f"{where}: {exc}") from exc
    _check_against_atlas(added, atlas, where)
    return added


def _expected_shape(key: str, atlas_shape: tuple[int, ...], n_labels: int,
                    part: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """A field's shape in a part of ``n_labels`` labels: per component, per label, or as the atlas'."""
    if key.startswith("component_"):
        comps = part.get("component_label")
        return (int(comps.shape[0]) if comps is not None and comps.ndim == 1 else -1, *atlas_shape[1:])
    if key in _PER_LABEL_FIELDS or (key.startswith("gaussian.") and key != "gaussian.fpr"):
        return (n_labels, *atlas_shape[1:])
    return tuple(atlas_shape)


def _check_against_atlas(added: ClassSummaries, atlas: ClassSummaries, where: str) -> None:
    c = added.components
    if added.n_dims != atlas.n_dims or c.means.shape[1:] != (atlas.n_dims,):
        raise LabelPartError(f"{where}: summaries in {added.n_dims} dimensions, the atlas latent has {atlas.n_dims}")
    k_min = atlas.options.k_min
    if added.options.k_min < k_min or (c.n and int(c.count.min()) < k_min):
        raise LabelPartError(f"{where}: a component stands for {int(c.count.min()) if c.n else 0} cells "
                             f"(k_min {added.options.k_min}); this atlas publishes none under {k_min}")
    empty = sorted(set(range(len(added.label_categories))) - set(c.label.tolist()))
    if empty:
        raise LabelPartError(f"{where}: label {added.label_categories[empty[0]]!r} has no component")
    new = [n for n in added.label_categories if n not in atlas.label_categories]
    check_new_names(new, kind="label", existing=atlas.label_categories)


def label_conflicts(atlas: ClassSummaries, added: ClassSummaries, site: str, digest: str) -> list[LabelConflict]:
    """The added labels whose components the atlas calls one other known label with confidence."""
    res = atlas.predict(added.components.means, adapt_to_query=False)
    pred = res.prediction.astype(str)
    sure = ~res.is_unknown
    out = []
    for y, name in enumerate(added.label_categories):
        rows = added.components.label == y
        counts = added.components.count[rows].astype(np.float64)
        calls = pred[rows]
        for other in sorted(set(calls[sure[rows]]) - {name}):
            share = float(counts[(calls == other) & sure[rows]].sum() / counts.sum())
            if share > CONFLICT_SHARE:
                out.append(LabelConflict(site=site, label=name, called=str(other), share=share, contribution=digest))
    return out


@dataclass(frozen=True)
class LabelSource:
    """One bundle's checked label part, with who sent it."""

    site: str
    digest: str
    summaries: ClassSummaries


def merge_label_parts(target: AtlasVersion, atlas: ClassSummaries, sources: Sequence[LabelSource],
                      number: int) -> tuple[ClassSummaries, list[LabelRecord], list[LabelConflict]]:
    """Grow ``atlas`` by every source's labels except conflicts, in (site, digest) order so the
    result does not depend on the order bundles arrived in. Conflicts are judged against the
    target's own summaries."""
    grown, records, conflicts = atlas, list(target.labels), []
    for src in sorted(sources, key=lambda s: (s.site, s.digest)):
        refused = label_conflicts(atlas, src.summaries, src.site, src.digest)
        conflicts.extend(refused)
        keep = [n for n in src.summaries.label_categories if n not in {c.label for c in refused}]
        if not keep:
            continue
        added = src.summaries.restricted(keep)
        start = grown.n_components
        grown = grown.merged(added)
        for y, name in enumerate(added.label_categories):
            idx = np.flatnonzero(added.components.label == y)
            records.append(LabelRecord(name=name, site=src.site, introduced_in=number, contribution=src.digest,
                                       components=[start + int(i) for i in idx],
                                       cells=[int(added.components.count[i]) for i in idx]))
    return grown, records, conflicts


def labels_blob(summaries: ClassSummaries) -> tuple[bytes, BlobRef]:
    """``labels.safetensors`` of grown summaries (the model directory's layout)."""
    data = save_tensors({_STATE_PREFIX + k: torch.from_numpy(np.ascontiguousarray(v))
                         for k, v in summaries.state().items()})
    return data, BlobRef(sha256=sha256_bytes(data), length=len(data))


def reference_label_records(model_labels: dict[str, torch.Tensor], categories: Sequence[str]) -> list[LabelRecord]:
    """Version 1's label provenance: every component from the reference (the coordinator)."""
    from fedarches.format.identity import REFERENCE_SITE

    label = model_labels.get(_STATE_PREFIX + "component_label")
    count = model_labels.get(_STATE_PREFIX + "component_count")
    if label is None or count is None:
        return []
    lab, cnt = label.numpy(), count.numpy()
    return [LabelRecord(name=str(n), site=REFERENCE_SITE, introduced_in=1, components=np.flatnonzero(lab == y).tolist(),
                        cells=[int(c) for c in cnt[lab == y]]) for y, n in enumerate(categories) if (lab == y).any()]


__all__ = ["LabelConflict", "LabelSource", "atlas_summaries", "check_label_part", "label_conflicts",
           "labels_blob", "merge_label_parts", "reference_label_records"]
