"""Crash-safe file and directory writes, the one implementation every writer uses.

Why it matters here: a coordinator or a site killed half-way must leave either
the old state or the new one, never a torn file that a later check would
refuse (or, worse, accept). The pattern is always the same: write a temporary
sibling, fsync it, ``os.replace`` it into place, fsync the directory so the
rename itself survives a power cut.

Why modes are set here and not left to the umask: the umask masks ``mkdir`` and
``open`` modes, so under ``umask 000`` a folder holding ``sites.json`` would be
world-writable and under ``umask 077`` the served repository unreadable by the
web server. Every folder this package creates goes through ``make_dirs`` and
every file through ``write_bytes`` or a staged directory, each with an
explicit mode: public folders 0755 and files 0644 (the served repository,
``atlas.json``, ``root.json``), private ones 0700 and 0600 (keys, the site
registry, a site's outputs and trust cache; the default).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fedarches.errors import OutputPathError

PUBLIC_DIR = 0o755
PUBLIC_FILE = 0o644
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def make_dirs(path: str | os.PathLike[str], mode: int = PUBLIC_DIR) -> Path:
    """``mkdir -p`` whose new folders get exactly ``mode`` (folders that existed are left as they are)."""
    p = Path(path)
    missing: list[Path] = []
    q = p
    while not q.exists() and q != q.parent:
        missing.append(q)
        q = q.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=mode)
        except FileExistsError:  # made by a concurrent writer: its mode is its own
            continue
        os.chmod(d, mode)
    if not p.is_dir():
        p.mkdir()  # raises the OSError that says why (a file in the way)
    return p


def set_tree_modes(root: str | os.PathLike[str], dir_mode: int) -> None:
    """Every folder below ``root`` (and ``root``) ``dir_mode``, every file the same without execute bits.

    What a staged directory holds is also written by libraries (anndata,
    safetensors, ``shutil.copytree``) whose files follow the umask; the tree
    takes its root's mode before it is renamed into place.
    """
    file_mode = dir_mode & 0o666
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            f = Path(dirpath) / name
            if not f.is_symlink():
                os.chmod(f, file_mode)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Persist a directory's entries (a rename is durable only after this)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync every file below ``path`` and every directory on the way."""
    root = Path(path)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)


def write_bytes(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = PRIVATE_FILE,
    before_replace: Callable[[], None] | None = None,
) -> Path:
    """Write ``data`` to ``path`` atomically and durably.

    ``mode`` sets the file's permission bits explicitly (whatever the umask);
    missing parent folders are made 0755 (``make_dirs``); ``before_replace``
    runs between the fsync and the rename (crash tests pause there).
    """
    p = Path(path)
    make_dirs(p.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)
    return p


def write_text(path: str | os.PathLike[str], text: str, *, mode: int = PRIVATE_FILE) -> Path:
    return write_bytes(path, text.encode("utf-8"), mode=mode)


def replace_dir(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Move the fully written directory ``staged`` to ``target``, replacing any old one.

    The old directory is first renamed aside, so at every instant ``target``
    is either the complete old directory or the complete new one. The tree
    takes the mode of ``staged`` (``staged_dir``'s ``mode``) first.
    """
    src, dst = Path(staged), Path(target)
    set_tree_modes(src, os.stat(src).st_mode & 0o777)
    fsync_tree(src)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)
    return dst


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike[str], *, suffix: str = "", mode: int = PRIVATE_DIR) -> Iterator[Path]:
    """A temporary sibling of ``target`` that is removed unless the caller moved it.

    Use with ``replace_dir(staged, target)`` as the last step inside the block;
    the directory then lands with ``mode`` (files: ``mode`` without execute bits).
    """
    dst = Path(target)
    make_dirs(dst.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{suffix}", dir=dst.parent))
    os.chmod(tmp, mode)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable_dir(path: str | os.PathLike[str], marker: str, what: str) -> Path:
    """``path`` may be replaced whole: absent, empty, or holding ``marker`` (an earlier ``what``).

    Why refuse anything else: outputs are swapped in whole (``replace_dir``), so an
    ``--out`` pointing at a directory of other files would remove them.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output path check failed: {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise OutputPathError(f"output path check failed: {out} exists and is not {what}; choose another --out")
    return out
