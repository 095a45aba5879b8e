"""`fedarches demo` end to end, small: generated data, 2 sites, 2 rounds over Flower
simulation (the atlas learns the held-out type from one site's shared labels); and the
paper's CellBench hold-out with --data (slow)."""

from __future__ import annotations

import json

import pytest

from fedarches.cli import main


@pytest.mark.flower
def test_demo_small_generated(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--sites", "2", "--rounds", "2", "--cells-per-study", "250", "--genes", "300",
                 "--n-genes", "0", "--epochs", "15", "--site-epochs", "5", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text[-3000:]
    # lineage: reference, then one version per round (site-2 holds one study: nothing new in round 2)
    assert "v1 " in text and "v2 " in text and "v3 " in text and "v4 " not in text
    assert "nothing-new" in text and "site-1-study_" in text and "site-2-study_" in text
    assert "label accuracy" in text and "unseen -> unknown" in text
    png = out / "umap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "federation-report.json").read_text())
    assert report["status"] == "completed" and [r["head_number"] for r in report["rounds"]] == [2, 3]
    accepted = [s for r in report["rounds"] for s in r["sites"] if s["status"] == "accepted"]
    assert len(accepted) == 3
    for s in accepted:  # scores travel (quality is the cellbench test's job: this model is tiny)
        for key in ("label_transfer.accuracy_known", "label_transfer.unseen_called_unknown",
                    "label_transfer.known_called_unknown"):
            assert 0.0 <= s["metrics"][key] <= 1.0
    # growth: site-2 (one study) shares its labels in round 1, the held-out type included; its
    # label either joins version 2 or is reported as a label conflict (this tiny model may not
    # tell it apart: the default-sized demo below checks that the type is learnt)
    rows, holdout = _growth(out, ("site-1", "site-2"))
    by = {(r["site"], r["version"]): r for r in rows}
    assert "the atlas learns" in text
    assert holdout in by[("site-2", 1)]["shared"] and not by[("site-1", 1)]["shared"]
    assert by[("site-1", 1)]["labelled"] == 0.0  # version 1 lacks the type
    first = report["rounds"][0]
    merged = {lab["name"] for v in first["published"] for lab in v.get("labels", [])}
    assert holdout in merged | {c["label"] for c in first.get("label_conflicts", [])}
    # the next demo with this --out replaces it (and only a directory a demo wrote)
    from fedarches.cli.demo import _prepare_out

    _prepare_out(out)
    assert not png.exists() and [p.name for p in out.iterdir()] == [".fedarches-demo"]


def _growth(out, sites):
    """The demo's growth rows and the held-out type (in the sites' data, not in the reference)."""
    import anndata as ad

    from fedarches.cli.demo import growth_rows

    ref_types = set(ad.read_h5ad(out / "data" / "reference.h5ad").obs["cell_type"].astype(str))
    (holdout,) = set(ad.read_h5ad(out / "sites" / "site-1" / "data.h5ad").obs["cell_type"].astype(str)) - ref_types
    return growth_rows({s: out / "sites" / s / "results" for s in sites}, "cell_type", holdout), holdout


@pytest.mark.flower
@pytest.mark.slow
def test_demo_default_size_learns_the_held_out_type(tmp_path, capsys):
    """The default demo (3 sites, 2 rounds): site-3 shares its labels in round 1; in round 2
    sites 1 and 2 map their second study onto version 2 and get the held-out type labelled,
    where version 1 called it unknown. About 4 minutes on 2 cores (measured: 86.0% and 96.5%)."""
    out = tmp_path / "demo"
    code = main(["demo", "--no-plot", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text[-3000:]
    report = json.loads((out / "federation-report.json").read_text())
    assert not report["rounds"][0].get("label_conflicts")
    rows, holdout = _growth(out, ("site-1", "site-2", "site-3"))
    by = {(r["site"], r["version"]): r for r in rows}
    assert holdout in by[("site-3", 1)]["shared"]
    for site in ("site-1", "site-2"):
        # 80%: the bar of a type as far from the known ones as A549 (issue 14). The unknown-cell rule
        # trades a few of site-1's 50 held-out cells (86% found) for false alarms 4.4% -> 0.2%
        assert by[(site, 1)]["labelled"] == 0.0 and by[(site, 1)]["unknown"] >= 0.8, rows
        assert by[(site, 2)]["labelled"] >= 0.8, rows


def test_demo_refuses_a_foreign_out_dir(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("not a demo")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not empty and not a previous demo" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "not a demo"


@pytest.mark.flower
@pytest.mark.slow
def test_demo_cellbench_holdout(tmp_path, capsys):
    """The scArches paper's hold-out on real data: reference = CELseq2_3cl, Dropseq_3cl,
    CELseq2_5cl_p1 without A549; sites = the two other 5-cell-line plates."""
    from conftest import shared_data

    from fedarches.data.splits import CELLBENCH

    data = shared_data("cellbench_lung_celllines.h5ad")
    code = main(["demo", "--data", str(data), "--condition-key", "study", "--label-key", "cell_type",
                 "--reference-studies", ",".join(CELLBENCH.reference_studies),
                 "--holdout", ",".join(CELLBENCH.held_out_types), "--sites", "2", "--rounds", "1",
                 "--n-genes", "2000", "--out", str(tmp_path / "demo")])
    text = capsys.readouterr().out
    assert code == 0, text[-3000:]
    report = json.loads((tmp_path / "demo" / "federation-report.json").read_text())
    sites = report["rounds"][0]["sites"]
    assert sorted(s["status"] for s in sites) == ["accepted", "accepted"]
    for s in sites:
        assert s["metrics"]["label_transfer.accuracy_known"] > 0.8
