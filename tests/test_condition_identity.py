"""A condition's identity is (contributing site, name): no squatting, no `batch1` collisions, old versions load.

The atlas-level tests build versions straight from the storage API (no
training); the last test maps real (generated) cells at two sites that both
call their batch ``batch1`` and checks merge exactness through ``embed`` with
the site's name.
"""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pytest
from safetensors.torch import load as st_load

from fedarches.cli import main
from fedarches.client import AtlasClient, map_and_contribute
from fedarches.config import MapSettings
from fedarches.errors import ConditionCollisionError, UnknownConditionError
from fedarches.format.canonical import sha256_bytes
from fedarches.format.identity import ConditionIndex, condition_id, parse_id
from fedarches.format.model_dir import CONDITIONS
from fedarches.format.signing import keygen
from fedarches.format.version import AtlasVersion, BlobRef, ConditionRecord, blob_target
from fedarches.model import LATENT_KEY, FedArchesModel
from fedarches.server import Atlas, make_server
from fedarches.server.publish import publish_versions
from fedarches.server.store import save_tensors
from test_atlas_support import bundle_for, enrolled_key, free_port, new_atlas, random_condition_vectors, tree_digest


@pytest.fixture
def atlas(tmp_path) -> Atlas:
    return new_atlas(tmp_path)


def test_ids_and_resolution():
    assert condition_id("site-a", "batch1") == "site-a/batch1"
    assert condition_id("coordinator", "s0") == condition_id(None, "s0") == "s0"
    assert parse_id("site-a/batch1").site == "site-a" and parse_id("s0").site is None
    index = ConditionIndex.from_ids(["s0", "site-a/batch1", "site-b/batch1", "site-b/only"])
    assert index.resolve("batch1", "site-a") == "site-a/batch1"
    assert index.resolve("batch1", "site-b") == "site-b/batch1"
    assert index.resolve("s0", "site-b") == "s0"  # reference studies are everyone's
    assert index.resolve("only", "site-a") is None  # another site's study is not site-a's
    assert index.resolve("only", None) == "site-b/only"  # one holder: found without a site
    with pytest.raises(UnknownConditionError, match="held by several sites"):
        index.resolve("batch1", None)
    assert index.visible_names("site-a") == ["s0", "batch1"]


def test_two_sites_batch1_merge_into_one_version_with_two_conditions(atlas, tmp_path):
    ka, kb = enrolled_key(atlas, "site-a"), enrolled_key(atlas, "site-b")
    a = bundle_for(atlas, ka, "site-a", ["batch1"], seed=1)
    b = bundle_for(atlas, kb, "site-b", ["batch1"], seed=2)
    twin = Atlas(shutil.copytree(atlas.path, tmp_path / "twin"))
    (v2,) = atlas.merge([a, b]).published
    (v2_twin,) = twin.merge([b, a]).published
    assert v2.id == v2_twin.id
    assert [(c.name, c.site) for c in v2.conditions] == [
        ("s0", "coordinator"), ("s1", "coordinator"), ("batch1", "site-a"), ("batch1", "site-b")
    ]
    version = atlas.version(2)
    assert version.model.conditions == ["s0", "s1", "site-a/batch1", "site-b/batch1"]
    tensors = st_load(atlas.repo.read_target(blob_target(version.blobs[CONDITIONS].sha256)))
    for site, seed in (("site-a", 1), ("site-b", 2)):  # each site's own vectors, unchanged
        sent = random_condition_vectors(version.model.config, ["batch1"], seed)
        assert all(tensors[k.replace("/", f"/{site}/", 1)].equal(t) for k, t in sent.items())
    # atlas log --json: the {name, site} pairs keep their meaning
    assert [(c.name, c.site) for c in atlas.log()[-1].conditions][-2:] == [("batch1", "site-a"), ("batch1", "site-b")]


def test_a_site_cannot_take_another_sites_study(atlas):
    ka, kb = enrolled_key(atlas, "site-a"), enrolled_key(atlas, "site-b")
    atlas.merge([bundle_for(atlas, ka, "site-a", ["b_study"], seed=1)])  # site-a publishes "b's" name first
    (v3,) = atlas.merge([bundle_for(atlas, kb, "site-b", ["b_study"], seed=2)]).published  # b's real one lands
    assert [(c.name, c.site) for c in v3.conditions][-2:] == [("b_study", "site-a"), ("b_study", "site-b")]
    before = tree_digest(atlas.path)
    with pytest.raises(ConditionCollisionError, match="'b_study' from site 'site-b'.*contributed by 'site-b'"):
        atlas.merge([bundle_for(atlas, kb, "site-b", ["b_study"], seed=3)])
    assert tree_digest(atlas.path) == before
    index = atlas.version(3).condition_index()
    assert index.resolve("b_study", "site-b") == "site-b/b_study"
    assert index.resolve("b_study", "site-a") == "site-a/b_study"


def _publish_legacy_version(atlas: Atlas) -> AtlasVersion:
    """Version 2 as the coordinator wrote it before ids were qualified: site-a's ``batch1`` under its bare name."""
    v1 = atlas.version(1)
    cond = st_load(atlas.repo.read_target(blob_target(v1.blobs[CONDITIONS].sha256)))
    cond.update(random_condition_vectors(v1.model.config, ["batch1"], seed=5))
    data = save_tensors(cond)
    files = {**v1.model.files, CONDITIONS: sha256_bytes(data)}
    legacy = AtlasVersion(
        atlas=v1.atlas, number=2, branch="main", parents=[v1.id], strategy="conditions",
        conditions=[*v1.conditions, ConditionRecord(name="batch1", site="site-a", introduced_in=2,
                                                    contribution="0" * 64)],
        model=v1.model.model_copy(update={"conditions": [*v1.model.conditions, "batch1"], "files": files}),
        blobs={**v1.blobs, CONDITIONS: BlobRef(sha256=files[CONDITIONS], length=len(data))},
    )
    with atlas._locked():
        state = atlas.repo.current()
        publish_versions(atlas.repo, state, atlas.lineage(state), [(legacy, {CONDITIONS: data})])
    return legacy


def test_an_old_format_version_loads_and_its_names_keep_their_owner(atlas, tmp_path):
    ka, kb = enrolled_key(atlas, "site-a"), enrolled_key(atlas, "site-b")
    legacy = _publish_legacy_version(atlas)
    assert atlas.version(2).id == legacy.id and atlas.version(2).model.conditions[-1] == "batch1"
    old = FedArchesModel.load(atlas.export_model(2, tmp_path / "v2"))
    assert old.condition_index().resolve("batch1", "site-a") == "batch1"  # the owner comes from the records
    assert old.condition_index().resolve("batch1", "site-b") is None
    with pytest.raises(ConditionCollisionError, match="'batch1' from site 'site-a'"):
        atlas.merge([bundle_for(atlas, ka, "site-a", ["batch1"], seed=6)])
    (v3,) = atlas.merge([bundle_for(atlas, kb, "site-b", ["batch1"], seed=7)]).published
    v3m = atlas.version(v3.number)
    assert v3m.model.conditions == ["s0", "s1", "batch1", "site-b/batch1"]  # old ids are never renamed
    assert [(c.name, c.site) for c in v3.conditions][-2:] == [("batch1", "site-a"), ("batch1", "site-b")]
    new = FedArchesModel.load(atlas.export_model(3, tmp_path / "v3"))
    assert new.condition_index().resolve("batch1", "site-a") == "batch1"
    assert new.condition_index().resolve("batch1", "site-b") == "site-b/batch1"


# ------------------------------------------------------------ real mapping


def _as_batch1(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    out.obs["study"] = "batch1"
    out.obs["study"] = out.obs["study"].astype("category")
    return out


def test_two_sites_map_batch1_and_embed_finds_each_sites_own(tmp_path):
    from test_site_map import simulate

    a = simulate()
    ref = a[a.obs["study"].isin(["ref_a", "ref_b"])].copy()
    sites = {"site-a": _as_batch1(a[a.obs["study"] == "site_a_study"]),
             "site-b": _as_batch1(a[a.obs["study"] == "site_b_study"])}
    atlas = Atlas.init(tmp_path / "atlas", "sim")
    atlas.build(ref, "study", "cell_type", kind="trvae", epochs=4, n_genes=0, threads=1)
    server = make_server(atlas.repository_dir, "127.0.0.1", free_port())
    server.start_background()
    try:
        results = {}
        for name, adata in sites.items():  # one after the other: site-b maps onto site-a's version
            key = keygen(tmp_path / name / "key")
            atlas.enroll(name, key.public)
            r = map_and_contribute(atlas_url=server.url, trust=atlas.root_json, key=tmp_path / name / "key",
                                   site=name, data=adata, condition_key="study", out_dir=tmp_path / name / "out",
                                   settings=MapSettings(epochs=3, threads=1), cache_dir=tmp_path / name / "cache")
            assert r.status == "contributed" and r.plan.new == ["batch1"] and r.report.map.new_conditions == ["batch1"]
            assert list(ad.read_h5ad(r.query_path).obs["study"].unique()) == ["batch1"]  # the user's own name
            atlas.merge([r.bundle_path])
            results[name] = r
        fetched = AtlasClient(server.url, atlas.root_json, cache_dir=tmp_path / "cache").fetch(tmp_path / "v3")
        assert fetched.number == 3
        merged = FedArchesModel.load(fetched.path)
        for name, adata in sites.items():
            local = ad.read_h5ad(results[name].query_path).obsm[LATENT_KEY]
            diff = float(np.abs(merged.embed(adata, "study", site=name).obsm[LATENT_KEY] - local).max())
            assert diff <= 1e-6, f"{name}: merged latent differs from its own site map by {diff}"
        with pytest.raises(UnknownConditionError, match="held by several sites"):
            merged.embed(sites["site-a"], "study")
        sites["site-b"].write_h5ad(tmp_path / "b.h5ad")  # the CLI finds the site's own by --site
        assert main(["embed", "--model", str(fetched.path), "--data", str(tmp_path / "b.h5ad"), "--condition-key",
                     "study", "--site", "site-b", "--out", str(tmp_path / "b-embedded.h5ad")]) == 0
        local = ad.read_h5ad(results["site-b"].query_path).obsm[LATENT_KEY]
        assert float(np.abs(ad.read_h5ad(tmp_path / "b-embedded.h5ad").obsm[LATENT_KEY] - local).max()) <= 1e-6
        again = map_and_contribute(atlas_url=server.url, trust=atlas.root_json, key=tmp_path / "site-a" / "key",
                                   site="site-a", data=sites["site-a"], condition_key="study",
                                   out_dir=tmp_path / "again", settings=MapSettings(epochs=3, threads=1),
                                   cache_dir=tmp_path / "site-a" / "cache")
        assert again.status == "nothing-new" and again.plan.held == ["batch1"]
    finally:
        server.shutdown()
        server.server_close()
