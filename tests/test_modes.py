"""Folder and file modes are the documented ones whatever the umask (``fedarches.atomic``).

The atlas directory: folders 0755 (``keys/`` 0700), the served repository,
``atlas.json`` and ``root.json`` 0644, ``sites.json``, ``.lock`` and every key
0600. What a site or an export writes (model directories, the trust cache)
is private: folders 0700, files 0600. Checked after a full init + build +
enroll + merge + fetch under umask 000 and 077, with the publish folders
removed after init so that the publishes have to create them.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from fedarches.atomic import make_dirs
from fedarches.client import AtlasClient
from fedarches.server import Atlas
from test_atlas_support import Served, bundle_for, enrolled_key

PRIVATE_NAMES = {"sites.json", ".lock"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _atlas_problems(root: Path) -> list[str]:
    bad = []
    for p in [root, *root.rglob("*")]:
        private = "keys" in p.relative_to(root).parts or p.name in PRIVATE_NAMES
        want = (0o700 if private else 0o755) if p.is_dir() else (0o600 if private else 0o644)
        if _mode(p) != want:
            bad.append(f"{p.relative_to(root.parent)}: {_mode(p):o}, documented {want:o}")
    return bad


def _private_problems(root: Path) -> list[str]:
    paths = [p for p in [root, *root.rglob("*")] if not p.is_symlink()]  # a link's own mode means nothing
    return [f"{p}: {_mode(p):o}" for p in paths if _mode(p) != (0o700 if p.is_dir() else 0o600)]


@pytest.fixture(scope="module")
def reference():
    from test_site_map import simulate

    a = simulate(per_study=60, n_genes=30)
    return a[a.obs["study"].isin(["ref_a", "ref_b"])].copy()


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_full_run_leaves_documented_modes(tmp_path, reference, umask):
    old = os.umask(umask)
    try:
        atlas = Atlas.init(tmp_path / "atlas", "modes")
        for d in ("versions", "blobs"):  # as an atlas made before init created them
            shutil.rmtree(atlas.repository_dir / "targets" / d)
        atlas.build(reference, "study", "cell_type", kind="trvae", epochs=1, n_genes=0, threads=1)
        key = enrolled_key(atlas, "site-a")
        atlas.merge([bundle_for(atlas, key, "site-a", ["qa"])])
        exported = atlas.export_model(2, tmp_path / "export")
        served = Served(atlas.repository_dir)
        try:
            fetched = AtlasClient(served.url, atlas.root_json, cache_dir=tmp_path / "site" / "cache").fetch(
                tmp_path / "site" / "model"
            )
        finally:
            served.close()
    finally:
        os.umask(old)
    assert _atlas_problems(atlas.path) == []
    assert _private_problems(exported) == []
    assert _private_problems(fetched.path) == []
    assert _private_problems(tmp_path / "site" / "cache") == []
    assert _mode(tmp_path / "site") == 0o755  # a missing parent of --out / --cache: a plain folder
    assert [p.name for p in (tmp_path / "site").iterdir() if p.name.startswith(".")] == [".cache.lock"]
    assert _mode(tmp_path / "site" / ".cache.lock") == 0o600


def test_make_dirs_sets_the_mode_of_every_folder_it_creates(tmp_path):
    old = os.umask(0o077)
    try:
        make_dirs(tmp_path / "a" / "b" / "c")
        make_dirs(tmp_path / "k" / "l", 0o700)
    finally:
        os.umask(old)
    assert [_mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o755] * 3
    assert [_mode(tmp_path / p) for p in ("k", "k/l")] == [0o700] * 2
    os.chmod(tmp_path / "a", 0o750)
    make_dirs(tmp_path / "a" / "x")
    assert _mode(tmp_path / "a") == 0o750  # an existing folder keeps its mode
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(OSError):
        make_dirs(tmp_path / "f")
