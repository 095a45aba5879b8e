"""Issue 10: `fedarches atlas build-federated` trains version 1 over Flower (simulation), 3 sites
holding the CellBench reference studies; afterwards `site fetch`, `site map` and `atlas merge`
work on it as on a centrally built one. Faults: a site that crashes mid-round does not stop the
build; a killed build resumes after its last completed round and ends where an uninterrupted
one does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import pytest
import tomli_w

from conftest import shared_data
from fedarches.cli import main
from fedarches.data.gene_stats import choose_genes, study_gene_stats
from fedarches.data.splits import CELLBENCH
from fedarches.data.validation import get_matrix
from fedarches.format.signing import keygen
from fedarches.format.version import read_atlas_version
from fedarches.mapping import write_h5ad
from fedarches.model import LATENT_KEY
from fedarches.server import Atlas

pytestmark = pytest.mark.flower

KEY = CELLBENCH.study_key
LABEL = CELLBENCH.label_key
BUILD = ["--label-key", LABEL, "--model", "trvae", "--rounds", "4", "--local-epochs", "30", "--n-genes", "500"]


@pytest.fixture(scope="module")
def cellbench():
    return CELLBENCH.load(shared_data(CELLBENCH.file))


def make_sites(work: Path, ref: ad.AnnData, *, faults: dict[str, dict] | None = None) -> tuple[Path, Path]:
    """An atlas and one enrolled site per reference study; returns (atlas dir, SITES.toml)."""
    work.mkdir(parents=True, exist_ok=True)
    assert main(["atlas", "init", str(work / "atlas"), "--name", "fed-cellbench"]) == 0
    tables = []
    for i, study in enumerate(CELLBENCH.reference_studies):
        name = f"site-{'abc'[i]}"
        d = work / name
        d.mkdir()
        write_h5ad(ref[(ref.obs[KEY].astype(str) == study).to_numpy()].copy(), d / "data.h5ad")
        keys = keygen(d / "keys")
        assert main(["atlas", "enroll", str(work / "atlas"), "--site", name, "--public-key", str(keys.public)]) == 0
        tables.append({"site": name, "data": str(d / "data.h5ad"), "condition-key": KEY, "key-dir": str(d / "keys"),
                       "out-dir": str(d / "results"), **(faults or {}).get(name, {})})
    (work / "sites.toml").write_text(tomli_w.dumps({"site": tables}))
    return work / "atlas", work / "sites.toml"


@pytest.fixture(scope="module")
def built(tmp_path_factory, cellbench):
    ref, _ = cellbench
    work = tmp_path_factory.mktemp("fedref")
    atlas_dir, toml = make_sites(work, ref)
    report = work / "report.json"
    assert main(["atlas", "build-federated", str(atlas_dir), "--sites", str(toml), *BUILD,
                 "--report", str(report)]) == 0
    return {"work": work, "atlas": Atlas(atlas_dir), "report": json.loads(report.read_text())}


def test_version_one_is_an_ordinary_signed_reference(built, cellbench, tmp_path):
    ref, _ = cellbench
    atlas = built["atlas"]
    [entry] = atlas.log()
    assert entry.number == 1 and entry.strategy == "reference"
    # the simulation's sites file setting was put back: it never leaks into later runs of the process
    from fedarches.federation.protocol import SIM_SITES_ENV

    assert SIM_SITES_ENV not in os.environ
    version = atlas.version(1)
    # the genes recorded in version 1 are the pooled choice, computed from statistics only
    genes = ref.var_names.astype(str).tolist()
    pooled = choose_genes(study_gene_stats(get_matrix(ref, None), genes, ref.obs[KEY].astype(str).to_numpy()),
                          genes, 500)
    assert version.model.genes == pooled
    assert sorted(version.model.conditions) == sorted(CELLBENCH.reference_studies)
    held = {c.name: c.metrics["held_by"] for c in version.conditions}
    assert held == {s: f"site-{'abc'[i]}" for i, s in enumerate(CELLBENCH.reference_studies)}
    m = version.conditions[0].metrics
    assert (m["federated_rounds"], m["federated_strategy"], m["federated_sites"]) == (4, "FedAvg",
                                                                                      "site-a,site-b,site-c")
    # the lineage entry names them too (atlas log), from the same signed records
    assert (entry.build["rounds"], entry.build["strategy"], entry.build["sites"]) == (4, "FedAvg",
                                                                                      "site-a,site-b,site-c")
    # label knowledge from the sites' class summaries; no per-cell array anywhere
    assert "labels.safetensors" in version.blobs and "reference.safetensors" not in version.blobs
    assert sorted(version.model.label_categories) == sorted(set(ref.obs[LABEL].astype(str)))
    rounds = built["report"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and all(len(r["answered"]) == 3 for r in rounds)
    # the shared weights each way, plus (trVAE, --mmd rff) a few KiB of study mean embeddings
    weights = rounds[0]["bytes_down"]
    assert all(weights <= u <= weights + 16384 for r in rounds for u in r["bytes_up"].values())
    assert all(weights < r["bytes_down"] <= weights + 16384 for r in rounds[1:])
    out = atlas.export_model(1, tmp_path / "v1")
    assert read_atlas_version(out).id == entry.id
    # the labels several sites hold were calibrated on every site's cells (reference_calibration)
    cal = built["report"]["calibration"]
    assert cal["status"] == "pooled" and m["federated_calibration"] == "pooled"
    assert set(cal["labels"]) == {"H1975", "H2228", "HCC827"}  # H838 is at one site only
    # trVAE's class Gaussians of those labels fitted on every site's cells (labels.moments)
    assert sorted(cal["pooled_gaussians"]) == sorted(cal["labels"]) and m["federated_gaussians"] == "pooled"
    assert m["federated_rows"] == "trained"  # trVAE keeps its rows as the rounds left them (FINAL_ROWS)
    from fedarches.model import FedArchesModel

    summaries = FedArchesModel.load(out).reference.summaries
    cats = list(summaries.label_categories)
    assert summaries.thresholds.calibration_counts[cats.index("H1975")] == sum(
        (ref.obs[LABEL].astype(str) == "H1975") & ref.obs[KEY].astype(str).isin(CELLBENCH.reference_studies))
    assert summaries.reference_median_score == cal["reference_median_score"]


def test_site_fetch_map_and_merge_work_on_it(built, cellbench, tmp_path):
    from fedarches.server.http import serve_atlas

    _, query = cellbench
    atlas = built["atlas"]
    d = tmp_path / "site-q"
    keys = keygen(d / "key")
    assert main(["atlas", "enroll", str(atlas.path), "--site", "site-q", "--public-key", str(keys.public)]) == 0
    q = query[(query.obs[KEY].astype(str) == CELLBENCH.query_studies[0]).to_numpy()].copy()
    write_h5ad(q, d / "query.h5ad")
    server = serve_atlas(atlas, "127.0.0.1", 0)
    try:
        common = ["--atlas", server.url, "--trust", str(atlas.root_json)]
        assert main(["site", "fetch", *common, "--out", str(tmp_path / "fetched")]) == 0
        assert read_atlas_version(tmp_path / "fetched").number == 1
        assert main(["site", "map", *common, "--key", str(d / "key"), "--site", "site-q", "--data",
                     str(d / "query.h5ad"), "--condition-key", KEY, "--quiet", "--epochs", "5", "--threads", "1",
                     "--cache", str(d / "cache"), "--out", str(d / "out")]) == 0
    finally:
        server.close()
    mapped = ad.read_h5ad(d / "out" / "query.h5ad")
    assert mapped.obsm[LATENT_KEY].shape == (q.n_obs, 10)
    pred = mapped.obs[f"{LABEL}_pred"].astype(str)
    known = (mapped.obs[LABEL].astype(str) != "A549").to_numpy()
    assert set(pred) <= {*atlas.version(1).model.label_categories, "Unknown"}
    accuracy = (pred[known] == mapped.obs[LABEL].astype(str)[known]).mean()
    print("known-type accuracy after 4 rounds x 30 epochs:", accuracy)
    assert accuracy > 0.5
    [bundle] = sorted((d / "out").glob("*.safetensors"))
    atlas.verify_bundle(bundle)
    assert main(["atlas", "merge", str(atlas.path), str(bundle)]) == 0
    assert atlas.head().number == 2


def test_a_site_crashing_mid_round_does_not_stop_the_build(tmp_path, cellbench):
    ref, _ = cellbench
    atlas_dir, toml = make_sites(tmp_path, ref, faults={"site-c": {"fault": "crash", "fault-rounds": "2"}})
    report = tmp_path / "report.json"
    assert main(["atlas", "build-federated", str(atlas_dir), "--sites", str(toml), *BUILD, "--min-sites", "2",
                 "--report", str(report)]) == 0
    r1, r2, *rest = json.loads(report.read_text())["rounds"]
    assert len(r1["answered"]) == 3 and r1["aggregated"]
    assert len(r2["answered"]) == 2 and r2["aggregated"] and "injected fault" in r2["failed"][0]["reason"]
    assert [len(r["answered"]) for r in rest] == [3, 3] and all(r["aggregated"] for r in rest)
    assert Atlas(atlas_dir).head().number == 1  # site-c's study still arrives: its rows of round 1


def test_a_killed_build_resumes_after_its_last_round(tmp_path, cellbench, built):
    from fedarches.federation.reference_run_config import ReferenceRunConfig
    from fedarches.federation.reference_simulation import build_federated

    ref, _ = cellbench
    atlas_dir, toml = make_sites(tmp_path, ref)
    cfg = ReferenceRunConfig.from_run_config({"atlas-dir": str(atlas_dir), "label-key": LABEL, "rounds": 4,
                                              "local-epochs": 30, "n-genes": 500, "min-sites": 3, "stop-after": 2})
    with pytest.raises(RuntimeError, match="stop-after"):
        build_federated(cfg, toml)
    assert Atlas(atlas_dir).head() is None
    report = build_federated(cfg.model_copy(update={"stop_after": 0}), toml)
    assert report["resumed_after"] == 2 and [r["round"] for r in report["rounds"]] == [3, 4]
    resumed, uninterrupted = Atlas(atlas_dir).version(1), built["atlas"].version(1)
    # the same build, interrupted or not, gives the same weights bit for bit (and the same version)
    assert resumed.blobs == uninterrupted.blobs
    assert resumed.id == uninterrupted.id
