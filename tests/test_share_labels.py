"""A site shares label summaries inside its signed bundle (issue 9, `site map --share-labels`);
intake checks the label part, the coordinator merges it by label name with provenance and
reports label conflicts; a bad label part is refused with the check that failed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from fedarches.cli import main
from fedarches.client import map_local
from fedarches.config import MapSettings
from fedarches.errors import (
    BundleContentError,
    BundleSizeError,
    InvalidNameError,
    LabelPartError,
    LabelShareError,
)
from fedarches.format.bundle import (
    META_MANIFEST,
    META_SIGNATURE,
    BundleManifest,
    _sorted_header,
    _tensor_entry,
    audit_bundle,
    label_part_bound,
    label_part_bytes,
    read_bundle,
)
from fedarches.format.signing import b64encode, keygen, load_site_key
from fedarches.server import Atlas

SETTINGS = MapSettings(epochs=2, threads=1, share_labels="cell_type")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from fedarches.data.simulate import simulate

    tmp = tmp_path_factory.mktemp("share-labels")
    adata = simulate(n_cells=900, n_genes=120, n_cell_types=3, n_studies=3, seed=4)
    ref = adata[adata.obs["study"].isin(["study_0", "study_1"])].copy()
    query = adata[adata.obs["study"] == "study_2"].copy()
    small = np.flatnonzero(query.obs["cell_type"].astype(str).to_numpy() == "type_C")[10:]
    query = query[~np.isin(np.arange(query.n_obs), small)].copy()  # type_C: 10 cells, under k_min
    atlases = {}
    for knowledge in ("summaries", "cells"):
        atlas = Atlas.init(tmp / knowledge, "s")
        atlas.build(ref, "study", "cell_type", epochs=3, n_genes=0, threads=1, label_knowledge=knowledge)
        atlas.export_model(1, tmp / f"{knowledge}-v1")
        atlases[knowledge] = atlas
    key = keygen(tmp / "key")
    for atlas in atlases.values():
        atlas.enroll("site-a", key.public)
    res = map_local(tmp / "summaries-v1", key=tmp / "key", site="site-a", data=query, condition_key="study",
                    out_dir=tmp / "out", settings=SETTINGS)
    shutil.copytree(tmp / "summaries", tmp / "merged")  # the merge test grows this one; intake tests stay on v1
    return {"tmp": tmp, "query": query, "atlas": atlases["summaries"], "cells": atlases["cells"], "res": res,
            "merged": Atlas(tmp / "merged")}


def test_labels_travel_in_the_signed_bundle_within_the_formula(world):
    res, atlas = world["res"], world["atlas"]
    assert res.report.labels == {"key": "cell_type", "k_min": 20, "shared": {"type_A": 117, "type_B": 93},
                                 "left_out": {"type_C": 10}, "unlabelled": 0}
    config = atlas.version(1).model.config
    audit = audit_bundle(res.bundle_path, config)
    lab = audit["labels"]
    assert lab["names"] == ["type_A", "type_B"] and lab["k_min"] == 20
    assert {n: v["cells"] for n, v in lab["per_label"].items()} == {"type_A": 117, "type_B": 93}
    assert lab["tensor_bytes"] == label_part_bytes(2, lab["components"], config.latent_dim)
    assert lab["tensor_bytes"] <= label_part_bound(2, config.latent_dim)
    assert audit["size_matches_formula"] and res.report.bundle.formula_tensor_bytes == audit["tensor_bytes"]
    b = read_bundle(res.bundle_path)
    assert all(k in b.manifest.tensors for k in (f"labels/{f}" for f in b.label_tensors()))  # all signed
    assert int(b.label_tensors()["component_count"].min()) >= 20
    assert all(d < 210 for t in b.tensors.values() for d in t.shape)  # nothing per cell (210 shared)
    out = main(["atlas", "audit", str(res.bundle_path)])
    assert out == 0


def test_unlabelled_cells_are_not_summarised(world):
    from fedarches.client.labels import plan_label_share
    from fedarches.format.version import read_atlas_version

    q = world["query"].copy()
    col = q.obs["cell_type"].astype(object)
    col.iloc[:5] = None
    col.iloc[5:8] = "Unknown"
    q.obs["cell_type"] = col
    v1 = world["tmp"] / "summaries-v1"
    plan = plan_label_share(v1, read_atlas_version(v1), q, "cell_type")
    assert plan.to_dict()["unlabelled"] == 8 and sum(plan.shared.values()) + sum(plan.left_out.values()) == 212
    with pytest.raises(Exception, match="obs column check failed"):
        plan_label_share(v1, read_atlas_version(v1), q, "no_such_column")
    q.obs["cell_type"] = "Unknown"
    with pytest.raises(LabelShareError, match="no label"):
        plan_label_share(v1, read_atlas_version(v1), q, "cell_type")


def test_cells_version_refuses_before_training(world, tmp_path):
    with pytest.raises(LabelShareError, match="label share check failed.*--label-knowledge summaries"):
        map_local(world["tmp"] / "cells-v1", key=world["tmp"] / "key", site="site-a", data=world["query"],
                  condition_key="study", out_dir=tmp_path / "out", settings=SETTINGS)
    assert not (tmp_path / "out").exists()
    with pytest.raises(LabelShareError, match="strategy conditions"):
        map_local(world["tmp"] / "summaries-v1", key=world["tmp"] / "key", site="site-a", data=world["query"],
                  condition_key="study", out_dir=tmp_path / "out",
                  settings=SETTINGS.model_copy(update={"strategy": "full"}))


def test_merge_by_label_name_with_provenance_and_conflicts(world, tmp_path):
    atlas, res = world["merged"], world["res"]
    merged = atlas.merge([res.bundle_path])
    v2 = atlas.version(merged.version.number)
    assert v2.model.label_categories == ["type_A", "type_B", "type_C"] and not merged.label_conflicts
    site = [r for r in v2.labels if r.site == "site-a"]
    assert [r.name for r in site] == ["type_A", "type_B"] and all(r.introduced_in == v2.number for r in site)
    assert [sum(r.cells) for r in site] == [117, 93]
    assert [(e.name, e.cells) for e in merged.version.labels] == [("type_A", 117), ("type_B", 93)]
    from fedarches.model import FedArchesModel

    atlas.export_model(v2.number, tmp_path / "v2")
    grown = FedArchesModel.load(tmp_path / "v2").reference.summaries
    assert grown.n_components == max(i for r in v2.labels for i in r.components) + 1
    # a site label the atlas calls another label: reported, not merged; its other labels merge
    q = world["query"].copy()
    q.obs["study"] = "study_renamed"
    q.obs["mine"] = q.obs["cell_type"].astype(str).replace({"type_A": "alpha"})
    r2 = map_local(tmp_path / "v2", key=world["tmp"] / "key", site="site-a", data=q, condition_key="study",
                   out_dir=tmp_path / "out2", settings=SETTINGS.model_copy(update={"share_labels": "mine"}))
    m2 = atlas.merge([r2.bundle_path])
    assert [(c.label, c.called) for c in m2.label_conflicts] == [("alpha", "type_A")]
    v3 = atlas.version(m2.version.number)
    assert "alpha" not in v3.model.label_categories
    assert [e.name for e in m2.version.labels] == ["type_B"]


# ------------------------------------------------------------------ intake refusals


def _resign(world, bundle_path, change) -> bytes:
    """The bundle with its label tensors changed by ``change`` and signed again by the site
    (a real site key: only the label part is wrong)."""
    b = read_bundle(bundle_path)
    tensors = {k: v.clone() for k, v in b.tensors.items()}
    labels = list(b.manifest.labels)
    labels = change(tensors, labels) or labels
    key = load_site_key(world["tmp"] / "key")
    manifest = b.manifest.model_copy(update={"tensors": {k: _tensor_entry(t) for k, t in tensors.items()},
                                             "labels": labels})
    manifest = BundleManifest.model_validate(json.loads(manifest.model_dump_json()))
    data = manifest.canonical()
    meta = {META_MANIFEST: data.decode(), META_SIGNATURE: b64encode(key.sign(data))}
    return _sorted_header(st_save(dict(sorted(tensors.items())), metadata=meta))


def _set(key, fn):
    def change(tensors, labels):
        tensors[f"labels/{key}"] = fn(tensors[f"labels/{key}"])
    return change


BAD_PARTS = {
    "count under k_min": (_set("component_count", lambda t: torch.where(t == t.max(), 5, t)), LabelPartError,
                          "fewer than k_min|under 20"),
    "NaN mean": (_set("component_means", lambda t: torch.where(torch.arange(t.numel()).reshape(t.shape) == 0,
                                                               float("nan"), t)), LabelPartError, "not finite"),
    "wrong latent dims": (_set("component_means", lambda t: torch.cat([t, t[:, :1]], 1)), LabelPartError,
                          "shape"),
    "per-label field too short": (_set("label_thresholds", lambda t: t[:1]), LabelPartError, "shape"),
    "missing field": (lambda ts, ls: (ts.pop("labels/gaussian.whiten"), None)[1], LabelPartError, "missing"),
    "float32 field": (_set("component_means", lambda t: t.float()), BundleContentError, "float32"),
    "label without component": (lambda ts, ls: [*ls, "type_D"], LabelPartError, "shape|no component"),
    "reserved name": (lambda ts, ls: ["Unknown", *ls[1:]], InvalidNameError, "name check failed"),
    "look-alike name": (lambda ts, ls: ["type_\u0410", *ls[1:]], InvalidNameError, "name check failed"),
    "too many components": (lambda ts, ls: ts.update({f"labels/component_{f}": torch.cat([ts[f"labels/component_{f}"]] * 40)
                                                      for f in ("label", "count", "means", "whiten", "log_det")}),
                            BundleSizeError, "components"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARTS))
def test_intake_refuses_a_bad_label_part(world, case):
    change, error, match = BAD_PARTS[case]
    bad = _resign(world, world["res"].bundle_path, change)
    with pytest.raises(error, match=match):
        world["atlas"].verify_bundle(bad)


def test_label_part_onto_a_cells_version_is_refused(world):
    b = read_bundle(world["res"].bundle_path)
    cells = world["cells"]
    v1 = cells.version(1)
    key = load_site_key(world["tmp"] / "key")
    manifest = b.manifest.model_copy(update={"parent": v1.id, "atlas": cells.name})
    data = BundleManifest.model_validate(json.loads(manifest.model_dump_json())).canonical()
    meta = {META_MANIFEST: data.decode(), META_SIGNATURE: b64encode(key.sign(data))}
    bundle = _sorted_header(st_save(dict(sorted(b.tensors.items())), metadata=meta))
    with pytest.raises(LabelPartError, match="holds no label summaries"):
        cells.verify_bundle(bundle)


def test_cli_site_map_shares_labels_and_log_shows_them(world, tmp_path, capsys):
    from fedarches.server import serve_atlas

    atlas = world["atlas"]
    shutil.copy(world["tmp"] / "summaries" / "root.json", tmp_path / "root.json")
    server = serve_atlas(atlas, "127.0.0.1", 0)
    try:
        assert main(["site", "map", "--atlas", server.url, "--trust", str(tmp_path / "root.json"),
                     "--key", str(world["tmp"] / "key"), "--site", "site-a", "--data", _h5ad(world, tmp_path),
                     "--condition-key", "study", "--epochs", "2", "--threads", "1", "--quiet",
                     "--share-labels", "cell_type", "--cache", str(tmp_path / "cache"),
                     "--out", str(tmp_path / "out")]) == 0
    finally:
        server.close()
    out = capsys.readouterr().out
    assert "label summaries shared (k_min 20): type_A, type_B" in out and "type_C (10)" in out
    assert main(["atlas", "audit", str(tmp_path / "out" / "contribution.safetensors")]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert audit["labels"]["names"] == ["type_A", "type_B"]
    shutil.copytree(world["tmp"] / "summaries", tmp_path / "atlas")
    assert main(["atlas", "merge", str(tmp_path / "atlas"), str(tmp_path / "out" / "contribution.safetensors")]) == 0
    assert "type_A@site-a: " in capsys.readouterr().out
    assert main(["atlas", "log", str(tmp_path / "atlas")]) == 0
    log = capsys.readouterr().out
    assert "type_B@site-a: " in log and "type_C@coordinator: " in log
    assert main(["atlas", "log", str(tmp_path / "atlas"), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["site"]) for r in entries[-1]["labels"]] == [("type_A", "site-a"), ("type_B", "site-a")]
    # atlas diff: what version 2 added over version 1, and nothing the other way
    assert main(["atlas", "diff", str(tmp_path / "atlas"), "1", "2", "--json"]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert {(c["name"], c["site"]) for c in diff["conditions_added"]} == {
        (c["name"], c["site"]) for c in entries[-1]["conditions"] if c["site"] == "site-a"}
    assert [(r["name"], r["site"]) for r in diff["labels_added"]] == [("type_A", "site-a"), ("type_B", "site-a")]
    assert diff["conditions_removed"] == [] and diff["labels_removed"] == [] and diff["label_names_added"] == []
    assert main(["atlas", "diff", str(tmp_path / "atlas"), "2", "1", "--json"]) == 0
    back = json.loads(capsys.readouterr().out)
    assert back["labels_removed"] == diff["labels_added"] and back["conditions_added"] == []
    assert main(["atlas", "diff", str(tmp_path / "atlas"), "1", "2"]) == 0
    text = capsys.readouterr().out
    assert "label components added: " in text and "type_A@site-a: " in text


def _h5ad(world, tmp_path) -> str:
    path = tmp_path / "query.h5ad"
    world["query"].write_h5ad(path)
    return str(path)


def test_label_merge_is_order_independent(world, tmp_path):
    """Invariant 3 with label parts: the same bundles in either order give the same version id."""
    key_b = keygen(tmp_path / "key-b")
    q = world["query"].copy()
    q.obs["study"] = "study_b"
    bundles = [world["res"].bundle_path]
    r = map_local(world["tmp"] / "summaries-v1", key=tmp_path / "key-b", site="site-b", data=q,
                  condition_key="study", out_dir=tmp_path / "out-b", settings=SETTINGS)
    bundles.append(r.bundle_path)
    ids = []
    for order, name in ((bundles, "ab"), (bundles[::-1], "ba")):
        shutil.copytree(world["tmp"] / "summaries", tmp_path / name)
        atlas = Atlas(tmp_path / name)
        atlas.enroll("site-b", key_b.public)
        ids.append(atlas.merge(order).version.id)
        assert [(e.name, e.site) for e in atlas.log()[-1].labels] == [
            ("type_A", "site-a"), ("type_B", "site-a"), ("type_A", "site-b"), ("type_B", "site-b")]
    assert ids[0] == ids[1]
