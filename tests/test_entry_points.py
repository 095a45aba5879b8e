"""The same input gives the same outcome through `fedarches site map`, the Python API
and the Flower ClientApp: byte-identical bundles for a site with a new study, and
"nothing-new" from all three for a site whose studies are all in the atlas.

One tiny atlas, one Flower simulation (two simulated sites, one round)."""

from __future__ import annotations

import json

import pytest

EPOCHS = 2


def _study(adata, name: str):
    return adata[(adata.obs["study"].astype(str) == name).to_numpy()].copy()


@pytest.fixture()
def world(tmp_path):
    import anndata as ad

    from fedarches.data.simulate import simulate
    from fedarches.format.signing import keygen
    from fedarches.server import Atlas

    adata = simulate(n_cells=450, n_genes=60, n_cell_types=3, n_studies=3, seed=5)
    studies = sorted(set(adata.obs["study"].astype(str)))
    atlas = Atlas.init(tmp_path / "atlas", "entry-atlas")
    atlas.build(ad.concat([_study(adata, s) for s in studies[:2]]), "study", "cell_type",
                epochs=3, n_genes=0, threads=1)
    sites = {}
    for name, study in (("site-a", studies[2]), ("site-n", studies[0])):  # site-n: already in the atlas
        d = tmp_path / name
        d.mkdir()
        part = _study(adata, study)
        part.obs["study"] = part.obs["study"].astype(str).astype("category")
        part.write_h5ad(d / "data.h5ad")
        atlas.enroll(name, keygen(d / "keys").public)
        sites[name] = {"data": d / "data.h5ad", "keys": d / "keys"}
    return {"atlas": atlas, "sites": sites, "base": tmp_path}


def _cli(url: str, root, site: str, s: dict, out) -> tuple[int, str]:
    import contextlib
    import io

    from fedarches.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["site", "map", "--atlas", url, "--trust", str(root), "--key", str(s["keys"]),
                     "--site", site, "--data", str(s["data"]), "--condition-key", "study",
                     "--epochs", str(EPOCHS), "--threads", "1", "--quiet", "--out", str(out)])
    return code, buf.getvalue()


def _python(url: str, root, site: str, s: dict, out):
    from fedarches.client import map_and_contribute
    from fedarches.config import MapSettings

    return map_and_contribute(atlas_url=url, trust=root, key=s["keys"], site=site, data=s["data"],
                              condition_key="study", out_dir=out, settings=MapSettings(epochs=EPOCHS, threads=1))


@pytest.mark.flower
def test_cli_python_and_flower_agree(world, tmp_path):
    from fedarches.client.site import STATUS_CONTRIBUTED, STATUS_NOTHING_NEW
    from fedarches.federation.app_dir import write_app_dir
    from fedarches.federation.protocol import SiteConfig, write_sim_sites
    from fedarches.format.bundle import BUNDLE_FILE
    from fedarches.server.http import serve_atlas
    from fedarches.testing.flower import start_simulation

    atlas, sites = world["atlas"], world["sites"]
    root = atlas.root_json
    server = serve_atlas(atlas, "127.0.0.1", 0)
    try:
        code, text = _cli(server.url, root, "site-a", sites["site-a"], tmp_path / "cli-a")
        assert code == 0, text
        cli_bundle = (tmp_path / "cli-a" / BUNDLE_FILE).read_bytes()
        py = _python(server.url, root, "site-a", sites["site-a"], tmp_path / "py-a")
        assert py.status == STATUS_CONTRIBUTED

        code, text = _cli(server.url, root, "site-n", sites["site-n"], tmp_path / "cli-n")
        assert code == 0 and "nothing" in text.lower() and "new" in text.lower(), text
        assert _python(server.url, root, "site-n", sites["site-n"], tmp_path / "py-n").status == STATUS_NOTHING_NEW
    finally:
        server.close()

    sim = write_sim_sites(tmp_path / "sim-sites.toml", [
        SiteConfig(site=n, data=sites[n]["data"], condition_key="study", key_dir=sites[n]["keys"],
                   out_dir=tmp_path / f"flower-{n}", epochs=EPOCHS)
        for n in ("site-a", "site-n")
    ])
    report = tmp_path / "report.json"
    fed = start_simulation(tmp_path / "flower")
    try:
        result = fed.run(write_app_dir(tmp_path / "fedarches-app"),
                         {"atlas-dir": str(atlas.path), "num-server-rounds": 1, "report": str(report),
                          "sim-sites": str(sim), "round-timeout": 300},
                         num_supernodes=2, timeout=600)
    finally:
        fed.stop()
    assert result.ok, result.output[-3000:]
    sites_rep = {s["site"]: s for s in json.loads(report.read_text())["rounds"][0]["sites"]}
    assert sites_rep["site-a"]["status"] == "accepted"
    assert sites_rep["site-n"]["status"] == STATUS_NOTHING_NEW
    (flower_file,) = atlas.path.glob("federation/run-*/round-1/*site-a*.contribution.safetensors")
    flower_bundle = flower_file.read_bytes()

    from fedarches.format.bundle import read_bundle

    py_bundle = py.bundle_bytes()
    manifests = [read_bundle(b).manifest.model_dump() for b in (cli_bundle, py_bundle, flower_bundle)]
    assert manifests[0] == manifests[1] == manifests[2]
    assert cli_bundle == py_bundle == flower_bundle
