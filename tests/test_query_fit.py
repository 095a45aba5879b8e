"""Fitting the new condition rows on a subsample (fedarches.query_fit): the subsample,
the convergence rule, settings checks, and that surgery stays exact (invariants 1, 2, 4)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedarches.config import MapSettings
from fedarches.errors import SettingError
from fedarches.format.canonical import tensor_sha256
from fedarches.model import LATENT_KEY, _prepare_matrix
from fedarches.query_fit import Convergence, check_fit_settings, fit_rows


def _hashes(model) -> dict[str, str]:  # noqa: ANN001
    state = dict(model.module.shared_state_dict())
    state.update(model.module.condition_state())
    return {k: tensor_sha256(v) for k, v in state.items()}


def test_fit_rows_caps_each_condition_and_is_seeded():
    conditions = np.array(["a"] * 50 + ["b"] * 7 + ["ref"] * 30)
    rows = np.arange(57)
    picked = fit_rows(conditions, rows, 10, seed=4)
    assert np.all(np.diff(picked) > 0)
    assert (conditions[picked] == "a").sum() == 10
    assert (conditions[picked] == "b").sum() == 7  # a small condition keeps every cell
    assert np.array_equal(picked, fit_rows(conditions, rows, 10, seed=4))
    assert not np.array_equal(picked, fit_rows(conditions, rows, 10, seed=5))
    assert np.array_equal(fit_rows(conditions, rows, 0, seed=4), rows)


@pytest.mark.parametrize("fit_cells, tol", [(-1, 1e-3), (1.5, 1e-3), (True, 1e-3), ("10", 1e-3),
                                            (10, -1.0), (10, float("nan")), (10, float("inf")), (10, "x")])
def test_bad_fit_settings_are_setting_errors(fit_cells, tol):
    with pytest.raises(SettingError, match="^setting check failed"):
        check_fit_settings(fit_cells, tol)


@pytest.mark.parametrize("lr", [0, -1e-3, float("nan"), True, "0.1"])
def test_bad_learning_rates_are_setting_errors(lr):
    with pytest.raises(SettingError, match="^setting check failed: learning rate"):
        check_fit_settings(10, 1e-3, lr)
    check_fit_settings(10, 1e-3, None)


def test_map_query_refuses_bad_fit_settings_before_training(trvae_model, tiny_data):
    _, query = tiny_data
    with pytest.raises(SettingError):
        trvae_model.map_query(query, "study", settings=MapSettings(fit_cells=-5, epochs=1))
    with pytest.raises(SettingError):
        trvae_model.map_query(query, "study", settings=MapSettings(converge_tol=-1.0, epochs=1))


def test_convergence_stops_when_parameters_stop_moving():
    p = torch.nn.Parameter(torch.ones(4))
    rule = Convergence(tol=1e-3, patience=3)
    rule.start([p])
    with torch.no_grad():
        p.add_(0.5)
    change, done = rule.step([p])
    assert change == pytest.approx(0.5) and not done
    results = [rule.step([p]) for _ in range(3)]
    assert [d for _, d in results] == [False, False, True]
    assert Convergence(tol=0.0, patience=1).step([p]) == (float("inf"), False)


@pytest.mark.parametrize("kind", ["trvae", "nb"])
def test_subsample_fit_keeps_surgery_exact(kind, trvae_model, nb_model, tiny_data):
    model = trvae_model if kind == "trvae" else nb_model
    ref, query = tiny_data
    before = _hashes(model)
    ref_latent = model.get_latent(ref)
    res = model.map_query(query, "study", settings=MapSettings(fit_cells=40, epochs=30, seed=1))
    new = res.report.new_conditions
    assert res.report.n_cells_trained == 40
    after = _hashes(res.model)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {k for k in after if k.split("/", 1)[-1] in new}  # only the new rows moved
    assert _hashes(model) == before
    assert np.array_equal(res.model.get_latent(ref), ref_latent)  # invariant 1, bit for bit
    # every cell is embedded, with the same latent embed gives for the mapped model
    assert res.adata.obsm[LATENT_KEY].shape == (query.n_obs, model.config.latent_dim)
    assert np.abs(res.model.get_latent(query) - res.adata.obsm[LATENT_KEY]).max() <= 1e-6
    size = sum(t.numel() for t in res.model.condition_slices(new).values())
    assert size == model.config.condition_parameter_count(len(new))  # the bundle formula
    again = model.map_query(query, "study", settings=MapSettings(fit_cells=40, epochs=30, seed=1))
    assert _hashes(again.model) == after  # same seed, same subsample, same rows


def test_convergence_rule_ends_the_schedule_early(trvae_model, tiny_data):
    _, query = tiny_data
    res = trvae_model.map_query(query, "study", settings=MapSettings(epochs=300, converge_tol=0.05, lr=1e-3))
    h = res.model.last_history
    assert h.converged and h.stopped_early and h.epochs < 300
    assert len(h.param_change) == h.epochs and all(c < 0.05 for c in h.param_change[-5:])
    full = trvae_model.map_query(query, "study", settings=MapSettings(epochs=3, converge_tol=0))
    assert full.model.last_history.param_change == [] and full.model.last_history.epochs == 3


def test_lazy_normalisation_gives_the_eager_bytes(tiny_data):
    ref, _ = tiny_data
    x = sp.csr_matrix(ref.X, dtype=np.float32)
    genes = ref.var_names.tolist()
    eager = _prepare_matrix(x, genes, ref.obs["study"].to_numpy(), "trvae", genes)
    lazy = _prepare_matrix(x, genes, ref.obs["study"].to_numpy(), "trvae", genes, lazy=True)
    rows = np.array([3, 0, 17, 400])
    for idx in (rows, slice(5, 300)):
        a, b = eager.rows(idx), lazy.rows(idx)
        assert (a != b).nnz == 0 and a.dtype == b.dtype == np.float32


def test_copy_data_false_shares_the_matrix_but_not_the_tables(trvae_model, tiny_data):
    _, query = tiny_data
    q = query.copy()
    cols = list(q.obs.columns)
    res = trvae_model.map_query(q, "study", settings=MapSettings(epochs=2), copy_data=False)
    assert res.adata.X is q.X
    assert list(q.obs.columns) == cols and LATENT_KEY not in q.obsm  # the input's tables untouched
    copied = trvae_model.map_query(q, "study", settings=MapSettings(epochs=2))
    assert copied.adata.X is not q.X
    assert np.array_equal(copied.adata.obsm[LATENT_KEY], res.adata.obsm[LATENT_KEY])


def test_large_outputs_are_written_sparse_without_gzip(tmp_path, tiny_data, monkeypatch):
    import anndata as ad
    import h5py

    from fedarches import mapping

    _, query = tiny_data
    q = query.copy()
    q.X = sp.csr_matrix(q.X)
    for limit, codec in ((10**9, "gzip"), (0, None)):
        monkeypatch.setattr(mapping, "GZIP_MAX_ENTRIES", limit)
        path = mapping.write_h5ad(q, tmp_path / f"q{limit}.h5ad")
        with h5py.File(path) as f:
            assert f["X"].attrs["encoding-type"] == "csr_matrix"
            assert f["X/data"].compression == codec
        back = ad.read_h5ad(path)
        assert (back.X != q.X).nnz == 0

