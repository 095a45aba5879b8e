"""Architecture surgery and query fine-tuning: invariants 1 and 2, parameter
counts, strategies, merges by name, and save/load round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedarches.model import LATENT_KEY, FedArchesModel
from fedarches.format.canonical import tensor_sha256


def _hashes(model: FedArchesModel) -> dict[str, str]:
    state = dict(model.module.shared_state_dict())
    state.update(model.module.condition_state())
    return {k: tensor_sha256(v) for k, v in state.items()}


def test_surgery_keeps_reference_latent_bit_identical(model, tiny_data):
    ref, _ = tiny_data
    before = model.get_latent(ref)
    module = model.module
    extended = FedArchesModel(
        _copy(module), genes=model.genes, condition_key="study", train_config=model.train_config,
        label_key=model.label_key, reference=model.reference,
    )
    extended.module.add_conditions(["new_study_a", "new_study_b"])
    after = extended.get_latent(ref)
    assert np.array_equal(before, after)  # bit for bit, not approximately


def _copy(module):
    import copy

    return copy.deepcopy(module)


@pytest.mark.parametrize("kind", ["trvae", "nb"])
def test_conditions_finetuning_changes_only_new_slices(kind, trvae_model, nb_model, tiny_data):
    model = trvae_model if kind == "trvae" else nb_model
    _, query = tiny_data
    before = _hashes(model)
    res = model.map_query(query, "study", epochs=5, progress=False)
    after = _hashes(res.model)
    new = res.report.new_conditions
    assert new == ["study_2"]
    changed = {k for k in after if before.get(k) != after[k]}
    new_keys = {k for k in after if k.split("/", 1)[-1] in new}
    assert changed == new_keys  # every old tensor byte-identical, every new slice trained
    assert set(before) == set(after) - new_keys
    assert _hashes(model) == before  # the caller's model is untouched


@pytest.mark.parametrize("kind", ["trvae", "nb"])
def test_report_counts_only_new_condition_parameters(kind, trvae_model, nb_model, tiny_data):
    model = trvae_model if kind == "trvae" else nb_model
    _, query = tiny_data
    res = model.map_query(query, "study", epochs=2, progress=False)
    c = model.config
    p, q = c.hidden[0], c.hidden[-1]
    expected = 1 * (p + q) + (c.n_genes if kind == "nb" else 0)
    assert res.report.trainable_parameters == expected
    assert res.report.total_parameters > 20 * expected
    assert res.report.epochs == 2 and res.report.seconds > 0


def test_reference_cells_keep_their_latent_in_extended_model(model, tiny_data):
    ref, query = tiny_data
    res = model.map_query(query, "study", epochs=3, progress=False)
    assert np.array_equal(model.get_latent(ref), res.model.get_latent(ref))
    # and the query latent returned by map equals embedding with the extended model
    assert np.array_equal(res.adata.obsm[LATENT_KEY], res.model.get_latent(query))


def test_precomputed_query_path_is_exact(tiny_data, trvae_model, nb_model):
    """The fast query path (projection + MSE terms) gives the loss of the plain path."""
    from fedarches.model import _prepare
    from fedarches.training import MatrixSource, ProjectedSource

    _, query = tiny_data
    for model in (trvae_model, nb_model):
        data, _ = _prepare(query, model.config.kind, model.genes, "study", None)
        module = _copy(model.module)
        module.add_conditions(["study_2"])
        module.eval()
        cond = np.full(query.n_obs, len(module.conditions) - 1)
        rows = np.arange(64)
        plain = MatrixSource(module, data.x, cond, data.library).loss_kwargs(rows)
        fast = ProjectedSource(module, data.x, cond, data.library,
                               use_mse_terms=model.config.kind == "trvae").loss_kwargs(rows)
        a = module.loss(kl_weight=1.0, **plain).total.item()
        b = module.loss(kl_weight=1.0, **fast).total.item()
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("strategy", ["input-layers", "full"])
def test_other_strategies_train_what_they_name(strategy, trvae_model, tiny_data):
    _, query = tiny_data
    res = trvae_model.map_query(query, "study", strategy=strategy, epochs=2, progress=False)
    before, after = _hashes(trvae_model), _hashes(res.model)
    changed = {k for k in before if before[k] != after[k]}
    assert "enc_in.weight" in changed and "dec_in.weight" in changed
    if strategy == "input-layers":
        assert "mu.weight" not in changed and "out.weight" not in changed
        c = trvae_model.config
        first_layers = (c.n_genes + 1) * c.hidden[0] + (c.latent_dim + 1) * c.hidden[-1]
        conds = len(res.model.conditions) * (c.hidden[0] + c.hidden[-1])
        assert res.report.trainable_parameters == first_layers + conds
    else:
        assert "mu.weight" in changed and "out.weight" in changed
        assert res.report.trainable_parameters == res.report.total_parameters


def test_same_seed_same_model(trvae_model, tiny_data):
    _, query = tiny_data
    a = trvae_model.map_query(query, "study", epochs=3, seed=7, progress=False)
    b = trvae_model.map_query(query, "study", epochs=3, seed=7, progress=False)
    c = trvae_model.map_query(query, "study", epochs=3, seed=8, progress=False)
    assert _hashes(a.model) == _hashes(b.model)
    assert _hashes(a.model) != _hashes(c.model)


def test_merge_by_name_is_order_independent_and_exact(trvae_model, tiny_data):
    _, query = tiny_data
    q1 = query[: query.n_obs // 2].copy()
    q2 = query[query.n_obs // 2:].copy()
    q1.obs["study"] = "site_a"
    q2.obs["study"] = "site_b"
    r1 = trvae_model.map_query(q1, "study", epochs=3, progress=False)
    r2 = trvae_model.map_query(q2, "study", epochs=3, progress=False)
    s1 = r1.model.condition_slices(["site_a"])
    s2 = r2.model.condition_slices(["site_b"])
    m12 = trvae_model.with_condition_slices({**s1, **s2})
    m21 = trvae_model.with_condition_slices({**s2, **s1})
    assert _hashes(m12) == _hashes(m21)
    assert m12.conditions == m21.conditions
    for q, r in ((q1, r1), (q2, r2)):
        diff = np.abs(m12.get_latent(q) - r.adata.obsm[LATENT_KEY]).max()
        assert diff <= 1e-6


def test_save_load_round_trip(model, tiny_data, tmp_path):
    ref, query = tiny_data
    res = model.map_query(query, "study", epochs=2, progress=False)
    res.model.save(tmp_path / "m")
    loaded = FedArchesModel.load(tmp_path / "m")
    assert loaded.conditions == res.model.conditions and loaded.genes == res.model.genes
    assert _hashes(loaded) == _hashes(res.model)
    a = loaded.embed(query)
    assert np.array_equal(a.obsm[LATENT_KEY], res.adata.obsm[LATENT_KEY])
    assert (a.obs["cell_type_pred"].astype(str) == res.adata.obs["cell_type_pred"].astype(str)).all()
    assert np.array_equal(a.obs["cell_type_uncertainty"], res.adata.obs["cell_type_uncertainty"])


def test_frozen_tensors_get_no_gradient(trvae_model):
    module = _copy(trvae_model.module)
    module.add_conditions(["q"])
    params = module.set_trainable("conditions")
    frozen = [p for p in module.parameters() if all(p is not q for q in params)]
    assert frozen and all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in params)
    assert sum(p.numel() for p in params) == trvae_model.config.condition_parameter_count(1)
    assert isinstance(params[0], torch.nn.Parameter)


@pytest.mark.parametrize("kind", ["trvae", "nb"])
def test_label_aware_reference_has_a_frozen_classifier(kind, trvae_model, nb_model, tiny_data):
    model = trvae_model if kind == "trvae" else nb_model
    assert model.label_key is not None
    c = model.config
    # a reference trained with labels carries the classifier that shaped its latent ...
    assert c.n_labels == len(model.reference.categories) and c.classifier_weight > 0
    assert {"classifier.weight", "classifier.bias"} <= set(model.module.shared_state_dict())
    # ... as a shared weight: surgery trains only the new condition rows, never it
    res = model.map_query(tiny_data[1], "study", epochs=3, progress=False)
    for key in ("classifier.weight", "classifier.bias"):
        assert tensor_sha256(res.model.module.state_dict()[key]) == tensor_sha256(model.module.state_dict()[key])
    assert res.report.trainable_parameters == c.condition_parameter_count(1)


def test_reference_without_labels_has_no_classifier(tiny_data):
    from fedarches.config import TrainConfig

    m = FedArchesModel.train_reference(tiny_data[0], "study", kind="trvae", n_genes=0,
                                       train=TrainConfig(epochs=2, threads=1), progress=False)
    assert m.config.n_labels == 0 and not hasattr(m.module, "classifier")
    off = FedArchesModel.train_reference(tiny_data[0], "study", "cell_type", kind="trvae", n_genes=0,
                                         train=TrainConfig(epochs=2, threads=1), progress=False,
                                         config={"classifier_weight": 0.0})
    assert off.config.n_labels == 0 and not hasattr(off.module, "classifier")
