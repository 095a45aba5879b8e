"""An unlucky site operator: `site fetch --out` onto a folder that holds a newer version.

TUF's rollback protection lives in the trust cache; a fresh cache (first
contact, another ``--cache``) must still not let an explicit ``--version``
silently downgrade a model folder. Refused with `OlderVersionError` naming both
numbers and ``--force``, the folder untouched; ``--force`` replaces it.
"""

from __future__ import annotations


import pytest

from fedarches.cli import main
from fedarches.client import AtlasClient
from fedarches.errors import OlderVersionError
from fedarches.format.version import read_atlas_version, write_model_dir
from test_atlas_support import Served, bundle_for, enrolled_key, new_atlas, tree_digest

@pytest.fixture
def two_versions(tmp_path):
    atlas = new_atlas(tmp_path)
    key = enrolled_key(atlas, "site-a")
    atlas.merge([bundle_for(atlas, key, "site-a", ["q1"])])
    served = Served(atlas.repository_dir)
    yield atlas, served
    served.close()


def _fetch_args(atlas, served, cache, out, *extra):
    return ["site", "fetch", "--atlas", served.url, "--trust", str(atlas.root_json), "--cache", str(cache),
            "--out", str(out), *extra]


def test_fetch_with_a_fresh_cache_refuses_to_replace_a_newer_model_folder(two_versions, tmp_path, capsys):
    atlas, served = two_versions
    out = tmp_path / "model"
    assert main(_fetch_args(atlas, served, tmp_path / "cache-1", out)) == 0
    assert read_atlas_version(out).number == 2
    before = tree_digest(out)
    capsys.readouterr()

    # first contact again (empty cache), asking for the older version into the same folder
    assert main(_fetch_args(atlas, served, tmp_path / "cache-2", out, "--version", "1")) != 0
    err = capsys.readouterr().err
    assert "version order check failed" in err and "version 2" in err and "version 1" in err and "--force" in err
    assert tree_digest(out) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "work folder left behind"

    # the same version again, or a newer one, is no downgrade
    assert main(_fetch_args(atlas, served, tmp_path / "cache-2", out)) == 0
    assert read_atlas_version(out).number == 2


def test_write_model_dir_refuses_older_unless_replace_newer(two_versions, tmp_path):
    atlas, served = two_versions
    client = AtlasClient(served.url, atlas.root_json, cache_dir=tmp_path / "cache")
    out = tmp_path / "model"
    client.fetch(out)
    v1, _, blobs1 = client.fetch_blobs(1)
    with pytest.raises(OlderVersionError) as info:
        write_model_dir(out, v1, blobs1)
    assert str(info.value).startswith("version order check failed")
    assert read_atlas_version(out).number == 2
    write_model_dir(out, v1, blobs1, replace_newer=True)
    assert read_atlas_version(out).number == 1


def test_another_atlas_or_a_damaged_version_file_does_not_block(two_versions, tmp_path):
    atlas, served = two_versions
    client = AtlasClient(served.url, atlas.root_json, cache_dir=tmp_path / "cache")
    v1, _, blobs1 = client.fetch_blobs(1)
    out = tmp_path / "model"
    client.fetch(out)
    (out / "atlas-version.json").write_bytes(b"{not json")
    write_model_dir(out, v1, blobs1)  # nothing trustworthy to protect: replaced by a verified version
    assert read_atlas_version(out).number == 1

    other = new_atlas(tmp_path / "other", name="other-atlas")
    key = enrolled_key(other, "site-a")
    other.merge([bundle_for(other, key, "site-a", ["q1"])])
    s = Served(other.repository_dir)
    try:
        AtlasClient(s.url, other.root_json, cache_dir=tmp_path / "cache-other").fetch(tmp_path / "other-model")
    finally:
        s.close()
    # other-model holds v2 of another atlas: v1 of this atlas may replace it
    write_model_dir(tmp_path / "other-model", v1, blobs1)
    assert read_atlas_version(tmp_path / "other-model").atlas == atlas.name


def test_force_replaces_a_newer_model_folder(two_versions, tmp_path):
    atlas, served = two_versions
    out = tmp_path / "model"
    assert main(_fetch_args(atlas, served, tmp_path / "cache-1", out)) == 0
    assert main(_fetch_args(atlas, served, tmp_path / "cache-2", out, "--version", "1", "--force")) == 0
    assert read_atlas_version(out).number == 1
