"""The coordinator's TUF repository, written with python-tuf's Metadata API.

Why TUF and not "sign a manifest and serve it": a signature alone does not stop
a mirror (or a stale cache) from serving an *old* signed version forever
(freeze), from serving version 3 after a site saw version 4 (rollback), from
mixing files of two versions, or from streaming endless bytes. TUF's four roles
and the ``tuf.ngclient`` client check all of that; we only have to publish the
metadata correctly.

Roles: one Ed25519 key each for root, targets, snapshot and timestamp, threshold
1, private keys in the atlas directory's ``keys/`` (0700 dir, 0600 files), never
inside the served directory. Consistent snapshots are on, so every metadata and
target file that a version needs has a name of its own
(``metadata/<N>.targets.json``, ``metadata/<N>.snapshot.json``,
``targets/<dir>/<sha256>.<name>``) and nothing that a served version uses is
ever overwritten except ``metadata/timestamp.json``.

Why that makes publishing crash-safe: a publish writes, in this order,
(1) new target files, (2) ``<N+1>.targets.json``, (3) ``<M+1>.snapshot.json``,
each to a temporary file, fsync, ``os.replace``; nothing served points at them
yet. (4) ``timestamp.json`` is replaced atomically: that single rename is the
commit. Killed before it, the old timestamp still names the old snapshot, which
names the old targets, whose files are all still there: the previous version is
served and verifies. The leftovers are unreferenced files that the next publish
overwrites (same names, since it starts again from the committed versions).

Set ``FEDARCHES_PUBLISH_PAUSE`` to one of ``CHECKPOINTS`` to make a publishing
process stop there (it prints a line to stderr and sleeps), so a test can
SIGKILL it at an exact step.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, UTC
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import RepositoryError as TufRepositoryError, UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from fedarches.atomic import fsync_dir, write_bytes
from fedarches.errors import AtlasKeyError, HashError, MetadataError, RepositoryError as AtlasRepositoryError, SignatureError
from fedarches.format.signing import generate_key, load_private_key, write_private_key
from fedarches.format.canonical import sha256_bytes, sha256_file

ROLES = ("root", "targets", "snapshot", "timestamp")
PAUSE_ENV = "FEDARCHES_PUBLISH_PAUSE"
CHECKPOINTS = (
    "target-files",  # new target files written (content-addressed, unreferenced)
    "targets-metadata",  # <N+1>.targets.json written
    "snapshot-metadata",  # <M+1>.snapshot.json written
    "timestamp-temp",  # new timestamp in a temporary file, not yet renamed
    "committed",  # timestamp.json replaced: the new version is served
)
#: where ``fedarches.atomic`` leaves a temporary file a killed write never renamed
TMP_GLOB = ".*.tmp"
_SERIALIZER = JSONSerializer(compact=False)


class ExpiryPolicy(BaseModel):
    """Lifetime of each role's metadata, in seconds.

    Short timestamp lifetimes are what makes freeze attacks visible: a site
    refuses metadata past its expiry, so a coordinator must re-sign (any
    publish, or ``fedarches atlas refresh``) at least this often.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: int = Field(default=365 * 86400, gt=0)
    targets: int = Field(default=90 * 86400, gt=0)
    snapshot: int = Field(default=30 * 86400, gt=0)
    timestamp: int = Field(default=7 * 86400, gt=0)


def checkpoint(name: str) -> None:
    """Pause here forever when ``FEDARCHES_PUBLISH_PAUSE`` names this step (crash tests)."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"fedarches: paused at publish step {name}", file=sys.stderr, flush=True)
        while True:  # pragma: no cover - killed by the test
            time.sleep(3600)


def atomic_write(path: Path, data: bytes, *, pause: str | None = None) -> None:
    """``fedarches.atomic.write_bytes`` (0644), stopping at checkpoint ``pause`` before the rename."""
    write_bytes(path, data, mode=0o644, before_replace=(lambda: checkpoint(pause)) if pause else None)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def utc_timestamp() -> str:
    """Now, UTC, whole seconds, ``...Z`` (atlas creation, enrolment and publish times)."""
    return _now().isoformat().replace("+00:00", "Z")


def target_disk_name(path: str, sha256: str) -> str:
    """Where a consistent-snapshot client looks for target ``path``: hash-prefixed basename."""
    dirname, sep, base = path.rpartition("/")
    return f"{dirname}{sep}{sha256}.{base}"


@dataclass
class RepoState:
    """The committed metadata, as loaded and verified from disk."""

    root: Metadata[Root]
    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]


class TufRepository:
    """A TUF repository in ``repo_dir`` (``metadata/`` + ``targets/``) signed with keys in ``keys_dir``."""

    def __init__(self, repo_dir: Path, keys_dir: Path, expiry: ExpiryPolicy):
        self.repo_dir = Path(repo_dir)
        self.keys_dir = Path(keys_dir)
        self.expiry = expiry
        self._signers: dict[str, CryptoSigner] = {}

    @property
    def metadata_dir(self) -> Path:
        return self.repo_dir / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.repo_dir / "targets"

    # ---------------------------------------------------------------- keys
    def _key_path(self, role: str) -> Path:
        return self.keys_dir / f"{role}.pem"

    def signer(self, role: str) -> CryptoSigner:
        if role not in self._signers:
            path = self._key_path(role)
            if not path.is_file():
                raise AtlasKeyError(f"atlas key check failed: {path} is missing; the {role} role cannot sign")
            self._signers[role] = CryptoSigner(load_private_key(path).key)
        return self._signers[role]

    # -------------------------------------------------------------- create
    @classmethod
    def create(cls, repo_dir: Path, keys_dir: Path, expiry: ExpiryPolicy) -> TufRepository:
        """Generate role keys and publish root v1 with empty targets."""
        repo = cls(repo_dir, keys_dir, expiry)
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(keys_dir, 0o700)
        for role in ROLES:
            write_private_key(repo._key_path(role), generate_key())
        now = _now()
        root = Root(expires=now + timedelta(seconds=expiry.root), consistent_snapshot=True)
        for role in ROLES:
            root.add_key(repo.signer(role).public_key, role)
        root_md: Metadata[Root] = Metadata(root)
        root_md.sign(repo.signer("root"))
        repo.metadata_dir.mkdir(parents=True, exist_ok=True)
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(repo.metadata_dir / "1.root.json", root_md.to_bytes(_SERIALIZER))
        targets_md: Metadata[Targets] = Metadata(Targets(expires=now + timedelta(seconds=expiry.targets)))
        snapshot_md: Metadata[Snapshot] = Metadata(Snapshot(expires=now + timedelta(seconds=expiry.snapshot)))
        timestamp_md: Metadata[Timestamp] = Metadata(Timestamp(expires=now + timedelta(seconds=expiry.timestamp)))
        repo._write_chain(RepoState(root_md, timestamp_md, snapshot_md, targets_md), bump=False)
        return repo

    # ---------------------------------------------------------------- load
    def root_versions(self) -> list[int]:
        out = []
        for p in self.metadata_dir.glob("*.root.json"):
            head = p.name.split(".", 1)[0]
            if head.isdigit():
                out.append(int(head))
        return sorted(out)

    def root_bytes(self, version: int = 1) -> bytes:
        return (self.metadata_dir / f"{version}.root.json").read_bytes()

    def _load(self, path: Path, what: str) -> tuple[Metadata, bytes]:
        try:
            data = path.read_bytes()
            return Metadata.from_bytes(data), data
        except FileNotFoundError:
            raise AtlasRepositoryError(
                f"atlas repository check failed: {path} is missing ({what}); the published repository is incomplete"
            ) from None
        except DeserializationError as exc:
            raise MetadataError(f"metadata check failed: {path} is not TUF metadata ({exc})") from exc

    def current(self) -> RepoState:
        """Load the committed chain timestamp -> snapshot -> targets and verify its signatures.

        The coordinator re-checks its own published files before signing on top
        of them: a tampered served directory must not be laundered into a new,
        validly signed version.
        """
        roots = self.root_versions()
        if not roots:
            raise AtlasRepositoryError(f"atlas repository check failed: no root metadata in {self.metadata_dir}")
        root_md, _ = self._load(self.metadata_dir / f"{roots[-1]}.root.json", "root")
        ts_md, _ = self._load(self.metadata_dir / "timestamp.json", "timestamp")
        try:
            root_md.verify_delegate("timestamp", ts_md)
            snap_meta = ts_md.signed.snapshot_meta
            snap_md, snap_bytes = self._load(
                self.metadata_dir / f"{snap_meta.version}.snapshot.json", "snapshot named by timestamp.json"
            )
            snap_meta.verify_length_and_hashes(snap_bytes)
            root_md.verify_delegate("snapshot", snap_md)
            tmeta = snap_md.signed.meta["targets.json"]
            targets_md, targets_bytes = self._load(
                self.metadata_dir / f"{tmeta.version}.targets.json", "targets named by the snapshot"
            )
            tmeta.verify_length_and_hashes(targets_bytes)
            root_md.verify_delegate("targets", targets_md)
        except UnsignedMetadataError as exc:
            raise SignatureError(f"atlas repository signature check failed: {exc}") from exc
        except TufRepositoryError as exc:
            raise HashError(f"atlas repository hash check failed: {exc}") from exc
        return RepoState(root_md, ts_md, snap_md, targets_md)

    def target_info(self, path: str, state: RepoState | None = None) -> TargetFile | None:
        state = state or self.current()
        return state.targets.signed.targets.get(path)

    def read_target(self, path: str, state: RepoState | None = None) -> bytes:
        """Bytes of a committed target, checked against the signed length and sha256."""
        info = self.target_info(path, state)
        if info is None:
            raise AtlasRepositoryError(f"atlas repository check failed: {path} is not a published target")
        disk = self.targets_dir / target_disk_name(path, info.hashes["sha256"])
        try:
            data = disk.read_bytes()
        except FileNotFoundError:
            raise AtlasRepositoryError(f"atlas repository check failed: {disk} is missing") from None
        try:
            info.verify_length_and_hashes(data)
        except TufRepositoryError as exc:
            raise HashError(
                f"atlas repository hash check failed: {disk} does not match its signed hash "
                f"(it was changed on disk); restore it from a backup before publishing again"
            ) from exc
        return data

    # ------------------------------------------------------------- publish
    def cleanup(self) -> None:
        """Remove temporary files a killed publish left behind (never referenced)."""
        for p in self.repo_dir.rglob(TMP_GLOB):
            p.unlink(missing_ok=True)

    def publish(self, files: dict[str, bytes]) -> RepoState:
        """Add (or replace) target files and commit new targets, snapshot and timestamp."""
        self.cleanup()
        state = self.current()
        for path, data in sorted(files.items()):
            info = TargetFile.from_data(path, data, ["sha256"])
            disk = self.targets_dir / target_disk_name(path, info.hashes["sha256"])
            if not disk.is_file() or sha256_file(disk) != info.hashes["sha256"]:
                atomic_write(disk, data)
            state.targets.signed.targets[path] = info
        fsync_dir(self.targets_dir)
        checkpoint("target-files")
        self._write_chain(state, bump=True)
        return state

    def refresh(self, *, force: bool = False) -> bool:
        """Re-sign targets/snapshot/timestamp when past half their lifetime (or ``force``).

        Returns True when it published new metadata.
        """
        state = self.current()
        now = _now()
        due = force
        for md, life in (
            (state.targets, self.expiry.targets),
            (state.snapshot, self.expiry.snapshot),
            (state.timestamp, self.expiry.timestamp),
        ):
            if md.signed.expires - now < timedelta(seconds=life / 2):
                due = True
        if due:
            self.publish({})
        return due

    def _write_chain(self, state: RepoState, *, bump: bool) -> None:
        now = _now()
        targets = state.targets.signed
        snapshot = state.snapshot.signed
        timestamp = state.timestamp.signed
        if bump:
            targets.version += 1
            snapshot.version += 1
            timestamp.version += 1
        targets.expires = now + timedelta(seconds=self.expiry.targets)
        state.targets.sign(self.signer("targets"))
        targets_bytes = state.targets.to_bytes(_SERIALIZER)
        atomic_write(self.metadata_dir / f"{targets.version}.targets.json", targets_bytes)
        checkpoint("targets-metadata")

        snapshot.meta["targets.json"] = MetaFile(
            version=targets.version, length=len(targets_bytes), hashes={"sha256": sha256_bytes(targets_bytes)}
        )
        snapshot.expires = now + timedelta(seconds=self.expiry.snapshot)
        state.snapshot.sign(self.signer("snapshot"))
        snapshot_bytes = state.snapshot.to_bytes(_SERIALIZER)
        atomic_write(self.metadata_dir / f"{snapshot.version}.snapshot.json", snapshot_bytes)
        checkpoint("snapshot-metadata")

        timestamp.snapshot_meta = MetaFile(
            version=snapshot.version, length=len(snapshot_bytes), hashes={"sha256": sha256_bytes(snapshot_bytes)}
        )
        timestamp.expires = now + timedelta(seconds=self.expiry.timestamp)
        state.timestamp.sign(self.signer("timestamp"))
        atomic_write(
            self.metadata_dir / "timestamp.json", state.timestamp.to_bytes(_SERIALIZER), pause="timestamp-temp"
        )
        checkpoint("committed")
