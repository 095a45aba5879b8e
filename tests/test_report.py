"""Typed reports: which fields travel in a bundle is pinned here, so a rename breaks this test."""

from __future__ import annotations

import dataclasses

from fedarches.client.plan import ContributionPlan
from fedarches.report import AtlasRef, LabelTransferSummary, MapReport, SiteReport

BUNDLE_METRIC_NAMES = {
    "strategy",
    "model",
    "epochs",
    "best_epoch",
    "stopped_early",
    "trainable_parameters",
    "final_loss",
    "gene_overlap",
    "label_transfer.accuracy_known",
    "label_transfer.unseen_called_unknown",
    "label_transfer.known_called_unknown",
}

MAP_REPORT_KEYS = {
    "strategy", "model", "new_conditions", "n_cells", "n_cells_trained", "gene_overlap", "trainable_parameters",
    "total_parameters", "expected_trainable_parameters", "epochs", "best_epoch", "stopped_early", "seconds",
    "setup_seconds", "seconds_per_epoch", "final_loss", "label_transfer",
}


def _full() -> MapReport:
    lt = LabelTransferSummary(n_known=90, n_unseen=10, accuracy_known=0.9, unseen_called_unknown=0.8,
                              known_called_unknown=0.05)
    return MapReport(strategy="conditions", model="trvae", new_conditions=["s"], n_cells=100, n_cells_trained=100,
                     gene_overlap=1.0, trainable_parameters=148, total_parameters=9999,
                     expected_trainable_parameters=148, epochs=3, best_epoch=2, stopped_early=False, seconds=1.5,
                     setup_seconds=0.1, seconds_per_epoch=0.4, final_loss=12.5, label_transfer=lt)


def test_bundle_metric_names_are_pinned_and_carry_no_timings_or_counts():
    metrics = _full().bundle_metrics()
    assert set(metrics) == BUNDLE_METRIC_NAMES
    assert not any("seconds" in k or k.startswith("n_") for k in metrics)
    assert metrics["label_transfer.accuracy_known"] == 0.9 and metrics["strategy"] == "conditions"


def test_unset_values_and_absent_label_transfer_do_not_travel():
    r = dataclasses.replace(_full(), label_transfer=None, final_loss=None, best_epoch=None)
    assert set(r.bundle_metrics()) == BUNDLE_METRIC_NAMES - {
        "final_loss", "best_epoch", *(n for n in BUNDLE_METRIC_NAMES if n.startswith("label_transfer."))}
    assert "label_transfer" not in r.to_dict()


def test_to_dict_keeps_report_json_key_names():
    d = _full().to_dict()
    assert set(d) == MAP_REPORT_KEYS
    assert d["label_transfer"]["accuracy_known"] == 0.9


def test_site_report_nothing_new_has_status_plan_and_parent():
    plan = ContributionPlan(present=["a"], held=["a"], new=[])
    rep = SiteReport(status="nothing-new", site="s", atlas=AtlasRef("atl", 2, "ab" * 32, "main"), plan=plan)
    d = rep.to_dict()
    assert d == {"status": "nothing-new", "site": "s", "plan": plan.to_dict(),
                 "atlas": {"name": "atl", "version": 2, "id": "ab" * 32, "branch": "main", "url": None}}
