"""examples/flower-deployment without Flower: its one settings file (federation.toml),
the helper that turns it into shell settings, the generated data split, and
`fedarches atlas report` on a run report of the shape the coordinator writes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import asdict
from pathlib import Path

import pytest

from fedarches.cli import main
from fedarches.errors import SettingError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower-deployment"


@pytest.fixture
def fedconfig(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delenv("WORK", raising=False)
    monkeypatch.delenv("FEDERATION_CONFIG", raising=False)
    import federation_config

    return federation_config


def _helper(*args: str, work: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WORK": str(work)}
    env.pop("FEDERATION_CONFIG", None)
    return subprocess.run([sys.executable, str(EXAMPLE / "federation_config.py"), *args],
                          capture_output=True, text=True, env=env, check=False)


def test_shipped_config_has_the_demo_settings(fedconfig):
    fed = fedconfig.load()
    assert fed.path == EXAMPLE / "federation.toml"
    assert fed.work == Path(os.path.abspath(EXAMPLE / "../../out/flower-deployment"))
    assert (fed.superlink_port, fed.atlas_port, fed.supernode_base_port) == (9093, 8765, 9094)
    assert (fed.condition_key, fed.label_key, fed.model, fed.n_genes, fed.epochs, fed.rounds) == \
        ("study", "cell_type", "trvae", 1000, None, 1)
    assert fed.reference == fed.work / "data" / "reference.h5ad"
    assert fed.generate == {"cells-per-study": 600, "genes": 2000, "cell-types": 6, "seed": 0}
    assert [(s.name, s.data, s.key_dir, s.keygen, s.port) for s in fed.sites] == [
        ("site-a", fed.work / "data" / "site-a.h5ad", fed.work / "sites" / "site-a" / "keys", True, 9094),
        ("site-b", fed.work / "data" / "site-b.h5ad", fed.work / "sites" / "site-b" / "keys", True, 9095),
    ]


def test_helper_prints_the_exports_env_sh_evals(tmp_path):
    work = tmp_path / "work"
    out = _helper(work=work)
    assert out.returncode == 0, out.stderr
    assert f"export WORK={work}" in out.stdout.splitlines()
    assert "export SUPERLINK_PORT=9093" in out.stdout and "export SITES='site-a site-b'" in out.stdout
    # what bash makes of it: the scalars and the per-site arrays
    script = ('eval "$(cat)"; echo "$SUPERLINK_PORT $ATLAS_PORT $N_GENES [$EPOCHS] $GENERATE"; '
              'for s in $SITES; do echo "$s ${SITE_PORT[$s]} ${SITE_KEYGEN[$s]} ${SITE_DATA[$s]}"; done')
    shell = subprocess.run(["bash", "-c", script], input=out.stdout, capture_output=True, text=True, check=True)
    assert shell.stdout.splitlines() == [
        "9093 8765 1000 [] 1",
        f"site-a 9094 1 {work}/data/site-a.h5ad",
        f"site-b 9095 1 {work}/data/site-b.h5ad",
    ]


def test_helper_writes_the_node_config_a_site_reads(tmp_path):
    from fedarches.federation.protocol import SiteConfig

    out = _helper("--node-config", "site-b", work=tmp_path)
    assert out.returncode == 0, out.stderr
    site = SiteConfig.from_mapping(tomllib.loads(out.stdout))
    assert (site.site, site.data, site.condition_key) == ("site-b", tmp_path / "data" / "site-b.h5ad", "study")
    assert site.trust_root == tmp_path / "sites" / "site-b" / "root.json"
    assert _helper("--node-config", "site-c", work=tmp_path).returncode == 2


def test_own_data_config(fedconfig, tmp_path):
    (tmp_path / "keys").mkdir()
    cfg = tmp_path / "mine.toml"
    cfg.write_text('work-dir = "run"\n[ports]\nsuperlink = 9200\n'
                   '[coordinator]\nreference = "ref.h5ad"\ncondition-key = "batch"\n'
                   '[[site]]\nname = "lab1"\ndata = "/data/lab1.h5ad"\ncondition-key = "sample"\n'
                   'key-dir = "keys"\nepochs = 7\n')
    fed = fedconfig.load(cfg)
    assert (fed.work, fed.reference, fed.label_key, fed.generate) == (tmp_path / "run", tmp_path / "ref.h5ad", "", None)
    (site,) = fed.sites
    assert (site.key_dir, site.keygen, site.epochs, site.port) == (tmp_path / "keys", False, 7, 9094)
    assert site.node_config(fed.work)["epochs"] == 7
    cfg.write_text(cfg.read_text().replace("condition-key = \"sample\"", "condition_key = \"sample\""))
    with pytest.raises(SettingError, match="unknown key 'condition_key'"):
        fedconfig.load(cfg)


def test_generated_data_is_the_demo_split(fedconfig, tmp_path, monkeypatch):
    """make_data.py cuts the data as `fedarches demo` does with one round (same cells)."""
    from fedarches.cli.demo import _split_generated

    shipped = (EXAMPLE / "federation.toml").read_text()
    small = shipped.replace("cells-per-study = 600", "cells-per-study = 60").replace("genes = 2000", "genes = 80")
    cfg = tmp_path / "small.toml"
    cfg.write_text(small.replace('work-dir = "../../out/flower-deployment"', f'work-dir = "{tmp_path / "w"}"'))
    import make_data
    import anndata as ad

    assert make_data.main([str(cfg)]) == 0
    fed = fedconfig.load(cfg)
    ref, sites, _, _, holdout = _split_generated(argparse.Namespace(
        sites=2, rounds=1, cells_per_study=60, genes=80, seed=0, holdout=None))
    ours = ad.read_h5ad(fed.reference)
    assert list(ours.obs_names) == list(ref.obs_names) and ours.n_vars == ref.n_vars == 80
    assert holdout not in set(ours.obs["cell_type"])
    for site, (_, studies) in zip(fed.sites, sites.items()):
        assert list(ad.read_h5ad(site.data).obs_names) == list(studies[0].obs_names)


def _report() -> dict:
    """A run report as `federation.coordinator.run_coordinator` writes it."""
    from fedarches.federation.coordinator import RoundReport, SiteOutcome

    metrics = {"label_transfer.accuracy_known": 0.985, "label_transfer.unseen_called_unknown": 0.9,
               "label_transfer.known_called_unknown": 0.02, "seconds": 41.5}
    rounds = [
        RoundReport(round=1, parent_number=1, parent_id="a" * 64, head_number=2, head_id="b" * 64, seconds=50.0,
                    sites=[SiteOutcome(node_id=7, status="accepted", site="site-a", conditions=["site-a-study_2"],
                                       metrics=metrics, bundle_bytes=1234),
                           SiteOutcome(node_id=8, status="failed", site="site-b", check="obs column check",
                                       message="obs column check failed: 'study' is not a column")],
                    published=[{"number": 2, "id": "b" * 64, "branch": "main", "strategy": "conditions",
                                "parents": [1], "conditions": [{"name": "site-a-study_2", "site": "site-a"}]}]),
        RoundReport(round=2, parent_number=2, parent_id="b" * 64, head_number=2, head_id="b" * 64,
                    sites=[SiteOutcome(node_id=7, status="nothing-new", site="site-a",
                                       message="all studies are in the atlas"),
                           SiteOutcome(node_id=9, status="no-reply", message="no reply within 600s")]),
    ]
    return {"atlas_dir": "/atlas", "run_id": 42, "atlas": "flower-example", "atlas_url": "http://127.0.0.1:8765",
            "rounds": [asdict(r) for r in rounds], "status": "completed", "seconds": 60.0}


def test_atlas_report_prints_the_site_table(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_report(), indent=2, sort_keys=True))
    assert main(["atlas", "report", str(path), "--holdout", "type_5"]) == 0
    text = capsys.readouterr().out
    assert "run 42 of atlas 'flower-example': completed, 2 round(s)" in text
    for column in ("round", "site", "status", "new studies / note", "label accuracy", "unseen -> unknown",
                   "known -> unknown", "seconds"):
        assert column in text
    rows = [line for line in text.splitlines() if "site-a" in line or "node 9" in line or "site-b" in line]
    assert "site-a-study_2" in rows[0] and "98.5%" in rows[0] and "90.0%" in rows[0] and "2.0%" in rows[0] \
        and "41.5" in rows[0]
    assert "failed" in rows[1] and "obs column check failed" in rows[1]
    assert "no-reply" in rows[2] and "node 9" in rows[2]  # a silent node has no site name: rows sort by name
    assert "nothing-new" in rows[3] and "all studies are in the atlas" in rows[3]
    assert "'type_5', which the reference never saw" in text


def test_atlas_report_refuses_what_is_not_a_report(tmp_path, capsys):
    failed = {**_report(), "status": "failed", "error": "SettingError: setting check failed: x"}
    (tmp_path / "failed.json").write_text(json.dumps(failed))
    assert main(["atlas", "report", str(tmp_path / "failed.json")]) == 1
    assert "error: SettingError" in capsys.readouterr().out
    (tmp_path / "other.json").write_text("[1, 2]")
    assert main(["atlas", "report", str(tmp_path / "other.json")]) == 2
    assert main(["atlas", "report", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.count("data file check failed") == 2
