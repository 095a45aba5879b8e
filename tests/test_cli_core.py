"""The core command-line contract: train-reference, map, embed."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np

from fedarches.cli import main


def test_train_map_embed_round_trip(tiny_data, tmp_path, capsys):
    ref, query = tiny_data
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    assert main(["train-reference", "--data", str(tmp_path / "ref.h5ad"), "--condition-key", "study",
                 "--label-key", "cell_type", "--n-genes", "100", "--epochs", "5", "--threads", "1",
                 "--out", str(tmp_path / "model"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert len(manifest["genes"]) == 100 and manifest["conditions"] == ["study_0", "study_1"]
    assert set(manifest["files"]) == {"weights.safetensors", "conditions.safetensors", "reference.safetensors"}
    assert main(["map", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "query.h5ad"),
                 "--condition-key", "study", "--epochs", "3", "--out", str(tmp_path / "mapped"), "--quiet"]) == 0
    report = json.loads((tmp_path / "mapped" / "report.json").read_text())
    for key in ("trainable_parameters", "total_parameters", "epochs", "seconds"):
        assert key in report
    assert report["trainable_parameters"] == 128 + 20
    mapped = ad.read_h5ad(tmp_path / "mapped" / "query.h5ad")
    assert mapped.obsm["X_fedarches"].shape == (query.n_obs, 10)
    assert {"cell_type_pred", "cell_type_uncertainty"} <= set(mapped.obs.columns)
    assert main(["embed", "--model", str(tmp_path / "mapped" / "model"), "--data", str(tmp_path / "query.h5ad"),
                 "--condition-key", "study", "--out", str(tmp_path / "embedded.h5ad")]) == 0
    emb = ad.read_h5ad(tmp_path / "embedded.h5ad")
    assert np.array_equal(emb.obsm["X_fedarches"], mapped.obsm["X_fedarches"])
    out = capsys.readouterr().out
    assert "written to" in out and "mapped" in out


def test_layer_option_reads_counts_from_a_layer(tiny_data, tmp_path):
    ref, _ = tiny_data
    a = ref.copy()
    a.layers["counts"] = a.X.copy()
    a.X = a.X.toarray() * 0.5 - 1.0  # scaled, centred data in .X, as many files have
    a.write_h5ad(tmp_path / "ref.h5ad")
    assert main(["train-reference", "--data", str(tmp_path / "ref.h5ad"), "--condition-key", "study",
                 "--layer", "counts", "--model", "nb", "--n-genes", "0", "--epochs", "1",
                 "--out", str(tmp_path / "m"), "--quiet"]) == 0
