"""Shared fixtures. One torch thread per process: two busy threads on two cores
stall when anything else runs (see README, "Testing")."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

DATA_DIR = Path(os.environ.get("FEDARCHES_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data(name: str) -> Path:
    """A file from ../shared/data (or $FEDARCHES_DATA); skips the test when absent."""
    path = DATA_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} not found; set FEDARCHES_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def tiny_data():
    """Small generated data: studies 0-1 are the reference, study 2 the query."""
    from fedarches.data.simulate import simulate

    adata = simulate(n_cells=900, n_genes=150, n_cell_types=3, n_studies=3, seed=3)
    ref = adata[adata.obs["study"].isin(["study_0", "study_1"])].copy()
    query = adata[adata.obs["study"] == "study_2"].copy()
    return ref, query


def _train(kind: str, ref):
    from fedarches.config import TrainConfig
    from fedarches.model import FedArchesModel

    return FedArchesModel.train_reference(
        ref, "study", "cell_type", kind=kind, n_genes=0, train=TrainConfig(epochs=12, seed=0), progress=False
    )


@pytest.fixture(scope="session")
def trvae_model(tiny_data):
    return _train("trvae", tiny_data[0])


@pytest.fixture(scope="session")
def nb_model(tiny_data):
    return _train("nb", tiny_data[0])


@pytest.fixture(params=["trvae", "nb"])
def model(request, trvae_model, nb_model):
    return trvae_model if request.param == "trvae" else nb_model
