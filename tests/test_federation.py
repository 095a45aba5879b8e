"""Federated rounds over real Flower: a deployment (SuperLink + SuperNodes on loopback,
TLS and SuperNode authentication) and a simulation (Ray), plus the site logic alone.

The atlas is trained once per module (tiny model, few epochs) and copied per test,
because a round publishes into it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedarches.federation.protocol import STATUS_CONTRIBUTED, STATUS_NOTHING_NEW, MapRequest, SiteConfig

SITE_EPOCHS = 3


def _study(adata, name: str):
    return adata[(adata.obs["study"].astype(str) == name).to_numpy()].copy()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A published atlas (v1 from studies 0-1) and three enrolled sites' keys and data:
    site-a holds two new studies, site-b one, site-c one but names a wrong condition key."""
    import anndata as ad

    from fedarches.data.simulate import simulate
    from fedarches.server import Atlas
    from fedarches.format.signing import keygen

    base = tmp_path_factory.mktemp("federation-world")
    adata = simulate(n_cells=1200, n_genes=120, n_cell_types=3, n_studies=6, seed=11)
    studies = sorted(set(adata.obs["study"].astype(str)))
    ref = ad.concat([_study(adata, s) for s in studies[:2]])
    atlas = Atlas.init(base / "atlas", "test-atlas")
    atlas.build(ref, "study", "cell_type", epochs=8, n_genes=0, threads=1)

    holdings = {"site-a": studies[2:4], "site-b": studies[4:5], "site-c": studies[5:6]}
    sites: dict[str, dict] = {}
    for name, held in holdings.items():
        d = base / name
        d.mkdir()
        parts = []
        for s in held:
            part = _study(adata, s)
            part.obs["study"] = f"{name}:{s}"
            parts.append(part)
        data = ad.concat(parts) if len(parts) > 1 else parts[0]
        data.obs["study"] = data.obs["study"].astype("category")
        data.write_h5ad(d / "data.h5ad")
        key = keygen(d / "keys")
        atlas.enroll(name, key.public)
        sites[name] = {"data": d / "data.h5ad", "keys": d / "keys", "studies": [f"{name}:{s}" for s in held]}
    return {"base": base, "atlas": base / "atlas", "sites": sites}


def _copy_atlas(world, dest: Path):
    from fedarches.server import Atlas

    shutil.copytree(world["atlas"], dest)
    return Atlas(dest)


def _site(world, name: str, work: Path, **kw) -> SiteConfig:
    s = world["sites"][name]
    return SiteConfig(site=name, data=s["data"], condition_key=kw.pop("condition_key", "study"),
                      key_dir=s["keys"], out_dir=work / f"{name}-results", epochs=SITE_EPOCHS, **kw)


def _conditions(entry) -> dict[str, str]:
    return {c.name: c.site for c in entry.conditions}


@pytest.mark.flower
def test_deployment_round_with_tls_and_supernode_auth(world, tmp_path):
    from fedarches.federation.app_dir import write_app_dir
    from fedarches.testing.flower import ManagedProcess, flower_bin, flower_env, free_port, start_deployment

    atlas = _copy_atlas(world, tmp_path / "atlas")
    sites = [_site(world, n, tmp_path) for n in ("site-a", "site-b")]
    fed = start_deployment(tmp_path / "flower", {s.site: s.to_node_config() for s in sites})
    try:
        cmd = fed.superlink.process.cmd
        assert "--enable-supernode-auth" in cmd and "--ssl-certfile" in cmd and "--insecure" not in cmd
        assert all("--root-certificates" in sn.process.cmd and "--auth-supernode-private-key" in sn.process.cmd
                   for sn in fed.supernodes)

        # an unregistered SuperNode key is turned away by the SuperLink
        from fedarches.federation.certs import make_supernode_keys

        stranger = make_supernode_keys(tmp_path / "stranger", "stranger")
        intruder = ManagedProcess(
            "stranger",
            [flower_bin("flower-supernode"), "--superlink", fed.superlink.address,
             "--root-certificates", str(fed.superlink.tls.ca_cert),
             "--auth-supernode-private-key", str(stranger.private_key),
             "--max-retries", "1", "--port", str(free_port())],
            tmp_path / "stranger" / "supernode.log",
            flower_env(flwr_home=tmp_path / "stranger" / "home"),
        ).start()
        try:
            code = intruder.proc.wait(timeout=120)
        finally:
            intruder.stop()  # also ends the SuperExec child it started
        assert code != 0 and "SuperNode ID:" not in intruder.log_tail(200), intruder.log_tail()

        report = tmp_path / "report.json"
        result = fed.run(write_app_dir(tmp_path / "fedarches-app"),
                         {"atlas-dir": str(atlas.path), "num-server-rounds": 1, "report": str(report),
                          "min-sites": 2, "round-timeout": 300},
                         timeout=600)
    finally:
        fed.stop()
    assert result.ok, result.output[-3000:]
    head = atlas.head()
    assert head.number == 2 and head.parent_numbers == [1]
    conds = _conditions(head)
    for s in ("site-a", "site-b"):
        # site-a holds two studies and maps both in one round (no per-round cap here)
        for study in world["sites"][s]["studies"]:
            assert conds[study] == s
    rep = json.loads(report.read_text())
    assert rep["status"] == "completed"
    assert sorted(x["status"] for x in rep["rounds"][0]["sites"]) == ["accepted", "accepted"]


@pytest.mark.flower
def test_simulation_rounds_survive_a_failing_site(world, tmp_path):
    """Round 1: site-a and site-b contribute (site-a one study per round), site-c fails
    (its condition key is not a column) and the coordinator carries on. Round 2: site-a
    adds its second study, site-b has nothing new. Two rounds, two new versions."""
    from fedarches.federation.app_dir import write_app_dir
    from fedarches.testing.flower import start_simulation
    from fedarches.federation.protocol import write_sim_sites

    atlas = _copy_atlas(world, tmp_path / "atlas")
    sites = [
        _site(world, "site-a", tmp_path, conditions_per_round=1),
        _site(world, "site-b", tmp_path),
        _site(world, "site-c", tmp_path, condition_key="no-such-column"),
    ]
    sim_sites = write_sim_sites(tmp_path / "sim-sites.toml", sites)
    report = tmp_path / "report.json"
    fed = start_simulation(tmp_path / "flower")
    try:
        result = fed.run(write_app_dir(tmp_path / "fedarches-app"),
                         {"atlas-dir": str(atlas.path), "num-server-rounds": 2, "report": str(report),
                          "sim-sites": str(sim_sites), "round-timeout": 300},
                         num_supernodes=3, timeout=900)
    finally:
        fed.stop()
    assert result.ok, result.output[-3000:]
    a1, a2 = world["sites"]["site-a"]["studies"]
    (b1,) = world["sites"]["site-b"]["studies"]
    (c1,) = world["sites"]["site-c"]["studies"]
    log = {e.number: e for e in atlas.log()}
    assert sorted(log) == [1, 2, 3]
    assert _conditions(log[2]) | {} == {**_conditions(log[1]), a1: "site-a", b1: "site-b"}
    assert _conditions(log[3]) == {**_conditions(log[2]), a2: "site-a"}
    assert c1 not in _conditions(log[3])

    rep = json.loads(report.read_text())
    assert rep["status"] == "completed"
    by_round = [{s["site"]: s for s in r["sites"]} for r in rep["rounds"]]
    assert by_round[0]["site-a"]["status"] == by_round[0]["site-b"]["status"] == "accepted"
    assert by_round[1]["site-a"]["status"] == "accepted"
    assert by_round[1]["site-b"]["status"] == STATUS_NOTHING_NEW
    for r in by_round:
        # a failed check is a structured reply: the site and the check are fields, not text to parse
        assert r["site-c"]["status"] == "failed" and "no-such-column" in r["site-c"]["message"]
        assert r["site-c"]["check"] and r["site-c"]["error_class"]
    # what came back from a site: scores, never cells
    assert 0.0 <= by_round[0]["site-a"]["metrics"]["label_transfer.accuracy_known"] <= 1.0
    assert "fedarches: round 1: site site-c failed" in result.output


def test_site_maps_new_studies_and_reports_nothing_new(world, tmp_path):
    """The ClientApp's work without Flower: contribute, then 'nothing new' on the merged
    version; a wrong trust root is an error naming the failed check."""
    from fedarches.errors import FedarchesError
    from fedarches.federation.site_job import handle_request
    from fedarches.server import make_server

    atlas = _copy_atlas(world, tmp_path / "atlas")
    site = _site(world, "site-b", tmp_path)
    server = make_server(atlas.repository_dir, "127.0.0.1", 0)
    server.start_background()
    try:
        head = atlas.head()
        req = MapRequest(round=1, atlas_url=server.url, version=head.number, version_id=head.id,
                         trust_root=atlas.root_json.read_bytes(), epochs=SITE_EPOCHS)
        reply = handle_request(site, req)
        assert reply.status == STATUS_CONTRIBUTED and list(reply.conditions) == world["sites"]["site-b"]["studies"]
        assert len(reply.bundle) < 64 * 1024  # weight slices, not cells
        merged = atlas.merge([reply.bundle])
        v2 = merged.version
        again = handle_request(site, MapRequest(round=2, atlas_url=server.url, version=v2.number,
                                                 version_id=v2.id, trust_root=atlas.root_json.read_bytes()))
        assert again.status == STATUS_NOTHING_NEW and not again.bundle

        other = tmp_path / "other-atlas"
        from fedarches.server import Atlas

        Atlas.init(other, "someone-else")
        with pytest.raises(FedarchesError, match="check failed"):
            handle_request(_site(world, "site-a", tmp_path / "x"),
                            MapRequest(round=1, atlas_url=server.url, version=1, version_id=head.id,
                                       trust_root=(other / "root.json").read_bytes()))
    finally:
        server.shutdown()
        server.server_close()
