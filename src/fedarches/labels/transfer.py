"""Label transfer from a reference atlas to query cells (docs/LABELS.md).

A query cell gets the weighted-kNN label of its nearest reference cells (scArches,
Lotfollahi et al. 2022, Methods eqs. 17-22), or ``"Unknown"`` when EITHER the
paper's label uncertainty ``u = 1 - max_y p(y)`` exceeds ``uncertainty_threshold``
OR a calibrated novelty test says the cell lies off the reference. Why the second
test: the uncertainty only compares neighbour labels, so a type the reference
never saw, embedded next to one known type, gets unanimous neighbours and a
confident wrong label. The novelty score is the larger of two ratios: the mean
distance to the ``k_novelty`` nearest reference cells over its label's threshold
(:mod:`fedarches.labels.calibration`), and the class-Gaussian score
(:class:`fedarches.labels.novelty.ClassGaussianNovelty`); above 1 means novel.
Both are calibrated on the reference; :mod:`fedarches.labels.query_shift` then
adapts them to a query in another biological state (the query's own median
excess, and the score of each cell's query neighbourhood).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedarches.errors import LabelStateError, LatentError, SettingError
from fedarches.labels.calibration import (
    MIN_LABEL_CELLS,
    Thresholds,
    calibration_sample,
    calibration_statistics,
    label_thresholds,
)
from fedarches.labels.knn import CHUNK, EXACT_METHOD, METHODS, NeighbourIndex, spatial_order
from fedarches.labels.novelty import ClassGaussianNovelty
from fedarches.labels.query_shift import adapted_scores, study_groups
from fedarches.labels.weights import label_probabilities
from fedarches.neighbours import as_latent, encode_labels, resolve_workers

__all__ = ["UNKNOWN", "KNNLabelTransfer", "LabelTransferResult"]

UNKNOWN = "Unknown"
STATE_FORMAT = 1
K_FLOOR = 10  # k is never capped below this (see fit)

_STATE_KEYS = (
    "format", "k", "k_novelty", "fpr", "uncertainty_threshold", "min_label_cells",
    "label_thresholds", "label_calibration_mode", "label_threshold_kind", "global_threshold",
    "pooled_ratio_quantile", "label_counts",
    "calibration_counts", "n_reference", "n_dims",
)
_PER_LABEL_KEYS = ("label_thresholds", "label_calibration_mode", "label_threshold_kind", "label_counts",
                   "calibration_counts")
_GAUSSIAN_PREFIX = "gaussian."  # ClassGaussianNovelty state, multi-dimensional arrays
_REFIT = "re-fit the label transfer or re-save the model with this version of fedarches"


@dataclass(frozen=True)
class LabelTransferResult:
    """Per-query-cell output of :meth:`KNNLabelTransfer.predict`.

    ``prediction`` is what to show users; ``knn_prediction`` keeps the best guess
    even for unknown cells (useful to see *which* known type a novel population
    sits next to). ``uncertainty > uncertainty_threshold`` and
    ``novelty_score > 1`` are the two tests; ``is_unknown`` is their OR.
    """

    prediction: np.ndarray  # object array of str; UNKNOWN where is_unknown
    knn_prediction: np.ndarray  # object array of str; argmax label (the classifier's when given), always a reference label
    knn_code: np.ndarray  # int64 codes into label_categories of knn_prediction
    uncertainty: np.ndarray  # float32, 1 - max_y p(y)  (paper eq. 22)
    novelty_score: np.ndarray  # float32; > 1 means novel: max(distance_score, gaussian_score) without
    # adapt_to_query; with it, the population score of labels/query_shift.adapted_scores
    is_novel: np.ndarray  # bool, novelty_score > 1
    is_unknown: np.ndarray  # bool, uncertain OR novel
    probabilities: np.ndarray | None = None  # float32 [n, n_labels] when requested
    distance_score: np.ndarray | None = None  # float32, kNN distance statistic / its label threshold
    gaussian_score: np.ndarray | None = None  # float32, min over labels of Mahalanobis / threshold
    query_shift: np.ndarray | None = None  # float32 per cell: the guard its study's scores were divided by (>= 1)


def _check_fit_settings(k: int, k_novelty: int, fpr: float, uncertainty_threshold: float,
                        min_label_cells: int, max_calibration_cells: int, max_groups: int) -> None:
    problem = None
    if not 1 <= int(k):
        problem = f"k must be a positive integer, got {k}"
    elif not 1 <= int(k_novelty):
        problem = f"k_novelty must be a positive integer, got {k_novelty}"
    elif not 0.0 < float(fpr) < 1.0:
        problem = f"fpr must be strictly between 0 and 1, got {fpr}"
    elif not 0.0 <= float(uncertainty_threshold) <= 1.0:
        problem = f"uncertainty_threshold must be in [0, 1], got {uncertainty_threshold}"
    elif int(min_label_cells) < 1 or int(max_calibration_cells) < 1 or int(max_groups) < 2:
        problem = "min_label_cells and max_calibration_cells must be >= 1, max_groups >= 2"
    if problem:
        raise SettingError(f"setting check failed: {problem}")


class KNNLabelTransfer:
    """Weighted kNN label transfer (scArches eqs. 17-22) plus a calibrated novelty test.

    Typical use::

        lt = KNNLabelTransfer().fit(ref_latent, ref_labels, ref_batches=ref_studies)
        res = lt.predict(query_latent)           # LabelTransferResult
        state = lt.state()                       # numeric arrays -> safetensors
        lt2 = KNNLabelTransfer.from_state(ref_latent, ref_codes, state,
                                          label_categories=lt.label_categories)

    ``workers`` is only how many threads the kNN search uses (-1 = all cores) and is
    not part of the state; with the exact tree it never changes a result, with the
    IVF index results are repeatable for a fixed ``seed`` and ``workers``.
    ``method``: "auto", "exact" or "ivf" (:class:`fedarches.labels.knn.NeighbourIndex`);
    after fitting, the ``method`` attribute names the search used.
    """

    EXACT_METHOD = EXACT_METHOD

    def __init__(self, *, workers: int = -1, eps: float = 0.0, method: str = "auto", seed: int = 0) -> None:
        self.workers = resolve_workers(workers)
        if eps < 0:
            raise SettingError(f"setting check failed: eps must be >= 0 (0 = exact kNN), got {eps}")
        if method not in METHODS:
            raise SettingError(f"setting check failed: method must be 'auto', 'exact' or 'ivf', got {method!r}")
        self.eps = float(eps)
        self.requested_method = method
        self.index_seed = int(seed)
        self.method = f"{method} (not fitted)"  # after fit/from_state: the neighbour search used
        self.index: NeighbourIndex | None = None
        self.label_categories: list[str] = []
        self.ref_codes = np.zeros(0, dtype=np.int64)
        self.k = 50
        self.k_novelty = 3
        self.fpr = 0.01
        self.uncertainty_threshold = 0.5
        self.min_label_cells = MIN_LABEL_CELLS
        self.thresholds = Thresholds(
            label_thresholds=np.zeros(0, dtype=np.float64), label_calibration_mode=np.zeros(0, dtype=np.int64),
            label_threshold_kind=np.zeros(0, dtype=np.int64), global_threshold=float("nan"),
            pooled_ratio_quantile=np.full(2, np.nan, dtype=np.float64), calibration_counts=np.zeros(0, dtype=np.int64))
        self._n_dims = 0
        self.gaussian = ClassGaussianNovelty()
        self.reference_median_score = float("nan")  # median raw score of calibration cells; nan: no guard

    def _build_index(self, latent: np.ndarray) -> None:
        self.index = NeighbourIndex(latent, self.ref_codes, len(self.label_categories), self.k, self.k_novelty,
                                    workers=self.workers, eps=self.eps, method=self.requested_method,
                                    seed=self.index_seed)
        self.method = self.index.description

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        ref_latent: np.ndarray,
        ref_labels: np.ndarray,
        ref_batches: np.ndarray | None = None,
        k: int = 50,
        fpr: float = 0.01,
        *,
        k_novelty: int = 3,
        uncertainty_threshold: float = 0.5,
        min_label_cells: int = MIN_LABEL_CELLS,
        label_categories: Sequence[str] | None = None,
        max_calibration_cells: int = 100_000,
        max_groups: int = 10,
        seed: int = 0,
        cap_k: bool = True,
    ) -> KNNLabelTransfer:
        """Index the reference and calibrate the novelty thresholds.

        ``ref_labels``: strings (or ints, taken as names), or int codes into
        ``label_categories`` when that is given. ``ref_batches``: study of each
        reference cell; enables the fair other-study calibration.

        ``cap_k``: cap ``k`` at the cell count of the smallest reference label (not
        below ``K_FLOOR``), so that every label can win a majority of a cell's
        neighbours; ``False`` keeps the paper's fixed ``k``.

        ``k_novelty``: neighbours in the distance statistic; fewer than ``k`` on
        purpose, because the nearest few measure how far the cell is from the
        reference manifold while the 50th mostly measures how large the cluster is.
        ``max_calibration_cells``: above this, a seeded sample of reference cells is
        calibrated. ``max_groups``: with more studies than this, studies are dealt
        into that many groups and "other studies" means other groups.
        """
        latent = as_latent(ref_latent, "reference latent")
        n, dims = latent.shape
        if n < 2:
            raise LatentError(f"latent check failed: label transfer needs at least 2 reference cells, got {n}")
        cats, codes = encode_labels(ref_labels, n, label_categories)
        _check_fit_settings(k, k_novelty, fpr, uncertainty_threshold, min_label_cells, max_calibration_cells,
                            max_groups)
        self.label_categories = cats
        self.ref_codes = codes
        # A label with fewer reference cells than k can never hold a majority of a
        # query cell's k neighbours, so its cells would all come out uncertain.
        counts = np.bincount(codes)
        smallest = int(counts[counts > 0].min())
        self.k = int(min(int(k), n, max(K_FLOOR, smallest))) if cap_k else int(min(int(k), n))
        self.k_novelty = int(min(int(k_novelty), n - 1))
        self.fpr = float(fpr)
        self.uncertainty_threshold = float(uncertainty_threshold)
        self.min_label_cells = int(min_label_cells)
        self._n_dims = dims
        self._build_index(latent)
        assert self.index is not None

        n_labels = len(cats)
        cal = calibration_sample(codes, n_labels, int(max_calibration_cells), np.random.default_rng(seed))
        stats, loo_stats, mode = calibration_statistics(self.index, latent, codes, ref_batches, cal, n_labels,
                                                        self.k_novelty, int(max_groups))
        self.thresholds = label_thresholds(stats, loo_stats, codes[cal], mode, n_labels, self.fpr,
                                           self.min_label_cells)
        self.gaussian = ClassGaussianNovelty().fit(latent, codes, n_labels, fpr=self.fpr)
        # The raw novelty score of the calibration cells, as a query cell's is computed
        # (distance statistic against other studies over its label's threshold, and the
        # class-Gaussian score): its median is what a query of known types should show.
        ref_scores = np.maximum(stats / np.maximum(self.thresholds.label_thresholds[codes[cal]],
                                                   np.finfo(np.float64).tiny),
                                self.gaussian.score(latent[cal]))
        self.reference_median_score = float(np.median(ref_scores))
        return self

    # ------------------------------------------------------------------ prediction

    def predict(self, query_latent: np.ndarray, *, return_probabilities: bool = False,
                query_batches: np.ndarray | None = None, adapt_to_query: bool = True,
                classifier_probabilities: np.ndarray | None = None) -> LabelTransferResult:
        """Label query cells; see :class:`LabelTransferResult` for the fields.

        Processed in chunks of 65,536 cells, so memory stays bounded for any query
        size (``return_probabilities`` adds ``n x n_labels`` float32).

        ``adapt_to_query`` (default): the query-shift guard. A query in another
        biological state (disease, stimulation) lies farther from the reference
        than reference studies lie from one another, so thresholds calibrated on the
        reference alone flag whole known types. Each query study's scores are
        divided by ``max(1, median query score / median reference score)``: the
        bulk of a study is its known types, a type the reference lacks is a
        minority that barely moves the median, and a query no farther than the
        reference keeps the reference calibration exactly. ``query_batches``: the
        study of each query cell (one guard per study; default: one for all);
        studies with fewer than ``query_shift.MIN_SHIFT_CELLS`` cells keep the
        reference calibration. With the guard, a population decides: the score of a
        cell is the median guarded score of its 15 nearest query cells of the same
        study and predicted label, or its own score over ``ISOLATED_FACTOR`` if that is
        larger (a new type is a population; a known type's edge cell is not), and an
        unsure call counts more (``1 + UNCERTAINTY_WEIGHT x uncertainty``). Call it with
        a study's cells together, not cell by cell (:mod:`fedarches.labels.query_shift`).

        ``classifier_probabilities`` (``n x n_labels``, columns in ``label_categories``
        order): a label-aware reference's own classifier output. It then makes the
        call and its ``1 - max p`` is the uncertainty; the neighbours still decide
        which label's distance threshold applies, and the novelty tests are unchanged.
        """
        if self.index is None:
            raise LabelStateError("label transfer state check failed: KNNLabelTransfer is not fitted: "
                                  "call fit() or from_state() first")
        q = as_latent(query_latent, "query latent")
        if q.shape[1] != self._n_dims:
            raise LatentError(f"latent check failed: query latent has {q.shape[1]} dimensions but the reference "
                              f"has {self._n_dims}; embed the query with the same model")
        n = q.shape[0]
        n_labels = len(self.label_categories)
        kq = max(self.k, self.k_novelty)
        code = np.empty(n, dtype=np.int64)
        unc = np.empty(n, dtype=np.float32)
        stat = np.empty(n, dtype=np.float64)
        probs = np.empty((n, n_labels), dtype=np.float32) if return_probabilities else None
        order = spatial_order(q)
        ivf = self.index.for_query(n)
        for start in range(0, n, CHUNK):
            sel = order[start:start + CHUNK]
            d, i = self.index.knn(q[sel], kq, ivf)
            p = label_probabilities(d[:, :self.k], self.ref_codes[i[:, :self.k]], n_labels)
            best = p.argmax(axis=1)
            code[sel] = best
            unc[sel] = 1.0 - p[np.arange(len(sel)), best]
            stat[sel] = d[:, :self.k_novelty].mean(axis=1)
            if probs is not None:
                probs[sel] = p
        thr_code = code
        if classifier_probabilities is not None:
            lp = np.asarray(classifier_probabilities, dtype=np.float64)
            if lp.shape != (n, n_labels) or not np.isfinite(lp).all():
                raise LatentError(f"latent check failed: label probabilities of shape {lp.shape} (finite: "
                                  f"{bool(np.isfinite(lp).all())}) for {n} cells and {n_labels} labels")
            code = lp.argmax(axis=1).astype(np.int64)
            unc = (1.0 - lp[np.arange(n), code]).astype(np.float32)
        return self._result(q, code, unc, stat, probs, query_batches, adapt_to_query, thr_code)

    def _result(self, q: np.ndarray, code: np.ndarray, unc: np.ndarray, stat: np.ndarray,
                probs: np.ndarray | None, batches: np.ndarray | None = None,
                adapt: bool = True, thr_code: np.ndarray | None = None) -> LabelTransferResult:
        n = q.shape[0]
        # 1 - max p can round to -2e-16 when every neighbour agrees: report a clean 0
        unc = np.clip(unc, 0.0, 1.0)
        thr = self.thresholds.label_thresholds[code if thr_code is None else thr_code] if n else np.zeros(0)
        distance_score = stat / np.maximum(thr, np.finfo(np.float64).tiny)
        gaussian_score = self.gaussian.score(q)
        raw = np.maximum(distance_score, gaussian_score)
        if adapt and n:
            score, shift = adapted_scores(q, raw, unc, code, study_groups(batches, n), self.reference_median_score,
                                          workers=self.workers)
        else:
            shift = np.ones(n, dtype=np.float64)
            score = raw
        is_novel = score > 1.0
        is_unknown = is_novel | (unc > self.uncertainty_threshold)
        cats = np.asarray(self.label_categories, dtype=object)
        knn_pred = cats[code] if n else np.zeros(0, dtype=object)
        pred = knn_pred.copy()
        pred[is_unknown] = UNKNOWN
        return LabelTransferResult(
            prediction=pred,
            knn_prediction=knn_pred,
            knn_code=code,
            uncertainty=unc,
            novelty_score=score.astype(np.float32),
            is_novel=is_novel,
            is_unknown=is_unknown,
            probabilities=probs,
            distance_score=distance_score.astype(np.float32),
            gaussian_score=gaussian_score.astype(np.float32),
            query_shift=shift.astype(np.float32),
        )

    # ------------------------------------------------------------------ persistence

    def state(self) -> dict[str, np.ndarray]:
        """Everything besides the reference latent and labels needed to rebuild this object.

        Only numeric arrays (safetensors holds no strings); label categories travel
        separately (the model manifest) and the per-label arrays are indexed by label
        code. ``label_counts`` lets :meth:`from_state` detect labels that do not
        match the calibration. The neighbour index is never saved.
        """
        if self.index is None:
            raise LabelStateError("label transfer state check failed: KNNLabelTransfer is not fitted: "
                                  "nothing to save")
        n_labels = len(self.label_categories)
        t = self.thresholds
        return {
            "format": np.array([STATE_FORMAT], dtype=np.int64),
            "k": np.array([self.k], dtype=np.int64),
            "k_novelty": np.array([self.k_novelty], dtype=np.int64),
            "fpr": np.array([self.fpr], dtype=np.float64),
            "uncertainty_threshold": np.array([self.uncertainty_threshold], dtype=np.float64),
            "min_label_cells": np.array([self.min_label_cells], dtype=np.int64),
            **t.state(),
            "label_counts": np.bincount(self.ref_codes, minlength=n_labels).astype(np.int64),
            "n_reference": np.array([self.ref_codes.shape[0]], dtype=np.int64),
            "n_dims": np.array([self._n_dims], dtype=np.int64),
            "reference_median_score": np.array([self.reference_median_score], dtype=np.float64),
            **{_GAUSSIAN_PREFIX + k: v for k, v in self.gaussian.state().items()},
        }

    @classmethod
    def from_state(
        cls,
        ref_latent: np.ndarray,
        ref_labels: np.ndarray,
        state: Mapping[str, np.ndarray],
        *,
        label_categories: Sequence[str] | None = None,
        workers: int = -1,
        eps: float = 0.0,
        method: str = "auto",
        seed: int = 0,
    ) -> KNNLabelTransfer:
        """Rebuild a fitted object without recalibrating (a site has no reference batches).

        ``method`` / ``seed``: as in the constructor; the neighbour index is rebuilt
        from ``ref_latent``. ``ref_labels`` as in :meth:`fit`. Raises
        :class:`LabelStateError` when the state is incomplete or does not belong to
        this reference (cell count, dimensions or per-label counts differ).
        """
        st = _read_state(state)
        obj = cls(workers=workers, eps=eps, method=method, seed=seed)
        latent = as_latent(ref_latent, "reference latent")
        n, dims = latent.shape
        if n != int(st["n_reference"][0]) or dims != int(st["n_dims"][0]):
            raise LabelStateError(f"label transfer state check failed: reference latent is {n} x {dims} but the "
                                  f"state was fitted on {int(st['n_reference'][0])} x {int(st['n_dims'][0])}")
        cats, codes = encode_labels(ref_labels, n, label_categories)
        _check_state_labels(st, codes, len(cats))
        obj.label_categories = cats
        obj.ref_codes = codes
        obj.k = int(st["k"][0])
        obj.k_novelty = int(st["k_novelty"][0])
        obj.fpr = float(st["fpr"][0])
        obj.uncertainty_threshold = float(st["uncertainty_threshold"][0])
        obj.min_label_cells = int(st["min_label_cells"][0])
        obj.thresholds = Thresholds.from_state(st)
        if not (1 <= obj.k <= n and 1 <= obj.k_novelty <= n):
            raise LabelStateError(f"label transfer state check failed: state has k={obj.k}, "
                                  f"k_novelty={obj.k_novelty} for {n} reference cells")
        obj.gaussian = _read_gaussian(state, len(cats), dims)
        if "reference_median_score" in state:
            obj.reference_median_score = float(np.asarray(state["reference_median_score"]).ravel()[0])
        obj._n_dims = dims
        obj._build_index(latent)
        return obj


def _read_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise LabelStateError(f"label transfer state check failed: state is missing {missing}; {_REFIT}")
    st = {key: np.asarray(state[key]).ravel() for key in _STATE_KEYS}
    if int(st["format"][0]) != STATE_FORMAT:
        raise LabelStateError(f"label transfer state check failed: state format {int(st['format'][0])} is not "
                              f"supported (expected {STATE_FORMAT})")
    return st


def _check_state_labels(st: Mapping[str, np.ndarray], codes: np.ndarray, n_labels: int) -> None:
    for key in _PER_LABEL_KEYS:
        if st[key].shape[0] != n_labels:
            raise LabelStateError(f"label transfer state check failed: state has {st[key].shape[0]} labels in "
                                  f"{key!r} but the reference has {n_labels}; pass the label_categories it was "
                                  "fitted with")
    counts = np.bincount(codes, minlength=n_labels).astype(np.int64)
    if not np.array_equal(counts, st["label_counts"].astype(np.int64)):
        raise LabelStateError("label transfer state check failed: reference labels do not match the state "
                              "(per-label cell counts differ); pass the same labels and label_categories used "
                              "at fit time")


def _read_gaussian(state: Mapping[str, np.ndarray], n_labels: int, dims: int) -> ClassGaussianNovelty:
    gaussian = {k[len(_GAUSSIAN_PREFIX):]: np.asarray(v) for k, v in state.items()
                if k.startswith(_GAUSSIAN_PREFIX)}
    try:
        out = ClassGaussianNovelty.from_state(gaussian)
    except KeyError as exc:
        raise LabelStateError(f"label transfer state check failed: state is missing "
                              f"{_GAUSSIAN_PREFIX}{exc.args[0]}; {_REFIT}") from exc
    if out.means.shape != (n_labels, dims):
        raise LabelStateError(f"label transfer state check failed: class Gaussians of shape {out.means.shape}, "
                              f"expected ({n_labels}, {dims})")
    return out
