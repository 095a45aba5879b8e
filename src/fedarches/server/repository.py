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

What a publish refuses (``server/publish_checks.py``): a missing role key,
before anything is written; a metadata directory holding a file this
coordinator did not write (a stray ``2.root.json`` would make every site
refuse the atlas); and, just before the commit, a version that a fresh
``tuf.ngclient`` client bootstrapped from root v1 would not accept. A publish
that fails (a refused check, a full disk) removes the files it added.

Set ``FEDARCHES_PUBLISH_PAUSE`` to one of ``CHECKPOINTS`` to make a publishing
process stop there (it prints a line to stderr and sleeps), so a test can
SIGKILL it at an exact step.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable, Iterable
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

from fedarches.atomic import PRIVATE_DIR, PUBLIC_DIR, PUBLIC_FILE, fsync_dir, make_dirs, write_bytes
from fedarches.errors import AtlasKeyError, HashError, MetadataError, RepositoryError as AtlasRepositoryError, SignatureError
from fedarches.format.signing import generate_key, load_private_key, write_private_key
from fedarches.format.canonical import sha256_bytes, sha256_file
from fedarches.server.publish_checks import check_metadata_dir, verify_as_fresh_site, verify_root_chain

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
    try:
        write_bytes(path, data, mode=PUBLIC_FILE, before_replace=(lambda: checkpoint(pause)) if pause else None)
    except OSError as exc:
        if exc.filename is None:  # a refused write or fsync names no file: say which one
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _write_failure(exc: OSError) -> str:
    """One line for a write the operating system refused (a full disk, ``ulimit -f``, permissions)."""
    where = f" ({exc.filename})" if exc.filename else ""
    why = "no space left for the repository files" if exc.errno in _NO_SPACE else "cannot write the repository"
    return (
        f"atlas repository check failed: {why}{where}: {exc.strerror or exc}; nothing was published, the "
        "previous version is still served and the files of this attempt were removed; fix it and run the command again"
    )


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

    def _root_keyid(self) -> str | None:
        """The root key this coordinator holds, or None when the root key is kept offline."""
        return self.signer("root").public_key.keyid if self._key_path("root").is_file() else None

    def signer(self, role: str) -> CryptoSigner:
        if role not in self._signers:
            path = self._key_path(role)
            if not path.is_file():
                raise AtlasKeyError(
                    f"atlas key check failed: {path} is missing; the {role} role cannot sign. Nothing was "
                    "written: restore the key file from your backup and run the command again"
                )
            self._signers[role] = CryptoSigner(load_private_key(path).key)
        return self._signers[role]

    # -------------------------------------------------------------- create
    @classmethod
    def create(cls, repo_dir: Path, keys_dir: Path, expiry: ExpiryPolicy) -> TufRepository:
        """Generate role keys and publish root v1 with empty targets."""
        repo = cls(repo_dir, keys_dir, expiry)
        make_dirs(keys_dir, PRIVATE_DIR)
        os.chmod(keys_dir, PRIVATE_DIR)  # also when it existed
        for role in ROLES:
            write_private_key(repo._key_path(role), generate_key())
        now = _now()
        root = Root(expires=now + timedelta(seconds=expiry.root), consistent_snapshot=True)
        for role in ROLES:
            root.add_key(repo.signer(role).public_key, role)
        root_md: Metadata[Root] = Metadata(root)
        root_md.sign(repo.signer("root"))
        make_dirs(repo.metadata_dir, PUBLIC_DIR)
        make_dirs(repo.targets_dir, PUBLIC_DIR)
        atomic_write(repo.metadata_dir / "1.root.json", root_md.to_bytes(_SERIALIZER))
        targets_md: Metadata[Targets] = Metadata(Targets(expires=now + timedelta(seconds=expiry.targets)))
        snapshot_md: Metadata[Snapshot] = Metadata(Snapshot(expires=now + timedelta(seconds=expiry.snapshot)))
        timestamp_md: Metadata[Timestamp] = Metadata(Timestamp(expires=now + timedelta(seconds=expiry.timestamp)))
        repo._write_chain(RepoState(root_md, timestamp_md, snapshot_md, targets_md), bump=False)
        return repo

    # ---------------------------------------------------------------- load
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
        root_md = verify_root_chain(self.metadata_dir, self._root_keyid())
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

    def check_signers(self) -> None:
        """Every online role key is there (raises ``AtlasKeyError`` naming the missing one)."""
        for role in ROLES[1:]:
            self.signer(role)

    def publish(self, files: dict[str, bytes], *, check: Iterable[str] | None = None) -> RepoState:
        """Add (or replace) target files and commit new targets, snapshot and timestamp.

        Before anything is written: every signing key is there and the metadata
        directory holds only what this coordinator wrote. Before the commit: a
        fresh site would accept the new version and download the targets in
        ``check`` (default: all of ``files``). A publish that fails removes the
        files it added, so the repository is as it was.
        """
        self.check_signers()
        state = self.current()
        check_metadata_dir(
            self.metadata_dir, state.root.signed.version, state.targets.signed.version, state.snapshot.signed.version
        )
        self.cleanup()
        to_check = sorted(files if check is None else check)
        written: list[Path] = []  # emptied at the commit: after it, nothing is removed
        try:
            self._write_targets(state, files, written)
            checkpoint("target-files")
            self._write_chain(
                state,
                bump=True,
                written=written,
                before_commit=lambda ts: verify_as_fresh_site(self.repo_dir, self.root_bytes(1), ts, to_check),
            )
        except OSError as exc:
            raise AtlasRepositoryError(_write_failure(exc)) from exc
        finally:
            for p in written:
                p.unlink(missing_ok=True)
        return state

    def _write_targets(self, state: RepoState, files: dict[str, bytes], written: list[Path]) -> None:
        for path, data in sorted(files.items()):
            info = TargetFile.from_data(path, data, ["sha256"])
            disk = self.targets_dir / target_disk_name(path, info.hashes["sha256"])
            present = disk.is_file()
            if not present or sha256_file(disk) != info.hashes["sha256"]:
                if not present:
                    written.append(disk)
                atomic_write(disk, data)
            state.targets.signed.targets[path] = info
        fsync_dir(self.targets_dir)

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

    def _write_chain(
        self,
        state: RepoState,
        *,
        bump: bool,
        written: list[Path] | None = None,
        before_commit: Callable[[bytes], None] | None = None,
    ) -> None:
        """Write targets, snapshot, then the timestamp (the commit); ``written`` lists the uncommitted files."""
        written = [] if written is None else written
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
        written.append(self.metadata_dir / f"{targets.version}.targets.json")
        atomic_write(written[-1], targets_bytes)
        checkpoint("targets-metadata")

        snapshot.meta["targets.json"] = MetaFile(
            version=targets.version, length=len(targets_bytes), hashes={"sha256": sha256_bytes(targets_bytes)}
        )
        snapshot.expires = now + timedelta(seconds=self.expiry.snapshot)
        state.snapshot.sign(self.signer("snapshot"))
        snapshot_bytes = state.snapshot.to_bytes(_SERIALIZER)
        written.append(self.metadata_dir / f"{snapshot.version}.snapshot.json")
        atomic_write(written[-1], snapshot_bytes)
        checkpoint("snapshot-metadata")

        timestamp.snapshot_meta = MetaFile(
            version=snapshot.version, length=len(snapshot_bytes), hashes={"sha256": sha256_bytes(snapshot_bytes)}
        )
        timestamp.expires = now + timedelta(seconds=self.expiry.timestamp)
        state.timestamp.sign(self.signer("timestamp"))
        timestamp_bytes = state.timestamp.to_bytes(_SERIALIZER)
        if before_commit is not None:
            before_commit(timestamp_bytes)
        atomic_write(self.metadata_dir / "timestamp.json", timestamp_bytes, pause="timestamp-temp")
        written.clear()
        checkpoint("committed")
