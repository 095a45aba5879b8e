"""Label transfer (paper eqs. 17-22) and the calibrated novelty test."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedarches.errors import ColumnError, InputDataError, LabelStateError, LatentError, SettingError
from fedarches.labels import UNKNOWN, ClassGaussianNovelty, KNNLabelTransfer
from fedarches.labels.calibration import KIND_OWN_QUANTILE, KIND_SCALED, MODE_CROSS_STUDY, MODE_LEAVE_ONE_OUT

TYPES = np.array([f"type_{c}" for c in "ABCDEF"])


def atlas(seed: int, *, n_studies: int = 4, n_per: int = 300, n_small: int = 25, f_offset: float = 7.0,
          shift_sd: float = 0.4, a_sd: float = 1.0, dims: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian clusters A-E (A small, spread ``a_sd``; the others unit variance), plus
    F (spread ``a_sd``) placed ``f_offset`` from A, in studies that each add a random
    shift (a residual batch effect)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 6.0, (5, dims))
    direction = rng.normal(size=dims)
    direction /= np.linalg.norm(direction)
    centers = np.vstack([centers, centers[0] + f_offset * direction])
    spread = np.array([a_sd, 1.0, 1.0, 1.0, 1.0, a_sd])
    shifts = rng.normal(0.0, shift_sd, (n_studies, dims))
    z, labels, studies = [], [], []
    for s in range(n_studies):
        for t in range(6):
            n = n_small if t == 0 else n_per
            z.append(centers[t] + shifts[s] + rng.normal(0.0, spread[t], (n, dims)))
            labels += [TYPES[t]] * n
            studies += [f"study_{s}"] * n
    return np.vstack(z), np.array(labels), np.array(studies)


# ----------------------------------------------------------------------------- eqs. 17-22


def test_uncertainty_matches_hand_computation_of_paper_equations():
    ref = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -4.0], [10.0, 10.0]])
    labels = np.array(["a", "a", "b", "b", "c", "c"])
    query = np.array([[0.2, 0.1]])
    lt = KNNLabelTransfer(workers=1).fit(ref, labels, k=5, fpr=0.5, min_label_cells=1)
    res = lt.predict(query, return_probabilities=True)

    d = sorted((math.dist(query[0], r), lab) for r, lab in zip(ref, labels))[:5]
    dist = [x for x, _ in d]
    mean = sum(dist) / 5
    s = math.sqrt(sum((x - mean) ** 2 for x in dist) / 5)  # np.std: population std
    kern = [math.exp(-x / (2.0 / s) ** 2) for x in dist]  # eq. 18-19
    w = [v / sum(kern) for v in kern]  # eq. 20
    p = {lab: sum(wi for wi, (_, l2) in zip(w, d) if l2 == lab) for lab in "abc"}  # eq. 21
    best = max(p, key=p.get)
    assert res.knn_prediction[0] == best
    assert res.uncertainty[0] == pytest.approx(1.0 - p[best], abs=1e-6)  # eq. 22
    np.testing.assert_allclose(res.probabilities[0], [p["a"], p["b"], p["c"]], atol=1e-6)
    assert lt.label_categories == ["a", "b", "c"]


def test_equal_distances_give_uniform_weights_and_threshold_is_strict():
    # query at the centre of a square: all four distances equal, std 0
    ref = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    lt = KNNLabelTransfer(workers=1).fit(ref, np.array(["A", "A", "B", "C"]), k=4, min_label_cells=1)
    res = lt.predict(np.zeros((1, 2)), return_probabilities=True)
    np.testing.assert_allclose(res.probabilities[0], [0.5, 0.25, 0.25])
    assert res.uncertainty[0] == pytest.approx(0.5)
    assert not (res.uncertainty > lt.uncertainty_threshold)[0]  # paper: unknown only when u > 0.5


def test_widely_spread_distances_do_not_underflow():
    # naive exp(-d / (2/s)^2) underflows to 0/0 here: s ~ 190, d / (2/s)^2 ~ 1e5
    ref = np.array([[10.0, 0.0], [20.0, 0.0], [300.0, 0.0], [400.0, 0.0], [500.0, 0.0]])
    lt = KNNLabelTransfer(workers=1).fit(ref, np.array(["near", "x", "y", "y", "y"]), k=5, min_label_cells=1)
    res = lt.predict(np.zeros((1, 2)), return_probabilities=True)
    assert np.isfinite(res.probabilities).all()
    assert res.knn_prediction[0] == "near" and res.uncertainty[0] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- behaviour


def test_well_separated_clusters_are_transferred_exactly():
    z, labels, studies = atlas(0)
    known = labels != "type_F"
    ref = (studies != "study_3") & known
    query = (studies == "study_3") & known
    lt = KNNLabelTransfer(workers=1).fit(z[ref], labels[ref], ref_batches=studies[ref])
    res = lt.predict(z[query])
    assert np.array_equal(res.knn_prediction, labels[query])
    assert (res.distance_score <= 1).mean() >= 0.98  # the cross-study calibrated test: ~fpr
    # the in-sample class-Gaussian test also flags some cells of this study's residual
    # shift (the trade-off documented in labels.py), within the accuracy the issue asks
    assert (res.prediction == labels[query]).mean() >= 0.95
    assert res.prediction.dtype == object and res.uncertainty.dtype == np.float32
    assert res.novelty_score.dtype == np.float32 and res.is_unknown.dtype == bool


def test_unseen_type_next_to_a_known_one_is_called_unknown_but_shifted_known_types_are_not():
    # A is small and dense; F is 3.5 sd(1) units from it: closer to A than the
    # typical spacing of the other (looser) types, so only a per-label threshold
    # for A catches it (a global threshold flags about a quarter of F)
    z, labels, studies = atlas(0, a_sd=0.5, f_offset=3.5, shift_sd=0.2)
    ref = (studies != "study_3") & (labels != "type_F")
    query = studies == "study_3"  # a new study: its own batch shift, and the unseen type F
    lt = KNNLabelTransfer(workers=1).fit(z[ref], labels[ref], ref_batches=studies[ref], fpr=0.01)
    res = lt.predict(z[query])
    truth = labels[query]
    unseen = truth == "type_F"

    # F sits next to A: its neighbours are unanimous, so the paper's uncertainty misses it ...
    assert (res.knn_prediction[unseen] == "type_A").all()
    assert (res.uncertainty[unseen] > 0.5).mean() < 0.1
    # ... and the calibrated distance test catches it (on its own: the class-Gaussian
    # test would too, so is_unknown alone would not notice a broken distance test)
    assert (res.distance_score[unseen] > 1).mean() >= 0.9
    assert res.is_unknown[unseen].mean() >= 0.9
    assert (res.prediction[unseen] == UNKNOWN).all() == res.is_unknown[unseen].all()
    # known types from the shifted study keep their labels (unknown counts as wrong)
    assert (res.prediction[~unseen] == truth[~unseen]).mean() >= 0.95
    # A has 75 reference cells (< min_label_cells): its threshold uses the per-label scale model
    a = lt.label_categories.index("type_A")
    assert lt.thresholds.label_threshold_kind[a] == KIND_SCALED
    assert lt.thresholds.label_threshold_kind[lt.label_categories.index("type_B")] == KIND_OWN_QUANTILE
    assert (lt.thresholds.label_calibration_mode == MODE_CROSS_STUDY).all()


def test_cross_study_false_positive_rate_is_near_fpr():
    # leave one study out: the left-out study is exactly a "new query study" of known types
    # (study shifts of sd 0.8 per dimension: a strong residual batch effect)
    z, labels, studies = atlas(10, n_studies=6, n_per=250, n_small=250, f_offset=30.0, shift_sd=0.8)
    keep = labels != "type_F"
    z, labels, studies = z[keep], labels[keep], studies[keep]
    for fpr in (0.01, 0.05):
        fair, naive = [], []
        for s in np.unique(studies):
            ref = studies != s
            lt = KNNLabelTransfer(workers=1).fit(z[ref], labels[ref], ref_batches=studies[ref], fpr=fpr)
            fair.append((lt.predict(z[~ref]).distance_score > 1).mean())
            loo = KNNLabelTransfer(workers=1).fit(z[ref], labels[ref], fpr=fpr)  # no batches: leave-one-out
            naive.append((loo.predict(z[~ref]).distance_score > 1).mean())
        assert 0.4 * fpr <= np.mean(fair) <= 2.0 * fpr, (fpr, fair)
        # why the calibration must see other studies: leave-one-out is far too strict
        assert np.mean(naive) > 3.0 * fpr, (fpr, naive)


def test_leave_one_out_false_positive_rate_on_held_out_reference_cells():
    z, labels, _ = atlas(20, n_studies=1, n_per=1500, n_small=1500, f_offset=30.0)
    keep = labels != "type_F"
    z, labels = z[keep], labels[keep]
    held = np.random.default_rng(0).random(z.shape[0]) < 0.25
    lt = KNNLabelTransfer(workers=1).fit(z[~held], labels[~held], fpr=0.05)
    assert (lt.thresholds.label_calibration_mode == MODE_LEAVE_ONE_OUT).all()
    res = lt.predict(z[held])
    rate = (res.distance_score > 1).mean()
    assert 0.025 <= rate <= 0.09, rate
    # the class-Gaussian test is calibrated in-sample at the same fpr on the reference
    g_rate = (res.gaussian_score > 1).mean()
    assert 0.025 <= g_rate <= 0.09, g_rate


def test_gaussian_test_is_in_sample_calibrated_and_pays_for_unremoved_batch_shifts():
    """Documents the trade-off in labels.py: the class-Gaussian test holds its fpr on
    reference-like cells, and flags more when a study's batch shift was not removed."""
    z, labels, studies = atlas(10, n_studies=6, n_per=250, n_small=250, f_offset=30.0, shift_sd=0.8)
    keep = labels != "type_F"
    z, labels, studies = z[keep], labels[keep], studies[keep]
    ref = studies != np.unique(studies)[0]
    lt = KNNLabelTransfer(workers=1).fit(z[ref], labels[ref], ref_batches=studies[ref], fpr=0.01)
    on_reference = (lt.predict(z[ref]).gaussian_score > 1).mean()
    assert on_reference <= 0.02, on_reference
    shifted = (lt.predict(z[~ref]).gaussian_score > 1).mean()
    assert shifted > on_reference, (shifted, on_reference)


def test_label_seen_in_one_study_is_calibrated_leave_one_out():
    z, labels, studies = atlas(1)
    only_one = (labels != "type_C") | (studies == "study_0")  # type_C only in study_0
    lt = KNNLabelTransfer(workers=1).fit(z[only_one], labels[only_one], ref_batches=studies[only_one])
    c = lt.label_categories.index("type_C")
    assert lt.thresholds.label_calibration_mode[c] == MODE_LEAVE_ONE_OUT
    assert lt.thresholds.label_calibration_mode[lt.label_categories.index("type_B")] == MODE_CROSS_STUDY


# ----------------------------------------------------------------------------- state


def test_state_round_trips_through_safetensors(tmp_path):
    z, labels, studies = atlas(2)
    ref = studies != "study_3"
    lt = KNNLabelTransfer(workers=1).fit(z[ref], labels[ref], ref_batches=studies[ref], fpr=0.02, k=30)
    state = lt.state()
    assert all(isinstance(v, np.ndarray) and v.dtype.kind in "iuf" for v in state.values())
    save_file(state, str(tmp_path / "reference.safetensors"))
    loaded = load_file(str(tmp_path / "reference.safetensors"))

    codes = lt.ref_codes.astype(np.int64)  # what the model stores next to the latent
    again = KNNLabelTransfer.from_state(z[ref], codes, loaded, label_categories=lt.label_categories, workers=1)
    from_strings = KNNLabelTransfer.from_state(z[ref], labels[ref], loaded, workers=1)
    a, b, c = (t.predict(z[~ref]) for t in (lt, again, from_strings))
    for other in (b, c):
        assert np.array_equal(a.prediction, other.prediction)
        assert np.array_equal(a.novelty_score, other.novelty_score)
        assert np.array_equal(a.uncertainty, other.uncertainty)
    assert again.k == 30 and again.fpr == 0.02

    relabelled = labels[ref].copy()
    relabelled[:10] = "type_B"
    with pytest.raises(LabelStateError, match="per-label cell counts differ"):
        KNNLabelTransfer.from_state(z[ref], relabelled, loaded, workers=1)
    with pytest.raises(LabelStateError, match="missing"):
        KNNLabelTransfer.from_state(z[ref], labels[ref], {"k": loaded["k"]}, workers=1)
    with pytest.raises(LabelStateError, match="fitted on"):
        KNNLabelTransfer.from_state(z[ref][:-1], labels[ref][:-1], loaded, workers=1)


def test_int_labels_and_explicit_categories():
    z, labels, _ = atlas(3, n_studies=1)
    ints = np.searchsorted(TYPES, labels) + 10
    lt = KNNLabelTransfer(workers=1).fit(z, ints)
    assert lt.label_categories == [str(i) for i in range(10, 16)]
    assert set(lt.predict(z[:50]).knn_prediction) <= set(lt.label_categories)
    codes = np.searchsorted(TYPES, labels)
    lt2 = KNNLabelTransfer(workers=1).fit(z, codes, label_categories=list(TYPES))
    assert lt2.label_categories == list(TYPES)
    assert np.array_equal(lt2.ref_codes, codes)


def test_bad_input_is_refused_with_a_reason():
    z, labels, studies = atlas(4, n_studies=2)
    lt = KNNLabelTransfer(workers=1)
    with pytest.raises(LabelStateError, match="not fitted"):
        lt.predict(z)
    bad = z.copy()
    bad[3, 2] = np.nan
    with pytest.raises(LatentError, match="NaN"):
        lt.fit(bad, labels)
    with pytest.raises(ColumnError, match="entries"):
        lt.fit(z, labels[:-1])
    with pytest.raises(ColumnError, match="missing values"):
        lt.fit(z, np.where(np.arange(len(labels)) == 5, None, labels).astype(object))
    with pytest.raises(SettingError, match="fpr"):
        lt.fit(z, labels, fpr=1.5)
    with pytest.raises(ColumnError, match="not in label_categories"):
        lt.fit(z, labels, label_categories=["type_A"])
    lt.fit(z, labels, ref_batches=studies)
    with pytest.raises(LatentError, match="dimensions"):
        lt.predict(z[:, :3])


def test_small_inputs_are_instant():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1000, 10))
    labels = rng.integers(0, 5, 1000).astype(str)
    batches = rng.integers(0, 3, 1000)
    t0 = time.perf_counter()
    lt = KNNLabelTransfer(workers=1).fit(z, labels, ref_batches=batches)
    lt.predict(rng.normal(size=(1000, 10)))
    assert time.perf_counter() - t0 < 2.0


# ----------------------------------------------------------------------------- neighbour search


def test_approximate_index_agrees_with_exact_and_is_repeatable():
    pytest.importorskip("faiss")
    z, labels, studies = atlas(5, n_studies=4, n_per=900, n_small=500, a_sd=0.6, f_offset=4.0, shift_sd=0.3)
    rng = np.random.default_rng(1)
    z = z + rng.normal(0.0, 0.05, z.shape)  # ~20k cells, overlapping clusters (F next to A)
    z = np.vstack([z, z + rng.normal(0.0, 0.3, z.shape)])
    labels, studies = np.concatenate([labels, labels]), np.concatenate([studies, studies])
    ref = studies != "study_3"
    q = z[~ref]
    approx = KNNLabelTransfer(workers=2, method="ivf").fit(z[ref], labels[ref], ref_batches=studies[ref])
    assert approx.method.startswith("faiss IndexIVFFlat")
    exact = KNNLabelTransfer.from_state(z[ref], labels[ref], approx.state(), workers=2, method="exact")
    assert exact.method == KNNLabelTransfer.EXACT_METHOD
    a, e = approx.predict(q), exact.predict(q)
    assert (a.knn_prediction == e.knn_prediction).mean() >= 0.99
    assert (a.prediction == e.prediction).mean() >= 0.99
    # nprobe is tuned on what label transfer reads: labels (above), the k_novelty nearest
    # (the distance statistic) and, more loosely, recall@k (the label weights)
    _, ia = approx.index.ivf.search(q, approx.k)
    _, ie = exact.index.tree.query(q, k=exact.k)
    assert (ia[:, :, None] == ie[:, None, :]).any(axis=2).mean() >= 0.85
    kn = approx.k_novelty
    assert (ia[:, :kn, None] == ie[:, None, :kn]).any(axis=2).mean() >= 0.95
    assert approx.index.ivf.label_agreement >= 0.995 and approx.index.ivf.recall_novelty >= 0.95
    # repeatable: a second fit, and a rebuild from the state, give identical output
    again = KNNLabelTransfer(workers=2, method="ivf").fit(z[ref], labels[ref], ref_batches=studies[ref])
    rebuilt = KNNLabelTransfer.from_state(z[ref], labels[ref], approx.state(), workers=2, method="ivf")
    for other in (again, rebuilt):
        b = other.predict(q)
        assert other.method == approx.method
        assert np.array_equal(a.prediction, b.prediction)
        assert np.array_equal(a.uncertainty, b.uncertainty)
        assert np.array_equal(a.novelty_score, b.novelty_score)


def test_auto_method_is_exact_for_small_references():
    z, labels, _ = atlas(6, n_studies=1)
    lt = KNNLabelTransfer(workers=1).fit(z, labels)
    assert lt.method == KNNLabelTransfer.EXACT_METHOD and lt.index.ivf is None
    with pytest.raises(SettingError, match="method"):
        KNNLabelTransfer(method="annoy")


def test_a_large_query_searches_the_tuned_index_and_a_small_one_stays_exact(monkeypatch):
    """With method "auto", a query of APPROX_MIN_QUERY cells or more against a reference of at
    least QUERY_IVF_MIN_REFERENCE cells searches a tuned IVF index (built once); a smaller query
    of the same fitted transfer still searches the exact tree, and the calls agree."""
    pytest.importorskip("faiss")
    import fedarches.labels.knn as knn

    z, labels, studies = atlas(5, n_studies=4, n_per=900, n_small=500, a_sd=0.6, f_offset=4.0, shift_sd=0.3)
    ref = studies != "study_3"
    lt = KNNLabelTransfer(workers=2).fit(z[ref], labels[ref], ref_batches=studies[ref])
    assert lt.index.ivf is None and lt.method == KNNLabelTransfer.EXACT_METHOD
    q = z[~ref]
    exact = lt.predict(q)
    assert lt.index.query_ivf is None  # below the query size: nothing built
    monkeypatch.setattr(knn, "APPROX_MIN_QUERY", len(q))
    monkeypatch.setattr(knn, "QUERY_IVF_MIN_REFERENCE", int(ref.sum()))
    large = lt.predict(q)
    ivf = lt.index.query_ivf
    assert ivf is not None and ivf.label_agreement >= 0.995 and ivf.recall_novelty >= 0.95
    assert "faiss IndexIVFFlat" in lt.index.query_description(len(q))
    assert (large.prediction == exact.prediction).mean() >= 0.99
    assert (large.is_unknown == exact.is_unknown).mean() >= 0.99
    assert lt.index.for_query(len(q) - 1) is None  # one cell fewer: the exact tree again
    assert np.array_equal(lt.predict(q).novelty_score, large.novelty_score)  # built once, repeatable


def test_k_is_capped_so_a_small_label_can_win_its_cells():
    rng = np.random.default_rng(0)
    big = rng.normal(0.0, 1.0, (400, 10))
    small = rng.normal(0.0, 0.5, (20, 10)) + np.r_[5.0, np.zeros(9)]  # 20 cells, a tight type near the big one
    ref = np.vstack([big, small])
    labels = np.array(["big"] * 400 + ["small"] * 20)
    query = rng.normal(0.0, 0.5, (50, 10)) + np.r_[5.0, np.zeros(9)]
    capped = KNNLabelTransfer(workers=1).fit(ref, labels, k=50)
    fixed = KNNLabelTransfer(workers=1).fit(ref, labels, k=50, cap_k=False)
    assert capped.k == 20 and fixed.k == 50
    right_capped = (capped.predict(query).knn_prediction == "small").mean()
    right_fixed = (fixed.predict(query).knn_prediction == "small").mean()
    assert right_capped > right_fixed and right_capped >= 0.8, (right_capped, right_fixed)


def test_errors_name_their_check_and_stay_input_errors():
    z, labels, _ = atlas(3, n_studies=1)
    codes = np.searchsorted(TYPES, labels)
    with pytest.raises(SettingError, match="^setting check failed: fpr"):
        ClassGaussianNovelty().fit(z, codes, len(TYPES), fpr=0.0)
    with pytest.raises(SettingError, match="workers"):
        KNNLabelTransfer(workers=0)
    with pytest.raises(LatentError, match="^latent check failed"):
        KNNLabelTransfer(workers=1).fit(z[:, :0], labels)
    for cls in (SettingError, LatentError, ColumnError, LabelStateError):
        assert issubclass(cls, InputDataError)
    lt = KNNLabelTransfer(workers=1).fit(z, labels)
    assert lt.min_label_cells == 100  # the default in effect for fit
    with pytest.raises(TypeError):
        KNNLabelTransfer.from_state(z, labels, lt.state(), cap_k=True)  # removed: it was ignored


def _shifted_query(seed: int, spread: float) -> tuple[KNNLabelTransfer, np.ndarray, np.ndarray]:
    """A reference of types A-E, and a query study in another state: every known cell
    spread ``spread`` times wider around its type (farther from the reference than
    reference studies are from one another), plus the unseen type F far off."""
    z, labels, studies = atlas(seed, f_offset=12.0, shift_sd=0.2, n_small=150)
    ref = (studies != "study_3") & (labels != "type_F")
    lt = KNNLabelTransfer(workers=1).fit(z[ref], labels[ref], ref_batches=studies[ref], fpr=0.01)
    q = studies == "study_3"
    zq, truth = z[q].copy(), labels[q]
    known = truth != "type_F"
    for t in np.unique(truth[known]):
        m = truth == t
        centre = z[ref][labels[ref] == t].mean(0)
        zq[m] = centre + spread * (zq[m] - centre)
    return lt, zq, truth


def test_query_shift_guard_keeps_false_alarms_low_in_a_shifted_state():
    lt, zq, truth = _shifted_query(3, spread=1.6)
    known = truth != "type_F"
    fixed = lt.predict(zq, adapt_to_query=False)
    adapted = lt.predict(zq)
    # calibrated on the reference alone, the shifted state flags a large share of known cells ...
    assert fixed.is_novel[known].mean() > 0.2
    # ... the guard divides each study's scores by its median excess and keeps them low,
    assert adapted.is_novel[known].mean() <= 0.05
    assert float(adapted.query_shift[0]) > 1.0 and np.unique(adapted.query_shift).size == 1
    # while the unseen type, a minority of the study, is still called unknown
    assert adapted.is_unknown[~known].mean() >= 0.9


def test_query_shift_guard_is_off_for_reference_like_queries_and_per_study():
    lt, zq, truth = _shifted_query(4, spread=1.0)
    adapted, fixed = lt.predict(zq), lt.predict(zq, adapt_to_query=False)
    unseen = truth == "type_F"
    # a query no farther than the reference keeps (nearly) the reference calibration:
    # the unseen type (18% of the study) lifts the median only a little
    assert float(adapted.query_shift.max()) <= 1.15
    assert adapted.is_novel[unseen].mean() >= fixed.is_novel[unseen].mean() - 0.02
    assert adapted.is_novel[~unseen].mean() <= fixed.is_novel[~unseen].mean()
    # known types of a new study sit where the cross-study calibration expects them
    calm = lt.predict(zq[~unseen])
    assert float(calm.query_shift.max()) <= 1.05
    # exactly the reference calibration when the query is closer than that (clipped at 1)
    inner = lt.predict(zq[~unseen] * 0.0 + lt.gaussian.means[lt.predict(zq[~unseen]).knn_code])
    assert np.all(inner.query_shift == 1.0)
    # one guard per query study: a shifted study does not relax the other one
    _, zs, _ = _shifted_query(4, spread=1.6)
    zc = zq[~unseen]
    both = np.vstack([zc, zs])
    batches = np.array(["calm"] * len(zc) + ["shifted"] * len(zs))
    res = lt.predict(both, query_batches=batches)
    assert float(res.query_shift[:len(zc)].max()) <= 1.05 and np.all(res.query_shift[len(zc):] > 1.2)
    # too few cells of a study to place their own median: the reference calibration
    few = lt.predict(zs[:10])
    assert np.all(few.query_shift == 1.0)


def test_states_without_the_guard_statistic_still_load(tmp_path):
    z, labels, studies = atlas(5)
    lt = KNNLabelTransfer(workers=1).fit(z, labels, ref_batches=studies)
    state = lt.state()
    assert np.isfinite(state["reference_median_score"]).all()
    old = {k: v for k, v in state.items() if k != "reference_median_score"}
    loaded = KNNLabelTransfer.from_state(z, labels, old, label_categories=lt.label_categories)
    assert np.all(loaded.predict(z[:100]).query_shift == 1.0)
    again = KNNLabelTransfer.from_state(z, labels, state, label_categories=lt.label_categories)
    assert again.reference_median_score == lt.reference_median_score


def test_classifier_probabilities_make_the_call_and_the_novelty_tests_stay():
    z, labels, studies = atlas(6)
    ref = studies != "study_3"
    lt = KNNLabelTransfer(workers=1).fit(z[ref], labels[ref], ref_batches=studies[ref])
    zq = z[~ref]
    n, k = zq.shape[0], len(lt.label_categories)
    probs = np.full((n, k), 0.1 / (k - 1))
    probs[:, 2] = 0.9  # a classifier that says "label 2" for every cell
    res = lt.predict(zq, classifier_probabilities=probs)
    plain = lt.predict(zq)
    assert (res.knn_prediction == lt.label_categories[2]).all()
    np.testing.assert_allclose(res.uncertainty, 0.1, rtol=1e-5)
    # the distance thresholds follow the neighbours, the class-Gaussian test ignores the call
    np.testing.assert_array_equal(res.distance_score, plain.distance_score)
    np.testing.assert_array_equal(res.gaussian_score, plain.gaussian_score)
    # without the query adaptation the score is the reference-calibrated one, whoever calls
    fixed = lt.predict(zq, classifier_probabilities=probs, adapt_to_query=False)
    np.testing.assert_array_equal(fixed.novelty_score, lt.predict(zq, adapt_to_query=False).novelty_score)
    with pytest.raises(LatentError):
        lt.predict(zq, classifier_probabilities=probs[:, :2])


def test_population_statistic_rescues_a_population_and_ignores_a_lone_cell():
    from fedarches.labels.query_shift import neighbourhood_median, study_groups

    rng = np.random.default_rng(0)
    known = rng.normal(0.0, 1.0, (200, 5))
    new = rng.normal(8.0, 0.5, (60, 5))
    z = np.vstack([known, new])
    values = np.r_[np.full(200, 0.5), np.full(60, 1.2)]
    values[5] = 3.0  # one known cell with a high score: its neighbours are known
    values[200:210] = 0.9  # cells of the new population just inside the threshold
    out = neighbourhood_median(z, values, study_groups(None, len(z)))
    assert out[5] < 1.0  # a lone high cell does not fire the population statistic
    assert np.all(out[200:210] > 1.0)  # the new population's cells inside the threshold are rescued
    # a study too small for its own statistic keeps each cell's value
    small = neighbourhood_median(z[:20], values[:20], study_groups(None, 20))
    np.testing.assert_array_equal(small, values[:20])


def test_label_thresholds_are_measured_on_new_cells_and_small_labels_stay_tight():
    """A 40-cell label of a new study is not flagged wholesale (its threshold is measured
    on cells its Gaussian was not fitted on); an 18-cell label keeps the in-sample
    quantile, so it does not widen into its neighbours' space."""
    from fedarches.labels.novelty import own_shape_cells

    rng = np.random.default_rng(3)
    dims = 10
    centers = rng.normal(0.0, 8.0, (5, dims))
    sizes = [300, 300, 300, 40, 18]

    def draw(scale):
        n = [int(s * scale) for s in sizes]
        z = np.vstack([centers[t] + rng.normal(0.0, 1.0, (n[t], dims)) for t in range(5)])
        return z, np.repeat(np.arange(5), n)

    z_ref, c_ref = draw(1.0)
    z_new, c_new = draw(5.0)  # new cells of the same five types
    g = ClassGaussianNovelty().fit(z_ref, c_ref, 5, fpr=0.01)
    assert own_shape_cells(dims) == 30
    rate_40 = (g.score(z_new[c_new == 3]) > 1).mean()
    assert rate_40 <= 0.03, rate_40  # in-sample thresholds flag about 5.5% here
    assert (g.score(z_new[c_new < 3]) > 1).mean() <= 0.03

    def in_sample(c):
        own = np.sqrt(np.square((z_ref[c_ref == c] - g.means[c]) @ g.whiten[c]).sum(1))
        return float(np.quantile(own, 0.99))

    assert g.thresholds[3] > in_sample(3)  # cross-validated: wider than in-sample
    assert g.thresholds[4] == pytest.approx(in_sample(4))  # small: in-sample, conservative


def test_population_of_a_label_decides_and_a_lone_cell_needs_a_clear_margin():
    """The query-adapted score: a known type's edge cell just above its threshold is not
    flagged alone (its label's query neighbours are calm); a new population just above
    the threshold is; an unsure call lifts the score (labels/query_shift.py)."""
    from fedarches.labels.query_shift import ISOLATED_FACTOR, adapted_scores, study_groups

    rng = np.random.default_rng(1)
    known = rng.normal(0.0, 1.0, (300, 5))
    new = rng.normal(6.0, 0.5, (60, 5))
    z = np.vstack([known, new])
    raw = np.r_[np.full(300, 0.5), np.full(60, 1.1)]
    raw[7] = 1.2  # an edge cell of the known type, just beyond its threshold
    raw[9] = ISOLATED_FACTOR * 1.1  # far beyond: flagged on its own
    codes = np.zeros(len(z), dtype=np.int64)  # everything gets the known type's label
    calm = np.zeros(len(z))
    groups = study_groups(None, len(z))
    score, shift = adapted_scores(z, raw, calm, codes, groups, reference_median=0.5)
    assert np.all(shift == 1.0)
    assert score[7] < 1.0 and score[9] > 1.0
    assert np.all(score[300:] > 1.0)
    # an unsure call needs less distance: the same new cells at 0.8 are flagged only when unsure
    raw2 = raw.copy()
    raw2[300:] = 0.8
    unsure = calm.copy()
    unsure[300:] = 0.6
    assert np.all(adapted_scores(z, raw2, calm, codes, groups, 0.5)[0][300:] < 1.0)
    assert np.all(adapted_scores(z, raw2, unsure, codes, groups, 0.5)[0][300:] > 1.0)


def test_a_new_type_spread_thinly_over_labels_takes_its_study_population():
    """Cells whose (study, label) is too small for a population of its own take the median
    of their study's nearest cells, any label: a new type split into small label fragments
    is still a population; the large known label's cells keep their own population."""
    from fedarches.labels.query_shift import MIN_POPULATION, adapted_scores, study_groups

    rng = np.random.default_rng(2)
    known = rng.normal(0.0, 1.0, (300, 5))
    new = rng.normal(6.0, 0.5, (60, 5))
    z = np.vstack([known, new])
    raw = np.r_[np.full(300, 0.5), np.full(60, 1.1)]
    codes = np.r_[np.zeros(300, dtype=np.int64), 1 + np.arange(60) % 4]  # 4 labels of 15 new cells each
    assert 60 // 4 < MIN_POPULATION
    score, _ = adapted_scores(z, raw, np.zeros(len(z)), codes, study_groups(None, len(z)), reference_median=0.5)
    assert np.all(score[300:] > 1.0) and np.all(score[:300] < 1.0)


def test_population_trees_are_sampled_for_large_studies(monkeypatch):
    """Above MAX_TREE_CELLS cells in a study, each label's neighbour tree is a seeded sample at
    the study's rate, searched (1 + SAMPLED_EPS)-approximately: the calls stay what they are with
    full, exact trees, and repeat exactly."""
    import fedarches.labels.query_shift as qs

    rng = np.random.default_rng(3)
    z = np.vstack([rng.normal(0.0, 1.0, (300, 5)), rng.normal(6.0, 0.5, (100, 5))])
    raw = np.r_[np.full(300, 0.5), np.full(100, 1.1)]
    codes = np.r_[np.zeros(300, dtype=np.int64), np.ones(100, dtype=np.int64)]
    groups, calm = qs.study_groups(None, len(z)), np.zeros(len(z))
    full, _ = qs.adapted_scores(z, raw, calm, codes, groups, 0.5)
    monkeypatch.setattr(qs, "MAX_TREE_CELLS", 100)  # study rate 0.25: trees of 75 and 25 cells
    sampled, _ = qs.adapted_scores(z, raw, calm, codes, groups, 0.5)
    again, _ = qs.adapted_scores(z, raw, calm, codes, groups, 0.5)
    np.testing.assert_array_equal(sampled, again)
    np.testing.assert_array_equal(sampled > 1.0, full > 1.0)


def test_a_query_cluster_whose_calls_scatter_is_a_new_population_and_one_split_over_two_labels_is_not():
    """A new type has no label to map to, so its calls scatter over many labels while each of
    its cells sits just under its threshold (the simulated unrelated type: found in 27-50% of
    its cells on the worst seed before this rule). A known type in a new state, even one the
    model mis-maps over two labels, is not mixed in that sense and keeps its calls; a mixed
    cluster that scores as the reference does (T cells over CD4/CD8/NK) is not new either."""
    from fedarches.labels import query_shift
    from fedarches.labels.query_shift import adapted_scores, mixed_cluster_scores, study_groups

    rng = np.random.default_rng(5)
    centres = rng.normal(0.0, 8.0, (4, 6))
    z = np.vstack([rng.normal(c, 0.5, (120, 6)) for c in centres])
    new, split, known, calm = (slice(i * 120, (i + 1) * 120) for i in range(4))
    codes = np.zeros(480, dtype=np.int64)
    codes[new] = rng.integers(0, 6, 120)  # calls scatter over six labels
    codes[split] = np.r_[np.full(60, 1), np.full(60, 2)]  # a mis-mapped known type: two labels
    codes[known] = 3
    codes[calm] = rng.integers(3, 6, 120)  # mixed calls, but scores like the reference
    raw = np.full(480, 0.5)
    raw[new] = raw[split] = 0.95  # just under every threshold
    groups = study_groups(None, 480)
    mixed = mixed_cluster_scores(z, raw, codes, groups, reference_median=0.5)
    assert np.all(mixed[new] > 1.0)
    assert np.all(mixed[split] == 0.0) and np.all(mixed[known] == 0.0)
    assert np.all((mixed[calm] > 0.0) & (mixed[calm] < 1.0))
    # through the whole rule (the bulk of the query scores as the reference, so no shift guard)
    bulk = raw.copy()
    bulk[split] = 0.5
    score, shift = adapted_scores(z, bulk, np.zeros(480), codes, groups, reference_median=0.5)
    assert np.all(shift == 1.0)
    assert np.all(score[new] > 1.0) and np.all(score[split] < 1.0) and np.all(score[known] < 1.0)
    # a study larger than the clustering sample: the rest join their nearest sampled cell's cluster
    cap, query_shift.MAX_CLUSTER_CELLS = query_shift.MAX_CLUSTER_CELLS, 200
    try:
        sampled = mixed_cluster_scores(z, raw, codes, groups, reference_median=0.5)
    finally:
        query_shift.MAX_CLUSTER_CELLS = cap
    assert np.all(sampled[new] > 1.0) and np.all(sampled[split] == 0.0) and np.all(sampled[known] == 0.0)
    # without a reference median (a state saved before it) the rule stays off
    assert np.all(mixed_cluster_scores(z, raw, codes, groups, reference_median=float("nan")) == 0.0)


def test_a_population_confirms_a_cell_near_its_threshold_but_never_overrules_one_inside_it():
    """A small known type whose label a new type also takes (PBMC's dendritic cells, which the
    held-out B cells were called) keeps its calls: the population lifts a cell's score to at
    most POPULATION_LIFT times its own, so a cell well inside its threshold stays known while a
    cell near it, among new neighbours, is flagged."""
    from fedarches.labels.query_shift import POPULATION_LIFT, adapted_scores, study_groups

    rng = np.random.default_rng(3)
    known = rng.normal(0.0, 1.0, (300, 5))
    new = rng.normal(6.0, 0.3, (60, 5))
    small = rng.normal(6.0, 0.3, (10, 5))  # a small known type in the new type's midst, same label
    z = np.vstack([known, new, small])
    raw = np.r_[np.full(300, 0.5), np.full(60, 1.6), np.full(10, 0.6)]
    raw[-1] = 0.95  # near its threshold: its new neighbours decide
    codes = np.r_[np.zeros(300, dtype=np.int64), np.ones(70, dtype=np.int64)]
    score, _ = adapted_scores(z, raw, np.zeros(len(z)), codes, study_groups(None, len(z)), reference_median=0.5)
    assert np.all(score[300:360] > 1.0)
    assert np.all(score[360:369] <= POPULATION_LIFT * 0.6 + 1e-12) and np.all(score[360:369] < 1.0)
    assert score[-1] > 1.0
