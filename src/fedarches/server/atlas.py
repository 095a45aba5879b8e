"""The coordinator: an atlas directory, its versions, site enrollment and merges.

Layout of ``ATLAS_DIR`` (only ``repository/`` is ever served)::

    ATLAS_DIR/
      atlas.json        name and metadata expiry policy
      root.json         the trust anchor to hand to sites out of band (TUF root v1)
      sites.json        enrolled sites and their Ed25519 public keys
      keys/             0700; root.pem targets.pem snapshot.pem timestamp.pem (0600)
      .lock             serialises writers (CLI, Flower ServerApp, ...)
      repository/       the static TUF repository: serve this directory
        metadata/       <N>.root.json, <N>.targets.json, <N>.snapshot.json, timestamp.json
        targets/        lineage.json, versions/<id>.json and blobs/<sha256>.safetensors,
                        each stored under a sha256-prefixed name (consistent snapshots)

The published repository is the only record of versions: the lineage, the
version manifests and the blobs are TUF targets. There is no second database
that a crash could leave disagreeing with what sites see (see
``server/repository.py`` for why a publish is atomic).

Merging: a bundle built with strategy ``conditions`` changes only its own
condition vectors, so it can join any version on its parent's branch that has
the same shared weights. Bundles land on the head of their parent's branch;
several bundles merge in one step into one new version whose parents are that
head plus the bundles' parents, sorted, and whose new conditions are sorted by
name, so the order of the bundles cannot change the version id. Bundles whose
strategy touched shared weights (``input-layers``, ``full``) become a branch of
their own, parented on the version they were built on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedarches.format.bundle import Bundle, BundleSource, read_bundle
from fedarches.format.metrics import sanitize_metrics
from fedarches.format.tensor_keys import split_condition_key
from fedarches.data.io import read_h5ad
from fedarches.errors import (
    ConditionCollisionError,
    ContributionError,
    FedarchesError,
    ModelFileError,
    VerificationError,
)
from fedarches.server.repository import ExpiryPolicy, RepoState, TufRepository, atomic_write
from fedarches.format.version import AtlasVersion, BlobRef, ConditionRecord, LINEAGE_TARGET, Lineage, LineageEntry, MAIN_BRANCH, REFERENCE_SITE, blob_target, entry_for, version_target, write_model_dir
from fedarches.format.signing import PublicKey, load_public_key, public_key_from_pem
from fedarches.format.model_dir import CONDITIONS, WEIGHTS, load_model_dir
from fedarches.format.canonical import canonical_json, sha256_bytes

ATLAS_FORMAT = "fedarches.atlas/1"
SITES_FORMAT = "fedarches.sites/1"


class AtlasConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = ATLAS_FORMAT
    name: str
    created: str
    expiry: ExpiryPolicy = ExpiryPolicy()


class EnrolledSite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    key_id: str
    public_key: str  # PEM
    enrolled: str


class SiteRegistry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = SITES_FORMAT
    sites: dict[str, EnrolledSite] = {}


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
    def is_branch(self) -> bool:
        return self.bundle.manifest.strategy != "conditions"


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

    @property
    def version(self) -> LineageEntry | None:
        """The version the bundles landed in: the first new one, else the head."""
        return self.published[0] if self.published else self.head


def _utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _source_name(source: BundleSource) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def _load_tensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"atlas blob check failed: {what} is not readable safetensors ({exc})") from exc


def _save_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Deterministic safetensors bytes: same tensors -> same bytes -> same sha256."""
    return st_save({k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)})


class Atlas:
    """An atlas directory (see module docstring). Open with ``Atlas(path)``, create with ``Atlas.init``."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        cfg = self.path / "atlas.json"
        if not cfg.is_file():
            raise ModelFileError(
                f"{self.path} is not an atlas directory (no atlas.json); create one with `fedarches atlas init`"
            )
        try:
            self.config = AtlasConfig.model_validate_json(cfg.read_bytes())
        except ValidationError as exc:
            raise ModelFileError(f"{cfg} is invalid: {exc.errors()[0]['msg']}") from exc
        if self.config.format != ATLAS_FORMAT:
            raise ModelFileError(f"{cfg} has format {self.config.format!r}, expected {ATLAS_FORMAT!r}")
        self.repo = TufRepository(self.repository_dir, self.path / "keys", self.config.expiry)

    # ------------------------------------------------------------- layout
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def repository_dir(self) -> Path:
        """The directory to serve over HTTP (holds no secrets)."""
        return self.path / "repository"

    @property
    def root_json(self) -> Path:
        """Trust anchor for sites: hand this file out of band."""
        return self.path / "root.json"

    @classmethod
    def init(cls, path: str | os.PathLike[str], name: str, *, expiry: ExpiryPolicy | None = None) -> Atlas:
        """Create keys, an empty signed repository and ``root.json``.

        Refuses a non-empty directory: re-initialising would replace the root
        keys that every site has pinned.
        """
        p = Path(path)
        if not name or any(ord(c) < 32 for c in name) or "/" in name:
            raise ModelFileError(
                f"atlas name check failed: {name!r} must be non-empty, without '/' or control characters"
            )
        if p.exists() and any(p.iterdir()):
            hint = (
                "it is already an atlas (its keys are pinned by sites: keep using it)"
                if (p / "atlas.json").is_file()
                else "if an earlier `atlas init` was interrupted there, delete the directory and run it again"
            )
            raise ModelFileError(f"{p} exists and is not empty; `atlas init` needs a new directory ({hint})")
        p.mkdir(parents=True, exist_ok=True)
        config = AtlasConfig(name=name, created=_utc_now(), expiry=expiry or ExpiryPolicy())
        repo = TufRepository.create(p / "repository", p / "keys", config.expiry)
        lineage = Lineage(atlas=name, versions=[])
        repo.publish({LINEAGE_TARGET: canonical_json(lineage)})
        atomic_write(p / "sites.json", canonical_json(SiteRegistry()), mode=0o600)
        atomic_write(p / "root.json", repo.root_bytes(1))
        # atlas.json last: a directory without it is an interrupted init, not an atlas.
        atomic_write(p / "atlas.json", canonical_json(config))
        return cls(p)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (CLI and Flower server may share an atlas directory)."""
        with open(self.path / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # -------------------------------------------------------------- reading
    def _state(self) -> RepoState:
        return self.repo.current()

    def lineage(self, state: RepoState | None = None) -> Lineage:
        lineage = Lineage.from_bytes(self.repo.read_target(LINEAGE_TARGET, state))
        if lineage.atlas != self.name:
            raise VerificationError(
                f"lineage check failed: the repository belongs to atlas {lineage.atlas!r}, not {self.name!r}"
            )
        return lineage

    def log(self) -> list[LineageEntry]:
        """All versions, oldest first."""
        return list(self.lineage().versions)

    def head(self, branch: str = MAIN_BRANCH) -> LineageEntry | None:
        return self.lineage().head(branch)

    def version(self, ref: int | str, state: RepoState | None = None) -> AtlasVersion:
        """A published version by number or id (verified against its signed hash)."""
        lineage = self.lineage(state)
        entry = lineage.by_number(ref) if isinstance(ref, int) else lineage.by_id(ref)
        if entry is None:
            raise ContributionError(
                f"version check failed: version {str(ref)[:16]}... was never published by this atlas"
            )
        data = self.repo.read_target(version_target(entry.id), state)
        return AtlasVersion.from_bytes(data, expected_id=entry.id)

    def _blob(self, version: AtlasVersion, filename: str, state: RepoState | None = None) -> bytes:
        ref = version.blobs.get(filename)
        if ref is None:
            raise ModelFileError(f"atlas blob check failed: version {version.number} has no {filename}")
        return self.repo.read_target(blob_target(ref.sha256), state)

    def export_model(self, ref: int | str, out_dir: str | os.PathLike[str]) -> Path:
        """Write version ``ref`` as a model directory (the same files a site fetches)."""
        version = self.version(ref)
        blobs = {name: self._blob(version, name) for name in version.blobs}
        return write_model_dir(out_dir, version, blobs)

    # ------------------------------------------------------------- sites
    def _registry(self) -> SiteRegistry:
        p = self.path / "sites.json"
        try:
            return SiteRegistry.model_validate_json(p.read_bytes())
        except FileNotFoundError:
            return SiteRegistry()
        except ValidationError as exc:
            raise ModelFileError(f"{p} is invalid: {exc.errors()[0]['msg']}") from exc

    def sites(self) -> dict[str, EnrolledSite]:
        return dict(self._registry().sites)

    def enroll(
        self, site: str, public_key: PublicKey | str | os.PathLike[str] | bytes, *, replace: bool = False
    ) -> EnrolledSite:
        """Record ``site``'s public key; only bundles it signs are accepted from ``site``.

        Enrolling the same key again is a no-op. A different key for an
        enrolled site, or a key already enrolled for another site, is refused
        unless ``replace=True`` (for the first case): one key, one identity.
        """
        if isinstance(public_key, PublicKey):
            key = public_key
        elif isinstance(public_key, bytes):
            key = public_key_from_pem(public_key)
        else:
            key = load_public_key(public_key)
        if not site or len(site) > 200 or any(ord(c) < 32 for c in site):
            raise VerificationError(f"enrollment check failed: site name {site!r} must be 1-200 printable characters")
        if site == REFERENCE_SITE:
            raise VerificationError(f"enrollment check failed: {REFERENCE_SITE!r} is reserved for the atlas itself")
        with self._locked():
            reg = self._registry()
            old = reg.sites.get(site)
            if old is not None and old.key_id == key.key_id:
                return old
            if old is not None and not replace:
                raise VerificationError(
                    f"enrollment check failed: site {site!r} is already enrolled with key {old.key_id[:16]}...; "
                    "pass replace=True to rotate its key"
                )
            for other in reg.sites.values():
                if other.key_id == key.key_id and other.site != site:
                    raise VerificationError(
                        f"enrollment check failed: key {key.key_id[:16]}... is already enrolled for site "
                        f"{other.site!r}; every site needs its own key (`fedarches site keygen`)"
                    )
            entry = EnrolledSite(
                site=site, key_id=key.key_id, public_key=key.pem().decode("ascii"), enrolled=_utc_now()
            )
            reg.sites[site] = entry
            atomic_write(self.path / "sites.json", canonical_json(reg), mode=0o600)
            return entry

    # ----------------------------------------------------------- publishing
    def _publish(
        self, state: RepoState, versions: Sequence[tuple[AtlasVersion, dict[str, bytes]]]
    ) -> list[LineageEntry]:
        """One TUF commit for all ``versions`` (their blobs, manifests and the new lineage)."""
        lineage = self.lineage(state)
        files: dict[str, bytes] = {}
        entries: list[LineageEntry] = []
        now = _utc_now()
        expected = lineage.next_number()
        for version, blobs in versions:
            if version.number != expected:
                raise ModelFileError(f"version number check failed: would publish {version.number}, next is {expected}")
            expected += 1
            version.check()
            for filename, ref in version.blobs.items():
                if filename in blobs:
                    data = blobs[filename]
                    if sha256_bytes(data) != ref.sha256 or len(data) != ref.length:
                        raise ModelFileError(f"atlas blob check failed: {filename} does not match the version manifest")
                    files[blob_target(ref.sha256)] = data
                elif blob_target(ref.sha256) not in files:
                    # a blob shared with an earlier version: it must still be intact on disk,
                    # or the new version would be published pointing at a corrupt file
                    self.repo.read_target(blob_target(ref.sha256), state)
            files[version_target(version.id)] = version.canonical()
            entry = entry_for(version, lineage, now)
            lineage = lineage.model_copy(update={"versions": [*lineage.versions, entry]})
            entries.append(entry)
        files[LINEAGE_TARGET] = canonical_json(lineage)
        self.repo.publish(files)
        return entries

    def publish_reference(
        self, model_dir: str | os.PathLike[str], *, metrics: Mapping[str, Any] | None = None
    ) -> LineageEntry:
        """Publish a trained reference model directory as version 1 of the main line."""
        manifest, _ = load_model_dir(model_dir)  # checks every blob hash
        blobs = {name: (Path(model_dir) / name).read_bytes() for name in manifest.files}
        with self._locked():
            state = self._state()
            if self.lineage(state).versions:
                raise ModelFileError(
                    f"atlas {self.name!r} already has a reference (version 1); build a new atlas directory "
                    "for a new reference, or grow this one with `atlas merge`"
                )
            clean = sanitize_metrics(metrics or {})
            version = AtlasVersion(
                atlas=self.name,
                number=1,
                branch=MAIN_BRANCH,
                parents=[],
                strategy="reference",
                conditions=[
                    ConditionRecord(name=c, site=REFERENCE_SITE, introduced_in=1, metrics=clean)
                    for c in manifest.conditions
                ],
                model=manifest,
                blobs={n: BlobRef(sha256=sha256_bytes(b), length=len(b)) for n, b in blobs.items()},
            )
            return self._publish(state, [(version, blobs)])[0]

    def build(
        self,
        data: Any,
        condition_key: str,
        label_key: str | None = None,
        *,
        kind: str = "trvae",
        epochs: int | None = None,
        n_genes: int = 2000,
        seed: int = 0,
        threads: int | None = None,
        layer: str | None = None,
        progress: bool = False,
    ) -> LineageEntry:
        """Train the reference (``FedArchesModel.train_reference``) and publish it as version 1.

        ``data`` is an AnnData or a path to ``.h5ad``. Refuses before training
        when the atlas already has a reference.
        """
        from fedarches.config import TrainConfig
        from fedarches.model import FedArchesModel

        if self.lineage().versions:
            raise ModelFileError(
                f"atlas {self.name!r} already has a reference (version 1); build a new atlas directory "
                "for a new reference, or grow this one with `atlas merge`"
            )
        adata = read_h5ad(data)
        model = FedArchesModel.train_reference(
            adata,
            condition_key,
            label_key,
            kind=kind,  # type: ignore[arg-type]
            n_genes=n_genes,
            layer=layer,
            train=TrainConfig(epochs=epochs, seed=seed, threads=threads),
            progress=progress,
        )
        h = model.last_history
        metrics: dict[str, Any] = {"model": kind}
        if h is not None:
            metrics.update(
                epochs=h.epochs,
                best_epoch=h.best_epoch,
                seconds=round(h.seconds, 3),
                final_loss=h.train_loss[-1] if h.train_loss else None,
            )
        with tempfile.TemporaryDirectory(prefix=".build-", dir=self.path) as tmp:
            model.save(Path(tmp) / "model")
            return self.publish_reference(Path(tmp) / "model", metrics=metrics)

    def refresh(self, *, force: bool = False) -> bool:
        """Re-sign the timestamp/snapshot/targets metadata if they are past half their life."""
        with self._locked():
            return self.repo.refresh(force=force)

    # -------------------------------------------------------------- intake
    def verify_bundle(self, source: BundleSource) -> VerifiedBundle:
        """Run every intake check on one bundle without changing anything."""
        state = self._state()
        return self._verify(source, state, self.lineage(state), self._registry(), {})

    def _contributions(self, lineage: Lineage, state: RepoState, cache: dict[str, AtlasVersion]) -> set[str]:
        out: set[str] = set()
        for entry in lineage.versions:
            v = self._cached_version(entry.id, state, cache)
            out.update(c.contribution for c in v.conditions if c.contribution)
        return out

    def _cached_version(self, version_id: str, state: RepoState, cache: dict[str, AtlasVersion]) -> AtlasVersion:
        if version_id not in cache:
            cache[version_id] = AtlasVersion.from_bytes(
                self.repo.read_target(version_target(version_id), state), expected_id=version_id
            )
        return cache[version_id]

    def _verify(
        self,
        source: BundleSource,
        state: RepoState,
        lineage: Lineage,
        registry: SiteRegistry,
        cache: dict[str, AtlasVersion],
    ) -> VerifiedBundle:
        bundle = read_bundle(source)  # format, manifest, tensor hashes
        m = bundle.manifest
        if m.atlas != self.name:
            raise ContributionError(
                f"atlas check failed: bundle {bundle.source} was made for atlas {m.atlas!r}, this is {self.name!r}"
            )
        enrolled = registry.sites.get(m.site)
        if enrolled is None:
            raise VerificationError(
                f"enrollment check failed: bundle {bundle.source} comes from site {m.site!r}, which is not "
                f"enrolled; enroll its public key with `fedarches atlas enroll ATLAS --site {m.site} --public-key FILE`"
            )
        bundle.verify_signature(public_key_from_pem(enrolled.public_key.encode("ascii"), source=f"key of {m.site}"))
        parent_entry = lineage.by_id(m.parent)
        if parent_entry is None:
            raise ContributionError(
                f"parent check failed: bundle {bundle.source} was built on version {m.parent[:16]}... "
                f"(number {m.parent_number}), which this atlas never published; map onto a published version"
            )
        if parent_entry.number != m.parent_number:
            raise ContributionError(
                f"parent check failed: bundle {bundle.source} names parent number {m.parent_number}, "
                f"but version {m.parent[:16]}... is number {parent_entry.number}"
            )
        parent = self._cached_version(m.parent, state, cache)
        if bundle.digest in self._contributions(lineage, state, cache):
            return VerifiedBundle(bundle=bundle, parent=parent, target=parent, noop=True)
        if m.strategy == "conditions":
            head_entry = lineage.head(parent.branch)
            if head_entry is None:  # the parent itself is on that branch, so this means a corrupt lineage
                raise ModelFileError(f"lineage check failed: branch {parent.branch!r} has no head")
            target = self._cached_version(head_entry.id, state, cache)
            if (
                target.model.files.get(WEIGHTS) != parent.model.files.get(WEIGHTS)
                or target.model.genes != parent.model.genes
            ):
                raise ContributionError(
                    f"parent check failed: bundle {bundle.source} was built on version {parent.number}, whose shared "
                    f"weights differ from the head of branch {parent.branch!r} (version {target.number})"
                )
        else:
            target = parent
        existing = {c.name: c for c in target.conditions}
        clash = [n for n in m.conditions if n in existing]
        if clash:
            c = existing[clash[0]]
            raise ContributionError(
                f"condition collision: {clash[0]!r} from site {m.site!r} is already in atlas version "
                f"{target.number} (contributed by {c.site!r} in version {c.introduced_in}); "
                "rename the query study (the --condition-key values) and map again"
            )
        self._check_shapes(bundle, parent, state)
        return VerifiedBundle(bundle=bundle, parent=parent, target=target, noop=False)

    def _check_shapes(self, bundle: Bundle, parent: AtlasVersion, state: RepoState) -> None:
        """Keys, shapes and dtypes must be exactly those the parent model has for one condition."""
        cond = _load_tensors(self._blob(parent, CONDITIONS, state), f"{CONDITIONS} of version {parent.number}")
        per_table: dict[str, torch.Tensor] = {}
        for key, t in cond.items():
            per_table.setdefault(split_condition_key(key)[0], t)
        expected_keys = {f"{table}/{name}" for name in bundle.manifest.conditions for table in per_table}
        got = set(bundle.condition_tensors())
        if got != expected_keys:
            raise ContributionError(
                f"tensor shape check failed: bundle {bundle.source} must hold exactly {sorted(expected_keys)} "
                f"(one vector per condition table of version {parent.number}); it holds {sorted(got)}"
            )
        for key, t in bundle.condition_tensors().items():
            ref = per_table[split_condition_key(key)[0]]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ContributionError(
                    f"tensor shape check failed: {key} is {t.dtype}{list(t.shape)}, the model of version "
                    f"{parent.number} needs {ref.dtype}{list(ref.shape)}"
                )
            if not torch.isfinite(t).all():
                raise ContributionError(f"tensor value check failed: {key} has NaN or infinite values")
        shared = bundle.shared_tensors()
        if shared:
            loaded: dict[str, dict[str, torch.Tensor]] = {}
            for (blob, key), t in shared.items():
                if blob not in (WEIGHTS, CONDITIONS) or blob not in parent.blobs:
                    raise ContributionError(f"tensor shape check failed: shared tensor names unknown blob {blob!r}")
                if blob not in loaded:
                    loaded[blob] = (
                        cond
                        if blob == CONDITIONS
                        else _load_tensors(self._blob(parent, blob, state), f"{blob} of version {parent.number}")
                    )
                ref = loaded[blob].get(key)
                if ref is None or ref.shape != t.shape or ref.dtype != t.dtype:
                    raise ContributionError(
                        f"tensor shape check failed: shared tensor {blob}/{key} does not match a tensor of "
                        f"version {parent.number}"
                    )
                if not torch.isfinite(t).all():
                    raise ContributionError(f"tensor value check failed: {blob}/{key} has NaN or infinite values")

    def merge(self, sources: Sequence[BundleSource], *, skip_invalid: bool = False) -> MergeResult:
        """Verify bundles and publish what they add, in one atomic TUF commit.

        All-or-nothing by default: the first failing check raises and nothing
        is published. With ``skip_invalid=True`` (the Flower server: one bad
        site must not sink a round) failing bundles are listed in
        ``rejected`` and the rest are merged; two bundles claiming the same
        condition name are then both rejected, so the outcome does not depend
        on which arrived first.
        """
        if not sources:
            raise ContributionError("merge needs at least one bundle")
        with self._locked():
            state = self._state()
            lineage = self.lineage(state)
            if not lineage.versions:
                raise ContributionError(f"atlas {self.name!r} has no reference yet; run `fedarches atlas build` first")
            registry = self._registry()
            cache: dict[str, AtlasVersion] = {}
            rejected: list[Rejection] = []
            verified: list[VerifiedBundle] = []
            index_of: dict[int, int] = {}
            for i, src in enumerate(sources):
                try:
                    v = self._verify(src, state, lineage, registry, cache)
                    index_of[id(v)] = i
                    verified.append(v)
                except FedarchesError as exc:
                    if not skip_invalid:
                        raise
                    rejected.append(Rejection(_source_name(src), str(exc), exc.check, i))

            unchanged = [v.bundle.source for v in verified if v.noop]
            fresh: dict[str, VerifiedBundle] = {}
            for v in verified:
                if not v.noop:
                    fresh.setdefault(v.digest, v)  # the same bundle twice in one call counts once

            # group conditions-bundles by the head they land on; branch bundles stand alone
            groups: dict[str, list[VerifiedBundle]] = {}
            branches: list[VerifiedBundle] = []
            for v in fresh.values():
                (branches.append(v) if v.is_branch else groups.setdefault(v.target.id, []).append(v))

            # two bundles of one step naming the same condition: refuse both (order-independent)
            for gid, members in list(groups.items()):
                owners: dict[str, list[VerifiedBundle]] = {}
                for v in members:
                    for n in v.conditions:
                        owners.setdefault(n, []).append(v)
                bad = {id(v) for vs in owners.values() if len(vs) > 1 for v in vs}
                if bad:
                    name = next(n for n, vs in owners.items() if len(vs) > 1)
                    sites = sorted({v.site for v in owners[name]})
                    msg = (
                        f"condition collision: {name!r} is claimed by several bundles in one merge "
                        f"(sites {sites}); rename the studies so each condition name is unique"
                    )
                    if not skip_invalid:
                        raise ConditionCollisionError(msg)
                    rejected.extend(
                        Rejection(v.bundle.source, msg, ConditionCollisionError.check, index_of[id(v)])
                        for v in members
                        if id(v) in bad
                    )
                    groups[gid] = [v for v in members if id(v) not in bad]

            plans: list[tuple[AtlasVersion, dict[str, bytes]]] = []
            number = lineage.next_number()
            # main line first, then other branches' heads by name, then new branches by digest
            ordered = sorted(
                (g for g in groups.values() if g),
                key=lambda g: (g[0].target.branch != MAIN_BRANCH, g[0].target.branch),
            )
            for group in ordered:
                plans.append(self._plan_merge(group, number, state))
                number += 1
            for v in sorted(branches, key=lambda v: v.digest):
                plans.append(self._plan_branch(v, number, lineage, state, [p[0] for p in plans]))
                number += 1
            published = self._publish(state, plans) if plans else []
            outcomes: dict[int, BundleOutcome] = {}
            refused = {r.index: r for r in rejected}
            for r in rejected:
                outcomes[r.index] = BundleOutcome(r.index, r.source, "rejected", error=r.error, check=r.check)
            for v in verified:
                i = index_of[id(v)]
                if i in outcomes:
                    continue
                # the same bundle given twice in one call shares the fate of its first copy
                first = refused.get(index_of[id(fresh[v.digest])]) if v.digest in fresh else None
                if first is not None:
                    outcomes[i] = BundleOutcome(i, v.bundle.source, "rejected", v.digest, v.site, first.error, first.check)
                else:
                    status = "unchanged" if v.noop else "accepted"
                    outcomes[i] = BundleOutcome(i, v.bundle.source, status, digest=v.digest, site=v.site)
            return MergeResult(
                published=published,
                unchanged=unchanged,
                rejected=rejected,
                head=self.lineage().head(MAIN_BRANCH),
                outcomes=[outcomes[i] for i in sorted(outcomes)],
            )

    def _plan_merge(
        self, group: list[VerifiedBundle], number: int, state: RepoState
    ) -> tuple[AtlasVersion, dict[str, bytes]]:
        target = group[0].target
        cond = _load_tensors(self._blob(target, CONDITIONS, state), f"{CONDITIONS} of version {target.number}")
        records = list(target.conditions)
        new_records: list[ConditionRecord] = []
        for v in group:
            cond.update(v.bundle.condition_tensors())
            new_records.extend(
                ConditionRecord(
                    name=n,
                    site=v.site,
                    introduced_in=number,
                    contribution=v.digest,
                    metrics=dict(v.bundle.manifest.metrics),
                )
                for n in v.conditions
            )
        new_records.sort(key=lambda r: r.name)
        cond_bytes = _save_tensors(cond)
        blobs = {CONDITIONS: cond_bytes}
        files = dict(target.model.files)
        files[CONDITIONS] = sha256_bytes(cond_bytes)
        model = target.model.model_copy(
            update={"conditions": [*target.model.conditions, *(r.name for r in new_records)], "files": files}
        )
        refs = dict(target.blobs)
        refs[CONDITIONS] = BlobRef(sha256=files[CONDITIONS], length=len(cond_bytes))
        parents = [target.id, *sorted({v.parent.id for v in group} - {target.id})]
        version = AtlasVersion(
            atlas=self.name,
            number=number,
            branch=target.branch,
            parents=parents,
            strategy="conditions",
            conditions=[*records, *new_records],
            model=model,
            blobs=refs,
        )
        return version, blobs

    def _plan_branch(
        self,
        v: VerifiedBundle,
        number: int,
        lineage: Lineage,
        state: RepoState,
        planned: list[AtlasVersion],
    ) -> tuple[AtlasVersion, dict[str, bytes]]:
        """A branch version: the parent with the bundle's shared tensors swapped in.

        The reference latent and labels are dropped: they were computed with
        the parent's encoder, which this branch changed, and the coordinator
        cannot recompute them from weights alone. A branch therefore offers
        embedding but no label transfer.
        """
        parent = v.parent
        tensors = {
            name: _load_tensors(self._blob(parent, name, state), f"{name} of version {parent.number}")
            for name in (WEIGHTS, CONDITIONS)
        }
        for (blob, key), t in v.bundle.shared_tensors().items():
            tensors[blob][key] = t
        tensors[CONDITIONS].update(v.bundle.condition_tensors())
        blobs = {name: _save_tensors(ts) for name, ts in tensors.items()}
        files = {name: sha256_bytes(b) for name, b in blobs.items()}
        model = parent.model.model_copy(
            update={
                "conditions": [*parent.model.conditions, *v.conditions],
                "files": files,
                "label_key": None,
                "label_categories": [],
                "train": parent.model.train.model_copy(update={"strategy": v.bundle.manifest.strategy}),
            }
        )
        taken = {e.branch for e in lineage.versions} | {p.branch for p in planned}
        branch = f"{v.site}/{v.bundle.manifest.strategy}@v{parent.number}"
        if branch in taken:
            branch = f"{branch}-{v.digest[:8]}"
        records = [
            *parent.conditions,
            *(
                ConditionRecord(
                    name=n,
                    site=v.site,
                    introduced_in=number,
                    contribution=v.digest,
                    metrics=dict(v.bundle.manifest.metrics),
                )
                for n in v.conditions
            ),
        ]
        version = AtlasVersion(
            atlas=self.name,
            number=number,
            branch=branch,
            parents=[parent.id],
            strategy=v.bundle.manifest.strategy,  # type: ignore[arg-type]
            conditions=records,
            model=model,
            blobs={n: BlobRef(sha256=files[n], length=len(b)) for n, b in blobs.items()},
        )
        return version, blobs


__all__ = [
    "Atlas",
    "AtlasConfig",
    "BundleOutcome",
    "EnrolledSite",
    "ExpiryPolicy",
    "MergeResult",
    "Rejection",
    "VerifiedBundle",
]
