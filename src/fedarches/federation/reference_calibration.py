"""Novelty calibration of the merged label knowledge, after the last round of a federated
reference build.

Why: each site summarises its own labelled cells (`reference_site.site_bundle`), so a
label held by several sites is calibrated only on the cells of the largest of them,
against that site's components alone, and the query-shift guard's reference median comes
from that site's scores. The central build calibrates each label in-sample on ALL its
cells against all its components. Here each site measures its own cells against the
merged components and sends histograms (`labels.binned`), never a cell, and the
coordinator sets the thresholds from their sums: the central calibration on the pooled
cells, within one bin.

1. The coordinator sends the merged summaries and each component's site (``origin``);
   each site answers, per label it holds >= ``k_min`` cells of, the histogram of its
   cells' novelty statistic against all the label's components ("loo", the pooled
   in-sample calibration: `calibration = "pooled"`, the default) and against the OTHER
   sites' components only ("cross", `calibration = "cross-site"`).
2. The coordinator sets the thresholds of the labels two or more sites hold from the
   summed histograms as ``calibration.label_thresholds`` does from cells, sends the
   summaries back, and each site answers the histogram of its cells' novelty scores;
   their median is the guard's reference median.

Each label keeps the class Gaussian of the site that introduced it: the moment-matched
mixture of all its components (a pooled Gaussian) was tried and is broader, and CellBench
lost A549 with it (NB, seed 0: called Unknown 0.574 against 0.986 with the site's
Gaussian). Measured: benchmarks/FEDERATED_REFERENCE.md, last section ("cross-site" loosened
CellBench's thresholds by ~30% and lost A549 too: 0.433).
"""

from __future__ import annotations

from dataclasses import replace
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedarches.labels.binned import N_BINS, binned_quantile, binned_thresholds, histogram
from fedarches.labels.calibration import MODE_CROSS_STUDY
from fedarches.labels.components import Components, label_statistic
from fedarches.labels.summaries import ClassSummaries

__all__ = ["CALIBRATE", "ORIGIN", "calibrate_across_sites", "component_origins", "site_histograms",
           "thresholds_from_histograms"]

CALIBRATE = "fedarches_calibrate"
ORIGIN = "origin"  # ArrayRecord key beside the summaries' state: each component's site index
STEP_STATISTICS, STEP_SCORES = 1, 2


def component_origins(summaries: ClassSummaries, parts: list[tuple[int, ClassSummaries]]) -> np.ndarray:
    """Each merged component's site index (``parts``: (site index, that site's summaries)),
    found by its mean: a merge copies components, never refits them."""
    where = {p.components.means[i].tobytes(): s for s, p in parts for i in range(p.components.n)}
    return np.array([where[m.tobytes()] for m in summaries.components.means], dtype=np.int64)


def _label_components(comps: Components, keep: np.ndarray) -> Components:
    return Components(comps.label[keep], comps.count[keep], comps.means[keep], comps.whiten[keep], comps.log_det[keep])


def shared_labels(summaries: ClassSummaries, origin: np.ndarray) -> np.ndarray:
    """Label codes that components of two or more sites stand for."""
    n = len(summaries.label_categories)
    return np.array([y for y in range(n) if np.unique(origin[summaries.components.label == y]).size >= 2],
                    dtype=np.int64)


def site_histograms(summaries: ClassSummaries, origin: np.ndarray, me: int, latent: np.ndarray,
                    labels: np.ndarray, k_min: int, step: int, statistic: str = "loo") -> dict[str, np.ndarray]:
    """A site's answer (module docstring) for its cells ``latent`` with ``labels`` (names);
    only labels of at least ``k_min`` of its cells count."""
    cats = list(summaries.label_categories)
    n_labels = len(cats)
    names, counts = np.unique(labels.astype(str), return_counts=True)
    held = {cats.index(str(n)) for n, k in zip(names, counts) if k >= k_min and str(n) in cats}
    codes = np.array([cats.index(v) if v in cats and cats.index(v) in held else -1 for v in labels.astype(str)])
    shared = set(shared_labels(summaries, origin).tolist())
    stat = summaries.options.statistic
    c = summaries.components
    cross = np.full(len(latent), np.nan)
    loo = np.full(len(latent), np.nan)
    for y in sorted(held):
        rows = np.flatnonzero(codes == y)
        z = latent[rows].astype(np.float64)
        own = c.label == y
        if own.any():
            loo[rows] = label_statistic(z, _label_components(c, own), np.array([y]), stat)[:, 0]
        other = own & (origin != me)
        if y in shared and other.any():
            cross[rows] = label_statistic(z, _label_components(c, other), np.array([y]), stat)[:, 0]
    if step == STEP_STATISTICS:
        return {"cross": histogram(cross, codes, n_labels), "loo": histogram(loo, codes, n_labels)}
    t = summaries.thresholds.label_thresholds
    calibrated = np.where(np.isin(codes, sorted(shared)) & np.isfinite(cross), cross, loo) if statistic == "cross" \
        else loo
    ok = codes >= 0
    score = np.full(len(latent), np.nan)
    score[ok] = np.maximum(calibrated[ok] / np.maximum(t[codes[ok]], np.finfo(np.float64).tiny),
                           summaries.gaussian.score(latent[ok].astype(np.float64)))
    return {"score": histogram(score, np.where(ok, 0, -1), 1)}


def thresholds_from_histograms(summaries: ClassSummaries, labels: np.ndarray, hists: dict[str, np.ndarray],
                               min_label_cells: int, statistic: str = "loo") -> ClassSummaries:
    """``labels``' component thresholds from the summed step-1 histograms of ``statistic``
    ("loo": every site's cells against all of the label's components, the central build's
    in-sample calibration on the pooled cells; "cross": against the other sites' only). Each
    label keeps the class Gaussian of its site."""
    labels = labels[hists[statistic][labels].sum(axis=1) > 0]  # some site holds k_min cells of it
    if labels.size == 0:
        return summaries
    fpr = summaries.fpr
    b = binned_thresholds(hists[statistic][labels], fpr, min_label_cells)
    t = summaries.thresholds
    fields = {f: getattr(t, f).copy() for f in ("label_thresholds", "label_calibration_mode",
                                                 "label_threshold_kind", "calibration_counts")}
    fields["label_thresholds"][labels] = b["label_thresholds"]
    fields["label_threshold_kind"][labels] = b["label_threshold_kind"]
    fields["calibration_counts"][labels] = b["calibration_counts"]
    if statistic == "cross":
        fields["label_calibration_mode"][labels] = MODE_CROSS_STUDY
    return replace(summaries, thresholds=replace(t, **fields))


def _content(summaries: ClassSummaries, origin: np.ndarray, arrays: ArrayRecord, config: ConfigRecord,
             step: int, statistic: str) -> RecordDict:
    state = {k: Array(np.ascontiguousarray(v)) for k, v in summaries.state().items()}
    state[ORIGIN] = Array(origin.astype(np.int64))
    return RecordDict({"arrays": arrays, "labels": ArrayRecord(state), "config": config,
                       "calibration": ConfigRecord({"step": step, "statistic": statistic})})


def _exchange(grid: Grid, nodes: list[int], content: RecordDict, timeout: int,
              report: dict[str, Any], keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    msgs = [Message(content=content, dst_node_id=n, message_type=f"query.{CALIBRATE}", ttl=float(timeout))
            for n in nodes]
    total: dict[str, np.ndarray] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        node = int(reply.metadata.src_node_id)
        rec = None if reply.has_error() else reply.content.array_records.get("histograms")
        if rec is None or any(k not in rec for k in keys):
            reason = reply.error.reason if reply.has_error() else "no histograms in the reply"
            report["failed"].append({"node": node, "step": "calibration", "reason": reason})
            return None
        for k in keys:
            h = rec[k].numpy().astype(np.int64)
            if h.ndim != 2 or h.shape[1] != N_BINS or (k in total and h.shape != total[k].shape) or (h < 0).any():
                report["failed"].append({"node": node, "step": "calibration", "reason": f"histogram {k!r} malformed"})
                return None
            total[k] = total[k] + h if k in total else h
    return total if total else None


def calibrate_across_sites(grid: Grid, nodes: list[int], summaries: ClassSummaries, origin: np.ndarray,
                           arrays: ArrayRecord, config: ConfigRecord, timeout: int, report: dict[str, Any],
                           min_label_cells: int = 100, statistic: str = "loo") -> ClassSummaries:
    """The two exchanges of the module docstring; the summaries unchanged (and the report says
    why) when no label is held by two sites or a site does not answer."""
    labels = shared_labels(summaries, origin)
    report["calibration"] = {"labels": [summaries.label_categories[y] for y in labels], "status": "site"}
    if labels.size == 0:
        return summaries
    hists = _exchange(grid, nodes, _content(summaries, origin, arrays, config, STEP_STATISTICS, statistic), timeout,
                      report, ("cross", "loo"))
    if hists is None:
        log(WARNING, "fedarches: calibration on the sites' cells skipped (a site did not answer); labels keep the "
            "calibration of the site that summarised them")
        return summaries
    out = thresholds_from_histograms(summaries, labels, hists, min_label_cells, statistic)
    scores = _exchange(grid, nodes, _content(out, origin, arrays, config, STEP_SCORES, statistic), timeout, report,
                       ("score",))
    if scores is None:
        return summaries
    median = binned_quantile(scores["score"][0], 0.5)
    if np.isfinite(median):
        out = replace(out, reference_median_score=float(median))
    report["calibration"].update(status={"loo": "pooled", "cross": "cross-site"}[statistic],
                                 reference_median_score=out.reference_median_score,
                                 cells={summaries.label_categories[y]: int(hists[statistic][y].sum()) for y in labels})
    return out
