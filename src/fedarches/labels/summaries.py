"""Label knowledge as class summaries: label transfer and unknown detection without reference cells.

Why: a per-cell reference latent next to the decoder lets anyone who fetches the atlas
decode every reference cell back to an expression profile (issue 9, invariant 8).
What label transfer needs from the reference is much less: where each type lies
(a few Gaussian components per label, each standing for >= ``k_min`` cells), how far
a cell of a known type from a NEW study lies from them (per-label thresholds at the
stated false-positive rate, measured across reference studies as the per-cell path
does), and the median score a query of known types shows (the query-shift guard).
All arrays are sized by labels, components and latent dimensions, never by cells.

The call is the label-aware reference's classifier where the model has one; without
it, a generative rule over components (``p(y | z)`` proportional to the sum over the
label's components of ``count x N(z; component)``). The novelty score is the larger
of the distance to the nearest component over its label's threshold and the class
Gaussian score (:class:`fedarches.labels.novelty.ClassGaussianNovelty`), then the
query-shift guard and the population statistic over QUERY cells
(:mod:`fedarches.labels.query_shift`), exactly as in
:class:`fedarches.labels.transfer.KNNLabelTransfer`. docs/LABELS.md has the figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from fedarches.config import K_MIN
from fedarches.errors import LabelStateError, LatentError, SettingError
from fedarches.labels.calibration import (
    MIN_LABEL_CELLS,
    MODE_CROSS_STUDY,
    MODE_LEAVE_ONE_OUT,
    MODE_SITE,
    KIND_EMPTY,
    KIND_GLOBAL,
    Thresholds,
    batch_groups,
    calibration_sample,
    label_thresholds,
)
from fedarches.labels.components import (
    STATISTICS,
    Components,
    fit_components,
    gaussians,
    label_parts,
    QuadraticForms,
    label_statistic,
    mahalanobis,
)
from fedarches.labels.novelty import ClassGaussianNovelty
from fedarches.labels.query_shift import adapted_scores, study_groups
from fedarches.labels.transfer import UNKNOWN, LabelTransferResult
from fedarches.neighbours import as_latent, encode_labels, resolve_workers
from fedarches.threads import active_threads

__all__ = ["K_MIN", "ClassSummaries", "SummaryOptions", "state_bytes_bound"]

STATE_FORMAT = 1
CHUNK = 65536
_GAUSSIAN_PREFIX = "gaussian."
_COMPONENT_FIELDS = ("label", "count", "means", "whiten", "log_det")
_PER_LABEL = ("label_thresholds", "label_calibration_mode", "label_threshold_kind", "calibration_counts")
#: "cross-study": components refitted without each study, its cells measured against them (as the
#: per-cell path calibrates); measured blind to CellBench's A549 (docs/LABELS.md), so not the default.
#: "cross-validated": each label's cells in FOLDS folds, a fold measured against components fitted
#: on the label's other folds (what a new cell of the type faces; novelty.py does the same for the
#: class Gaussians).
CALIBRATIONS = ("in-sample", "cross-study", "cross-validated")
FOLDS = 5
#: A label with fewer than k_min cells. "pad": with at least k_min / 2 cells it gets one
#: component of its cells plus the nearest cells of other labels up to k_min (a majority of its
#: own); smaller ones are "absorb"ed: their cells join the nearest component's geometry, so
#: their type is not flagged novel, without a label of their own. "drop": no component and no
#: cell in any (its query cells look novel). "pad-drop": pad, drop the rest. docs/LABELS.md
#: has the measurements.
SMALL_LABELS = ("pad", "absorb", "drop", "pad-drop")


@dataclass(frozen=True)
class SummaryOptions:
    """How a label's cells become components (chosen by measurement: docs/LABELS.md)."""

    k_min: int = K_MIN
    cells_per_component: int = 20  # about this many cells per k-means cell
    max_components: int = 32  # per label
    statistic: str = "mahalanobis"  # distance novelty statistic: components.STATISTICS
    calibration: str = "in-sample"  # CALIBRATIONS: thresholds from the label's own cells, or across studies
    small_labels: str = "pad-drop"  # SMALL_LABELS: what becomes of a label with fewer than k_min cells

    def check(self) -> None:
        if self.small_labels not in SMALL_LABELS:
            raise SettingError(f"setting check failed: small_labels must be one of {SMALL_LABELS}, "
                               f"got {self.small_labels!r}")
        if self.calibration not in CALIBRATIONS:
            raise SettingError(f"setting check failed: calibration must be one of {CALIBRATIONS}, "
                               f"got {self.calibration!r}")
        if self.statistic not in STATISTICS:
            raise SettingError(f"setting check failed: statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if self.k_min < 2 or self.cells_per_component < 1 or self.max_components < 1:
            raise SettingError(f"setting check failed: k_min must be >= 2, cells_per_component and "
                               f"max_components >= 1, got {self}")


def state_bytes_bound(n_labels: int, latent_dim: int, max_components: int = SummaryOptions.max_components) -> int:
    """Largest size in bytes of :meth:`ClassSummaries.state`'s arrays (safetensors header aside):
    a formula of labels, latent dimensions and components per label, never of cells. Per
    component: label, count, log det (8 B each), mean (8 d), whitening factor (8 d^2); per label:
    threshold, mode, kind, calibration count, Gaussian threshold (8 B each), fitted flag (1 B),
    Gaussian mean and whitening factor (8 d + 8 d^2); 16 scalars of 8 B."""
    d = int(latent_dim)
    per_component = 24 + 8 * d + 8 * d * d
    per_label = 41 + 8 * d + 8 * d * d
    return int(n_labels) * (int(max_components) * per_component + per_label) + 16 * 8


def _fit_label(z: np.ndarray, label: int, opts: SummaryOptions, seed: int, k_min: int | None = None) -> Components:
    return fit_components(z, label, k_min=opts.k_min if k_min is None else k_min,
                          cells_per_component=opts.cells_per_component, max_components=opts.max_components,
                          seed=seed)


def _own_statistic(z: np.ndarray, comps: Components, statistic: str) -> np.ndarray:
    """Distance of each cell to the nearest of ``comps`` (one label's components)."""
    if comps.n == 0:
        return np.full(len(z), np.nan)
    return label_statistic(z, comps, comps.label[:1], statistic)[:, 0]


def _calibration(latent: np.ndarray, codes: np.ndarray, batches: object | None, cal: np.ndarray,
                 published: Components, n_labels: int, opts: SummaryOptions, max_groups: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per calibration cell, the statistic its label is calibrated with (components fitted on
    OTHER studies when the label occurs in two or more) and the in-sample one; per label the mode."""
    cal_codes = codes[cal]
    loo = np.full(cal.size, np.nan)
    for y in range(n_labels):
        rows = cal_codes == y
        loo[rows] = _own_statistic(latent[cal[rows]], Components(*(getattr(published, f)[published.label == y]
                                                                   for f in _COMPONENT_FIELDS)), opts.statistic)
    stats = loo.copy()
    mode = np.full(n_labels, MODE_LEAVE_ONE_OUT, dtype=np.int64)
    if opts.calibration == "cross-validated":
        return _cross_validated(latent, codes, cal, published, n_labels, opts, seed, stats), loo, mode
    if batches is None:
        return stats, loo, mode
    groups = batch_groups(batches, latent.shape[0], max_groups)
    n_groups = int(groups.max()) + 1
    present = np.zeros((n_labels, n_groups), dtype=bool)
    present[codes, groups] = True
    for y in np.flatnonzero(present.sum(axis=1) >= 2):
        if not (published.label == y).any():
            continue
        mode[y] = MODE_CROSS_STUDY
        for g in np.flatnonzero(present[y]):
            members = np.flatnonzero((cal_codes == y) & (groups[cal] == g))
            other = latent[(codes == y) & (groups != g)]
            comps = _fit_label(other, y, opts, seed, k_min=min(opts.k_min, max(2, len(other))))
            if members.size and comps.n:
                stats[members] = _own_statistic(latent[cal[members]], comps, opts.statistic)
    return stats, loo, mode


def _cross_validated(latent: np.ndarray, codes: np.ndarray, cal: np.ndarray, published: Components,
                     n_labels: int, opts: SummaryOptions, seed: int, stats: np.ndarray) -> np.ndarray:
    """Each calibration cell's statistic against its label's components fitted without its fold
    (labels with fewer than ``2 k_min`` cells, padded or single-component, keep ``stats``)."""
    rng = np.random.default_rng(seed)
    cal_codes = codes[cal]
    for y in range(n_labels):
        rows = np.flatnonzero(codes == y)
        if rows.size < 2 * opts.k_min or not (published.label == y).any():
            continue
        fold = rng.permutation(rows.size) % FOLDS
        at = np.flatnonzero(cal_codes == y)
        cal_fold = fold[np.searchsorted(rows, cal[at])]
        for k in range(FOLDS):
            members = at[cal_fold == k]
            comps = _fit_label(latent[rows[fold != k]], y, opts, seed)
            if members.size and comps.n:
                stats[members] = _own_statistic(latent[cal[members]], comps, opts.statistic)
    return stats


@dataclass
class ClassSummaries:
    """Per-label latent components plus the calibration of the novelty test (see module doc).

    Typical use::

        s = ClassSummaries.fit(ref_latent, ref_labels, ref_batches=ref_studies)
        state = s.state()                                   # numeric arrays, no per-cell array
        s2 = ClassSummaries.from_state(state, s.label_categories)
        res = s2.predict(query_latent, classifier_probabilities=p)   # LabelTransferResult
    """

    label_categories: list[str]
    components: Components
    thresholds: Thresholds
    gaussian: ClassGaussianNovelty
    options: SummaryOptions
    fpr: float = 0.01
    uncertainty_threshold: float = 0.5
    reference_median_score: float = float("nan")
    workers: int = -1  # threads of the query-neighbour search; -1 all cores (a thread_limits block wins)

    @property
    def n_dims(self) -> int:
        return int(self.components.means.shape[1])

    @property
    def n_components(self) -> int:
        return self.components.n

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, ref_latent: np.ndarray, ref_labels: np.ndarray, ref_batches: np.ndarray | None = None, *,
            label_categories: Sequence[str] | None = None, options: SummaryOptions | None = None,
            fpr: float = 0.01, uncertainty_threshold: float = 0.5, min_label_cells: int = MIN_LABEL_CELLS,
            max_calibration_cells: int = 100_000, max_groups: int = 10, seed: int = 0,
            workers: int = -1) -> ClassSummaries:
        """Summarise the reference: components per label (cells of labels below ``k_min`` join their
        nearest component), per-label thresholds at ``fpr`` and the reference median score."""
        opts = options or SummaryOptions()
        opts.check()
        if not 0.0 < float(fpr) < 1.0 or not 0.0 <= float(uncertainty_threshold) <= 1.0:
            raise SettingError(f"setting check failed: fpr must be in (0, 1) and uncertainty_threshold in [0, 1], "
                               f"got {fpr}, {uncertainty_threshold}")
        latent = as_latent(ref_latent, "reference latent").astype(np.float64)
        n, dims = latent.shape
        cats, label_codes = encode_labels(ref_labels, n, label_categories)
        n_labels = len(cats)
        comps, codes, padding = _summarise(latent, label_codes, n_labels, opts, seed)
        kept = codes >= 0
        gauss_rows, gauss_codes = _gaussian_cells(codes, padding)
        gaussian = ClassGaussianNovelty().fit(latent[gauss_rows], gauss_codes, n_labels, fpr=float(fpr))
        latent, codes = latent[kept], codes[kept]
        ref_batches = None if ref_batches is None else np.asarray(ref_batches)[kept]
        cal = calibration_sample(codes, n_labels, int(max_calibration_cells), np.random.default_rng(seed))
        batches = ref_batches if opts.calibration == "cross-study" else None
        stats, loo, mode = _calibration(latent, codes, batches, cal, comps, n_labels, opts, int(max_groups), seed)
        thresholds = label_thresholds(stats, loo, codes[cal], mode, n_labels, float(fpr), int(min_label_cells))
        _unsummarised_global(thresholds, comps, n_labels)
        own = thresholds.label_thresholds[codes[cal]]
        ref_scores = np.maximum(stats / np.maximum(own, np.finfo(np.float64).tiny), gaussian.score(latent[cal]))
        return cls(label_categories=cats, components=comps, thresholds=thresholds, gaussian=gaussian,
                   options=opts, fpr=float(fpr), uncertainty_threshold=float(uncertainty_threshold),
                   reference_median_score=float(np.median(ref_scores)), workers=resolve_workers(workers))

    # ------------------------------------------------------------------ prediction
    def predict(self, query_latent: np.ndarray, *, return_probabilities: bool = False,
                query_batches: np.ndarray | None = None, adapt_to_query: bool = True,
                classifier_probabilities: np.ndarray | None = None) -> LabelTransferResult:
        """Label query cells from the summaries alone; the arguments and the result are those of
        :meth:`fedarches.labels.transfer.KNNLabelTransfer.predict`. Without
        ``classifier_probabilities`` the generative rule over components makes the call. With
        fewer columns than labels (a classifier trained before labels were added to the
        summaries: its labels are the first columns), labels beyond them take their generative
        probability and the classifier's share the rest in its proportions."""
        q = as_latent(query_latent, "query latent").astype(np.float64)
        if q.shape[1] != self.n_dims:
            raise LatentError(f"latent check failed: query latent has {q.shape[1]} dimensions but the label "
                              f"summaries have {self.n_dims}; embed the query with the same model")
        n, n_labels = q.shape[0], len(self.label_categories)
        clf = None if classifier_probabilities is None else self._check_probabilities(classifier_probabilities, n)
        # the generative rule is needed for labels the classifier lacks, or when asked for
        need_gen = clf is None or clf.shape[1] < n_labels or return_probabilities
        scorer = _Scorer.of(self)
        gen = np.zeros((n, n_labels), dtype=np.float64) if need_gen else None
        dist, gauss = np.empty(n, dtype=np.float64), np.empty(n, dtype=np.float64)
        guard = np.empty(n, dtype=np.float64) if scorer.guard is not None else None
        for start in range(0, n, CHUNK):
            rows = slice(start, start + CHUNK)
            dist[rows], gauss[rows], guard_rows, posterior = scorer.chunk(q[rows], need_gen)
            if guard is not None:
                guard[rows] = guard_rows
            if gen is not None:
                gen[rows] = posterior
        if gen is None:
            gen = np.zeros((n, 0), dtype=np.float64)
        lp = gen if clf is None else self._combine(clf, gen)
        code = lp.argmax(axis=1).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
        unc = np.clip(1.0 - lp[np.arange(n), code], 0.0, 1.0).astype(np.float32)
        probs = gen.astype(np.float32) if return_probabilities else None
        return self._result(q, code, unc, dist, gauss, guard, probs, query_batches, adapt_to_query)

    @staticmethod
    def _combine(classifier: np.ndarray, gen: np.ndarray) -> np.ndarray:
        """The classifier's p(label | z) over its own labels, the generative rule's for the rest."""
        m = classifier.shape[1]
        if m == gen.shape[1]:
            return classifier
        added = gen[:, m:]
        return np.concatenate([classifier * (1.0 - added.sum(axis=1, keepdims=True)), added], axis=1)

    def _check_probabilities(self, probabilities: np.ndarray, n: int) -> np.ndarray:
        lp = np.asarray(probabilities, dtype=np.float64)
        if lp.ndim != 2 or lp.shape[0] != n or not 1 <= lp.shape[1] <= len(self.label_categories) \
                or not np.isfinite(lp).all():
            raise LatentError(f"latent check failed: label probabilities of shape {lp.shape} (finite: "
                              f"{bool(np.isfinite(lp).all())}) for {n} cells and {len(self.label_categories)} labels")
        return lp

    def _workers(self) -> int:
        """The count of an active ``fedarches.threads.thread_limits`` block, else ``workers`` (as the
        per-cell path's neighbour search, ``threads.policy_workers``)."""
        return active_threads() or resolve_workers(self.workers)

    def _result(self, q: np.ndarray, code: np.ndarray, unc: np.ndarray, distance_score: np.ndarray,
                gaussian_score: np.ndarray, guard_score: np.ndarray | None, probs: np.ndarray | None,
                batches: np.ndarray | None, adapt: bool) -> LabelTransferResult:
        n = q.shape[0]
        raw = np.maximum(distance_score, gaussian_score)
        if adapt and n:
            score, shift = adapted_scores(q, raw, unc, code, study_groups(batches, n), self.reference_median_score,
                                          guard_score=guard_score, workers=self._workers())
        else:
            shift, score = np.ones(n, dtype=np.float64), raw
        is_novel = score > 1.0
        is_unknown = is_novel | (unc > self.uncertainty_threshold)
        knn_pred = np.asarray(self.label_categories, dtype=object)[code] if n else np.zeros(0, dtype=object)
        pred = knn_pred.copy()
        pred[is_unknown] = UNKNOWN
        return LabelTransferResult(
            prediction=pred, knn_prediction=knn_pred, knn_code=code, uncertainty=unc,
            novelty_score=score.astype(np.float32), is_novel=is_novel, is_unknown=is_unknown, probabilities=probs,
            distance_score=distance_score.astype(np.float32), gaussian_score=gaussian_score.astype(np.float32),
            query_shift=shift.astype(np.float32))

    # ------------------------------------------------------------------ growth
    def merged(self, added: ClassSummaries) -> ClassSummaries:
        """Label knowledge grown by merge, by label NAME: ``added``'s components join (an existing
        label gains them, a new label is appended; new names sorted, so merge order does not
        change the result); each label keeps the calibration (threshold, class Gaussian) of the
        summaries that introduced it, and the query-shift guard keeps this reference's median."""
        if added.n_dims != self.n_dims:
            raise LabelStateError(f"label summaries check failed: {added.n_dims}-dimensional summaries cannot join "
                                  f"{self.n_dims}-dimensional ones")
        new = sorted(set(added.label_categories) - set(self.label_categories))
        cats = [*self.label_categories, *new]
        index = {c: i for i, c in enumerate(cats)}
        remap = np.array([index[c] for c in added.label_categories], dtype=np.int64)
        comps = Components.concat([self.components, replace(added.components, label=remap[added.components.label])],
                                  self.n_dims)
        src = np.array([added.label_categories.index(c) for c in new], dtype=np.int64)
        t, a = self.thresholds, added.thresholds
        thresholds = Thresholds(**{f: np.concatenate([getattr(t, f), getattr(a, f)[src]]) for f in _PER_LABEL},
                                global_threshold=t.global_threshold, pooled_ratio_quantile=t.pooled_ratio_quantile)
        thresholds.label_calibration_mode[len(self.label_categories):] = MODE_SITE
        gaussian = ClassGaussianNovelty.from_state({k: np.concatenate([v, added.gaussian.state()[k][src]])
                                                    if k != "fpr" else v for k, v in self.gaussian.state().items()})
        return replace(self, label_categories=cats, components=comps, thresholds=thresholds, gaussian=gaussian)

    def with_empty_labels(self, names: Sequence[str]) -> ClassSummaries:
        """``names`` appended as labels with no component (as a label below ``k_min`` cells is in
        a central build): the global threshold, no class Gaussian, no calibration cells. A label
        the classifier knows but no site could summarise k-anonymously."""
        names = [str(n) for n in names if str(n) not in self.label_categories]
        if not names:
            return self
        k, t = len(names), self.thresholds
        thresholds = Thresholds(
            label_thresholds=np.concatenate([t.label_thresholds, np.full(k, t.global_threshold)]),
            label_calibration_mode=np.concatenate([t.label_calibration_mode, np.full(k, MODE_LEAVE_ONE_OUT)]),
            label_threshold_kind=np.concatenate([t.label_threshold_kind, np.full(k, KIND_EMPTY)]),
            global_threshold=t.global_threshold, pooled_ratio_quantile=t.pooled_ratio_quantile,
            calibration_counts=np.concatenate([t.calibration_counts, np.zeros(k, dtype=np.int64)]))
        g = self.gaussian.state()
        d = g["means"].shape[1]
        gaussian = ClassGaussianNovelty.from_state({
            "means": np.vstack([g["means"], np.zeros((k, d))]), "whiten": np.concatenate([g["whiten"], np.zeros((k, d, d))]),
            "thresholds": np.concatenate([g["thresholds"], np.full(k, np.inf)]),
            "fitted": np.concatenate([g["fitted"], np.zeros(k, dtype=np.uint8)]), "fpr": g["fpr"]})
        return replace(self, label_categories=[*self.label_categories, *names], thresholds=thresholds,
                       gaussian=gaussian)

    def restricted(self, names: Sequence[str]) -> ClassSummaries:
        """Only the labels ``names`` (in this order) with their components and calibration: what
        a merge takes from a site's summaries when some of its labels are refused."""
        idx = np.array([self.label_categories.index(n) for n in names], dtype=np.int64)
        code = np.full(len(self.label_categories), -1, dtype=np.int64)
        code[idx] = np.arange(idx.size)
        keep = code[self.components.label] >= 0
        comps = Components(*(getattr(self.components, f)[keep] for f in _COMPONENT_FIELDS))
        comps = replace(comps, label=code[comps.label])
        t = self.thresholds
        thresholds = Thresholds(**{f: getattr(t, f)[idx] for f in _PER_LABEL}, global_threshold=t.global_threshold,
                                pooled_ratio_quantile=t.pooled_ratio_quantile)
        gaussian = ClassGaussianNovelty.from_state({k: v[idx] if k != "fpr" else v
                                                    for k, v in self.gaussian.state().items()})
        return replace(self, label_categories=[str(n) for n in names], components=comps, thresholds=thresholds,
                       gaussian=gaussian)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, np.ndarray]:
        """Numeric arrays only, sized by labels, components and latent dimensions (never cells);
        label names travel in the model manifest, indexed by the label codes used here."""
        t = self.thresholds
        return {
            "format": np.array([STATE_FORMAT], dtype=np.int64),
            "k_min": np.array([self.options.k_min], dtype=np.int64),
            "cells_per_component": np.array([self.options.cells_per_component], dtype=np.int64),
            "max_components": np.array([self.options.max_components], dtype=np.int64),
            "statistic": np.array([STATISTICS.index(self.options.statistic)], dtype=np.int64),
            "calibration": np.array([CALIBRATIONS.index(self.options.calibration)], dtype=np.int64),
            "small_labels": np.array([SMALL_LABELS.index(self.options.small_labels)], dtype=np.int64),
            "fpr": np.array([self.fpr], dtype=np.float64),
            "uncertainty_threshold": np.array([self.uncertainty_threshold], dtype=np.float64),
            "reference_median_score": np.array([self.reference_median_score], dtype=np.float64),
            **{f"component_{f}": np.ascontiguousarray(getattr(self.components, f)) for f in _COMPONENT_FIELDS},
            **t.state(),
            **{_GAUSSIAN_PREFIX + k: v for k, v in self.gaussian.state().items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], label_categories: Sequence[str], *,
                   workers: int = -1) -> ClassSummaries:
        """Rebuild from :meth:`state`; refuses a state that is incomplete, of another format, whose
        arrays do not match the label count, or with a component below its ``k_min``."""
        st = {k: np.asarray(v) for k, v in state.items()}
        try:
            if int(st["format"].ravel()[0]) != STATE_FORMAT:
                raise LabelStateError(f"label summaries check failed: state format {int(st['format'].ravel()[0])} "
                                      f"is not supported (expected {STATE_FORMAT})")
            comps = Components(*(st[f"component_{f}"].astype(np.float64 if f in ("means", "whiten", "log_det")
                                                              else np.int64) for f in _COMPONENT_FIELDS))
            opts = SummaryOptions(int(st["k_min"].ravel()[0]), int(st["cells_per_component"].ravel()[0]),
                                  int(st["max_components"].ravel()[0]),
                                  STATISTICS[int(st["statistic"].ravel()[0])],
                                  CALIBRATIONS[int(st["calibration"].ravel()[0])],
                                  SMALL_LABELS[int(st["small_labels"].ravel()[0])])
            thresholds = Thresholds.from_state(st)
            gaussian = ClassGaussianNovelty.from_state({k[len(_GAUSSIAN_PREFIX):]: v for k, v in st.items()
                                                        if k.startswith(_GAUSSIAN_PREFIX)})
            out = cls(label_categories=[str(c) for c in label_categories], components=comps, thresholds=thresholds,
                      gaussian=gaussian, options=opts, fpr=float(st["fpr"].ravel()[0]),
                      uncertainty_threshold=float(st["uncertainty_threshold"].ravel()[0]),
                      reference_median_score=float(st["reference_median_score"].ravel()[0]),
                      workers=resolve_workers(workers))
        except KeyError as exc:
            raise LabelStateError(f"label summaries check failed: state is missing {exc.args[0]!r}") from exc
        out._check_shapes()
        return out

    def _check_shapes(self) -> None:
        c, n_labels = self.components, len(self.label_categories)
        d = c.means.shape[1] if c.means.ndim == 2 else -1
        problems = []
        if not (c.label.shape == c.count.shape == c.log_det.shape == (c.n,) and c.means.shape == (c.n, d)
                and c.whiten.shape == (c.n, d, d)):
            problems.append("component arrays disagree in shape")
        if c.n and (c.label.min() < 0 or c.label.max() >= n_labels):
            problems.append(f"component labels outside the {n_labels} label categories")
        if c.n and int(c.count.min()) < self.options.k_min:
            problems.append(f"a component stands for {int(c.count.min())} cells, fewer than k_min "
                            f"{self.options.k_min}")
        if self.thresholds.label_thresholds.shape != (n_labels,) or self.gaussian.means.shape != (n_labels, d):
            problems.append(f"per-label arrays do not match {n_labels} labels")
        if problems:
            raise LabelStateError("label summaries check failed: " + "; ".join(problems))


@dataclass(frozen=True)
class _Scorer:
    """What :meth:`ClassSummaries.predict` computes per chunk of query cells, prepared once.

    Why one object: the components and the class Gaussians are all Gaussians, so ONE
    :class:`QuadraticForms` product per chunk gives every squared distance the call
    needs: the distance score (``min`` over components of distance / the threshold of the
    component's label, the same as the nearest component per label over its threshold,
    then the smallest label), the class Gaussian score (as
    :meth:`ClassGaussianNovelty.score`) and the generative posterior (count-weighted
    densities summed per label by a product with the components' one-hot label matrix,
    relative to the cell's largest term, so what underflows is below 1e-300 of the total).

    The query-shift guard compares the query's median score with the reference's median,
    so it reads the score against the labels that median was measured on: without the
    labels sites added by merge (``MODE_SITE``), whose calibration comes from a site's own
    cells. Otherwise a query holding many cells of a site-added type (scored low against
    it now) would lower the guard and the known types would pay with false alarms.
    """

    forms: QuadraticForms  # the components, then the fitted class Gaussians
    n_components: int
    component_scale: np.ndarray  # [C] 1 / threshold^2 of each component's label
    gaussian_scale: np.ndarray  # [G] 1 / threshold^2 of each fitted class Gaussian
    log_weight: np.ndarray  # [C] log count - log det / 2 (the 2 pi term cancels in the posterior)
    onehot: np.ndarray  # [C, L]
    summaries: ClassSummaries  # for the statistics other than "mahalanobis"
    guard: tuple[np.ndarray, np.ndarray] | None  # columns of the guard's Gaussians: components, class Gaussians

    @classmethod
    def of(cls, s: ClassSummaries) -> _Scorer:
        c, g = s.components, s.gaussian
        fitted = np.flatnonzero(g.fitted)
        floor = 1e-150  # a threshold of 0 stays a division by a tiny number, as in the direct form
        onehot = np.zeros((c.n, len(s.label_categories)), dtype=np.float64)
        onehot[np.arange(c.n), c.label] = 1.0
        forms = QuadraticForms.of(np.concatenate([c.means, g.means[fitted]]),
                                  np.concatenate([c.whiten, g.whiten[fitted]]))
        site = s.thresholds.label_calibration_mode == MODE_SITE
        guard = None
        if site.any() and s.options.statistic == "mahalanobis":
            guard = (np.flatnonzero(~site[c.label]), np.flatnonzero(~site[fitted]))
        return cls(forms=forms, n_components=c.n,
                   component_scale=1.0 / np.maximum(s.thresholds.label_thresholds[c.label], floor) ** 2,
                   gaussian_scale=1.0 / np.maximum(g.thresholds[fitted], floor) ** 2,
                   log_weight=np.log(np.maximum(c.count, 1)) - 0.5 * c.log_det, onehot=onehot, summaries=s,
                   guard=guard)

    def chunk(self, z: np.ndarray, posterior: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                              np.ndarray | None]:
        """Distance score, class Gaussian score, the guard's score (None: the raw score) and (if
        asked) p(label | z) of the cells ``z``."""
        sq = self.forms.squared(z)
        comp, gauss = sq[:, :self.n_components], sq[:, self.n_components:]
        comp_ratio, gauss_ratio = comp * self.component_scale, gauss * self.gaussian_scale
        g = np.sqrt(gauss_ratio.min(axis=1)) if gauss.shape[1] else np.full(len(z), np.inf)
        guard = None
        if self.guard is not None:
            guard = np.sqrt(np.maximum(_row_min(comp_ratio[:, self.guard[0]]), _row_min(gauss_ratio[:, self.guard[1]])))
        s = self.summaries
        if s.options.statistic == "mahalanobis":
            dist = np.sqrt(comp_ratio.min(axis=1))
        else:
            present = np.unique(s.components.label)
            stat = label_statistic(z, s.components, present, s.options.statistic, np.sqrt(comp))
            dist = (stat / np.maximum(s.thresholds.label_thresholds[present], np.finfo(np.float64).tiny)).min(axis=1)
        if not posterior:
            return dist, g, guard, None
        dens = comp * -0.5
        dens += self.log_weight
        dens -= dens.max(axis=1, keepdims=True)
        np.exp(dens, out=dens)
        per_label = dens @ self.onehot
        per_label /= per_label.sum(axis=1, keepdims=True)
        return dist, g, guard, per_label


def _row_min(x: np.ndarray) -> np.ndarray:
    return x.min(axis=1) if x.shape[1] else np.full(x.shape[0], np.inf)


def _gaussian_cells(codes: np.ndarray, padding: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows and label codes the class Gaussians are fitted on: every cell in a component under
    its effective label, plus each padded label's padding cells under that label.

    Why the padding: a label's Gaussian (its mean and covariance) is published like a component,
    so it must stand for ``k_min`` cells too. Fitted on a padded label's own cells alone it was
    the mean of 10-19 cells (PBMC's dendritic cells) in a version that promises k-anonymity."""
    rows = np.flatnonzero(codes >= 0)
    extra = [(y, r) for y, r in sorted(padding.items()) if r.size]
    return (np.concatenate([rows, *(r for _, r in extra)]),
            np.concatenate([codes[rows], *(np.full(r.size, y, dtype=codes.dtype) for y, r in extra)]))


def _summarise(latent: np.ndarray, codes: np.ndarray, n_labels: int, opts: SummaryOptions,
               seed: int) -> tuple[Components, np.ndarray, dict[int, np.ndarray]]:
    """Components of every label with >= k_min cells, and what becomes of smaller labels
    (``opts.small_labels``, see :data:`SMALL_LABELS`). Returns the components, each cell's
    effective label code (-1: in no component) and, per padded label, the other labels' cells
    that pad it to ``k_min``."""
    part = np.full(len(codes), -1, dtype=np.int64)
    members: list[np.ndarray] = []
    owners: list[int] = []
    for y in range(n_labels):
        rows = np.flatnonzero(codes == y)
        p = label_parts(latent[rows], k_min=opts.k_min, cells_per_component=opts.cells_per_component,
                        max_components=opts.max_components, seed=seed)
        for c in range(int(p.max()) + 1 if rows.size else 0):
            part[rows[p == c]] = len(owners)
            members.append(rows[p == c])
            owners.append(y)
    if not owners:
        raise LatentError(f"latent check failed: no label has {opts.k_min} reference cells (k_min); "
                          "nothing can be summarised")
    small = [y for y in range(n_labels) if 0 < (codes == y).sum() < opts.k_min]
    eff = codes.copy()
    padding: dict[int, np.ndarray] = {}
    if opts.small_labels.startswith("pad"):
        for y in [y for y in small if 2 * (codes == y).sum() >= opts.k_min]:
            rows = np.flatnonzero(codes == y)
            others = np.flatnonzero((codes != y) & (part >= 0))
            near = others[np.argsort(((latent[others] - latent[rows].mean(0)) ** 2).sum(1))[:opts.k_min - rows.size]]
            part[rows] = len(owners)
            padding[y] = near
            members.append(np.concatenate([rows, near]))
            owners.append(y)
    comps = gaussians([latent[m] for m in members], owners)
    rest = np.flatnonzero(part < 0)
    if rest.size and opts.small_labels in ("absorb", "pad"):
        nearest = mahalanobis(latent[rest], comps).argmin(axis=1)
        for c in np.unique(nearest):
            members[c] = np.concatenate([members[c], rest[nearest == c]])
        comps = gaussians([latent[m] for m in members], owners)
        eff[rest] = comps.label[nearest]
    elif rest.size:
        eff[rest] = -1
    return comps, eff, padding


def _unsummarised_global(thresholds: Thresholds, comps: Components, n_labels: int) -> None:
    """A label with no component (fewer than k_min cells) publishes no threshold of its own."""
    missing = np.setdiff1d(np.arange(n_labels), comps.label)
    thresholds.label_thresholds[missing] = thresholds.global_threshold
    thresholds.label_threshold_kind[missing] = KIND_GLOBAL
    thresholds.calibration_counts[missing] = 0
