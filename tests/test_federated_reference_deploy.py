"""Issue 10, deployment: the federated reference build with a real ``flower-superlink`` (TLS,
SuperNode authentication) and one real ``flower-supernode`` per site, started with ``flwr run``
of the reference app (`app_dir.write_reference_app_dir`) and its run config, as an operator
does (docs/FEDERATED_REFERENCE.md). Version 1 is an ordinary signed version that ``site fetch``
verifies, its lineage names the sites, and it is the version the simulation
(``atlas build-federated``) publishes from the same sites and settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

from fedarches.cli import main
from fedarches.format.signing import keygen
from fedarches.format.version import read_atlas_version
from fedarches.mapping import write_h5ad
from fedarches.server import Atlas

SITES = ("site-a", "site-b", "site-c")
SETTINGS = {"label-key": "cell_type", "model": "trvae", "rounds": 2, "local-epochs": 1, "n-genes": 60,
            "min-sites": len(SITES), "round-timeout": 300}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Two atlases with the same three enrolled sites (one generated study each): one for
    the deployment, one for the simulation."""
    from fedarches.data.simulate import simulate

    base = tmp_path_factory.mktemp("fedref-deploy")
    adata = simulate(n_cells=900, n_genes=120, n_cell_types=3, n_studies=3, seed=5)
    studies = sorted(set(adata.obs["study"].astype(str)))
    nodes: dict[str, dict] = {}
    publics: dict[str, Path] = {}
    for name, study in zip(SITES, studies):
        d = base / name
        d.mkdir()
        write_h5ad(adata[(adata.obs["study"].astype(str) == study).to_numpy()].copy(), d / "data.h5ad")
        publics[name] = keygen(d / "keys").public
        nodes[name] = {"site": name, "data": str(d / "data.h5ad"), "condition-key": "study",
                       "key-dir": str(d / "keys"), "out-dir": str(d / "results")}
    atlases = {}
    for kind in ("deployed", "simulated"):
        path = base / kind
        assert main(["atlas", "init", str(path), "--name", "fed-generated"]) == 0
        for name in SITES:
            assert main(["atlas", "enroll", str(path), "--site", name, "--public-key", str(publics[name])]) == 0
        atlases[kind] = Atlas(path)
    return {"base": base, "nodes": nodes, "atlases": atlases, "adata": adata}


@pytest.mark.flower
def test_real_superlink_and_supernodes_publish_the_simulated_version(federation, tmp_path):
    from fedarches.federation.app_dir import write_reference_app_dir
    from fedarches.federation.reference_run_config import ReferenceRunConfig
    from fedarches.federation.reference_simulation import build_federated
    from fedarches.server.http import serve_atlas
    from fedarches.testing.flower import start_deployment

    atlas = federation["atlases"]["deployed"]
    report = tmp_path / "report.json"
    # out-dir per deployment: a site's rows of each round stay there
    nodes = {n: {**c, "out-dir": str(tmp_path / n)} for n, c in federation["nodes"].items()}
    fed = start_deployment(tmp_path / "flower", nodes)
    try:
        assert "--enable-supernode-auth" in fed.superlink.process.cmd and "--insecure" not in fed.superlink.process.cmd
        assert all("--auth-supernode-private-key" in sn.process.cmd for sn in fed.supernodes)
        result = fed.run(write_reference_app_dir(tmp_path / "fedarches-reference"),
                         {**SETTINGS, "atlas-dir": str(atlas.path), "report": str(report)}, timeout=600)
    finally:
        fed.stop()
    assert result.ok, result.output[-3000:]
    rep = json.loads(report.read_text())
    assert rep["status"] == "completed" and [len(r["answered"]) for r in rep["rounds"]] == [3, 3]
    # the calibration exchange ran over the real SuperLink too
    assert rep["calibration"]["status"] == "pooled" and rep["calibration"]["labels"]

    [entry] = atlas.log()
    assert entry.number == 1 and entry.strategy == "reference"
    assert (entry.build["sites"], entry.build["rounds"], entry.build["strategy"]) == (",".join(SITES), 2, "FedAvg")
    version = atlas.version(1)
    assert {c.name: c.metrics["held_by"] for c in version.conditions} == \
        dict(zip(sorted(set(federation["adata"].obs["study"].astype(str))), SITES))

    # a site fetches it over HTTP and verifies it against the atlas's trust root
    server = serve_atlas(atlas, "127.0.0.1", 0)
    try:
        assert main(["site", "fetch", "--atlas", server.url, "--trust", str(atlas.root_json),
                     "--out", str(tmp_path / "fetched")]) == 0
    finally:
        server.close()
    assert read_atlas_version(tmp_path / "fetched").id == entry.id

    # the simulation of the same sites and settings
    sim = federation["atlases"]["simulated"]
    toml = tmp_path / "sites.toml"
    toml.write_text(tomli_w.dumps({"site": [{**c, "out-dir": str(tmp_path / "sim" / n)}
                                            for n, c in federation["nodes"].items()]}))
    build_federated(ReferenceRunConfig.from_run_config({**SETTINGS, "atlas-dir": str(sim.path)}), toml)
    simulated = sim.version(1)
    assert version.model.genes == simulated.model.genes and len(version.model.genes) == 60
    assert sorted(version.model.conditions) == sorted(simulated.model.conditions)
    assert version.blobs == simulated.blobs  # the same weights, bit for bit


def test_reference_app_declares_every_run_config_key(tmp_path):
    """Flower refuses a --run-config key the app does not declare: the app holds them all,
    and its defaults alone are refused (no atlas directory, no label key)."""
    import tomllib

    from fedarches.errors import SettingError
    from fedarches.federation.app_dir import REFERENCE_CLIENT_APP, REFERENCE_SERVER_APP, write_reference_app_dir
    from fedarches.federation.reference_run_config import ReferenceRunConfig

    app = tomllib.loads((write_reference_app_dir(tmp_path / "fedarches-reference") / "pyproject.toml")
                        .read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": REFERENCE_SERVER_APP, "clientapp": REFERENCE_CLIENT_APP}
    assert set(app["config"]) == {f.alias or n for n, f in ReferenceRunConfig.model_fields.items()}
    with pytest.raises(SettingError, match="atlas-dir"):
        ReferenceRunConfig.from_run_config(app["config"])
    cfg = ReferenceRunConfig.from_run_config({**app["config"], "atlas-dir": str(tmp_path), "label-key": "x"})
    assert cfg == ReferenceRunConfig(atlas_dir=str(tmp_path), label_key="x")
