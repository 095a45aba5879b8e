"""The published atlas format, shared by the coordinator (writes it) and sites (read it).

Why a version manifest on top of TUF: TUF proves *that* the coordinator
published a set of files and that they were not changed, rolled back or frozen;
it says nothing about what they mean. The version manifest says what a version
is: which versions it was derived from, which conditions it holds and which
site contributed each (with the metrics the site reported), and the complete
``storage.ModelManifest`` (genes, model config, condition order, sha256 of
every blob). It is canonical JSON, so its sha256 is a stable identity, the
version id, which bundles name as their parent. Deliberately no timestamps
inside it: merging the same contributions in any order must give the same id.

TUF target paths (the published repository, see ``server/repository.py``):

- ``lineage.json``         the index of all versions (``Lineage``), so a site can
                           find "the latest" or "number N" through a verified file;
- ``versions/<id>.json``   a version manifest (its file sha256 equals ``<id>``);
- ``blobs/<sha256>.safetensors`` content-addressed model blobs, shared between
                           versions (a merge that only adds conditions republishes
                           just ``conditions.safetensors``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedarches.atomic import check_replaceable_dir, replace_dir, staged_dir
from fedarches.errors import (
    FedarchesError,
    LineageError,
    ModelDirError,
    OlderVersionError,
    UnknownVersionError,
    VersionManifestError,
)
from fedarches.format.canonical import (
    OmitEmptyLabels,
    canonical_json,
    parse_json_bounded,
    sha256_bytes,
    validation_summary,
)
from fedarches.format.identity import REFERENCE_SITE as REFERENCE_SITE  # re-exported: where it always was
from fedarches.format.identity import Condition, ConditionIndex, condition_id
from fedarches.format.model_dir import MANIFEST, MAX_MANIFEST_BYTES, ModelManifest, load_model_dir, read_manifest

VERSION_FORMAT = "fedarches.atlas-version/1"
LINEAGE_FORMAT = "fedarches.lineage/1"
LINEAGE_TARGET = "lineage.json"
MAIN_BRANCH = "main"
ATLAS_VERSION_FILE = "atlas-version.json"

Metric = Union[bool, int, float, str]
VersionStrategy = Literal["reference", "conditions", "input-layers", "full"]


def version_target(version_id: str) -> str:
    return f"versions/{version_id}.json"


def blob_target(sha256: str) -> str:
    return f"blobs/{sha256}.safetensors"


class ConditionRecord(BaseModel):
    """One condition of a version and where it came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    site: str
    introduced_in: int = Field(ge=1, description="number of the version that first held it")
    contribution: str | None = Field(
        default=None, description="sha256 of the signed bundle manifest (None for reference conditions)"
    )
    metrics: dict[str, Metric] = {}


class LabelRecord(BaseModel):
    """Label components a version gained from one source: provenance per component.

    ``components`` are the indices of those components in the version's
    ``labels.safetensors`` (merges only append, so an index keeps its meaning in later
    versions) and ``cells`` their cell counts (each >= k_min).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    site: str
    introduced_in: int = Field(ge=1)
    contribution: str | None = Field(default=None, description="sha256 of the signed bundle manifest")
    components: list[int]
    cells: list[int]


class BlobRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    length: int = Field(ge=0)


class AtlasVersion(OmitEmptyLabels):
    """A published atlas version. ``id`` = sha256 of ``canonical_json(self)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fedarches.atlas-version/1"] = VERSION_FORMAT
    atlas: str
    number: int = Field(ge=1)
    branch: str
    parents: list[str]
    strategy: VersionStrategy
    conditions: list[ConditionRecord]
    model: ModelManifest
    blobs: dict[str, BlobRef]
    labels: list[LabelRecord] = []  # label summaries' provenance (left out of the bytes while empty)

    def canonical(self) -> bytes:
        return canonical_json(self)  # an empty ``labels`` is left out: older versions keep their ids

    @property
    def id(self) -> str:
        return sha256_bytes(self.canonical())

    def condition_names(self) -> list[str]:
        """The names as their sites gave them (two sites' ``batch1`` appear twice)."""
        return [c.name for c in self.conditions]

    def condition_index(self) -> ConditionIndex:
        """Each condition's id in the model with its recorded owner (``format.identity``)."""
        return ConditionIndex([Condition(i, c.site, c.name) for i, c in zip(self.model.conditions, self.conditions)])

    def check(self) -> None:
        """Internal consistency: the records, the model manifest and the blob list agree.

        The model stores record ``{name, site}`` under ``condition_id(site, name)``,
        or under the bare name in versions published before ids were qualified.
        """
        ids = list(self.model.conditions)
        if len(ids) != len(self.conditions) or any(
            i not in (c.name, condition_id(c.site, c.name)) for i, c in zip(ids, self.conditions)
        ):
            raise VersionManifestError(
                f"version manifest check failed: version {self.number} lists conditions "
                f"{[(c.site, c.name) for c in self.conditions]} but its model holds {ids}"
            )
        if len(set(ids)) != len(ids) or len({(c.site, c.name) for c in self.conditions}) != len(ids):
            raise VersionManifestError(f"version manifest check failed: version {self.number} repeats a condition")
        if {k: v.sha256 for k, v in self.blobs.items()} != dict(self.model.files):
            raise VersionManifestError(
                f"version manifest check failed: version {self.number} blob list disagrees with its model files"
            )

    @classmethod
    def from_bytes(cls, data: bytes, *, expected_id: str | None = None) -> AtlasVersion:
        """Parse a published manifest; the bytes must be canonical and hash to ``expected_id``."""
        version = _parse(cls, data, what="the version manifest", error=VersionManifestError)
        if version.canonical() != data:
            raise VersionManifestError("version manifest check failed: the bytes are not canonical JSON")
        if expected_id is not None and version.id != expected_id:
            raise VersionManifestError(
                f"version manifest check failed: the manifest hashes to {version.id[:16]}..., expected {expected_id[:16]}..."
            )
        version.check()
        return version


class ConditionRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    site: str


class LabelRef(BaseModel):
    """What a version added to its label knowledge from one source (``atlas log``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    site: str
    components: int
    cells: int


class LineageEntry(OmitEmptyLabels):
    """One line of ``atlas log``: enough to pick a version without fetching it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    number: int
    id: str
    parents: list[str]
    parent_numbers: list[int]
    branch: str
    strategy: VersionStrategy
    conditions: list[ConditionRef]
    published: str = Field(description="UTC time the coordinator published it (not part of the id)")
    labels: list[LabelRef] = []  # label components this version added (left out of the bytes while empty)
    #: a reference built over Flower (``atlas build-federated``): sites, rounds, strategy, ...
    #: (left out of the bytes while empty, so every other entry keeps its bytes)
    build: dict[str, Metric] = {}


class KeyChange(BaseModel):
    """A site key rotation (``atlas enroll --replace``) as the signed lineage records it.

    Why in the lineage: ``sites.json`` is integrity-protected but private to the
    coordinator; the lineage is a signed TUF target every site and auditor can
    fetch, so who replaced which key, and when, is verifiable from outside.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    old_key_id: str
    new_key_id: str
    replaced: str = Field(description="UTC time the old key stopped being accepted")


class Lineage(BaseModel):
    """All published versions, oldest first. Published as the ``lineage.json`` target.

    ``key_changes``: every site key rotation, oldest first (``KeyChange``);
    left out of the bytes while empty, so a lineage without rotations is
    byte-identical to one written before rotations were recorded.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fedarches.lineage/1"] = LINEAGE_FORMAT
    atlas: str
    versions: list[LineageEntry] = []
    key_changes: list[KeyChange] = []

    def canonical(self) -> bytes:
        doc = self.model_dump(mode="json")
        if not doc["key_changes"]:
            del doc["key_changes"]
        return canonical_json(doc)

    def by_number(self, number: int) -> LineageEntry:
        for v in self.versions:
            if v.number == number:
                return v
        have = ", ".join(str(v.number) for v in self.versions) or "none"
        raise UnknownVersionError(f"version check failed: the atlas has no version {number} (published: {have})")

    def by_id(self, version_id: str) -> LineageEntry | None:
        for v in self.versions:
            if v.id == version_id:
                return v
        return None

    def head(self, branch: str = MAIN_BRANCH) -> LineageEntry | None:
        """Highest-numbered version on ``branch`` (numbers only grow)."""
        on = [v for v in self.versions if v.branch == branch]
        return max(on, key=lambda v: v.number) if on else None

    def next_number(self) -> int:
        return max((v.number for v in self.versions), default=0) + 1

    @classmethod
    def from_bytes(cls, data: bytes) -> Lineage:
        lineage = _parse(cls, data, what=LINEAGE_TARGET, error=LineageError)
        numbers = [v.number for v in lineage.versions]
        if numbers != sorted(set(numbers)):
            raise LineageError("lineage check failed: version numbers are not strictly increasing")
        return lineage


def entry_for(version: AtlasVersion, lineage: Lineage, published: str) -> LineageEntry:
    numbers = []
    for pid in version.parents:
        p = lineage.by_id(pid)
        if p is None:
            raise LineageError(
                f"lineage check failed: parent {pid[:16]}... of version {version.number} is unknown"
            )
        numbers.append(p.number)
    return LineageEntry(
        number=version.number,
        id=version.id,
        parents=list(version.parents),
        parent_numbers=numbers,
        branch=version.branch,
        strategy=version.strategy,
        conditions=[ConditionRef(name=c.name, site=c.site) for c in version.conditions],
        published=published,
        labels=[LabelRef(name=r.name, site=r.site, components=len(r.components), cells=sum(r.cells))
                for r in version.labels if r.introduced_in == version.number],
        build=federated_build(version),
    )


FEDERATED_PREFIX = "federated_"


def federated_build(version: AtlasVersion) -> dict[str, Metric]:
    """How a federated reference was trained, as its signed study records state it
    (``federated_*`` metrics, the same on every study of version 1); empty otherwise."""
    if version.strategy != "reference":
        return {}
    for c in version.conditions:
        found = {k[len(FEDERATED_PREFIX):]: v for k, v in c.metrics.items() if k.startswith(FEDERATED_PREFIX)}
        if found:
            return found
    return {}


def write_model_dir(
    out_dir: str | os.PathLike[str], version: AtlasVersion, blobs: Mapping[str, bytes], *, replace_newer: bool = False
) -> Path:
    """Write a model directory from verified blob bytes, atomically.

    The blobs are written byte for byte (not re-serialised) so the hashes in
    ``manifest.json`` are the published ones; ``atlas-version.json`` keeps the
    version manifest so a site knows which version (id, number) it holds.
    Checked with ``storage.load_model_dir`` before it replaces anything.

    A folder holding a newer version of the same atlas is not replaced unless
    ``replace_newer``: TUF's rollback protection lives in the trust cache, so a
    fresh cache (first contact, or another ``--cache``) would otherwise let an
    explicit ``--version`` silently downgrade the site's model.
    """
    target = check_replaceable_dir(out_dir, MANIFEST, "a fedarches model directory")
    if not replace_newer:
        _refuse_older(target, version)
    with staged_dir(target) as tmp:
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_bytes(canonical_json(version.model))
        (tmp / ATLAS_VERSION_FILE).write_bytes(version.canonical())
        load_model_dir(tmp)
        replace_dir(tmp, target)
    return target


def _refuse_older(target: Path, version: AtlasVersion) -> None:
    """Raise `OlderVersionError` if ``target`` holds a higher number of the same atlas.

    An unreadable or foreign ``atlas-version.json`` does not block: that folder is
    no version to protect, and the write replaces it with a verified one.
    """
    held_file = target / ATLAS_VERSION_FILE
    if not held_file.is_file():
        return
    try:
        held = AtlasVersion.from_bytes(held_file.read_bytes())
    except FedarchesError:
        return
    if held.atlas == version.atlas and held.number > version.number:
        raise OlderVersionError(
            f"version order check failed: {target} holds version {held.number} of atlas {held.atlas!r}, "
            f"newer than version {version.number} being fetched; pass --force to replace it, "
            "or choose another --out"
        )


def read_atlas_version(model_dir: str | os.PathLike[str]) -> AtlasVersion:
    """The version manifest a fetched model directory came from (id recomputed from its bytes)."""
    p = Path(model_dir) / ATLAS_VERSION_FILE
    if not p.is_file():
        raise ModelDirError(
            f"model directory check failed: {model_dir} has no {ATLAS_VERSION_FILE}: it was not fetched from an atlas (use `fedarches site fetch`)"
        )
    version = AtlasVersion.from_bytes(p.read_bytes())
    manifest = read_manifest(model_dir)
    if canonical_json(manifest) != canonical_json(version.model):
        raise VersionManifestError(
            f"version manifest check failed: {model_dir}/{MANIFEST} differs from {ATLAS_VERSION_FILE}"
        )
    return version


_Parsed = Union["AtlasVersion", "Lineage"]


def _parse(cls: type[_Parsed], data: bytes, *, what: str, error: type[FedarchesError]) -> _Parsed:
    """Bounded JSON, then the model: every failure is one line of ``error``."""
    raw = parse_json_bounded(data, max_bytes=MAX_MANIFEST_BYTES, what=what, error=error)
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{error.check} failed: {what} is not a fedarches {cls.__name__} ({validation_summary(exc)})") from exc
