"""The seeded count simulator: determinism, sparsity, NB sampling, held-out types, study effects."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from fedarches.data.simulate import _nb_block, cell_type_names, simulate
from fedarches.errors import InputDataError


def _same(a, b) -> bool:
    return (
        a.shape == b.shape
        and np.array_equal(a.X.indptr, b.X.indptr)
        and np.array_equal(a.X.indices, b.X.indices)
        and np.array_equal(a.X.data, b.X.data)
        and a.obs.equals(b.obs)
        and list(a.var_names) == list(b.var_names)
    )


def test_identical_arguments_give_identical_data_whatever_the_threads():
    a = simulate(n_cells=9000, n_genes=120, seed=5, n_jobs=1)  # 3 random-stream blocks
    b = simulate(n_cells=9000, n_genes=120, seed=5, n_jobs=2)
    c = simulate(n_cells=9000, n_genes=120, seed=6, n_jobs=1)
    assert _same(a, b)
    assert not _same(a, c)


def test_output_is_sparse_integer_float32_csr_with_named_studies_and_types():
    adata = simulate(n_cells=2000, n_genes=2000, n_cell_types=6, n_studies=4, seed=0, n_jobs=1)
    x = adata.X
    assert sp.issparse(x) and x.format == "csr" and x.dtype == np.float32
    assert x.has_canonical_format  # sorted indices, no duplicates
    assert (x.data > 0).all() and np.array_equal(x.data, np.round(x.data))  # positive integers, no stored zeros
    zeros = 1.0 - x.nnz / (x.shape[0] * x.shape[1])
    assert 0.80 <= zeros <= 0.95, zeros
    assert adata.var_names.is_unique and adata.obs_names.is_unique
    assert list(adata.obs["study"].cat.categories) == ["study_0", "study_1", "study_2", "study_3"]
    assert list(adata.obs["cell_type"].cat.categories) == [f"type_{c}" for c in "ABCDEF"]
    assert adata.obs["study"].value_counts().tolist() == [500] * 4
    assert adata.varm["type_log_program"].shape == (2000, 6)
    assert adata.varm["study_log_effect"].shape == (2000, 4)


def test_held_out_types_are_missing_from_their_studies_only():
    held = {"study_0": ["type_C"], "study_1": ["type_C", "type_A"]}
    adata = simulate(n_cells=3000, n_genes=100, n_cell_types=4, n_studies=3, held_out=held, seed=1, n_jobs=1)
    counts = adata.obs.groupby(["study", "cell_type"], observed=False).size()
    for study in ("study_0", "study_1", "study_2"):
        for t in ("type_A", "type_B", "type_C", "type_D"):
            absent = t in held.get(study, [])
            assert (counts[(study, t)] == 0) == absent, (study, t, counts[(study, t)])
    assert adata.uns["simulate"]["held_out"] == held


def _log_means(x: sp.csr_matrix) -> np.ndarray:
    """log mean of library-normalised expression per gene."""
    lib = np.asarray(x.sum(axis=1)).ravel()
    norm = sp.diags(1e4 / lib) @ x
    return np.log(np.asarray(norm.mean(axis=0)).ravel() + 1e-3)


def _study_vs_replicate_gap(adata) -> tuple[float, float]:
    """Mean |log-mean difference| over expressed genes for one cell type:
    study_0 vs study_1, and two random halves of study_0 (sampling noise only)."""
    ct = adata.obs["cell_type"].to_numpy()
    st = adata.obs["study"].to_numpy()
    x = adata.X
    s0 = np.flatnonzero((ct == "type_A") & (st == "study_0"))
    s1 = np.flatnonzero((ct == "type_A") & (st == "study_1"))
    halves = np.random.default_rng(0).permutation(s0)
    h1, h2 = halves[: len(halves) // 2], halves[len(halves) // 2:]
    m0, m1, a, b = (_log_means(x[i]) for i in (s0, s1, h1, h2))
    expressed = np.asarray(x[s0].mean(axis=0)).ravel() > 0.5
    return float(np.abs(m0 - m1)[expressed].mean()), float(np.abs(a - b)[expressed].mean())


def test_study_effects_exist_and_are_controlled_by_their_parameters():
    kw = {"n_cells": 4000, "n_genes": 400, "n_cell_types": 2, "n_studies": 2, "seed": 3, "n_jobs": 1}
    with_effect = simulate(**kw, study_gene_sd=0.5, study_library_sd=0.5)
    without = simulate(**kw, study_gene_sd=0.0, study_library_sd=0.0)
    between, within = _study_vs_replicate_gap(with_effect)
    assert between > 2.0 * within, (between, within)
    between0, within0 = _study_vs_replicate_gap(without)
    assert between0 < 1.5 * within0, (between0, within0)

    # library size: the per-study factor shifts the median UMI count of a study
    def median_umis(adata, study):
        rows = (adata.obs["study"] == study).to_numpy()
        return float(np.median(np.asarray(adata.X[rows].sum(axis=1)).ravel()))

    shift = abs(np.log(median_umis(with_effect, "study_0") / median_umis(with_effect, "study_1")))
    shift0 = abs(np.log(median_umis(without, "study_0") / median_umis(without, "study_1")))
    truth = abs(np.diff(np.log(with_effect.obs.groupby("study", observed=True)["library_factor"].median()))[0])
    assert shift == pytest.approx(truth, abs=0.1) and shift > 0.1, (shift, truth)
    assert shift0 < 0.08


def test_cell_types_follow_their_programs():
    adata = simulate(n_cells=3000, n_genes=500, n_cell_types=3, n_studies=2, seed=4, n_jobs=1)
    prog = adata.varm["type_log_program"]
    ct = adata.obs["cell_type"].to_numpy()
    for t, name in enumerate(cell_type_names(3)):
        observed = _log_means(adata.X[np.flatnonzero(ct == name)])
        expressed = observed > np.log(1.0)
        assert np.corrcoef(observed[expressed], prog[expressed, t])[0, 1] > 0.8
        # its own markers (largest program excess over the other types) are up in it
        others = np.delete(prog, t, axis=1).max(axis=1)
        markers = np.argsort(prog[:, t] - others)[-5:]
        rest = _log_means(adata.X[np.flatnonzero(ct != name)])
        assert (observed[markers] > rest[markers]).all()


@pytest.mark.parametrize(("mu", "theta"), [(0.05, 2.0), (0.7, 0.5), (3.0, 2.0), (15.0, 1.0), (80.0, 0.4)])
def test_sampler_draws_the_negative_binomial(mu, theta):
    n = 200_000
    rng = np.random.default_rng(0)
    nnz, _cols, vals = _nb_block(rng, np.full(n, mu, np.float32), np.ones((1, 1), np.float32),
                                np.zeros(n, np.int64), np.array([theta], np.float32))
    x = np.zeros(n)
    x[np.repeat(np.arange(n), nnz)] = vals
    se_mean = np.sqrt((mu + mu * mu / theta) / n)
    assert x.mean() == pytest.approx(mu, abs=5 * se_mean)
    assert x.var() == pytest.approx(mu + mu * mu / theta, rel=0.08)
    p0 = (theta / (theta + mu)) ** theta
    assert (x == 0).mean() == pytest.approx(p0, abs=5 * np.sqrt(p0 * (1 - p0) / n) + 1e-4)


def test_bad_arguments_are_refused_with_a_reason():
    with pytest.raises(InputDataError, match="study 'study_9'"):
        simulate(n_cells=100, n_genes=20, n_studies=2, held_out={"study_9": ["type_A"]})
    with pytest.raises(InputDataError, match="type 'type_Z'"):
        simulate(n_cells=100, n_genes=20, n_cell_types=3, held_out={"study_0": ["type_Z"]})
    with pytest.raises(InputDataError, match="every cell type"):
        simulate(n_cells=100, n_genes=20, n_cell_types=2, held_out={"study_0": ["type_A", "type_B"]})
    with pytest.raises(InputDataError, match="n_cells"):
        simulate(n_cells=2, n_genes=20, n_studies=4)
    with pytest.raises(InputDataError, match="n_genes"):
        simulate(n_cells=10, n_genes=0)


def test_many_cell_types_get_unique_names():
    names = cell_type_names(30)
    assert names[:2] == ["type_A", "type_B"] and names[26:28] == ["type_AA", "type_AB"]
    assert len(set(names)) == 30


# ---------------------------------------------------------------- state and siblings

_STATE_KW = {"n_cells": 6000, "n_genes": 400, "n_cell_types": 3, "n_studies": 2, "seed": 7, "n_jobs": 1,
             "study_gene_sd": 0.0, "study_library_sd": 0.0}


def _type_log_means(adata, study: str) -> np.ndarray:
    """[types, genes] log mean of library-normalised expression of each type in one study."""
    ct, st = adata.obs["cell_type"].to_numpy(), adata.obs["study"].to_numpy()
    return np.array([_log_means(adata.X[np.flatnonzero((ct == t) & (st == study))])
                     for t in adata.obs["cell_type"].cat.categories])


def test_state_shifts_every_type_and_each_type_its_own_way():
    stim = simulate(**_STATE_KW, state_strength={"study_1": 1.0})
    ctrl = simulate(**_STATE_KW, state_strength={"study_1": 0.0})
    expressed = np.asarray(stim.X.mean(axis=0)).ravel() > 0.2
    shift = (_type_log_means(stim, "study_1") - _type_log_means(stim, "study_0"))[:, expressed]
    noise = (_type_log_means(ctrl, "study_1") - _type_log_means(ctrl, "study_0"))[:, expressed]
    size, noise_size = np.linalg.norm(shift, axis=1), np.linalg.norm(noise, axis=1)
    assert (size > 3 * noise_size).all(), (size, noise_size)
    # what one offset per study (the same for every type) cannot remove
    residual = np.linalg.norm(shift - shift.mean(axis=0), axis=1)
    noise_residual = np.linalg.norm(noise - noise.mean(axis=0), axis=1)
    assert (residual > 2 * noise_residual).all(), (residual, noise_residual)
    assert (stim.obs["state"] == np.where(stim.obs["study"] == "study_1", "stimulated", "control")).all()
    assert stim.uns["simulate"]["state_strength"] == {"study_0": 0.0, "study_1": 1.0}


def test_state_at_strength_one_is_about_a_marker_difference_and_not_one_offset():
    adata = simulate(n_cells=200, n_genes=2000, n_cell_types=6, n_studies=2, seed=1, n_jobs=1,
                     state_strength={"study_1": 1.0})
    prog, resp = adata.varm["type_log_program"], adata.varm["state_log_response"]
    assert resp.shape == (2000, 6)
    # marker part of a type difference: the programs minus their type-level noise
    n_markers, (lo, hi) = adata.uns["simulate"]["n_markers"], adata.uns["simulate"]["marker_log_fold_range"]
    marker_gap = np.sqrt(2 * n_markers * ((hi - lo) ** 2 / 12 + ((lo + hi) / 2) ** 2))
    shift = np.linalg.norm(resp, axis=0)
    assert (0.6 * marker_gap < shift).all() and (shift < 2.0 * marker_gap).all(), (shift, marker_gap)
    type_gap = np.linalg.norm(prog[:, 0] - prog[:, 1])
    assert shift.max() < type_gap
    common = resp.mean(axis=1, keepdims=True)
    assert (np.linalg.norm(resp - common, axis=0) > 0.3 * shift).all()


def test_state_at_strength_zero_is_no_state():
    plain = simulate(**_STATE_KW)
    zero = simulate(**_STATE_KW, state_strength={"study_0": 0.0, "study_1": 0.0})
    assert not _same(plain, zero)  # obs gained the state columns ...
    cols = ["study", "cell_type", "library_factor"]
    assert plain.obs.equals(zero.obs[cols])  # ... and nothing else changed
    for attr in ("indptr", "indices", "data"):
        assert np.array_equal(getattr(plain.X, attr), getattr(zero.X, attr))
    assert (zero.obs["state"] == "control").all() and (zero.obs["state_strength"] == 0).all()
    assert list(plain.obs.columns) == cols and "state_log_response" not in plain.varm
    assert "state_strength" not in plain.uns["simulate"] and "siblings" not in plain.uns["simulate"]


def test_a_close_sibling_is_nearer_its_parent_than_a_distant_one():
    sibs = {"close": ("type_A", 0.2), "far": ("type_A", 1.0)}
    adata = simulate(n_cells=5000, n_genes=500, n_cell_types=3, n_studies=2, seed=2, n_jobs=1, siblings=sibs,
                     held_out={"study_0": ["close", "far"]})
    plain = simulate(n_cells=5000, n_genes=500, n_cell_types=3, n_studies=2, seed=2, n_jobs=1)
    assert list(adata.obs["cell_type"].cat.categories) == ["type_A", "type_B", "type_C", "close", "far"]
    # siblings add types without changing the others' programs or the study effects
    assert np.array_equal(adata.varm["type_log_program"][:, :3], plain.varm["type_log_program"])
    assert np.array_equal(adata.varm["study_log_effect"], plain.varm["study_log_effect"])
    counts = adata.obs.groupby(["study", "cell_type"], observed=False).size()
    assert counts[("study_0", "close")] == 0 and counts[("study_0", "far")] == 0
    assert counts[("study_1", "close")] > 100 and counts[("study_1", "far")] > 100
    expressed = np.asarray(adata.X.mean(axis=0)).ravel() > 0.2
    means = dict(zip(adata.obs["cell_type"].cat.categories, _type_log_means(adata, "study_1")[:, expressed]))

    def gap(a, b):
        return float(np.linalg.norm(means[a] - means[b]))

    assert gap("close", "type_A") < 0.7 * gap("far", "type_A")
    assert gap("close", "type_A") < 0.7 * gap("type_B", "type_A")
    assert gap("far", "type_A") == pytest.approx(gap("type_B", "type_A"), rel=0.3)
    assert adata.uns["simulate"]["siblings"] == {"close": ["type_A", 0.2], "far": ["type_A", 1.0]}


def test_siblings_respond_to_the_state_like_their_parent_where_they_share_its_program():
    adata = simulate(n_cells=100, n_genes=1000, n_cell_types=3, n_studies=2, seed=4, n_jobs=1,
                     siblings={"close": ("type_A", 0.2)}, state_strength={"study_1": 1.0})
    resp = adata.varm["state_log_response"]
    assert np.linalg.norm(resp[:, 3] - resp[:, 0]) < 0.7 * np.linalg.norm(resp[:, 1] - resp[:, 0])


def test_bad_state_and_sibling_settings_are_refused_with_a_reason():
    kw = {"n_cells": 100, "n_genes": 50, "n_cell_types": 2, "n_studies": 2}
    with pytest.raises(InputDataError, match="state_strength names study 'study_5'"):
        simulate(**kw, state_strength={"study_5": 1.0})
    with pytest.raises(InputDataError, match="state_strength"):
        simulate(**kw, state_strength={"study_1": -1.0})
    with pytest.raises(InputDataError, match="n_state_genes"):
        simulate(**kw, state_strength={"study_1": 1.0}, n_state_genes=51)
    with pytest.raises(InputDataError, match="parent 'type_Q'"):
        simulate(**kw, siblings={"new": ("type_Q", 0.5)})
    with pytest.raises(InputDataError, match=r"distance must be in \(0, 1\]"):
        simulate(**kw, siblings={"new": ("type_A", 0.0)})
    with pytest.raises(InputDataError, match="sibling name 'type_B'"):
        simulate(**kw, siblings={"type_B": ("type_A", 0.5)})
