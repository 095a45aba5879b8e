"""What the coordinator checks before it commits a publish.

Why two checks and not one. The coordinator's own reading of the repository
(``TufRepository.current``) follows timestamp -> snapshot -> targets and
the newest root; a site follows the *root chain* from the root it pinned, file
by file, with python-tuf's rules. Where the two disagree (a stray
``metadata/2.root.json``, say) the coordinator would happily publish a
version that every site then refuses. So before signing it refuses a metadata
directory holding anything it did not write (``check_metadata_dir``), and
before the commit rename it runs a real ``tuf.ngclient.Updater`` against the
files on disk, serving the new timestamp from memory (``verify_as_fresh_site``):
what a brand-new site would get is exactly what is about to go live.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from fedarches.errors import RepositoryError

#: where the fresh-site check pretends the repository is served (never contacted)
CHECK_URL = "https://fedarches-publish-check.invalid"
_VERSIONED = re.compile(r"([1-9][0-9]*)\.(root|targets|snapshot)\.json")
_TMP = re.compile(r"\..+\.tmp")
_MOVE_AWAY = "the coordinator did not write it: move it out of {dir} and run the command again"


def _refuse(path: Path, why: str) -> RepositoryError:
    return RepositoryError(
        f"atlas repository check failed: {path} {why}; {_MOVE_AWAY.format(dir=path.parent)} "
        "(nothing was published)"
    )


def _load_root(path: Path, version: int) -> Metadata[Root]:
    try:
        md = Metadata.from_bytes(path.read_bytes())
    except (OSError, DeserializationError) as exc:
        raise _refuse(path, f"is not TUF metadata ({exc})") from exc
    if not isinstance(md.signed, Root):
        raise _refuse(path, f"holds {md.signed.type} metadata, not root")
    if md.signed.version != version:
        raise _refuse(path, f"holds root version {md.signed.version}, not {version}")
    return md


def verify_root_chain(metadata_dir: Path, root_keyid: str | None = None) -> Metadata[Root]:
    """The newest root of ``1.root.json``, ``2.root.json``, ... each signed by its predecessor and itself.

    ``root_keyid`` (the coordinator's root key, when it holds one) must be a
    root key of version 1: a ``1.root.json`` of another atlas is refused.
    """
    numbers = sorted(int(m.group(1)) for p in metadata_dir.iterdir()
                     if (m := _VERSIONED.fullmatch(p.name)) and m.group(2) == "root")
    if not numbers:
        raise RepositoryError(f"atlas repository check failed: no root metadata in {metadata_dir}")
    trusted: Metadata[Root] | None = None
    for n in range(1, numbers[-1] + 1):
        path = metadata_dir / f"{n}.root.json"
        if n not in numbers:
            raise RepositoryError(
                f"atlas repository check failed: {path} is missing but {numbers[-1]}.root.json exists; "
                f"{_MOVE_AWAY.format(dir=metadata_dir)} (the roots above version {n - 1})"
            )
        md = _load_root(path, n)
        try:
            for signer in (trusted or md, md):
                signer.verify_delegate(Root.type, md)
        except tuf_exc.UnsignedMetadataError as exc:
            raise _refuse(path, f"is not signed by the atlas's root keys ({exc})") from exc
        if n == 1 and root_keyid is not None and root_keyid not in md.signed.roles[Root.type].keyids:
            raise _refuse(path, "is not signed by keys/root.pem")
        trusted = md
    assert trusted is not None
    return trusted


def check_metadata_dir(metadata_dir: Path, roots: int, targets: int, snapshots: int) -> None:
    """Refuse any file in ``metadata/`` but the committed chain and what this publish will overwrite.

    Allowed: ``1..roots`` root files, ``1..targets+1`` targets and
    ``1..snapshots+1`` snapshot files (``+1``: what a killed publish left and
    this one rewrites), ``timestamp.json`` and temporary files of
    ``fedarches.atomic`` (removed before writing).
    """
    limits = {"root": roots, "targets": targets + 1, "snapshot": snapshots + 1}
    for p in sorted(metadata_dir.iterdir()):
        if p.is_symlink() or not p.is_file():
            raise _refuse(p, "is not a regular file")
        if p.name == "timestamp.json" or _TMP.fullmatch(p.name):
            continue
        m = _VERSIONED.fullmatch(p.name)
        if m is None:
            raise _refuse(p, "is not a file of the TUF repository")
        if int(m.group(1)) > limits[m.group(2)]:
            raise _refuse(p, f"is newer than the committed {m.group(2)} metadata (version {limits[m.group(2)]})")


class DirectoryFetcher(FetcherInterface):
    """Serves ``CHECK_URL/...`` from ``repo_dir`` on disk, with in-memory ``overrides`` by relative path.

    Only names inside ``metadata/`` and ``targets/`` are served; anything
    else, and any missing file, is a 404 (which ends ngclient's root walk).
    """

    def __init__(self, repo_dir: Path, overrides: dict[str, bytes]):
        self.repo_dir = Path(repo_dir).resolve()
        self.overrides = overrides

    def _fetch(self, url: str) -> Iterator[bytes]:
        prefix = f"{CHECK_URL}/"
        rel = unquote(url[len(prefix):]) if url.startswith(prefix) else ""
        if rel in self.overrides:
            return iter([self.overrides[rel]])
        path = (self.repo_dir / rel).resolve()
        top = rel.split("/", 1)[0]
        if top not in ("metadata", "targets") or not path.is_relative_to(self.repo_dir) or not path.is_file():
            raise tuf_exc.DownloadHTTPError(f"{url} is not in the repository", 404)
        return iter([path.read_bytes()])


def verify_as_fresh_site(
    repo_dir: Path, pinned_root: bytes, timestamp_bytes: bytes, targets: Iterable[str]
) -> None:
    """Refresh from ``pinned_root`` and download ``targets`` as a new site would, or raise RepositoryError.

    ``timestamp_bytes`` is the timestamp about to be committed; everything else
    comes from ``repo_dir`` as it is on disk now.
    """
    fetcher = DirectoryFetcher(repo_dir, {"metadata/timestamp.json": timestamp_bytes})
    with tempfile.TemporaryDirectory(prefix="fedarches-publish-check-") as work:
        try:
            updater = Updater(
                metadata_dir=work, metadata_base_url=f"{CHECK_URL}/metadata/", target_dir=work,
                target_base_url=f"{CHECK_URL}/targets/", fetcher=fetcher, config=UpdaterConfig(),
                bootstrap=pinned_root,
            )
            updater.refresh()
            for path in sorted(targets):
                info = updater.get_targetinfo(path)
                if info is None:
                    raise tuf_exc.RepositoryError(f"{path} is not in the new targets metadata")
                Path(updater.download_target(info, filepath=str(Path(work) / "download"))).unlink()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError, ValueError) as exc:
            raise RepositoryError(
                f"atlas repository check failed: the fresh-site TUF check (a tuf.ngclient client from the "
                f"pinned root.json against {repo_dir}) refused the new version: {type(exc).__name__}: {exc}; "
                "nothing was published and the previous version is still served"
            ) from exc
