"""Crash-safe file and directory writes, the one implementation every writer uses.

Why it matters here: a coordinator or a site killed half-way must leave either
the old state or the new one, never a torn file that a later check would
refuse (or, worse, accept). The pattern is always the same: write a temporary
sibling, fsync it, ``os.replace`` it into place, fsync the directory so the
rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fedarches.errors import OutputPathError


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
    mode: int | None = None,
    before_replace: Callable[[], None] | None = None,
) -> Path:
    """Write ``data`` to ``path`` atomically and durably.

    ``mode`` sets the file's permission bits explicitly (whatever the umask);
    ``before_replace`` runs between the fsync and the rename (crash tests
    pause there).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)
    return p


def write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> Path:
    return write_bytes(path, text.encode("utf-8"), mode=mode)


def replace_dir(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Move the fully written directory ``staged`` to ``target``, replacing any old one.

    The old directory is first renamed aside, so at every instant ``target``
    is either the complete old directory or the complete new one.
    """
    src, dst = Path(staged), Path(target)
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
def staged_dir(target: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """A temporary sibling of ``target`` that is removed unless the caller moved it.

    Use with ``replace_dir(staged, target)`` as the last step inside the block.
    """
    dst = Path(target)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{suffix}", dir=dst.parent))
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
