"""What changed between two atlas versions: the answer to "what did this round add?".

Why a diff of records and not of blobs: a version's meaning is its records
(conditions with their owning site, label components with their source) and the
content hash of each blob; two versions of one lineage differ by what merges
appended, and a blob whose hash is unchanged is the same bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fedarches.format.version import AtlasVersion


@dataclass(frozen=True)
class LabelChange:
    """Label components of one label from one source, present in only one of the versions."""

    name: str
    site: str
    introduced_in: int
    components: int
    cells: int


@dataclass(frozen=True)
class VersionDiff:
    """From version ``a`` to version ``b`` (``b`` need not descend from ``a``)."""

    a: int
    b: int
    a_id: str
    b_id: str
    conditions_added: list[dict[str, str | int]] = field(default_factory=list)
    conditions_removed: list[dict[str, str | int]] = field(default_factory=list)
    labels_added: list[LabelChange] = field(default_factory=list)
    labels_removed: list[LabelChange] = field(default_factory=list)
    label_names_added: list[str] = field(default_factory=list)
    blobs_changed: list[str] = field(default_factory=list)
    genes_changed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _conditions(v: AtlasVersion) -> dict[tuple[str, str], dict[str, str | int]]:
    return {(c.site, c.name): {"name": c.name, "site": c.site, "introduced_in": c.introduced_in}
            for c in v.conditions}


def _labels(v: AtlasVersion) -> dict[tuple[str, str, int], LabelChange]:
    return {(r.name, r.site, r.introduced_in): LabelChange(r.name, r.site, r.introduced_in, len(r.components),
                                                           int(sum(r.cells)))
            for r in v.labels}


def version_diff(a: AtlasVersion, b: AtlasVersion) -> VersionDiff:
    """Records in ``b`` and not in ``a`` (added) and the reverse (removed), in ``b``'s order."""
    ca, cb = _conditions(a), _conditions(b)
    la, lb = _labels(a), _labels(b)
    names_a = {r.name for r in a.labels}
    return VersionDiff(
        a=a.number, b=b.number, a_id=a.id, b_id=b.id,
        conditions_added=[cb[k] for k in cb if k not in ca],
        conditions_removed=[ca[k] for k in ca if k not in cb],
        labels_added=[lb[k] for k in lb if k not in la],
        labels_removed=[la[k] for k in la if k not in lb],
        label_names_added=sorted({r.name for r in b.labels} - names_a),
        blobs_changed=sorted(k for k in set(a.blobs) | set(b.blobs) if a.blobs.get(k) != b.blobs.get(k)),
        genes_changed=list(a.model.genes) != list(b.model.genes),
    )
