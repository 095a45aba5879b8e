"""A `summaries` atlas version publishes no per-cell array, and a site still gets labels and
pictures from it (issue 9, invariant 8). Old (`cells`) models keep loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedarches.cli import main
from fedarches.format.model_dir import LABELS, REFERENCE
from fedarches.format.signing import keygen
from fedarches.server import Atlas, serve_atlas

N_REF_CELLS_MIN = 300  # every model dimension of the test below stays under this


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from fedarches.data.simulate import simulate

    tmp = tmp_path_factory.mktemp("summaries-atlas")
    adata = simulate(n_cells=900, n_genes=120, n_cell_types=3, n_studies=3, seed=4)
    ref = adata[adata.obs["study"].isin(["study_0", "study_1"])].copy()
    ref.write_h5ad(tmp / "ref.h5ad")
    adata[adata.obs["study"] == "study_2"].copy().write_h5ad(tmp / "query.h5ad")
    assert ref.n_obs >= N_REF_CELLS_MIN
    assert main(["atlas", "init", str(tmp / "atlas"), "--name", "s"]) == 0
    assert main(["atlas", "build", str(tmp / "atlas"), "--data", str(tmp / "ref.h5ad"), "--condition-key", "study",
                 "--label-key", "cell_type", "--label-knowledge", "summaries", "--epochs", "3", "--n-genes", "0",
                 "--threads", "1", "--quiet"]) == 0
    return {"tmp": tmp, "n_ref": ref.n_obs}


def _json_lists(obj, path="$"):
    if isinstance(obj, list):
        yield path, len(obj)
        for i, v in enumerate(obj):
            yield from _json_lists(v, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_lists(v, f"{path}.{k}")


def test_no_published_blob_holds_a_per_cell_array(world):
    n_ref = world["n_ref"]
    targets = world["tmp"] / "atlas" / "repository" / "targets"
    tensors = [p for p in targets.rglob("*") if p.is_file() and p.name.endswith(".safetensors")]
    documents = [p for p in targets.rglob("*") if p.is_file() and p.name.endswith(".json")]
    assert len(tensors) == 3 and documents  # weights, conditions, labels
    names = set()
    for blob in tensors:
        for key, value in load_file(str(blob)).items():
            names.add(key.split("/")[0])
            assert all(d < n_ref for d in value.shape), f"{blob.name}: {key} {value.shape} vs {n_ref} cells"
    assert "summaries" in names and "latent" not in names
    for doc in documents:
        for where, length in _json_lists(json.loads(doc.read_text())):
            assert length < n_ref, f"{doc.name}: {where} has {length} entries"
    version = Atlas(world["tmp"] / "atlas").version(1)
    assert LABELS in version.blobs and REFERENCE not in version.blobs
    labels_blob = next(p for p in tensors if p.name.endswith(version.blobs[LABELS].sha256 + ".safetensors")
                       or version.blobs[LABELS].sha256 in p.name)
    state = load_file(str(labels_blob))
    assert int(state["summaries/component_count"].min()) >= int(state["summaries/k_min"][0]) == 20


def test_site_maps_and_plots_without_reference_cells(world):
    tmp: Path = world["tmp"]
    atlas = Atlas(tmp / "atlas")
    key = keygen(tmp / "site" / "key")
    assert main(["atlas", "enroll", str(tmp / "atlas"), "--site", "site-a", "--public-key", str(key.public)]) == 0
    shutil.copy(tmp / "atlas" / "root.json", tmp / "site" / "root.json")
    server = serve_atlas(atlas, "127.0.0.1", 0)
    try:
        png = tmp / "site" / "map.png"
        assert main(["site", "map", "--atlas", server.url, "--trust", str(tmp / "site" / "root.json"),
                     "--key", str(tmp / "site" / "key"), "--site", "site-a", "--data", str(tmp / "query.h5ad"),
                     "--condition-key", "study", "--epochs", "2", "--threads", "1", "--quiet",
                     "--cache", str(tmp / "site" / "cache"), "--out", str(tmp / "site" / "out"),
                     "--plot", str(png)]) == 0
    finally:
        server.close()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import anndata as ad

    q = ad.read_h5ad(tmp / "site" / "out" / "query.h5ad")
    for col in ("cell_type_pred", "cell_type_uncertainty", "cell_type_novelty", "cell_type_unknown"):
        assert col in q.obs


def test_python_api_summaries_round_trip_and_cells_still_load(tmp_path, trvae_model, tiny_data):
    from fedarches.config import TrainConfig
    from fedarches.model import FedArchesModel, SummaryIndex
    from fedarches.plotting import COMPONENTS_SOURCE, mapping_cells

    ref, query = tiny_data
    m = FedArchesModel.train_reference(ref, "study", "cell_type", kind="trvae", n_genes=0, progress=False,
                                       train=TrainConfig(epochs=3, seed=0, threads=1), label_knowledge="summaries")
    assert isinstance(m.reference, SummaryIndex) and m.training_latent is not None
    m.save(tmp_path / "summ")
    assert not (tmp_path / "summ" / REFERENCE).exists() and (tmp_path / "summ" / LABELS).exists()
    loaded = FedArchesModel.load(tmp_path / "summ")
    assert isinstance(loaded.reference, SummaryIndex)
    a, b = m.map_query(query, "study", epochs=2, progress=False), loaded.map_query(query, "study", epochs=2,
                                                                                   progress=False)
    assert (a.adata.obs["cell_type_pred"].astype(str) == b.adata.obs["cell_type_pred"].astype(str)).all()
    np.testing.assert_array_equal(a.adata.obs["cell_type_novelty"], b.adata.obs["cell_type_novelty"])
    cells = mapping_cells(b.adata, b.model, "study", "cell_type")
    assert (cells.source == COMPONENTS_SOURCE).sum() == loaded.reference.summaries.n_components
    # a per-cell model (the old format) saves and loads as before
    trvae_model.save(tmp_path / "cells")
    assert (tmp_path / "cells" / REFERENCE).exists()
    assert FedArchesModel.load(tmp_path / "cells").reference.knowledge == "cells"
    with pytest.raises(Exception, match="setting check failed"):
        FedArchesModel.train_reference(ref, "study", "cell_type", n_genes=0, progress=False,
                                       train=TrainConfig(epochs=1), label_knowledge="everything")
