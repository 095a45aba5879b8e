"""The coordinator's facade: an atlas directory, its lock, its reads, and the jobs it delegates.

Layout of ``ATLAS_DIR`` (only ``repository/`` is ever served; folders 0755 unless said)::

    ATLAS_DIR/
      atlas.json        name and metadata expiry policy
      root.json         the trust anchor to hand to sites out of band (TUF root v1)
      sites.json        0600; enrolled sites, their Ed25519 public keys and retired key ids,
                        sealed with an HMAC keyed by keys/registry.key (``registry``)
      keys/             0700; root.pem targets.pem snapshot.pem timestamp.pem registry.key (0600)
      .lock             0600; serialises writers (CLI, Flower ServerApp, ...)
      repository/       the static TUF repository: serve this directory
        metadata/       <N>.root.json, <N>.targets.json, <N>.snapshot.json, timestamp.json
        targets/        lineage.json, versions/<id>.json and blobs/<sha256>.safetensors,
                        each stored under a sha256-prefixed name (consistent snapshots)

The published repository is the only record of versions: the lineage, the
version manifests and the blobs are TUF targets. There is no second database
that a crash could leave disagreeing with what sites see (see
``server/repository.py`` for why a publish is atomic). The jobs live next
door: ``registry`` (enrolment), ``intake`` (bundle checks), ``merge``
(planning), ``publish`` (the commit), ``reference`` (training version 1).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from fedarches.atomic import PRIVATE_FILE, PUBLIC_DIR, PUBLIC_FILE, make_dirs, write_bytes
from fedarches.config import DEFAULT_LABEL_KNOWLEDGE, K_MIN, LabelKnowledge, TrainConfig
from fedarches.errors import AtlasDirError, InvalidNameError, LineageError, ParentError, ReferenceExistsError, UnknownVersionError
from fedarches.format.bundle import BundleSource
from fedarches.format.canonical import canonical_json
from fedarches.format.signing import PublicKey
from fedarches.format.version import LINEAGE_TARGET, MAIN_BRANCH, AtlasVersion, Lineage, LineageEntry, write_model_dir
from fedarches.server.intake import Intake, VerifiedBundle, verify_bundle
from fedarches.server.merge import MergeResult, merge_bundles
from fedarches.server.publish import publish_versions, reference_version
from fedarches.server.reference import ReferenceBuild, build_reference
from fedarches.server.registry import (
    EnrolledSite,
    SiteRegistry,
    as_public_key,
    enroll_site,
    key_changes,
    read_registry,
    write_registry,
)
from fedarches.server.repository import ExpiryPolicy, RepoState, TufRepository, utc_timestamp
from fedarches.server.store import VersionStore

ATLAS_FORMAT = "fedarches.atlas/1"


class AtlasConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = ATLAS_FORMAT
    name: str
    created: str
    expiry: ExpiryPolicy = ExpiryPolicy()


def _read_config(path: Path) -> AtlasConfig:
    cfg = path / "atlas.json"
    if not cfg.is_file():
        raise AtlasDirError(
            f"atlas directory check failed: {path} is not an atlas directory (no atlas.json); "
            "create one with `fedarches atlas init`"
        )
    try:
        config = AtlasConfig.model_validate_json(cfg.read_bytes())
    except ValidationError as exc:
        raise AtlasDirError(f"atlas directory check failed: {cfg} is invalid: {exc.errors()[0]['msg']}") from exc
    if config.format != ATLAS_FORMAT:
        raise AtlasDirError(
            f"atlas directory check failed: {cfg} has format {config.format!r}, expected {ATLAS_FORMAT!r}"
        )
    return config


def _check_new_dir(p: Path, name: str) -> None:
    if not name or any(ord(c) < 32 for c in name) or "/" in name:
        raise InvalidNameError(
            f"atlas name check failed: {name!r} must be non-empty, without '/' or control characters"
        )
    if p.exists() and any(p.iterdir()):
        hint = (
            "it is already an atlas (its keys are pinned by sites: keep using it)"
            if (p / "atlas.json").is_file()
            else "if an earlier `atlas init` was interrupted there, delete the directory and run it again"
        )
        raise AtlasDirError(
            f"atlas directory check failed: {p} exists and is not empty; `atlas init` needs a new directory ({hint})"
        )


def _make_public_dirs(p: Path) -> None:
    """The atlas folder and the served tree, 0755 whatever the umask.

    ``mkdir`` modes are masked by the umask, so a umask of 000 would leave
    folders anyone can write, including the one holding ``sites.json``; the
    explicit ``chmod`` pins them. ``keys/`` is made 0700 by the repository.
    Creating ``targets/versions`` and ``targets/blobs`` here means later
    publishes write into folders that already have the right mode.
    """
    for d in (p, p / "repository", p / "repository" / "metadata", p / "repository" / "targets",
              p / "repository" / "targets" / "versions", p / "repository" / "targets" / "blobs"):
        make_dirs(d, PUBLIC_DIR)
        os.chmod(d, PUBLIC_DIR)  # also a given empty folder


class Atlas:
    """An atlas directory (see module docstring). Open with ``Atlas(path)``, create with ``Atlas.init``."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.config = _read_config(self.path)
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

    @property
    def _sites_json(self) -> Path:
        return self.path / "sites.json"

    @classmethod
    def init(cls, path: str | os.PathLike[str], name: str, *, expiry: ExpiryPolicy | None = None) -> Atlas:
        """Create keys, an empty signed repository and ``root.json``.

        Refuses a non-empty directory: re-initialising would replace the root
        keys that every site has pinned.
        """
        p = Path(path)
        _check_new_dir(p, name)
        _make_public_dirs(p)
        write_bytes(p / ".lock", b"", mode=PRIVATE_FILE)
        config = AtlasConfig(name=name, created=utc_timestamp(), expiry=expiry or ExpiryPolicy())
        repo = TufRepository.create(p / "repository", p / "keys", config.expiry)
        repo.publish({LINEAGE_TARGET: Lineage(atlas=name, versions=[]).canonical()})
        write_registry(p / "sites.json", SiteRegistry())
        write_bytes(p / "root.json", repo.root_bytes(1), mode=PUBLIC_FILE)
        # atlas.json last: a directory without it is an interrupted init, not an atlas.
        write_bytes(p / "atlas.json", canonical_json(config), mode=PUBLIC_FILE)
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
    def lineage(self, state: RepoState | None = None) -> Lineage:
        lineage = Lineage.from_bytes(self.repo.read_target(LINEAGE_TARGET, state))
        if lineage.atlas != self.name:
            raise LineageError(
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
        state = state or self.repo.current()
        lineage = self.lineage(state)
        entry = next((e for e in lineage.versions if ref in (e.number, e.id)), None)
        if entry is None:
            raise UnknownVersionError(
                f"version check failed: version {str(ref)[:16]}... was never published by this atlas"
            )
        return VersionStore(self.repo, state).version(entry.id)

    def export_model(self, ref: int | str, out_dir: str | os.PathLike[str]) -> Path:
        """Write version ``ref`` as a model directory (the same files a site fetches)."""
        state = self.repo.current()
        version = self.version(ref, state)
        store = VersionStore(self.repo, state)
        return write_model_dir(out_dir, version, {name: store.blob(version, name) for name in version.blobs})

    # ------------------------------------------------------------ delegating
    def enroll(
        self, site: str, public_key: PublicKey | str | os.PathLike[str] | bytes, *, replace: bool = False
    ) -> EnrolledSite:
        """Record ``site``'s public key; only bundles it signs are accepted from ``site`` (``registry``).

        ``replace=True`` rotates the key of an enrolled site; the old key id is
        kept in ``sites.json`` and the rotation is published at once in the
        signed lineage (``Lineage.key_changes``: one TUF commit, no new
        version). Should that publish fail, the rotation still holds and the
        next enrol, merge or build publishes it.
        """
        key = as_public_key(public_key)
        with self._locked():
            if replace:
                self.repo.check_signers()  # a rotation must be publishable before sites.json changes
            entry = enroll_site(self._sites_json, site, key, replace=replace)
            self._publish_key_changes()
            return entry

    def _signed_lineage(self, state: RepoState, registry: SiteRegistry | None = None) -> Lineage:
        """The lineage to publish next: the current one with every key rotation the registry holds."""
        registry = registry if registry is not None else read_registry(self._sites_json)
        return self.lineage(state).model_copy(update={"key_changes": key_changes(registry)})

    def _publish_key_changes(self) -> None:
        state = self.repo.current()
        signed = self._signed_lineage(state)
        if signed != self.lineage(state):
            self.repo.publish({LINEAGE_TARGET: signed.canonical()})

    def _intake(self, state: RepoState) -> Intake:
        return Intake(self.name, self.lineage(state), read_registry(self._sites_json), VersionStore(self.repo, state))

    def verify_bundle(self, source: BundleSource) -> VerifiedBundle:
        """Run every intake check on one bundle without changing anything."""
        return verify_bundle(source, self._intake(self.repo.current()))

    def merge(self, sources: Sequence[BundleSource], *, skip_invalid: bool = False) -> MergeResult:
        """Verify bundles and publish what they add, in one atomic TUF commit.

        All-or-nothing by default: the first failing check raises and nothing
        is published. With ``skip_invalid=True`` (the Flower server: one bad
        site must not sink a round) failing bundles are listed in
        ``rejected`` and the rest are merged; two bundles of one site claiming
        the same condition name are then both rejected, so the outcome does not
        depend on which arrived first (other sites' names never clash:
        ``format.identity``).
        """
        with self._locked():
            state = self.repo.current()
            intake = self._intake(state)
            if sources and not intake.lineage.versions:
                raise ParentError(
                    f"parent check failed: atlas {self.name!r} has no reference yet; run `fedarches atlas build` first"
                )
            return merge_bundles(
                sources,
                intake,
                lambda plans: publish_versions(self.repo, state, self._signed_lineage(state, intake.registry), plans),
                lambda: self.head(MAIN_BRANCH),
                skip_invalid=skip_invalid,
            )

    def _refuse_second_reference(self, state: RepoState | None = None) -> None:
        if self.lineage(state).versions:
            raise ReferenceExistsError(
                f"reference check failed: atlas {self.name!r} already has a reference (version 1); build a new "
                "atlas directory for a new reference, or grow this one with `atlas merge`"
            )

    def publish_reference(
        self, model_dir: str | os.PathLike[str], *, metrics: Mapping[str, Any] | None = None
    ) -> LineageEntry:
        """Publish a trained reference model directory as version 1 of the main line."""
        return self._publish_version_one(*reference_version(self.name, model_dir, metrics))

    def _publish_version_one(self, version: AtlasVersion, blobs: Mapping[str, bytes]) -> LineageEntry:
        with self._locked():
            state = self.repo.current()
            self._refuse_second_reference(state)
            return publish_versions(self.repo, state, self._signed_lineage(state), [(version, blobs)])[0]

    def publish_federated_reference(
        self, model_dir: str | os.PathLike[str], *, holders: Mapping[str, str], build: Mapping[str, Any]
    ) -> LineageEntry:
        """Version 1 from a reference the sites trained together (``federation/reference_*``).

        As ``publish_reference``; each study's signed record also carries ``build`` (sites,
        rounds, strategy) and ``held_by``, the site that holds its cells. The studies stay
        reference studies (site ``coordinator``), so every later step treats them as any."""
        version, blobs = reference_version(self.name, model_dir, build)
        version = version.model_copy(update={"conditions": [
            c.model_copy(update={"metrics": {**c.metrics, "held_by": holders[c.name]}}) for c in version.conditions]})
        return self._publish_version_one(version, blobs)

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
        device: str = "auto",
        layer: str | None = None,
        progress: bool = False,
        reference_studies: Sequence[str] | None = None,
        label_knowledge: LabelKnowledge = DEFAULT_LABEL_KNOWLEDGE,
        k_min: int = K_MIN,
    ) -> ReferenceBuild:
        """Train the reference (``server/reference.py``) and publish it as version 1.

        ``data`` is an AnnData or a path to ``.h5ad``; ``reference_studies``
        picks which values of ``condition_key`` form the reference (default:
        all). Refuses before training when the atlas already has a reference.
        ``label_knowledge``: "summaries" publishes class summaries (every component
        >= ``k_min`` cells, no per-cell array), "cells" the per-cell reference latent.
        Returns the lineage entry and a summary of what was built.
        """
        self._refuse_second_reference()
        return build_reference(
            self.path,
            lambda model_dir, metrics: self.publish_reference(model_dir, metrics=metrics),
            data,
            condition_key,
            label_key,
            kind=kind,
            train=TrainConfig(epochs=epochs, seed=seed, threads=threads, device=device),
            n_genes=n_genes,
            layer=layer,
            progress=progress,
            reference_studies=reference_studies,
            label_knowledge=label_knowledge,
            k_min=k_min,
        )

    def refresh(self, *, force: bool = False) -> bool:
        """Re-sign the timestamp/snapshot/targets metadata if they are past half their life."""
        with self._locked():
            return self.repo.refresh(force=force)


__all__ = ["Atlas", "AtlasConfig", "ATLAS_FORMAT"]
