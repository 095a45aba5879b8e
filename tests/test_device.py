"""The device setting (fedarches.device): CPU results and stored bytes unchanged, a clear
error for CUDA where there is none. CI has no GPU; the GPU path is not measured here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedarches.cli import main
from fedarches.config import MapSettings, TrainConfig
from fedarches.device import on_device, resolve_device, to_device
from fedarches.errors import SettingError
from fedarches.model import FedArchesModel
from fedarches.models.losses import Nonzeros

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


@no_cuda
def test_auto_is_cpu_and_cuda_is_refused():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None) == resolve_device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(SettingError, match="setting check failed: device .*--device cpu") as e:
            resolve_device(name)
        assert e.value.check == "setting check"
    with pytest.raises(SettingError, match="unknown device"):
        resolve_device("tpu")


def test_cpu_moves_nothing():
    t = torch.ones(3)
    nz = Nonzeros(flat=torch.zeros(2, dtype=torch.int64), values=torch.ones(2), lgamma_x1=torch.tensor(0.0))
    kw = {"x": t, "nonzeros": nz, "n": 3}
    assert to_device(kw, torch.device("cpu")) is kw
    module = torch.nn.Linear(2, 2)
    with on_device(module, "cpu") as dev:
        assert dev.type == "cpu"
    assert next(module.parameters()).device.type == "cpu"


def test_device_is_never_stored(tiny_data, tmp_path):
    ref, query = tiny_data
    runs = [FedArchesModel.train_reference(ref, "study", "cell_type", n_genes=0, progress=False,
                                           train=TrainConfig(epochs=3, device=d)) for d in ("auto", "cpu")]
    a, b = (m.module.state_dict() for m in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    runs[0].save(tmp_path / "a")
    runs[1].save(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert "device" not in json.loads((tmp_path / "a" / "manifest.json").read_text())["train"]
    m1 = runs[1].map_query(query, "study", settings=MapSettings(epochs=2, device="cpu")).adata
    m2 = runs[1].map_query(query, "study", settings=MapSettings(epochs=2)).adata
    np.testing.assert_array_equal(m1.obsm["X_fedarches"], m2.obsm["X_fedarches"])
    e1, e2 = runs[1].embed(ref, "study", device="cpu"), runs[1].embed(ref, "study")
    np.testing.assert_array_equal(e1.obsm["X_fedarches"], e2.obsm["X_fedarches"])


@no_cuda
def test_cuda_without_cuda_is_a_setting_error(tiny_data, tmp_path, capsys):
    ref, query = tiny_data
    ref.write_h5ad(tmp_path / "ref.h5ad")
    rc = main(["train-reference", "--data", str(tmp_path / "ref.h5ad"), "--condition-key", "study",
               "--epochs", "1", "--out", str(tmp_path / "m"), "--device", "cuda", "--quiet"])
    assert rc == 2 and "setting check failed: device 'cuda'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    model = FedArchesModel.train_reference(ref, "study", n_genes=0, progress=False, train=TrainConfig(epochs=1))
    with pytest.raises(SettingError):
        model.map_query(query, "study", settings=MapSettings(epochs=1, device="cuda"))
    with pytest.raises(SettingError):
        model.embed(ref, "study", device="cuda")
    with pytest.raises(SettingError):
        FedArchesModel.train_reference(ref, "study", n_genes=0, progress=False,
                                       train=TrainConfig(epochs=1, device="cuda"))
