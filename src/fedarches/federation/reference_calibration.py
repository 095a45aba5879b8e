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

1. Class Gaussians: each site answers, per label it summarises (``reference_site.summarisable``),
   the count, sum and sum of outer products of its cells' latent in each of ``FOLDS`` seeded
   folds (`labels.moments`); the coordinator fits each label's pooled Gaussian from their sums,
   exactly the central build's (mean, OAS covariance), and the Gaussians of every fold's
   complement for its cross-validated threshold.
2. The coordinator sends the merged summaries, each component's site (``origin``) and those
   Gaussians; each site answers, per label it summarises, the histogram of its cells' novelty
   statistic against all the label's components ("loo", the pooled in-sample calibration:
   `calibration = "pooled"`, the default), against the OTHER sites' components only ("cross",
   `calibration = "cross-site"`) and of their distances to the Gaussian of their fold's
   complement ("gauss"; labels below ``novelty.own_shape_cells``: to the pooled Gaussian).
3. The coordinator sets the thresholds of the labels two or more sites hold from the summed
   histograms as ``calibration.label_thresholds`` and ``ClassGaussianNovelty.fit`` do from
   cells, sends the summaries back, and each site answers the histogram of its cells' novelty
   scores; their median is the guard's reference median.

Why pooled class Gaussians: a label's Gaussian fitted at one site is tighter than the one
fitted on all its cells and flags its cells from every other study. Measured on PBMC (trVAE,
5 seeds): known query cells called Unknown 0.030 with the sites' Gaussians, 0.025 pooled
(centralized 0.017). In NB's latent, which keeps studies further apart, the pooled Gaussians
span them and accepted A549 on CellBench (0.787 against 0.986), so `--gaussians auto` is
per model (`reference_run_config.GAUSSIANS`; benchmarks/FEDERATED_REFERENCE.md, last section).
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
from fedarches.labels.moments import FOLDS, LabelMoments, fold_of_cells, pooled_gaussians
from fedarches.labels.novelty import ClassGaussianNovelty
from fedarches.labels.summaries import ClassSummaries

__all__ = ["CALIBRATE", "ORIGIN", "calibrate_across_sites", "component_origins", "gaussians_from_histograms",
           "site_histograms", "thresholds_from_histograms"]

CALIBRATE = "fedarches_calibrate"
ORIGIN = "origin"  # ArrayRecord key beside the summaries' state: each component's site index
STEP_STATISTICS, STEP_SCORES, STEP_MOMENTS = 1, 2, 3
GAUSSIAN_KEYS = ("fitted", "cross", "means", "whiten", "fold_means", "fold_whiten")  # `pooled_gaussians`
MOMENT_KEYS = ("count", "total", "outer")


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


def _held_codes(cats: list[str], labels: np.ndarray, k_min: int) -> np.ndarray:
    """Label codes of the cells of labels the site summarises (``reference_site.summarisable``:
    at least k_min / 2 of its cells); -1 for the others."""
    from fedarches.federation.reference_site import summarisable

    names, counts = np.unique(labels.astype(str), return_counts=True)
    held = {cats.index(str(n)) for n, k in zip(names, counts) if summarisable(int(k), k_min) and str(n) in cats}
    return np.array([cats.index(v) if v in cats and cats.index(v) in held else -1 for v in labels.astype(str)],
                    dtype=np.int64)


def _gaussian_distances(z: np.ndarray, codes: np.ndarray, folds: np.ndarray, g: dict[str, np.ndarray]) -> np.ndarray:
    """Each cell's Mahalanobis distance to its label's Gaussian fitted without its fold (labels
    with a cross-validated threshold) or to the pooled one (smaller labels); NaN elsewhere."""
    out = np.full(len(z), np.nan)
    for y in np.flatnonzero(g["fitted"]):
        rows = np.flatnonzero(codes == y)
        if not rows.size:
            continue
        if g["cross"][y]:
            mean, white = g["fold_means"][y][folds[rows]], g["fold_whiten"][y][folds[rows]]
            out[rows] = np.sqrt(np.square(np.einsum("nd,nde->ne", z[rows] - mean, white)).sum(1))
        else:
            out[rows] = np.sqrt(np.square((z[rows] - g["means"][y]) @ g["whiten"][y]).sum(1))
    return out


def site_histograms(summaries: ClassSummaries, origin: np.ndarray, me: int, latent: np.ndarray,
                    labels: np.ndarray, k_min: int, step: int, statistic: str = "loo",
                    gaussians: dict[str, np.ndarray] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A site's answer (module docstring) for its cells ``latent`` with ``labels`` (names);
    only labels it summarises count. ``seed``: the site's folds (the same at every step)."""
    cats = list(summaries.label_categories)
    n_labels = len(cats)
    codes = _held_codes(cats, labels, k_min)
    folds = fold_of_cells(codes, n_labels, seed)
    z_all = latent.astype(np.float64)
    if step == STEP_MOMENTS:
        return LabelMoments.of(z_all, codes, folds, n_labels).state()
    shared = set(shared_labels(summaries, origin).tolist())
    stat = summaries.options.statistic
    c = summaries.components
    cross = np.full(len(latent), np.nan)
    loo = np.full(len(latent), np.nan)
    for y in sorted(set(codes[codes >= 0].tolist())):
        rows = np.flatnonzero(codes == y)
        z = z_all[rows]
        own = c.label == y
        if own.any():
            loo[rows] = label_statistic(z, _label_components(c, own), np.array([y]), stat)[:, 0]
        other = own & (origin != me)
        if y in shared and other.any():
            cross[rows] = label_statistic(z, _label_components(c, other), np.array([y]), stat)[:, 0]
    if step == STEP_STATISTICS:
        out = {"cross": histogram(cross, codes, n_labels), "loo": histogram(loo, codes, n_labels)}
        if gaussians is not None:
            out["gauss"] = histogram(_gaussian_distances(z_all, codes, folds, gaussians), codes, n_labels)
        return out
    t = summaries.thresholds.label_thresholds
    calibrated = np.where(np.isin(codes, sorted(shared)) & np.isfinite(cross), cross, loo) if statistic == "cross" \
        else loo
    ok = (codes >= 0) & np.isfinite(calibrated)
    score = np.full(len(latent), np.nan)
    score[ok] = np.maximum(calibrated[ok] / np.maximum(t[codes[ok]], np.finfo(np.float64).tiny),
                           summaries.gaussian.score(z_all[ok]))
    return {"score": histogram(score, np.where(ok, 0, -1), 1)}


def gaussians_from_histograms(summaries: ClassSummaries, labels: np.ndarray, g: dict[str, np.ndarray],
                              hist: np.ndarray) -> tuple[ClassSummaries, list[int]]:
    """``labels``' class Gaussians replaced by the pooled ones ``g`` (`pooled_gaussians`), each
    with the (1 - fpr) quantile of its summed distance histogram ``hist`` as threshold (as
    ``ClassGaussianNovelty.fit`` sets it from cells). Returns the summaries and the labels changed."""
    old = summaries.gaussian
    new = ClassGaussianNovelty.from_state(old.state())
    done = []
    for y in labels:
        if not g["fitted"][y] or hist[y].sum() == 0:
            continue
        new.means[y], new.whiten[y], new.fitted[y] = g["means"][y], g["whiten"][y], True
        new.thresholds[y] = max(binned_quantile(hist[y], 1.0 - old.fpr), 1e-12)
        done.append(int(y))
    return (replace(summaries, gaussian=new) if done else summaries), done


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
             step: int, statistic: str, gaussians: dict[str, np.ndarray] | None = None) -> RecordDict:
    state = {k: Array(np.ascontiguousarray(v)) for k, v in summaries.state().items()}
    state[ORIGIN] = Array(origin.astype(np.int64))
    content = RecordDict({"arrays": arrays, "labels": ArrayRecord(state), "config": config,
                          "calibration": ConfigRecord({"step": step, "statistic": statistic})})
    if gaussians is not None:
        content["gaussians"] = ArrayRecord({k: Array(np.ascontiguousarray(gaussians[k])) for k in GAUSSIAN_KEYS})
    return content


def _histogram_ok(k: str, h: np.ndarray, n_labels: int, dims: int) -> bool:
    return h.ndim == 2 and h.shape[1] == N_BINS and h.shape[0] in (1, n_labels) and bool((h >= 0).all())


def _moments_ok(k: str, h: np.ndarray, n_labels: int, dims: int) -> bool:
    want = {"count": (n_labels, FOLDS), "total": (n_labels, FOLDS, dims), "outer": (n_labels, FOLDS, dims, dims)}[k]
    return h.shape == want and bool(np.isfinite(h).all()) and bool((h >= 0).all() if k == "count" else True)


def _exchange(grid: Grid, nodes: list[int], content: RecordDict, timeout: int, report: dict[str, Any],
              keys: tuple[str, ...], shape: tuple[int, int], ok: Any = _histogram_ok) -> dict[str, np.ndarray] | None:
    """Every node's arrays ``keys`` summed (``ok`` checks each; ``shape``: labels, latent
    dimensions), or None (the report says which node failed and why). Floating-point sums do
    not depend on the order replies arrive in (values sorted across nodes before adding), so a
    deployment publishes the bytes a simulation does."""
    msgs = [Message(content=content, dst_node_id=n, message_type=f"query.{CALIBRATE}", ttl=float(timeout))
            for n in nodes]
    parts: dict[str, list[np.ndarray]] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        node = int(reply.metadata.src_node_id)
        rec = None if reply.has_error() else reply.content.array_records.get("histograms")
        if rec is None or any(k not in rec for k in keys):
            reason = reply.error.reason if reply.has_error() else "no histograms in the reply"
            report["failed"].append({"node": node, "step": "calibration", "reason": reason})
            return None
        for k in keys:
            h = rec[k].numpy()
            h = h.astype(np.int64) if ok is _histogram_ok or k == "count" else h.astype(np.float64)
            if not ok(k, h, *shape) or (k in parts and h.shape != parts[k][0].shape):
                report["failed"].append({"node": node, "step": "calibration", "reason": f"{k!r} malformed"})
                return None
            parts.setdefault(k, []).append(h)
    total = {k: (np.stack(v).sum(axis=0) if v[0].dtype.kind == "i" else np.sort(np.stack(v), axis=0).sum(axis=0))
             for k, v in parts.items()}
    return total if total else None


def calibrate_across_sites(grid: Grid, nodes: list[int], summaries: ClassSummaries, origin: np.ndarray,
                           arrays: ArrayRecord, config: ConfigRecord, timeout: int, report: dict[str, Any],
                           min_label_cells: int = 100, statistic: str = "loo",
                           gaussians: str = "pooled") -> ClassSummaries:
    """The three exchanges of the module docstring (``gaussians="site"``: each label keeps its
    site's class Gaussian, and the first is skipped); the summaries unchanged (and the report
    says why) when no label is held by two sites or a site does not answer."""
    labels = shared_labels(summaries, origin)
    report["calibration"] = {"labels": [summaries.label_categories[y] for y in labels], "status": "site"}
    if labels.size == 0:
        return summaries
    shape = (len(summaries.label_categories), summaries.n_dims)
    pooled_g: dict[str, np.ndarray] | None = None
    if gaussians == "pooled":
        moments = _exchange(grid, nodes, _content(summaries, origin, arrays, config, STEP_MOMENTS, statistic),
                            timeout, report, MOMENT_KEYS, shape, _moments_ok)
        pooled_g = None if moments is None else pooled_gaussians(LabelMoments.from_state(moments), labels)
    hists = None if gaussians == "pooled" and pooled_g is None else _exchange(
        grid, nodes, _content(summaries, origin, arrays, config, STEP_STATISTICS, statistic, pooled_g), timeout,
        report, ("cross", "loo") + (("gauss",) if pooled_g is not None else ()), shape)
    if hists is None:
        log(WARNING, "fedarches: calibration on the sites' cells skipped (a site did not answer); labels keep the "
            "calibration of the site that summarised them")
        return summaries
    out = thresholds_from_histograms(summaries, labels, hists, min_label_cells, statistic)
    pooled: list[int] = []
    if pooled_g is not None:
        out, pooled = gaussians_from_histograms(out, labels, pooled_g, hists["gauss"])
    scores = _exchange(grid, nodes, _content(out, origin, arrays, config, STEP_SCORES, statistic), timeout, report,
                       ("score",), shape)
    if scores is None:
        return summaries
    median = binned_quantile(scores["score"][0], 0.5)
    if np.isfinite(median):
        out = replace(out, reference_median_score=float(median))
    report["calibration"].update(status={"loo": "pooled", "cross": "cross-site"}[statistic],
                                 reference_median_score=out.reference_median_score,
                                 cells={summaries.label_categories[y]: int(hists[statistic][y].sum()) for y in labels},
                                 pooled_gaussians=[summaries.label_categories[y] for y in pooled])
    return out
