"""Every check a contribution bundle passes before the coordinator merges it.

Order matters for the messages users see: format and tensor hashes
(``read_bundle``), atlas, enrolment, signature, parent, already merged,
shared weights of the target, name collision, tensor shapes and values, then
the label part (``server/labels.py``), the exact size formula (after the shapes,
whose message is more specific). Each
failure raises its own class from ``fedarches.errors``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedarches.errors import (
    AtlasMismatchError,
    ConditionCollisionError,
    EnrollmentError,
    LabelPartError,
    LineageError,
    ParentError,
    TensorShapeError,
    TensorValueError,
)
from fedarches.format.bundle import Bundle, BundleSource, check_size, read_bundle
from fedarches.format.conditions import merge_conditions, table_templates
from fedarches.format.model_dir import CONDITIONS, WEIGHTS
from fedarches.format.identity import condition_id
from fedarches.format.names import check_new_names
from fedarches.format.tensor_keys import condition_key, split_condition_key
from fedarches.format.version import AtlasVersion, Lineage
from fedarches.labels.summaries import ClassSummaries
from fedarches.server.labels import atlas_summaries, check_label_part
from fedarches.server.registry import SiteRegistry
from fedarches.server.store import VersionStore


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every intake check.

    ``target`` is the version it lands on: the head of its parent's branch for
    ``conditions`` bundles, the parent itself for branch strategies.
    ``noop`` marks an identical resubmission of an already merged bundle.
    """

    bundle: Bundle
    parent: AtlasVersion
    target: AtlasVersion
    noop: bool
    labels: ClassSummaries | None = None  # the checked label part (``--share-labels``), if any

    @property
    def digest(self) -> str:
        return self.bundle.digest

    @property
    def site(self) -> str:
        return self.bundle.manifest.site

    @property
    def conditions(self) -> list[str]:
        return list(self.bundle.manifest.conditions)

    @property
    def condition_ids(self) -> list[str]:
        """The ids the bundle's conditions get in the atlas (qualified by the signing site)."""
        return [condition_id(self.site, n) for n in self.conditions]

    def condition_tensors(self) -> dict[str, torch.Tensor]:
        return site_condition_tensors(self.bundle)

    @property
    def is_branch(self) -> bool:
        return self.bundle.manifest.strategy != "conditions"


def site_condition_tensors(bundle: Bundle) -> dict[str, torch.Tensor]:
    """The bundle's condition vectors keyed by their atlas ids.

    The site signs its own names; the identity is (signing site, name), so the
    site prefix comes from the verified signer, never from the bundle's text.
    """
    site = bundle.manifest.site
    out: dict[str, torch.Tensor] = {}
    for key, t in bundle.condition_tensors().items():
        table, name = split_condition_key(key)
        out[condition_key(table, condition_id(site, name))] = t
    return out


@dataclass(frozen=True)
class Intake:
    """What the checks read: the atlas name, its lineage, enrolled sites and published versions."""

    atlas: str
    lineage: Lineage
    registry: SiteRegistry
    store: VersionStore


def check_origin(bundle: Bundle, intake: Intake) -> None:
    """Made for this atlas, by an enrolled site, signed with that site's key."""
    m = bundle.manifest
    if m.atlas != intake.atlas:
        raise AtlasMismatchError(
            f"atlas check failed: bundle {bundle.source} was made for atlas {m.atlas!r}, this is {intake.atlas!r}"
        )
    enrolled = intake.registry.sites.get(m.site)
    if enrolled is None:
        raise EnrollmentError(
            f"enrollment check failed: bundle {bundle.source} comes from site {m.site!r}, which is not "
            f"enrolled; enroll its public key with `fedarches atlas enroll ATLAS --site {m.site} --public-key FILE`"
        )
    bundle.verify_signature(enrolled.key())


def check_parent(bundle: Bundle, intake: Intake) -> AtlasVersion:
    m = bundle.manifest
    entry = intake.lineage.by_id(m.parent)
    if entry is None:
        raise ParentError(
            f"parent check failed: bundle {bundle.source} was built on version {m.parent[:16]}... "
            f"(number {m.parent_number}), which this atlas never published; map onto a published version"
        )
    if entry.number != m.parent_number:
        raise ParentError(
            f"parent check failed: bundle {bundle.source} names parent number {m.parent_number}, "
            f"but version {m.parent[:16]}... is number {entry.number}"
        )
    return intake.store.version(m.parent)


def landing_version(bundle: Bundle, parent: AtlasVersion, intake: Intake) -> AtlasVersion:
    """The head of the parent's branch, which must share the parent's shared weights."""
    head = intake.lineage.head(parent.branch)
    if head is None:  # the parent itself is on that branch, so this means a corrupt lineage
        raise LineageError(f"lineage check failed: branch {parent.branch!r} has no head")
    target = intake.store.version(head.id)
    if target.model.files.get(WEIGHTS) != parent.model.files.get(WEIGHTS) or target.model.genes != parent.model.genes:
        raise ParentError(
            f"parent check failed: bundle {bundle.source} was built on version {parent.number}, whose shared "
            f"weights differ from the head of branch {parent.branch!r} (version {target.number})"
        )
    return target


def check_collision(bundle: Bundle, target: AtlasVersion) -> None:
    """A site's new names must differ from its own conditions and the reference studies.

    Other sites' names are no clash: the identity is (site, name), so site A
    publishing "B's study" makes A's own condition and never blocks B.
    """
    m = bundle.manifest
    visible = target.condition_index().visible(m.site)
    existing = {c.name: c for c in visible}
    clash = [n for n in m.conditions if n in existing]
    if clash:
        c = existing[clash[0]]
        raise ConditionCollisionError(
            f"condition collision: {clash[0]!r} from site {m.site!r} is already in atlas version "
            f"{target.number} (contributed by {c.site!r} in version "
            f"{_introduced(target, c.id)}); rename the query study (the --condition-key values) and map again"
        )
    check_new_names(m.conditions, kind="condition", existing=existing)  # case and look-alike clashes


def _introduced(version: AtlasVersion, cid: str) -> int:
    return version.conditions[list(version.model.conditions).index(cid)].introduced_in


def check_condition_tensors(bundle: Bundle, parent: AtlasVersion, cond: dict[str, torch.Tensor]) -> None:
    """Exactly one vector per table for each named condition, each fitting the parent's tables."""
    tables = table_templates(cond)
    expected = {condition_key(table, name) for name in bundle.manifest.conditions for table in tables}
    got = set(bundle.condition_tensors())
    if got != expected:
        raise TensorShapeError(
            f"tensor shape check failed: bundle {bundle.source} must hold exactly {sorted(expected)} "
            f"(one vector per condition table of version {parent.number}); it holds {sorted(got)}"
        )
    merge_conditions([], {}, [bundle.condition_tensors()], tables=tables)  # shapes, named as the bundle has them
    merge_conditions(parent.model.conditions, cond, [site_condition_tensors(bundle)], tables=tables)  # ids


def check_shared_tensors(bundle: Bundle, parent: AtlasVersion, cond: dict[str, torch.Tensor], store: VersionStore) -> None:
    """A branch bundle's shared tensors must replace tensors of the parent, shape for shape."""
    loaded: dict[str, dict[str, torch.Tensor]] = {CONDITIONS: cond}
    for (blob, key), t in bundle.shared_tensors().items():
        if blob not in (WEIGHTS, CONDITIONS) or blob not in parent.blobs:
            raise TensorShapeError(f"tensor shape check failed: shared tensor names unknown blob {blob!r}")
        if blob not in loaded:
            loaded[blob] = store.tensors(parent, blob)
        ref = loaded[blob].get(key)
        if ref is None or ref.shape != t.shape or ref.dtype != t.dtype:
            raise TensorShapeError(
                f"tensor shape check failed: shared tensor {blob}/{key} does not match a tensor of "
                f"version {parent.number}"
            )
        if not torch.isfinite(t).all():
            raise TensorValueError(f"tensor value check failed: {blob}/{key} has NaN or infinite values")


def verify_bundle(source: BundleSource, intake: Intake) -> VerifiedBundle:
    """Run every intake check on one bundle; changes nothing."""
    bundle = read_bundle(source)  # format, manifest, tensor hashes
    check_origin(bundle, intake)
    parent = check_parent(bundle, intake)
    if bundle.digest in intake.store.contributions(intake.lineage):
        return VerifiedBundle(bundle=bundle, parent=parent, target=parent, noop=True)
    strategy = bundle.manifest.strategy
    target = landing_version(bundle, parent, intake) if strategy == "conditions" else parent
    check_collision(bundle, target)
    cond = intake.store.tensors(parent, CONDITIONS)
    check_condition_tensors(bundle, parent, cond)
    labels = _label_part(bundle, target, intake.store)
    check_size(bundle, parent.model.config)  # then every byte is accounted for: exactly the formula
    check_shared_tensors(bundle, parent, cond, intake.store)
    return VerifiedBundle(bundle=bundle, parent=parent, target=target, noop=False, labels=labels)


def _label_part(bundle: Bundle, target: AtlasVersion, store: VersionStore) -> ClassSummaries | None:
    """The bundle's shared label summaries, checked against the version they land on."""
    if not bundle.manifest.labels:
        return None
    if bundle.manifest.strategy != "conditions":
        raise LabelPartError(f"label part check failed: bundle {bundle.source} shares labels with strategy "
                             f"{bundle.manifest.strategy!r}; a branch holds no label knowledge, map with "
                             "--strategy conditions")
    return check_label_part(bundle, target, atlas_summaries(target, store))
