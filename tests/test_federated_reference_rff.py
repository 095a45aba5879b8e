"""Issue 10, trVAE's MMD across sites without pooling cells: a site sends each study's mean
random-feature embedding (an aggregate of >= k_min cells) and trains its studies towards
the other sites' ones. Real files, real local epochs, no simulation."""

from __future__ import annotations

import numpy as np
import torch

from fedarches.config import ModelConfig
from fedarches.federation.protocol import SiteConfig
from fedarches.federation.reference_protocol import RFF_PER_SCALE, BuildSetup
from fedarches.federation.reference_coordinator import initial_arrays
from fedarches.federation.reference_site import train_round
from fedarches.models.losses import RFF_SCALES


def initial_shared(setup, studies):
    return dict(initial_arrays(setup, studies).to_torch_state_dict())


def _site(tmp_path, adata, name, studies):
    path = tmp_path / f"{name}.h5ad"
    adata[adata.obs["study"].isin(studies)].copy().write_h5ad(path)
    return SiteConfig(site=name, data=path, condition_key="study", key_dir=tmp_path / f"{name}-keys")


def test_a_site_sends_k_anonymous_study_embeddings_and_trains_towards_the_others(tmp_path):
    from fedarches.data.simulate import simulate
    from fedarches.model import _reference_config

    adata = simulate(n_cells=600, n_genes=60, n_cell_types=3, n_studies=3, seed=0)
    studies = sorted(adata.obs["study"].unique())
    a = _site(tmp_path, adata, "site-a", studies[:1])
    config = _reference_config("trvae", 60, 0, None)
    setup = BuildSetup(atlas="x", sites=["site-a", "site-b"], genes=list(adata.var_names), label_key="cell_type",
                       model_config=config.model_dump_json(), label_categories=[], local_epochs=2,
                       total_epochs=4, k_min=20, mmd="rff")
    shared = initial_shared(setup, studies)
    out, n, loss, emb = train_round(a, setup, shared, 1)
    assert sorted(emb) == [studies[0], f"{studies[0]}/n"] and int(emb[f"{studies[0]}/n"][0]) == n
    assert emb[studies[0]].shape == (RFF_PER_SCALE * len(RFF_SCALES),)
    assert np.isfinite(loss)
    # the other site's study, as it would arrive: round 2 adds the cross-site term
    far = {"other": np.zeros_like(emb[studies[0]]), "other/n": np.array([200])}
    _, _, loss_far, _ = train_round(a, setup, dict(out), 2, targets=far)
    _, _, loss_self, _ = train_round(a, setup, dict(out), 2, targets={**emb, **{"x": emb[studies[0]]}})
    assert loss_far > loss_self  # an all-zero mean embedding is far from any study's: the term is in the loss
    nb = BuildSetup(**{**setup.__dict__, "mmd": "none",
                       "model_config": ModelConfig.model_validate_json(setup.model_config).model_copy(
                           update={"mmd_weight": 0.0}).model_dump_json()})
    assert train_round(a, nb, initial_shared(nb, studies), 1)[3] == {}  # no MMD: nothing extra leaves
    assert torch.is_tensor(next(iter(out.values())))
