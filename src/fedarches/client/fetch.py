"""Fetching a verified atlas version through ``tuf.ngclient``.

Why ngclient does the work: the site pins the atlas's ``root.json`` (handed
out of band) and ngclient walks root -> timestamp -> snapshot -> targets,
checking signatures, thresholds, version numbers against what this site saw
before (rollback), expiry (freeze), hashes and lengths of every file, and upper
bounds on every download (endless data). This module only chooses which
targets to ask for and turns ngclient's exceptions into ``VerificationError``
messages that name the failed check.

Site state. ngclient keeps the last trusted metadata in a cache directory;
that memory is what makes a rolled-back timestamp detectable. We key the cache
by the sha256 of the pinned root (two mirrors of one atlas share it), run each
fetch on a copy, and swap the copy in only after the whole fetch verified. A
refused fetch therefore leaves the cache, and the output directory, exactly as
they were.

Time. Every download of one fetch goes through one ``TimedFetcher``: a read
that waits longer than ``stall_s`` (default 20 s) or a fetch that runs past
``deadline_s`` (default 300 s, counted from taking the cache lock) is refused
with a one-line ``DownloadError``; nothing is retried.

Leftovers. Work directories are siblings named ``.<cache>.<random>`` (and
``.<out>.<random>`` for the output, staged by ``write_model_dir``). They are
removed on every exit Python sees; a SIGKILLed fetch leaves them, so the next
fetch removes them: inside the cache lock (and the lock on the output's
parent folder) no other fetch can own one, so every such sibling is stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from fedarches.atomic import PRIVATE_DIR, PRIVATE_FILE, make_dirs, set_tree_modes
from fedarches.client.transport import FetchFault, TimedFetcher
from fedarches.errors import (
    DownloadError,
    OutputPathError,
    SettingError,
    ExpiryError,
    HashError,
    LengthError,
    MetadataError,
    RollbackError,
    SignatureError,
    TargetError,
    TrustCacheError,
    TrustRootError,
    UnknownVersionError,
    VerificationError,
    VersionManifestError,
)
from fedarches.format.version import AtlasVersion, LINEAGE_TARGET, Lineage, LineageEntry, MAIN_BRANCH, blob_target, version_target, write_model_dir

CACHE_ENV = "FEDARCHES_CACHE"
USER_AGENT = "fedarches-site"
DEADLINE_S = 300.0
STALL_S = 20.0
# What tempfile.mkdtemp appends (8 characters of its alphabet), or the ".old" of a two-step swap.
_WORK_SUFFIX = re.compile(r"(old|[a-z0-9_]{8})")


def site_cache_dir(root_bytes: bytes, site: str | None = None) -> Path:
    """Where a site keeps its trusted metadata for one atlas (one atlas = one pinned root).

    Each site gets its own (``<cache root>/sites/<site>/tuf/<root digest>``): two sites
    on one machine sharing one cache would each see the other's newer metadata, and the
    rollback memory of one would be the other's. Without a site name (a plain
    ``site fetch``): ``<cache root>/tuf/<root digest>``.
    """
    digest = hashlib.sha256(root_bytes).hexdigest()[:16]
    if not site:
        return default_cache_root() / "tuf" / digest
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", site).strip(".") or "site"
    return default_cache_root() / "sites" / f"{safe}-{hashlib.sha256(site.encode()).hexdigest()[:8]}" / "tuf" / digest


def default_cache_root() -> Path:
    """``$FEDARCHES_CACHE`` or ``$XDG_CACHE_HOME/fedarches`` (``~/.cache/fedarches``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "fedarches"


def tuf_error(exc: BaseException, what: str) -> VerificationError:
    """Name the TUF check that failed, and what the site can do about it."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return ExpiryError(
            f"expiry check failed while {what}: {msg}. The atlas metadata is past its expiry date: either "
            "the coordinator stopped re-signing (ask it to run `fedarches atlas refresh`) or someone is "
            "replaying old metadata (a freeze attack). Nothing was loaded"
        )
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        return RollbackError(
            f"rollback check failed while {what}: {msg}. The server offers older metadata than this site "
            "has already seen; refusing to go back to an old atlas version. Nothing was loaded"
        )
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return SignatureError(
            f"signature check failed while {what}: {msg}. The metadata is not signed by the keys of the "
            "pinned root.json (wrong --trust file, or tampered metadata). Nothing was loaded"
        )
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return HashError(
            f"hash check failed while {what}: {msg}. A file differs from what the atlas signed "
            "(tampered or corrupted on the server or in transit). Nothing was loaded"
        )
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        return LengthError(
            f"length check failed while {what}: {msg}. The server sent more data than the signed "
            "length allows (an endless-data attack or a broken server). Nothing was loaded"
        )
    if isinstance(exc, FetchFault):
        end = " " if msg.endswith("?") else ". "
        return DownloadError(f"download check failed while {what}: {msg}{end}Nothing was loaded")
    if isinstance(exc, tuf_exc.SlowRetrievalError):
        return DownloadError(f"download check failed while {what}: the server is too slow ({msg}). Nothing was loaded")
    if isinstance(exc, tuf_exc.DownloadHTTPError):
        return DownloadError(
            f"download check failed while {what}: HTTP {exc.status_code} ({msg}); is --atlas the URL "
            "that `fedarches atlas serve` prints? Nothing was loaded"
        )
    if isinstance(exc, tuf_exc.DownloadError):
        cause = exc.__cause__ or exc.__context__
        detail = f"{msg} ({cause})" if cause else msg
        return DownloadError(
            f"download check failed while {what}: {detail}; is the atlas server running and --atlas right?"
        )
    if isinstance(exc, tuf_exc.RepositoryError):
        return MetadataError(f"metadata check failed while {what}: {msg}. Nothing was loaded")
    return VerificationError(f"check failed while {what}: {type(exc).__name__}: {msg}")


@dataclass(frozen=True)
class FetchedVersion:
    """A verified version written as a model directory."""

    path: Path
    version: AtlasVersion
    entry: LineageEntry

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def number(self) -> int:
        return self.entry.number


class AtlasClient:
    """A site's view of one atlas: URL + pinned root + local trusted-metadata cache.

    ``url`` is the base of the served repository (``<url>/metadata/``,
    ``<url>/targets/``). ``trust`` is the pinned root.json (path or bytes).
    ``deadline_s`` bounds one whole fetch (or lineage read) and ``stall_s``
    each wait for the server; both are ignored when a ``fetcher`` is given.
    """

    def __init__(
        self,
        url: str,
        trust: str | os.PathLike[str] | bytes,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        site: str | None = None,
        fetcher: FetcherInterface | None = None,
        config: UpdaterConfig | None = None,
        deadline_s: float = DEADLINE_S,
        stall_s: float = STALL_S,
    ):
        for name, value in (("deadline_s", deadline_s), ("stall_s", stall_s)):
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise SettingError(f"setting check failed: {name} must be a positive number of seconds, not {value!r}")
        self.deadline_s, self.stall_s = float(deadline_s), float(stall_s)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise VerificationError(f"atlas URL check failed: {url!r} is not an http(s) URL")
        self.url = url.rstrip("/")
        if isinstance(trust, bytes):
            self.root_bytes = trust
        else:
            p = Path(trust)
            if not p.is_file():
                raise TrustRootError(
                    f"trust root check failed: {p} does not exist; pass the root.json the coordinator "
                    "handed you (`fedarches atlas init` prints where it is)"
                )
            self.root_bytes = p.read_bytes()
        self.cache_dir = Path(cache_dir) if cache_dir else site_cache_dir(self.root_bytes, site)
        self._fetcher = fetcher
        self._config = config or UpdaterConfig(app_user_agent=USER_AGENT)

    # ------------------------------------------------------------ cache
    @contextlib.contextmanager
    def _session(self) -> Iterator[Updater]:
        """An Updater over a copy of the cache; the copy replaces the cache only on success."""
        try:
            cache = self.cache_dir
            make_dirs(cache.parent)
            with _lock_file(cache.parent / f".{cache.name}.lock") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                old = cache.with_name(f".{cache.name}.old")
                remove_stale_work_dirs(cache)
                work = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
                try:
                    if cache.exists():
                        shutil.copytree(cache, work, symlinks=True, dirs_exist_ok=True)
                    targets = work / "downloads"
                    make_dirs(targets, PRIVATE_DIR)
                    try:
                        updater = Updater(
                            metadata_dir=str(work),
                            metadata_base_url=f"{self.url}/metadata/",
                            target_dir=str(targets),
                            target_base_url=f"{self.url}/targets/",
                            fetcher=self._fetcher or TimedFetcher(
                                stall_s=self.stall_s, deadline_s=self.deadline_s, app_user_agent=USER_AGENT
                            ),
                            config=self._config,
                            bootstrap=self.root_bytes,
                        )
                    except (tuf_exc.RepositoryError, ValueError) as exc:
                        raise TrustRootError(
                            f"trust root check failed: the pinned root.json is not valid TUF root metadata ({exc})"
                        ) from exc
                    yield updater
                    shutil.rmtree(targets, ignore_errors=True)
                    set_tree_modes(work, PRIVATE_DIR)  # ngclient's files follow the umask
                    shutil.rmtree(old, ignore_errors=True)
                    if cache.exists():
                        os.replace(cache, old)
                    os.replace(work, cache)
                    shutil.rmtree(old, ignore_errors=True)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        except OSError as exc:  # the site's own disk (cache folder), not the server
            raise TrustCacheError(
                f"trust cache check failed: could not use the trusted-metadata cache {self.cache_dir}: {exc}; "
                "check the disk and its permissions, or pass --cache DIR"
            ) from exc

    # --------------------------------------------------------- targets
    @staticmethod
    def _download(updater: Updater, path: str, what: str) -> bytes:
        try:
            info = updater.get_targetinfo(path)
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
            raise tuf_error(exc, what) from exc
        if info is None:
            raise TargetError(f"target check failed while {what}: the atlas does not publish {path}")
        try:
            local = updater.download_target(info)
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
            raise tuf_error(exc, what) from exc
        data = Path(local).read_bytes()
        os.unlink(local)
        return data

    def _lineage(self, updater: Updater) -> Lineage:
        try:
            updater.refresh()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
            raise tuf_error(exc, f"refreshing the atlas metadata from {self.url}") from exc
        return Lineage.from_bytes(self._download(updater, LINEAGE_TARGET, "downloading the lineage"))

    def lineage(self) -> Lineage:
        """The verified list of published versions."""
        with self._session() as updater:
            return self._lineage(updater)

    @staticmethod
    def _choose(lineage: Lineage, version: int | None, branch: str) -> LineageEntry:
        if version is not None:
            return lineage.by_number(version)
        head = lineage.head(branch)
        if head is None:
            raise UnknownVersionError(
                f"version check failed: atlas {lineage.atlas!r} has published no version on branch {branch!r} yet "
                "(the coordinator runs `fedarches atlas build` first)"
            )
        return head

    def fetch_blobs(
        self, version: int | None = None, *, branch: str = MAIN_BRANCH
    ) -> tuple[AtlasVersion, LineageEntry, dict[str, bytes]]:
        """Verified version manifest and blob bytes of ``version`` (default: head of ``branch``)."""
        with self._session() as updater:
            lineage = self._lineage(updater)
            entry = self._choose(lineage, version, branch)
            what = f"downloading version {entry.number}"
            data = self._download(updater, version_target(entry.id), f"{what} (manifest)")
            manifest = AtlasVersion.from_bytes(data, expected_id=entry.id)
            if manifest.number != entry.number or manifest.branch != entry.branch or manifest.atlas != lineage.atlas:
                raise VersionManifestError(
                    f"version manifest check failed: version {entry.number} manifest says number "
                    f"{manifest.number}, branch {manifest.branch!r}, atlas {manifest.atlas!r}"
                )
            blobs: dict[str, bytes] = {}
            for filename, ref in sorted(manifest.blobs.items()):
                blob = self._download(updater, blob_target(ref.sha256), f"{what} ({filename})")
                if hashlib.sha256(blob).hexdigest() != ref.sha256:
                    raise HashError(
                        f"hash check failed while {what}: {filename} is not the blob its manifest names"
                    )
                blobs[filename] = blob
            return manifest, entry, blobs

    def fetch(
        self, out_dir: str | os.PathLike[str], version: int | None = None, *, branch: str = MAIN_BRANCH,
        replace_newer: bool = False,
    ) -> FetchedVersion:
        """Download, verify and write ``version`` (default: newest on ``branch``) as a model directory.

        Nothing is written unless every check passed; an existing model
        directory at ``out_dir`` is replaced atomically, but never by an older
        version of the same atlas unless ``replace_newer`` (``--force``).
        """
        manifest, entry, blobs = self.fetch_blobs(version, branch=branch)
        target = Path(out_dir)
        try:
            make_dirs(target.parent)
            with _dir_lock(target.parent):
                remove_stale_work_dirs(target)
                path = write_model_dir(target, manifest, blobs, replace_newer=replace_newer)
        except OSError as exc:
            raise OutputPathError(f"output path check failed: could not write {target}: {exc}") from exc
        return FetchedVersion(path=path, version=manifest, entry=entry)


def remove_stale_work_dirs(target: Path) -> None:
    """Remove ``.<target>.<random>`` work siblings a killed run left; the caller holds the lock.

    A ``.<target>.old`` with no ``target`` is the complete old copy of a swap
    cut between its two renames: it is put back rather than removed.
    """
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)
    prefix = f".{target.name}."
    for p in target.parent.iterdir():
        if p.name.startswith(prefix) and _WORK_SUFFIX.fullmatch(p.name[len(prefix):]) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _lock_file(path: Path):  # type: ignore[no-untyped-def]
    """The cache's lock file, 0600 whatever the umask (opened for flock)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    return os.fdopen(fd, "r+b")


@contextlib.contextmanager
def _dir_lock(folder: Path) -> Iterator[None]:
    """Exclusive flock on a folder itself (no lock file left next to the output)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
