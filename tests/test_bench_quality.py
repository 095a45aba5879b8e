"""The benchmark's quality section: scoring rules, seed aggregation and the
rendered tables (benchmarks/quality_scores.py, benchmarks/report.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

quality_scores = pytest.importorskip("quality_scores")
report = pytest.importorskip("report")


def test_score_calls_counts_unknown_known_cells_as_wrong_and_ranks_heldout():
    labels = np.array(["a", "a", "b", "b", "new", "new"])
    pred = np.array(["a", "b", "b", "b", "a", "b"])
    unknown = np.array([False, False, True, False, True, False])
    score = np.array([0.1, 0.2, 0.3, 0.0, 0.9, 0.8])
    s = quality_scores.score_calls((pred, unknown, score), labels, ["new"])
    assert s["accuracy_known"] == pytest.approx(2 / 4)  # the unknown "b" cell is wrong
    assert s["known_called_unknown"] == pytest.approx(1 / 4)
    assert s["heldout"]["new"]["called_unknown"] == pytest.approx(1 / 2)
    assert s["heldout"]["new"]["auroc"] == pytest.approx(1.0)


def test_auroc_is_none_without_heldout_cells_and_infinite_scores_rank_highest():
    labels = np.array(["a", "a", "new"])
    calls = (np.array(["a", "a", "a"]), np.zeros(3, bool), np.array([0.0, 1.0, np.inf]))
    assert quality_scores.score_calls(calls, labels, ["new"])["heldout"]["new"]["auroc"] == 1.0
    assert quality_scores.score_calls(calls, labels, ["gone"])["heldout"]["gone"]["auroc"] is None


def test_scanvi_own_rule_unknown_below_half_probability(tmp_path):
    np.savez(tmp_path / "own_labels.npz", prediction=np.array(["a", "b"]),
             max_probability=np.array([0.9, 0.4], dtype=np.float32))
    pred, unknown, score = quality_scores.own_calls(tmp_path)
    assert list(unknown) == [False, True]
    assert score == pytest.approx([0.1, 0.6])
    assert quality_scores.own_calls(tmp_path / "none") is None


def test_aggregate_reports_worst_seed_per_direction():
    def one(acc, fa, det):
        return {"t": {"own": {"accuracy_known": acc, "known_called_unknown": fa, "n_known": 10,
                              "heldout": {"x": {"n": 3, "called_unknown": det, "auroc": det}}}}}

    agg = quality_scores.aggregate({"0": one(0.9, 0.01, 0.8), "1": one(0.8, 0.04, 0.9), "2": one(0.85, 0.02, 0.7)})
    a = agg["t"]["own"]
    assert a["accuracy_known"]["worst"] == 0.8 and a["accuracy_known"]["worst_seed"] == "1"
    assert a["known_called_unknown"]["worst"] == 0.04 and a["known_called_unknown"]["worst_seed"] == "1"
    assert a["heldout"]["x"]["called_unknown"]["worst_seed"] == "2"
    assert a["accuracy_known"]["mean"] == pytest.approx(0.85)
    assert a["accuracy_known"]["sd"] == pytest.approx(0.05)


def test_knn_rules_on_a_latent_with_a_far_heldout_cluster():
    rng = np.random.default_rng(0)
    centres = {"a": 0.0, "b": 8.0}
    z_ref = np.concatenate([rng.normal(c, 1.0, (150, 4)) for c in centres.values()]).astype(np.float32)
    ref_labels = np.repeat(list(centres), 150)
    ref_batches = np.tile(["s1", "s2"], 150)
    z_q = np.concatenate([rng.normal(0.0, 1.0, (60, 4)), rng.normal(8.0, 1.0, (60, 4)),
                          rng.normal(-30.0, 1.0, (40, 4))]).astype(np.float32)
    q_labels = np.repeat(["a", "b", "new"], [60, 60, 40])
    calls = quality_scores.knn_calls(z_ref, ref_labels, ref_batches, z_q)
    assert set(calls) == {"paper-knn", "fedarches-rule"}
    fed = quality_scores.score_calls(calls["fedarches-rule"], q_labels, ["new"])
    assert fed["heldout"]["new"]["auroc"] > 0.95
    assert fed["heldout"]["new"]["called_unknown"] > 0.9
    knn = quality_scores.score_calls(calls["paper-knn"], q_labels, ["new"])
    assert knn["accuracy_known"] > 0.95


def _results_with_quality() -> dict:
    def seed(acc):
        rules = {"accuracy_known": acc, "known_called_unknown": 0.02, "n_known": 100,
                 "heldout": {"X": {"n": 10, "called_unknown": 0.5, "auroc": 0.8}}}
        return {t: {"own": rules, "paper-knn": rules} for t in ("fedarches-nb", "fedarches-trvae", "scanvi")} | {
            "scvi-tools": {"paper-knn": rules}}

    per_seed = {"0": seed(0.95), "1": seed(0.90)}
    data = {"description": "toy split.", "n_reference_cells": 100, "n_query_cells": 110, "n_genes": 50}
    q = {"toy": {"simulated": True, "data": data, "aggregate": quality_scores.aggregate(per_seed),
                 "seeds": {s: {"data": data, "seconds": 60.0, "tools": {}} for s in per_seed}}}
    return {"command": "python benchmarks/run.py --sections quality", "mode": "full", "mode_settings": {},
            "started": "now", "seconds": 120.0, "threads": 1, "quality": q, "quality_seeds": [0, 1],
            "machine": {"nproc": "2", "memory": "", "cpu": "", "platform": "", "python": ""},
            "versions": {"fedarches_venv": {}, "peers_venv": {}},
            "carried_over": {"splits": {"command": "python benchmarks/run.py --mode full", "started": "before"}}}


def test_report_renders_quality_tables_and_worst_seed_verdict(tmp_path):
    res = _results_with_quality()
    res["summary"] = report.summarise(res)
    out = tmp_path / "RESULTS.md"
    report.write_markdown(res, out)
    md = out.read_text()
    assert "## Quality under state shift" in md
    assert "| fedarches NB, its own labels (map_query) | 92.5% ± 3.5 (90.0%, s1) |" in md
    assert "X AUROC" in md
    verdict = next(line for line in md.splitlines() if line.startswith("| `toy` |"))
    assert "| yes / yes |" in verdict  # worst seed 90.0% vs the peers' worst 90.0%
    assert "Section **splits** was not re-measured" in md


def test_simulated_quality_split_is_drawn_per_seed_with_reference_genes(tmp_path):
    import anndata as ad

    prep = pytest.importorskip("prep")
    splits = prep.quality_splits()
    sim = next((s for s in splits.values() if prep.is_simulated(s)), None)
    if sim is None:
        pytest.skip("this fedarches has no simulated quality split")
    assert not prep.is_simulated(splits["cellbench"])
    meta = prep.prepare_quality(sim, 0, tmp_path / "s0", n_genes=200)
    ref, query = ad.read_h5ad(meta["ref"]), ad.read_h5ad(meta["query"])
    assert list(ref.var_names) == list(query.var_names) and meta["n_genes"] == ref.n_vars <= 200
    assert set(meta["query_types_not_in_reference"]) == set(sim.held_out_types)
    assert meta["data_seed"] == 0 and "lognorm" in ref.layers
    again = prep.prepare_quality(sim, 1, tmp_path / "s1", n_genes=200)
    assert ad.read_h5ad(again["ref"]).X.sum() != ref.X.sum()
