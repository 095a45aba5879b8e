"""Out-of-core reference training (fedarches.data.backed): real small .h5ad files in tmp_path.

What must hold: the streamed passes choose the genes the in-memory path chooses; with one
block holding every cell the backed run IS the in-memory run (same minibatches, weights
bit for bit); with small blocks only the buffer is in memory and every training cell is
visited once per epoch; input checks and the CLI work from the file."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedarches.cli import main
from fedarches.config import TrainConfig
from fedarches.data.backed import BackedData, ChunkSettings, CSRFile, scan_reference
from fedarches.data.genes import select_genes
from fedarches.data.simulate import simulate
from fedarches.errors import CountValueError, SettingError
from fedarches.model import FedArchesModel
from fedarches.training import BackedSource, prepared_rows


@pytest.fixture(scope="module")
def sim():
    return simulate(n_cells=900, n_genes=400, n_studies=3, seed=1, n_jobs=1)


@pytest.fixture()
def h5ad(sim, tmp_path):
    path = tmp_path / "ref.h5ad"
    sim.write_h5ad(path)
    return path


def test_streamed_gene_selection_equals_in_memory(sim, h5ad):
    conditions = sim.obs["study"].astype(str).to_numpy()
    expected = select_genes(sim.X, sim.var_names.tolist(), conditions, 150)
    data = BackedData.open(h5ad)
    with data.matrix() as reader:
        for chunk in (97, 4096):
            got = scan_reference(data, reader, conditions, 150, require_integers=True, chunk_cells=chunk)
            assert got == expected


def test_csr_file_reads_rows(sim, h5ad):
    rows = np.array([0, 1, 2, 450, 899])
    with CSRFile(h5ad) as f:
        assert f.shape == sim.shape
        assert (f.rows(rows) != sim.X[rows]).nnz == 0
        assert (f.range(10, 20) != sim.X[10:20]).nnz == 0


@pytest.mark.parametrize("kind", ["trvae", "nb"])
def test_one_block_is_the_in_memory_run(sim, h5ad, kind):
    cfg = TrainConfig(epochs=3, seed=0)
    mem = FedArchesModel.train_reference(sim, "study", "cell_type", kind=kind, n_genes=150, train=cfg, progress=False)
    for data in (str(h5ad), ad.read_h5ad(h5ad, backed="r")):
        backed = FedArchesModel.train_reference(data, "study", "cell_type", kind=kind, n_genes=150, train=cfg,
                                                progress=False, chunks=ChunkSettings(chunk_cells=10_000))
        a, b = mem.module.state_dict(), backed.module.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert mem.last_history.train_loss == backed.last_history.train_loss
        assert mem.manifest() == backed.manifest()
        np.testing.assert_array_equal(mem.training_latent, backed.training_latent)


def test_small_blocks_train_from_disk(h5ad, tmp_path):
    chunks = ChunkSettings(chunk_cells=64, buffer_chunks=2)
    model = FedArchesModel.train_reference(h5ad, "study", "cell_type", kind="nb", n_genes=150,
                                           train=TrainConfig(epochs=3), progress=False, chunks=chunks)
    h = model.last_history
    assert h.epochs == 3 and np.isfinite(h.train_loss).all() and np.isfinite(h.validation_loss).all()
    assert model.training_latent.shape == (900, 10) and np.isfinite(model.training_latent).all()
    model.save(tmp_path / "model")
    loaded = FedArchesModel.load(tmp_path / "model")
    out = loaded.embed(ad.read_h5ad(h5ad), "study")
    assert out.obsm["X_fedarches"].shape == (900, 10)


def test_backed_source_bounds_the_buffer_and_visits_each_row_once():
    n, chunk, buf = 1000, 50, 3
    x = sp.random(n, 20, density=0.3, format="csr", random_state=0, dtype=np.float32)
    sizes: list[int] = []

    def read(rows: np.ndarray):
        sizes.append(len(rows))
        return prepared_rows(rows, x[rows], None)

    # only the batching is exercised here: module=None, loss_kwargs is never called
    source = BackedSource(module=None, read=read, n_cells=n, condition=np.zeros(n, np.int64),  # type: ignore[arg-type]
                          chunk_cells=chunk, buffer_chunks=buf)
    rows = np.sort(np.random.default_rng(0).choice(n, 900, replace=False))
    seen = np.concatenate(list(source.minibatches(rows, 32, np.random.default_rng(1))))
    assert np.array_equal(np.sort(seen), rows)
    assert max(sizes) <= chunk * buf
    source.max_batches = 5
    assert len(list(source.minibatches(rows, 32, np.random.default_rng(1)))) == 5


def test_reference_studies_and_cli(sim, h5ad, tmp_path, capsys):
    data = BackedData.open(h5ad).select("study", ["study_0", "study_1"])
    assert data.n_obs == int(sim.obs["study"].isin(["study_0", "study_1"]).sum())
    with pytest.raises(SettingError):
        BackedData.open(h5ad).select("study", ["nope"])
    rc = main(["train-reference", "--data", str(h5ad), "--condition-key", "study", "--label-key", "cell_type",
               "--reference-studies", "study_0,study_1", "--epochs", "2", "--n-genes", "150", "--backed",
               "--chunk-cells", "128", "--buffer-chunks", "2", "--out", str(tmp_path / "m"), "--quiet"])
    assert rc == 0
    model = FedArchesModel.load(tmp_path / "m")
    assert model.conditions == ["study_0", "study_1"] and len(model.genes) == 150
    assert "2 studies" in capsys.readouterr().out


def test_backed_refusals(sim, tmp_path):
    dense = sim.copy()
    dense.X = dense.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    with pytest.raises(SettingError, match="CSR"):
        FedArchesModel.train_reference(tmp_path / "dense.h5ad", "study", progress=False)
    bad = sim.copy()
    bad.X = bad.X.copy()
    bad.X.data[5] = np.nan
    bad.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(CountValueError):
        FedArchesModel.train_reference(tmp_path / "nan.h5ad", "study", kind="nb", progress=False,
                                       chunks=ChunkSettings(chunk_cells=100))
    with pytest.raises(SettingError):
        ChunkSettings(chunk_cells=0).check()


def test_simulate_chunks_share_the_design():
    a = simulate(n_cells=300, n_genes=100, n_studies=3, seed=4, cell_seed=0, n_jobs=1)
    b = simulate(n_cells=300, n_genes=100, n_studies=3, seed=4, cell_seed=1, n_jobs=1)
    plain = simulate(n_cells=300, n_genes=100, n_studies=3, seed=4, n_jobs=1)
    np.testing.assert_array_equal(a.varm["type_log_program"], b.varm["type_log_program"])
    np.testing.assert_array_equal(a.varm["type_log_program"], plain.varm["type_log_program"])
    assert (a.X != b.X).nnz > 0 and (a.X != plain.X).nnz > 0
    with pytest.raises(SettingError):
        simulate(n_cells=30, n_genes=10, cell_seed=-1)
