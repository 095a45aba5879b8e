"""Merge planning: which versions a set of verified bundles becomes.

A bundle built with strategy ``conditions`` changes only its own condition
vectors, so it can join any version on its parent's branch that has the same
shared weights. Bundles land on the head of their parent's branch; several
bundles merge in one step into one new version whose parents are that head
plus the bundles' parents, sorted, and whose new conditions are sorted by id
(``format.conditions.merge_conditions``; ids qualified by site, ``format.identity``), so the order of the bundles cannot
change the version id. Bundles whose strategy touched shared weights
(``input-layers``, ``full``) become a branch of their own, parented on the
version they were built on. Nothing here writes: ``server/publish.py`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fedarches.errors import BundleFileError, ConditionCollisionError, FedarchesError
from fedarches.format.bundle import BundleSource
from fedarches.format.canonical import sha256_bytes
from fedarches.format.conditions import merge_conditions
from fedarches.format.model_dir import CONDITIONS, LABELS, WEIGHTS
from fedarches.format.version import MAIN_BRANCH, AtlasVersion, BlobRef, ConditionRecord, Lineage, LineageEntry
from fedarches.server.intake import Intake, VerifiedBundle, verify_bundle
from fedarches.server.labels import LabelConflict, LabelSource, atlas_summaries, labels_blob, merge_label_parts
from fedarches.server.store import VersionStore, save_tensors

Plan = tuple[AtlasVersion, dict[str, bytes]]


@dataclass(frozen=True)
class Rejection:
    source: str
    error: str
    check: str = ""
    index: int = -1


@dataclass(frozen=True)
class BundleOutcome:
    """What a merge did with one of its sources, in the order they were given.

    ``status``: ``accepted`` (in a published version), ``unchanged`` (an
    identical resubmission) or ``rejected`` (``error`` says why, ``check``
    names the failed check). Callers match outcomes to their inputs by
    ``index``, never by path text.
    """

    index: int
    source: str
    status: str
    digest: str | None = None
    site: str | None = None
    error: str = ""
    check: str = ""


@dataclass(frozen=True)
class MergeResult:
    """What a merge did.

    ``published``: new versions in number order (the main-line merge first,
    then one version per branch bundle); empty when every bundle was already
    merged. ``unchanged``: sources that were identical resubmissions.
    ``rejected``: only filled with ``skip_invalid=True``. ``head``: the main
    line's head after the merge.
    """

    published: list[LineageEntry]
    unchanged: list[str]
    rejected: list[Rejection]
    head: LineageEntry | None
    outcomes: list[BundleOutcome] = field(default_factory=list)
    label_conflicts: list[LabelConflict] = field(default_factory=list)  # site labels reported, not merged

    @property
    def version(self) -> LineageEntry | None:
        """The version the bundles landed in: the first new one, else the head."""
        return self.published[0] if self.published else self.head


def source_name(source: BundleSource) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def _records(v: VerifiedBundle, number: int) -> list[ConditionRecord]:
    metrics = dict(v.bundle.manifest.metrics)
    return [
        ConditionRecord(name=n, site=v.site, introduced_in=number, contribution=v.digest, metrics=metrics)
        for n in v.conditions
    ]


def plan_merge(atlas: str, group: list[VerifiedBundle], number: int,
               store: VersionStore) -> tuple[Plan, list[LabelConflict]]:
    """One new version on ``group``'s common target holding every group member's conditions
    and, merged by label name, their shared label summaries (conflicts reported, not merged)."""
    target = group[0].target
    cond = store.tensors(target, CONDITIONS)
    names, merged = merge_conditions(target.model.conditions, cond, [v.condition_tensors() for v in group])
    by_id = {i: r for v in group for i, r in zip(v.condition_ids, _records(v, number))}
    new_records = [by_id[n] for n in names[len(target.model.conditions) :]]
    cond_bytes = save_tensors(merged)
    files = {**target.model.files, CONDITIONS: sha256_bytes(cond_bytes)}
    update: dict[str, object] = {"conditions": names}
    refs = {**target.blobs, CONDITIONS: BlobRef(sha256=files[CONDITIONS], length=len(cond_bytes))}
    blobs = {CONDITIONS: cond_bytes}
    label_records, conflicts = list(target.labels), []
    sources = [LabelSource(v.site, v.digest, v.labels) for v in group if v.labels is not None]
    summaries = atlas_summaries(target, store) if sources else None
    if summaries is not None:
        grown, label_records, conflicts = merge_label_parts(target, summaries, sources, number)
        blobs[LABELS], refs[LABELS] = labels_blob(grown)
        files[LABELS] = refs[LABELS].sha256
        update["label_categories"] = list(grown.label_categories)
    model = target.model.model_copy(update={**update, "files": files})
    version = AtlasVersion(
        atlas=atlas,
        number=number,
        branch=target.branch,
        parents=[target.id, *sorted({v.parent.id for v in group} - {target.id})],
        strategy="conditions",
        conditions=[*target.conditions, *new_records],
        model=model,
        blobs=refs,
        labels=label_records,
    )
    return (version, blobs), conflicts


def _branch_name(v: VerifiedBundle, lineage: Lineage, planned: Sequence[AtlasVersion]) -> str:
    taken = {e.branch for e in lineage.versions} | {p.branch for p in planned}
    branch = f"{v.site}/{v.bundle.manifest.strategy}@v{v.parent.number}"
    return f"{branch}-{v.digest[:8]}" if branch in taken else branch


def plan_branch(
    atlas: str, v: VerifiedBundle, number: int, lineage: Lineage, store: VersionStore, planned: Sequence[AtlasVersion]
) -> Plan:
    """A branch version: the parent with the bundle's shared tensors swapped in.

    The reference latent and labels are dropped: they were computed with
    the parent's encoder, which this branch changed, and the coordinator
    cannot recompute them from weights alone. A branch therefore offers
    embedding but no label transfer.
    """
    parent = v.parent
    tensors = {name: store.tensors(parent, name) for name in (WEIGHTS, CONDITIONS)}
    for (blob, key), t in v.bundle.shared_tensors().items():
        tensors[blob][key] = t
    names, tensors[CONDITIONS] = merge_conditions(
        parent.model.conditions, tensors[CONDITIONS], [v.condition_tensors()]
    )
    blobs = {name: save_tensors(ts) for name, ts in tensors.items()}
    files = {name: sha256_bytes(b) for name, b in blobs.items()}
    train = parent.model.train.model_copy(update={"strategy": v.bundle.manifest.strategy})
    model = parent.model.model_copy(
        update={"conditions": names, "files": files, "label_key": None, "label_categories": [], "train": train}
    )
    version = AtlasVersion(
        atlas=atlas,
        number=number,
        branch=_branch_name(v, lineage, planned),
        parents=[parent.id],
        strategy=v.bundle.manifest.strategy,  # type: ignore[arg-type]
        conditions=[*parent.conditions, *_records(v, number)],
        model=model,
        blobs={n: BlobRef(sha256=files[n], length=len(b)) for n, b in blobs.items()},
    )
    return version, blobs


def refuse_shared_names(members: list[VerifiedBundle]) -> tuple[list[VerifiedBundle], list[VerifiedBundle], str]:
    """Split one step's bundles into (kept, refused, why): two bundles claiming one condition id are both refused.

    Ids are qualified by site, so only two bundles of one site can meet here.
    """
    owners: dict[str, list[VerifiedBundle]] = {}
    for v in members:
        for n in v.condition_ids:
            owners.setdefault(n, []).append(v)
    dup = next((n for n, vs in owners.items() if len(vs) > 1), None)
    if dup is None:
        return members, [], ""
    bad = {id(v) for vs in owners.values() if len(vs) > 1 for v in vs}
    msg = (
        f"condition collision: {dup!r} is claimed by several bundles in one merge "
        f"(sites {sorted({v.site for v in owners[dup]})}); a site adds each study once: merge one of them"
    )
    return [v for v in members if id(v) not in bad], [v for v in members if id(v) in bad], msg


class _Run:
    """One merge call: sources in, plans and per-source outcomes out."""

    def __init__(self, intake: Intake, skip_invalid: bool):
        self.intake = intake
        self.skip_invalid = skip_invalid
        self.verified: list[tuple[int, VerifiedBundle]] = []
        self.rejected: list[Rejection] = []
        self.label_conflicts: list[LabelConflict] = []

    def refuse(self, index: int, source: str, exc: FedarchesError) -> None:
        if not self.skip_invalid:
            raise exc
        self.rejected.append(Rejection(source, str(exc), exc.check, index))

    def verify(self, sources: Sequence[BundleSource]) -> None:
        for i, src in enumerate(sources):
            try:
                self.verified.append((i, verify_bundle(src, self.intake)))
            except FedarchesError as exc:
                self.refuse(i, source_name(src), exc)

    def fresh(self) -> dict[str, tuple[int, VerifiedBundle]]:
        out: dict[str, tuple[int, VerifiedBundle]] = {}
        for i, v in self.verified:
            if not v.noop:
                out.setdefault(v.digest, (i, v))  # the same bundle twice in one call counts once
        return out

    def plans(self, fresh: dict[str, tuple[int, VerifiedBundle]]) -> list[Plan]:
        index = {id(v): i for i, v in fresh.values()}
        groups: dict[str, list[VerifiedBundle]] = {}
        branches: list[VerifiedBundle] = []
        for _, v in fresh.values():
            (branches.append(v) if v.is_branch else groups.setdefault(v.target.id, []).append(v))
        kept_groups = []
        for members in groups.values():
            kept, refused, msg = refuse_shared_names(members)
            for v in refused:
                self.refuse(index[id(v)], v.bundle.source, ConditionCollisionError(msg))
            if kept:
                kept_groups.append(kept)
        # main line first, then other branches' heads by name, then new branches by digest
        kept_groups.sort(key=lambda g: (g[0].target.branch != MAIN_BRANCH, g[0].target.branch))
        lineage, store, atlas = self.intake.lineage, self.intake.store, self.intake.atlas
        plans: list[Plan] = []
        number = lineage.next_number()
        for group in kept_groups:
            plan, conflicts = plan_merge(atlas, group, number + len(plans), store)
            plans.append(plan)
            self.label_conflicts.extend(conflicts)
        for v in sorted(branches, key=lambda v: v.digest):
            plans.append(plan_branch(atlas, v, number + len(plans), lineage, store, [p[0] for p in plans]))
        return plans

    def outcomes(self, fresh: dict[str, tuple[int, VerifiedBundle]]) -> list[BundleOutcome]:
        refused = {r.index: r for r in self.rejected}
        out = {r.index: BundleOutcome(r.index, r.source, "rejected", error=r.error, check=r.check) for r in self.rejected}
        for i, v in self.verified:
            if i in out:
                continue
            # the same bundle given twice in one call shares the fate of its first copy
            first = refused.get(fresh[v.digest][0]) if v.digest in fresh else None
            if first is not None:
                out[i] = BundleOutcome(i, v.bundle.source, "rejected", v.digest, v.site, first.error, first.check)
            else:
                out[i] = BundleOutcome(i, v.bundle.source, "unchanged" if v.noop else "accepted", v.digest, v.site)
        return [out[i] for i in sorted(out)]


def merge_bundles(
    sources: Sequence[BundleSource],
    intake: Intake,
    publish: Callable[[list[Plan]], list[LineageEntry]],
    head: Callable[[], LineageEntry | None],
    *,
    skip_invalid: bool = False,
) -> MergeResult:
    """Verify ``sources``, plan the versions they make and hand those to ``publish`` (one commit)."""
    if not sources:
        raise BundleFileError("bundle file check failed: merge needs at least one bundle")
    run = _Run(intake, skip_invalid)
    run.verify(sources)
    fresh = run.fresh()
    plans = run.plans(fresh)
    published = publish(plans) if plans else []
    return MergeResult(
        published=published,
        unchanged=[v.bundle.source for _, v in run.verified if v.noop],
        rejected=run.rejected,
        head=head(),
        outcomes=run.outcomes(fresh),
        label_conflicts=run.label_conflicts,
    )
