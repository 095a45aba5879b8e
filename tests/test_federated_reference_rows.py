"""Issue 10, a site's final condition rows (`reference_site.refit_rows`): with
``final-rows = refit`` they are fitted again to the final shared weights the way ``map`` fits
a query's, every shared tensor (batch-norm statistics included) untouched, and every later
step of the build reads the same rows. Real files, real local epochs, no simulation."""

from __future__ import annotations

import numpy as np
import torch

from fedarches.federation.protocol import SiteConfig
from fedarches.federation.reference_coordinator import initial_arrays
from fedarches.federation.reference_protocol import BuildSetup
from fedarches.federation.reference_run_config import FINAL_ROWS, ReferenceRunConfig
from fedarches.federation.reference_site import final_model, local_module, train_round


def test_refit_rows_move_only_the_sites_rows_and_are_kept_for_the_build(tmp_path):
    from fedarches.data.simulate import simulate
    from fedarches.model import _reference_config

    adata = simulate(n_cells=500, n_genes=50, n_cell_types=3, n_studies=2, seed=1)
    study = sorted(adata.obs["study"].unique())[0]
    path = tmp_path / "a.h5ad"
    adata[adata.obs["study"] == study].copy().write_h5ad(path)
    site = SiteConfig(site="site-a", data=path, condition_key="study", key_dir=tmp_path / "keys")
    config = _reference_config("nb", 50, 0, None)
    setup = BuildSetup(atlas="x", sites=["site-a", "site-b"], genes=list(adata.var_names), label_key="cell_type",
                       model_config=config.model_dump_json(), label_categories=[], local_epochs=2,
                       total_epochs=2, k_min=20, mmd="none", rows="refit")
    shared = dict(initial_arrays(setup, sorted(adata.obs["study"].unique())).to_torch_state_dict())
    final, _, _, _ = train_round(site, setup, shared, 1)  # one round: its weights are the final ones
    trained = local_module(site, setup, dict(final), 2)  # the rows as the round left them

    model, latent, _ = final_model(site, setup, dict(final), 1)
    state = model.module.state_dict()
    for k, v in final.items():  # weights and batch-norm statistics exactly the aggregated ones
        assert torch.equal(state[k], v), k
    before, after = trained.condition_state(), model.module.condition_state()
    assert sorted(before) == sorted(after) == [f"{t}/{study}" for t in ("decoder", "dispersion", "encoder")]
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every row table was fitted
    assert (site.results_dir / f"reference-{setup.digest[:16]}" / "refit-1.safetensors").is_file()
    # calibration and the bundle call final_model again: the same rows, the same latent
    again, latent_again, _ = final_model(site, setup, dict(final), 1)
    assert np.array_equal(latent, latent_again)
    assert all(torch.equal(again.module.condition_state()[k], after[k]) for k in after)
    # "trained" keeps the rows as the round left them
    as_trained = BuildSetup(**{**setup.__dict__, "rows": "trained"})
    train_round(site, as_trained, shared, 1)
    kept, _, _ = final_model(site, as_trained, dict(final), 1)
    left = local_module(site, as_trained, dict(final), 2).condition_state()
    assert all(torch.equal(kept.module.condition_state()[k], left[k]) for k in left)


def test_final_rows_auto_takes_the_models_choice():
    base = {"atlas-dir": "atlas", "label-key": "cell_type"}
    for model, rows in FINAL_ROWS.items():
        cfg = ReferenceRunConfig.from_run_config({**base, "model": model})
        assert cfg.final_rows == rows
        assert ReferenceRunConfig.from_run_config({**ReferenceRunConfig.defaults(), **base, "model": model}) == cfg
        assert ReferenceRunConfig.from_run_config(cfg.to_run_config()) == cfg
    for model in FINAL_ROWS:  # asked for, it is what the build gets
        assert ReferenceRunConfig.from_run_config({**base, "model": model, "final-rows": "refit"}).final_rows == "refit"
