"""Label knowledge as class summaries (issue 9): the summaries themselves, label transfer from
them alone, and a `summaries` atlas version that holds no per-cell array anywhere."""

from __future__ import annotations

import numpy as np
import pytest

from fedarches.errors import LabelStateError, SettingError
from fedarches.labels.summaries import ClassSummaries, SummaryOptions, state_bytes_bound


def _latents(seed: int = 0, n_per: int = 150, shift: float = 0.15):
    """Three known types in two studies (a small study offset), one tiny type, and a query
    study holding the known types plus a type the reference lacks."""
    rng = np.random.default_rng(seed)
    centres = {"a": [0, 0, 0, 0], "b": [4, 0, 0, 0], "c": [0, 4, 0, 0], "tiny": [0, 0, 4, 0], "rare": [0, 0, 0, 4],
               "new": [2, 2, 2.5, 2]}

    def cells(t, n, offset):
        scale = np.array([1.0, 0.5, 0.5, 0.3])
        return rng.normal(size=(n, 4)) * scale * 0.6 + np.asarray(centres[t], float) + offset

    z, labels, studies = [], [], []
    for s, offset in (("s0", 0.0), ("s1", shift)):
        for t, n in (("a", n_per), ("b", n_per), ("c", n_per // 2), ("tiny", 6), ("rare", 2)):
            z.append(cells(t, n, offset))
            labels += [t] * n
            studies += [s] * n
    q, q_labels = [], []
    for t, n in (("a", 100), ("b", 100), ("c", 50), ("new", 60)):
        q.append(cells(t, n, shift / 2))
        q_labels += [t] * n
    return (np.vstack(z).astype(np.float32), np.array(labels), np.array(studies),
            np.vstack(q).astype(np.float32), np.array(q_labels))


@pytest.fixture(scope="module")
def fitted():
    z, labels, studies, q, q_labels = _latents()
    s = ClassSummaries.fit(z, labels, ref_batches=studies)
    return s, z, labels, q, q_labels


def test_every_component_stands_for_k_min_cells_and_no_array_grows_with_cells(fitted):
    s, z, labels, _, _ = fitted
    state = s.state()
    assert s.components.count.min() >= s.options.k_min == 20
    for key, value in state.items():
        assert all(d < len(z) // 4 for d in np.asarray(value).shape), key
    size = sum(np.asarray(v).nbytes for v in state.values())
    assert size <= state_bytes_bound(len(s.label_categories), z.shape[1], s.options.max_components)
    # 12 cells (>= k_min / 2): one component padded with the nearest other cells up to k_min
    tiny = s.label_categories.index("tiny")
    assert s.components.count[s.components.label == tiny].tolist() == [20]
    # ... and its class Gaussian is fitted on those 20 cells, never on its 12 alone
    own = z[labels == "tiny"].astype(np.float64)
    others = z[labels != "tiny"].astype(np.float64)
    near = others[np.argsort(((others - own.mean(0)) ** 2).sum(1))[:20 - len(own)]]
    assert np.allclose(s.gaussian.means[tiny], np.vstack([own, near]).mean(0))
    assert not np.allclose(s.gaussian.means[tiny], own.mean(0), atol=1e-3)
    # 4 cells: nothing published, not even a class Gaussian or a threshold of its own
    rare = s.label_categories.index("rare")
    assert rare not in set(s.components.label.tolist())
    assert s.gaussian.fitted[rare] == np.False_
    assert s.thresholds.label_thresholds[rare] == s.thresholds.global_threshold


def test_summaries_detect_a_new_type_and_keep_known_types(fitted):
    s, _, _, q, q_labels = fitted
    res = ClassSummaries.from_state(s.state(), s.label_categories).predict(q)
    known = q_labels != "new"
    assert (res.prediction[known] == q_labels[known]).mean() >= 0.95
    assert res.is_unknown[~known].mean() >= 0.9
    assert res.is_unknown[known].mean() <= 0.05
    for field in ("uncertainty", "novelty_score", "query_shift", "distance_score", "gaussian_score"):
        assert getattr(res, field).shape == (len(q),)


def test_state_round_trip_gives_identical_predictions(fitted):
    s, _, _, q, _ = fitted
    again = ClassSummaries.from_state(s.state(), s.label_categories)
    a, b = s.predict(q), again.predict(q)
    assert (a.prediction == b.prediction).all()
    np.testing.assert_array_equal(a.novelty_score, b.novelty_score)
    np.testing.assert_array_equal(a.uncertainty, b.uncertainty)


def test_classifier_probabilities_make_the_call(fitted):
    s, _, _, q, _ = fitted
    p = np.zeros((len(q), len(s.label_categories)), dtype=np.float32)
    p[:, s.label_categories.index("b")] = 1.0
    res = s.predict(q, classifier_probabilities=p)
    assert set(res.knn_prediction.tolist()) == {"b"}
    assert (res.uncertainty == 0).all()
    with pytest.raises(Exception, match="latent check failed"):
        s.predict(q, classifier_probabilities=p[:10])


def test_state_below_k_min_or_incomplete_is_refused(fitted):
    s = fitted[0]
    state = s.state()
    bad = {**state, "component_count": np.full_like(state["component_count"], 3)}
    with pytest.raises(LabelStateError, match="fewer than k_min"):
        ClassSummaries.from_state(bad, s.label_categories)
    with pytest.raises(LabelStateError, match="missing"):
        ClassSummaries.from_state({k: v for k, v in state.items() if k != "label_thresholds"}, s.label_categories)
    with pytest.raises(LabelStateError, match="labels"):
        ClassSummaries.from_state(state, s.label_categories[:-1])


def test_bad_options_are_refused():
    z, labels, studies, _, _ = _latents()
    with pytest.raises(SettingError):
        ClassSummaries.fit(z, labels, options=SummaryOptions(k_min=1))
    with pytest.raises(SettingError):
        ClassSummaries.fit(z, labels, options=SummaryOptions(statistic="nope"))


def test_query_shift_guard_applies_over_query_cells(fitted):
    s, _, _, q, q_labels = fitted
    shifted = q + np.array([0.0, 0.0, 0.0, 0.6], dtype=np.float32)  # every query cell moves
    guarded = s.predict(shifted)
    fixed = s.predict(shifted, adapt_to_query=False)
    known = q_labels != "new"
    assert guarded.query_shift[0] > 1.0
    assert guarded.is_unknown[known].mean() < fixed.is_unknown[known].mean()


def test_merged_summaries_grow_by_label_name_and_label_the_new_type(fitted):
    """A site's summaries of its labelled cells (incl. a type the reference lacks) join the
    reference's; the classifier knows only the reference labels, the generative rule the rest."""
    s, _, _, q, q_labels = fitted
    site = ClassSummaries.fit(q, q_labels)
    grown = s.merged(site)
    assert grown.label_categories == [*s.label_categories, "new"]
    assert grown.n_components == s.n_components + site.n_components
    assert grown.components.count.min() >= 20
    again = ClassSummaries.from_state(grown.state(), grown.label_categories)
    clf = np.zeros((len(q), len(s.label_categories)), dtype=np.float32)
    for i, t in enumerate(q_labels):
        if t in s.label_categories:
            clf[i, s.label_categories.index(t)] = 1.0
        else:
            clf[i] = 1.0 / clf.shape[1]
    res = again.predict(q, classifier_probabilities=clf)
    new = q_labels == "new"
    assert (res.prediction[new] == "new").mean() >= 0.9
    assert (res.prediction[~new] == q_labels[~new]).mean() >= 0.95
    assert s.merged(site).state().keys() == grown.state().keys()
    with pytest.raises(LabelStateError):
        s.merged(ClassSummaries.fit(q[:, :3], q_labels))


def _direct_scores(s, q):
    """The distance score, class Gaussian score and generative posterior in their direct form:
    one Gaussian at a time, per-label log-sum-exp (what the one-product scorer must equal)."""
    from scipy.special import logsumexp

    c = s.components
    q = np.asarray(q, dtype=np.float64)
    d = np.stack([np.sqrt(np.square((q - c.means[i]) @ c.whiten[i]).sum(1)) for i in range(c.n)], axis=1)
    labels = np.unique(c.label)
    per = np.stack([d[:, c.label == y].min(1) / s.thresholds.label_thresholds[y] for y in labels], axis=1)
    dens = -0.5 * d ** 2 - 0.5 * c.log_det + np.log(c.count)
    lp = np.full((len(q), len(s.label_categories)), -np.inf)
    for y in labels:
        lp[:, y] = logsumexp(dens[:, c.label == y], axis=1)
    return per.min(1), s.gaussian.score(q), np.exp(lp - logsumexp(lp, axis=1, keepdims=True))


def test_one_product_scorer_equals_the_direct_form(fitted):
    from fedarches.labels.summaries import _Scorer

    s, z, labels, q, _ = fitted
    far = q * 3.0 + 5.0  # cells far from every component: large terms, tiny densities
    site = ClassSummaries.fit(q[-60:], np.array(["new"] * 60))
    for summ in (s, s.merged(site)):
        for cells in (q, far):
            dist, gauss, guard, post = _Scorer.of(summ).chunk(cells, True)
            d0, g0, p0 = _direct_scores(summ, cells)
            if summ is s:
                assert guard is None  # no label added by a site: the guard reads the raw score
            else:  # the guard reads the score against the reference's own labels (and their components)
                own = summ.restricted(s.label_categories)
                np.testing.assert_allclose(guard, np.maximum(*_direct_scores(own, cells)[:2]), rtol=1e-9)
                assert (guard >= np.maximum(d0, g0) - 1e-12).all() and own.n_components == s.n_components
            np.testing.assert_allclose(dist, d0, rtol=1e-9)
            np.testing.assert_allclose(gauss, g0, rtol=1e-9)
            np.testing.assert_allclose(post, p0, rtol=1e-9, atol=1e-12)
        res = summ.predict(q, return_probabilities=True, adapt_to_query=False)
        d0, g0, p0 = _direct_scores(summ, q)
        np.testing.assert_allclose(res.distance_score, d0, rtol=1e-6)
        np.testing.assert_allclose(res.gaussian_score, g0, rtol=1e-6)
        np.testing.assert_allclose(res.probabilities, p0, rtol=1e-5, atol=1e-7)
