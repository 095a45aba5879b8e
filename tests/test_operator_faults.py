"""Operator faults (issue 12, item 8): key rotation, key files, empty data, modes, registry integrity.

Real files, real keys and the real CLI throughout: these are the mistakes an
operator makes at a shell, so the tests make them the same way.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from fedarches.cli import main
from fedarches.errors import CountValueError, EnrollmentError, KeyFileError
from fedarches.format.signing import generate_key, keygen, load_public_key, load_site_key, write_public_key
from fedarches.server import Atlas
from fedarches.server.registry import REGISTRY_KEY_FILE, read_registry


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def atlas(tmp_path) -> Atlas:
    return Atlas.init(tmp_path / "atlas", "faults")


# ------------------------------------------------------------------ key rotation
def test_enroll_replace_rotates_and_records_the_old_key(atlas, tmp_path, capsys):
    old, new = keygen(tmp_path / "old"), keygen(tmp_path / "new")
    base = ["atlas", "enroll", str(atlas.path), "--site", "site-a", "--public-key"]
    assert _run(capsys, [*base, str(old.public)])[0] == 0

    code, _, err = _run(capsys, [*base, str(new.public)])
    assert code != 0 and "--replace" in err and "replace=True" not in err and "\n" not in err
    assert read_registry(atlas.path / "sites.json").sites["site-a"].key_id == old.key_id

    code, out, _ = _run(capsys, [*base, str(new.public), "--replace"])
    assert code == 0 and new.key_id in out and old.key_id in out
    entry = read_registry(atlas.path / "sites.json").sites["site-a"]
    assert entry.key_id == new.key_id
    assert [k.key_id for k in entry.previous_keys] == [old.key_id]
    assert entry.previous_keys[0].replaced == entry.enrolled

    # a retired key never comes back, for this site or another
    with pytest.raises(EnrollmentError, match="retired"):
        atlas.enroll("site-a", old.public, replace=True)
    with pytest.raises(EnrollmentError, match="retired"):
        atlas.enroll("site-b", old.public)


def test_key_rotation_is_signed_in_the_lineage(tmp_path, capsys):
    from fedarches.client import AtlasClient
    from fedarches.format.version import LINEAGE_TARGET, KeyChange
    from fedarches.server.registry import enroll_site
    from test_atlas_support import Served, bundle_for, new_atlas

    atlas = new_atlas(tmp_path)
    old, new = keygen(tmp_path / "old"), keygen(tmp_path / "new")
    assert b"key_changes" not in atlas.repo.read_target(LINEAGE_TARGET)  # no rotation: the bytes as before
    atlas.enroll("site-a", old.public)
    published = atlas.repo.current().timestamp.signed.version
    assert atlas.lineage().key_changes == []
    base = ["atlas", "enroll", str(atlas.path), "--site", "site-a", "--public-key", str(new.public), "--replace"]
    code, out, _ = _run(capsys, base)
    assert code == 0 and "signed lineage" in out
    assert atlas.repo.current().timestamp.signed.version == published + 1  # published at once, no new version
    replaced = read_registry(atlas.path / "sites.json").sites["site-a"].previous_keys[0].replaced
    change = KeyChange(site="site-a", old_key_id=old.key_id, new_key_id=new.key_id, replaced=replaced)
    assert atlas.lineage().key_changes == [change] and [e.number for e in atlas.log()] == [1]
    served = Served(atlas.repository_dir)
    try:  # a fresh site (or an auditor) sees it through TUF
        assert AtlasClient(served.url, atlas.root_json, cache_dir=tmp_path / "site").lineage().key_changes == [change]
    finally:
        served.close()
    code, out, _ = _run(capsys, ["atlas", "log", str(atlas.path)])
    assert code == 0 and f"site 'site-a': key {old.key_id[:16]}... replaced by {new.key_id[:16]}..." in out
    # a rotation whose lineage publish was missed (a crash after sites.json) is published by the next merge
    keys_b = [generate_key() for _ in range(2)]
    enroll_site(atlas.path / "sites.json", "site-b", keys_b[0].public)
    enroll_site(atlas.path / "sites.json", "site-b", keys_b[1].public, replace=True)
    assert len(atlas.lineage().key_changes) == 1
    atlas.merge([bundle_for(atlas, load_site_key(tmp_path / "new"), "site-a", ["qa"])])
    assert [(c.site, c.new_key_id) for c in atlas.lineage().key_changes] == [
        ("site-a", new.key_id), ("site-b", keys_b[1].public.key_id)
    ]


def test_rotation_without_a_signing_key_changes_nothing(atlas, tmp_path):
    from fedarches.errors import AtlasKeyError
    from test_atlas_support import tree_digest

    atlas.enroll("site-a", keygen(tmp_path / "old").public)
    (atlas.path / "keys" / "targets.pem").rename(tmp_path / "targets.pem")
    before = tree_digest(atlas.path)
    with pytest.raises(AtlasKeyError, match="targets"):
        atlas.enroll("site-a", keygen(tmp_path / "new").public, replace=True)
    assert tree_digest(atlas.path) == before


# ------------------------------------------------------------------ key files
def test_pem_with_two_keys_is_refused(atlas, tmp_path, capsys):
    a, b = tmp_path / "a.pub", tmp_path / "b.pub"
    write_public_key(a, generate_key().public)
    write_public_key(b, generate_key().public)
    both = tmp_path / "both.pub"
    both.write_bytes(a.read_bytes() + b.read_bytes())
    with pytest.raises(KeyFileError, match=r"both\.pub holds 2 PEM blocks"):
        load_public_key(both)
    code, _, err = _run(capsys, ["atlas", "enroll", str(atlas.path), "--site", "s", "--public-key", str(both)])
    assert code != 0 and "2 PEM blocks" in err and str(both) in err
    assert read_registry(atlas.path / "sites.json").sites == {}

    keys = keygen(tmp_path / "site")
    priv = keys.private
    os.chmod(priv, 0o600)
    with open(priv, "ab") as fh:
        fh.write(generate_key().pem())
    with pytest.raises(KeyFileError, match="holds 2 PEM blocks"):
        load_site_key(tmp_path / "site")


def test_directory_and_fifo_as_key_name_what_they_are(atlas, tmp_path, capsys):
    folder = tmp_path / "folder.pub"
    folder.mkdir()
    fifo = tmp_path / "fifo.pub"
    os.mkfifo(fifo)
    with pytest.raises(KeyFileError, match="is a directory"):
        load_public_key(folder)
    with pytest.raises(KeyFileError, match="is not a regular file"):
        load_public_key(fifo)  # must not block on the FIFO either
    with pytest.raises(KeyFileError, match="does not exist"):
        load_public_key(tmp_path / "missing.pub")
    code, _, err = _run(capsys, ["atlas", "enroll", str(atlas.path), "--site", "s", "--public-key", str(fifo)])
    assert code != 0 and "is not a regular file" in err
    with pytest.raises(KeyFileError, match="is not a regular file"):
        load_site_key(fifo)


# ------------------------------------------------------------------ empty signal
def _counts(zero_condition: str | None, all_zero: bool):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(60, 20)).astype(np.float32)
    studies = np.repeat(["s0", "s1", "s2"], 20)
    if all_zero:
        x[:] = 0
    if zero_condition is not None:
        x[studies == zero_condition] = 0
    obs = pd.DataFrame({"study": studies}, index=[f"c{i}" for i in range(60)])
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(20)]))


def test_check_values_refuses_empty_signal():
    with pytest.raises(CountValueError, match="zero counts in all 60 cells"):
        from fedarches.data.validation import check_values

        check_values(sp.csr_matrix((60, 20), dtype=np.float32), require_integers=True)
    a = _counts("s1", all_zero=False)
    with pytest.raises(CountValueError, match="condition 's1' has zero counts in all its 20 cells"):
        check_values(a.X, require_integers=True, conditions=a.obs["study"].to_numpy())
    check_values(_counts(None, False).X, require_integers=True)  # real counts pass


@pytest.mark.parametrize("case", ["all_zero", "one_condition_zero"])
def test_train_reference_refuses_empty_signal_before_training(case, tmp_path, capsys):
    adata = _counts("s2" if case == "one_condition_zero" else None, all_zero=case == "all_zero")
    data = tmp_path / "ref.h5ad"
    adata.write_h5ad(data)
    out = tmp_path / "model"
    code, _, err = _run(capsys, ["train-reference", "--data", str(data), "--condition-key", "study", "--out",
                                 str(out), "--epochs", "1", "--n-genes", "0", "--quiet"])
    assert code == 2 and "count value check failed" in err and "zero counts" in err and "\n" not in err
    if case == "one_condition_zero":
        assert "'s2'" in err
    assert not out.exists()


def test_map_refuses_all_zero_query(tmp_path, capsys):
    ref = _counts(None, False)
    ref.write_h5ad(tmp_path / "ref.h5ad")
    assert main(["train-reference", "--data", str(tmp_path / "ref.h5ad"), "--condition-key", "study", "--out",
                 str(tmp_path / "model"), "--epochs", "1", "--n-genes", "0", "--quiet"]) == 0
    query = _counts(None, all_zero=True)
    query.obs["study"] = "q"
    query.write_h5ad(tmp_path / "q.h5ad")
    capsys.readouterr()
    code, _, err = _run(capsys, ["map", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "q.h5ad"),
                                 "--condition-key", "study", "--out", str(tmp_path / "mapped"), "--epochs", "1",
                                 "--quiet"])
    assert code == 2 and "zero counts in all 60 cells" in err
    assert not (tmp_path / "mapped").exists()


# ------------------------------------------------------------------ modes and registry
def test_init_modes_are_explicit_under_umask_000(tmp_path, capsys):
    old = os.umask(0)
    try:
        assert _run(capsys, ["atlas", "init", str(tmp_path / "atlas"), "--name", "open"])[0] == 0
        atlas = Atlas(tmp_path / "atlas")
        atlas.enroll("site-a", keygen(tmp_path / "k").public)
    finally:
        os.umask(old)
    root = tmp_path / "atlas"
    assert _mode(root) == 0o755
    assert _mode(root / "keys") == 0o700
    assert _mode(root / "sites.json") == 0o600
    for pem in (root / "keys").iterdir():
        assert _mode(pem) == 0o600, pem
    for path in root.rglob("*"):
        assert not _mode(path) & 0o002, f"{path} is world-writable"
        if path.is_dir() and path.name != "keys":
            assert _mode(path) == 0o755, path


def test_hand_edited_registry_is_refused(atlas, tmp_path):
    atlas.enroll("site-a", keygen(tmp_path / "a").public)
    sites = atlas.path / "sites.json"
    doc = json.loads(sites.read_bytes())
    assert doc["mac"]
    intruder = keygen(tmp_path / "intruder")
    doc["sites"]["site-a"]["public_key"] = intruder.public.read_text()
    doc["sites"]["site-a"]["key_id"] = intruder.key_id
    sites.write_text(json.dumps(doc))
    with pytest.raises(EnrollmentError, match="does not match its integrity code"):
        read_registry(sites)
    with pytest.raises(EnrollmentError):
        atlas.enroll("site-b", keygen(tmp_path / "b").public)
    del doc["mac"]
    sites.write_text(json.dumps(doc))
    with pytest.raises(EnrollmentError, match="has no integrity code"):
        read_registry(sites)


def test_registry_without_code_is_read_and_sealed_on_next_write(atlas, tmp_path):
    """An atlas made before the integrity code: no registry.key, no mac."""
    a = keygen(tmp_path / "a")
    atlas.enroll("site-a", a.public)
    sites = atlas.path / "sites.json"
    doc = json.loads(sites.read_bytes())
    del doc["mac"]
    for entry in doc["sites"].values():
        del entry["previous_keys"]
    sites.write_text(json.dumps(doc))
    (atlas.path / "keys" / REGISTRY_KEY_FILE).unlink()
    assert read_registry(sites).sites["site-a"].key_id == a.key_id
    atlas.enroll("site-b", keygen(tmp_path / "b").public)
    assert json.loads(sites.read_bytes())["mac"]
    assert _mode(atlas.path / "keys" / REGISTRY_KEY_FILE) == 0o600
    assert set(read_registry(sites).sites) == {"site-a", "site-b"}


def test_a_folder_or_fifo_given_as_a_bundle_is_named_as_such(tmp_path):
    import os

    from fedarches.errors import BundleFileError
    from fedarches.format.bundle import read_bundle

    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    for path, words in ((tmp_path, "is a directory"), (fifo, "is not a regular file"),
                        (tmp_path / "missing.safetensors", "does not exist")):
        with pytest.raises(BundleFileError, match=words):
            read_bundle(path)
