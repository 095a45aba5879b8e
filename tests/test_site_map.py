"""Sites map real (generated) AnnData onto a served atlas; the coordinator merges.

The whole path is real: `atlas build` trains a tiny trVAE, `atlas serve` runs as
a subprocess on an explicit loopback port, sites fetch over TUF, fine-tune their
condition vectors, sign bundles, the coordinator verifies and merges them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from fedarches.cli import main
from fedarches.config import MapSettings
from fedarches.errors import FedarchesError, ManifestError, VersionManifestError
from fedarches.format.bundle import audit_bundle, read_bundle
from fedarches.model import LATENT_KEY, FedArchesModel
from fedarches.server import Atlas
from fedarches.format.version import read_atlas_version
from fedarches.format.signing import keygen
from test_atlas_support import CLI, free_port

EPOCHS = 8
QUERY_EPOCHS = 6


def simulate(
    seed: int = 0,
    studies=("ref_a", "ref_b", "site_a_study", "site_b_study"),
    per_study: int = 150,
    n_genes: int = 40,
    n_types: int = 3,
) -> ad.AnnData:
    """Counts from cell-type programs times a per-study gene effect, Poisson-sampled."""
    rng = np.random.default_rng(seed)
    programs = rng.gamma(2.0, 1.0, size=(n_types, n_genes))
    blocks, obs = [], []
    for s in studies:
        effect = rng.lognormal(0.0, 0.3, size=n_genes)
        types = rng.integers(n_types, size=per_study)
        lib = rng.lognormal(7.0, 0.3, size=per_study)
        mu = programs[types] * effect
        mu = mu / mu.sum(1, keepdims=True) * lib[:, None]
        blocks.append(rng.poisson(mu).astype(np.float32))
        obs.append(
            pd.DataFrame(
                {"study": s, "cell_type": [f"type{t}" for t in types]},
                index=[f"{s}-cell-{i:04d}" for i in range(per_study)],
            )
        )
    a = ad.AnnData(X=sp.csr_matrix(np.vstack(blocks)), obs=pd.concat(obs))
    a.var_names = [f"gene{i}" for i in range(n_genes)]
    a.obs["study"] = a.obs["study"].astype("category")
    return a


@pytest.fixture(scope="module")
def data():
    a = simulate()
    ref = a[a.obs["study"].isin(["ref_a", "ref_b"])].copy()
    site_a = a[a.obs["study"] == "site_a_study"].copy()
    site_b = a[a.obs["study"] == "site_b_study"].copy()
    return ref, site_a, site_b


@pytest.fixture(scope="module")
def world(tmp_path_factory, data):
    """An atlas with version 1 built from the reference, served by `fedarches atlas serve`."""
    tmp = tmp_path_factory.mktemp("world")
    ref, site_a, site_b = data
    ref.write_h5ad(tmp / "ref.h5ad")
    assert main(["atlas", "init", str(tmp / "atlas"), "--name", "sim"]) == 0
    assert (
        main(
            [
                "atlas",
                "build",
                str(tmp / "atlas"),
                "--data",
                str(tmp / "ref.h5ad"),
                "--condition-key",
                "study",
                "--label-key",
                "cell_type",
                "--model",
                "trvae",
                "--epochs",
                str(EPOCHS),
                "--n-genes",
                "0",
                "--threads",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "atlas", "serve", str(tmp / "atlas"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/metadata/timestamp.json", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError(f"atlas serve did not come up: {proc.stdout.read().decode()}") from None
            time.sleep(0.2)
    sites = {}
    for name, adata in (("site-a", site_a), ("site-b", site_b)):
        d = tmp / name
        k = keygen(d / "key")
        adata.write_h5ad(d / "query.h5ad")
        assert main(["atlas", "enroll", str(tmp / "atlas"), "--site", name, "--public-key", str(k.public)]) == 0
        shutil.copy(tmp / "atlas" / "root.json", d / "root.json")  # out of band
        sites[name] = d
    yield {"tmp": tmp, "atlas": Atlas(tmp / "atlas"), "url": url, "sites": sites}
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _site_map_args(url: str, d, name: str, out, *extra: str, condition_key: str = "study") -> list[str]:
    """`fedarches site map` for site ``name`` whose files are in ``d``."""
    return ["site", "map", "--atlas", url, "--trust", str(d / "root.json"), "--key", str(d / "key"),
            "--site", name, "--data", str(d / "query.h5ad"), "--condition-key", condition_key,
            "--quiet", "--cache", str(d / "cache"), "--out", str(out), *extra]


def _site_map(world, name, *extra):
    d = world["sites"][name]
    return main(_site_map_args(world["url"], d, name, d / "out", "--epochs", str(QUERY_EPOCHS),
                               "--threads", "1", *extra))


@pytest.fixture(scope="module")
def mapped(world):
    for name in world["sites"]:
        assert _site_map(world, name) == 0
    return world


def test_site_map_writes_results_and_only_a_small_signed_bundle(mapped, data):
    d = mapped["sites"]["site-a"]
    out = d / "out"
    assert {p.name for p in out.iterdir()} >= {"query.h5ad", "report.json", "contribution.safetensors", "model"}
    q = ad.read_h5ad(out / "query.h5ad")
    assert q.obsm[LATENT_KEY].shape == (data[1].n_obs, 10) and "cell_type_pred" in q.obs

    v1 = mapped["atlas"].version(1)
    cfg = v1.model.config
    raw = (out / "contribution.safetensors").read_bytes()
    rep = audit_bundle(out / "contribution.safetensors", cfg)
    assert rep["conditions"] == ["site_a_study"] and rep["site"] == "site-a" and rep["parent"] == v1.id
    assert rep["size_matches_formula"], rep
    assert rep["size"] == rep["header_bytes"] + 4 * cfg.condition_parameter_count(1)
    assert set(rep["tensors"]) == {"encoder/site_a_study", "decoder/site_a_study"}
    assert rep["shapes_match_model"]  # every vector is a model width long
    assert all(data[1].n_obs not in t["shape"] for t in rep["tensors"].values())
    for cell in data[1].obs_names:
        assert cell.encode() not in raw, f"cell id {cell} leaked into the bundle"
    assert not any("cell" in k and k.startswith("n_") for k in rep["metrics"]), rep["metrics"]
    assert {"epochs", "trainable_parameters"} <= set(rep["metrics"])
    assert rep["metrics"]["trainable_parameters"] == cfg.condition_parameter_count(1)


def test_merge_exactness_two_sites(mapped, data, tmp_path, capsys):
    atlas: Atlas = mapped["atlas"]
    a_bundle = mapped["sites"]["site-a"] / "out" / "contribution.safetensors"
    b_bundle = mapped["sites"]["site-b"] / "out" / "contribution.safetensors"
    twin = Atlas(shutil.copytree(atlas.path, tmp_path / "twin"))
    assert main(["atlas", "merge", str(atlas.path), str(a_bundle), str(b_bundle)]) == 0
    assert "published version 2" in capsys.readouterr().out
    (v2_twin,) = twin.merge([b_bundle, a_bundle]).published
    v2 = atlas.head()
    assert v2.number == 2 and v2.id == v2_twin.id, "merge order changed the version id"
    assert [(c.name, c.site) for c in v2.conditions][-2:] == [("site_a_study", "site-a"), ("site_b_study", "site-b")]

    d = mapped["sites"]["site-a"]
    fetch = ["site", "fetch", "--atlas", mapped["url"], "--trust", str(d / "root.json"), "--cache", str(d / "cache")]
    assert main([*fetch, "--out", str(tmp_path / "v2")]) == 0
    assert main([*fetch, "--out", str(tmp_path / "v1"), "--version", "1"]) == 0
    assert read_atlas_version(tmp_path / "v2").id == v2.id
    merged = FedArchesModel.load(tmp_path / "v2")
    ref_model = FedArchesModel.load(tmp_path / "v1")
    for name, adata in (("site-a", data[1]), ("site-b", data[2])):
        local = ad.read_h5ad(mapped["sites"][name] / "out" / "query.h5ad").obsm[LATENT_KEY]
        emb = merged.embed(adata, "study").obsm[LATENT_KEY]
        diff = float(np.abs(emb - local).max())
        assert diff <= 1e-6, f"{name}: merged latent differs from its own site map by {diff}"
    ref = data[0]
    assert np.array_equal(ref_model.embed(ref, "study").obsm[LATENT_KEY], merged.embed(ref, "study").obsm[LATENT_KEY])
    assert atlas.version(2).blobs["reference.safetensors"] == atlas.version(1).blobs["reference.safetensors"]
    assert atlas.version(2).blobs["weights.safetensors"] == atlas.version(1).blobs["weights.safetensors"]

    # an embed through the core CLI on the fetched directory works as for any model directory
    assert (
        main(
            [
                "embed",
                "--model",
                str(tmp_path / "v2"),
                "--data",
                str(d / "query.h5ad"),
                "--condition-key",
                "study",
                "--out",
                str(tmp_path / "embedded.h5ad"),
            ]
        )
        == 0
    )
    # resubmitting is a no-op, and the site that mapped again after the merge has nothing new
    assert atlas.merge([a_bundle]).published == []
    again = tmp_path / "again"
    assert main(_site_map_args(mapped["url"], d, "site-a", again)) == 0
    assert "nothing new: all 1 studies" in capsys.readouterr().out
    report = json.loads((again / "report.json").read_text())
    assert report["status"] == "nothing-new" and report["plan"]["held"] == ["site_a_study"]
    assert report["atlas"]["version"] == 2 and sorted(p.name for p in again.iterdir()) == ["report.json"]


def test_failed_map_leaves_no_output(world, tmp_path, capsys):
    d = world["sites"]["site-b"]
    args = _site_map_args(world["url"], d, "site-b", tmp_path / "out", condition_key="no_such_column")
    assert main(args) == 2
    assert "no_such_column" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_full_strategy_is_published_as_a_branch(world, data, tmp_path):
    atlas: Atlas = world["atlas"]
    d = world["sites"]["site-b"]
    out = tmp_path / "full"
    assert (
        main(_site_map_args(world["url"], d, "site-b", out, "--strategy", "full", "--epochs", "2",
                                  "--version", "1", "--threads", "1"))
        == 0
    )
    bundle = read_bundle(out / "contribution.safetensors")
    assert bundle.manifest.strategy == "full" and bundle.shared_tensors()
    head_before = atlas.head()
    (branch,) = atlas.merge([out / "contribution.safetensors"]).published
    assert branch.branch.startswith("site-b/full@v1") and atlas.head() == head_before
    fetched = tmp_path / "branch"
    assert (
        main(
            [
                "site",
                "fetch",
                "--atlas",
                world["url"],
                "--trust",
                str(d / "root.json"),
                "--cache",
                str(d / "cache"),
                "--version",
                str(branch.number),
                "--out",
                str(fetched),
            ]
        )
        == 0
    )
    local = ad.read_h5ad(out / "query.h5ad").obsm[LATENT_KEY]
    emb = FedArchesModel.load(fetched).embed(data[2], "study").obsm[LATENT_KEY]
    assert float(np.abs(emb - local).max()) <= 1e-6


def test_nb_model_through_the_python_api(data, tmp_path):
    """The same story for the count model (dispersion vectors, batch norm), through the Python API."""
    from fedarches.client import AtlasClient, map_and_contribute
    from fedarches.server import make_server

    ref, site_a, site_b = data
    atlas = Atlas.init(tmp_path / "atlas", "nb-atlas")
    atlas.build(ref, "study", "cell_type", kind="nb", epochs=4, n_genes=0, threads=1)
    cfg = atlas.version(1).model.config
    server = make_server(atlas.repository_dir, "127.0.0.1", free_port())
    server.start_background()
    try:
        results = {}
        for name, adata in (("site-a", site_a), ("site-b", site_b)):
            key = keygen(tmp_path / name / "key")
            atlas.enroll(name, key.public)
            r = map_and_contribute(
                atlas_url=server.url,
                trust=atlas.root_json,
                key=tmp_path / name / "key",
                site=name,
                data=adata,
                condition_key="study",
                out_dir=tmp_path / name / "out",
                settings=MapSettings(epochs=3, threads=1),
                cache_dir=tmp_path / name / "cache",
            )
            rep = audit_bundle(r.bundle_bytes(), cfg)
            assert rep["size_matches_formula"] and len(rep["tensors"]) == 3  # encoder, decoder, dispersion
            results[name] = (r, adata)
        (v2,) = atlas.merge([results["site-b"][0].bundle_path, results["site-a"][0].bundle_path]).published
        fetched = AtlasClient(server.url, atlas.root_json, cache_dir=tmp_path / "cache").fetch(tmp_path / "v2")
        assert fetched.id == v2.id
        merged = FedArchesModel.load(fetched.path)
        for r, adata in results.values():
            local = ad.read_h5ad(r.query_path).obsm[LATENT_KEY]
            assert float(np.abs(merged.embed(adata, "study").obsm[LATENT_KEY] - local).max()) <= 1e-6
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("damage", ["atlas-version.json", "manifest.json"])
def test_damaged_fetched_directory_is_a_one_line_error(world, data, tmp_path, damage):
    from fedarches.client import map_local

    d = world["sites"]["site-b"]
    fetched = tmp_path / "v1"
    assert main(["site", "fetch", "--atlas", world["url"], "--trust", str(d / "root.json"), "--cache",
                 str(d / "cache"), "--version", "1", "--out", str(fetched)]) == 0
    path = fetched / damage
    path.write_text(path.read_text().replace('"conditions"', '"conditionz"', 1))
    with pytest.raises(FedarchesError) as info:
        map_local(fetched, key=d / "key", site="site-b", data=data[2], condition_key="study",
                  out_dir=tmp_path / "out", settings=MapSettings(epochs=1, threads=1))
    assert isinstance(info.value, VersionManifestError if damage == "atlas-version.json" else ManifestError)
    assert "\n" not in str(info.value) and str(info.value).startswith(info.value.check)
    assert not (tmp_path / "out").exists()


def test_same_data_and_settings_give_byte_identical_bundles(world, data, tmp_path):
    """Held studies in the site's data do not change what it maps, and no timing enters the bundle."""
    from fedarches.client import map_local

    ref, _, site_b = data
    d = world["sites"]["site-b"]
    fetched = tmp_path / "v1"
    assert main(["site", "fetch", "--atlas", world["url"], "--trust", str(d / "root.json"), "--cache",
                 str(d / "cache"), "--version", "1", "--out", str(fetched)]) == 0
    settings = MapSettings(epochs=2, threads=1, seed=3)
    mixed = ad.concat([ref, site_b])
    mixed.obs["study"] = pd.Categorical(mixed.obs["study"].astype(str))
    runs = [map_local(fetched, key=d / "key", site="site-b", data=x, condition_key="study",
                      out_dir=tmp_path / f"out{i}", settings=settings) for i, x in enumerate((site_b, mixed))]
    assert runs[0].bundle_bytes() == runs[1].bundle_bytes()
    assert runs[1].plan.held == ["ref_a", "ref_b"] and runs[1].conditions == ["site_b_study"]
    assert not any("seconds" in k for k in read_bundle(runs[0].bundle_path).manifest.metrics)
