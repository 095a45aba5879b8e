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
