"""`fedarches atlas build`: choosing the reference studies and saying what was built."""

from __future__ import annotations

import pytest

from fedarches.cli import main
from fedarches.errors import SettingError
from fedarches.server import Atlas


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from fedarches.data.simulate import simulate

    path = tmp_path_factory.mktemp("data") / "studies.h5ad"
    simulate(n_cells=600, n_genes=120, n_cell_types=3, n_studies=3, seed=1).write_h5ad(path)
    return path


def _build(tmp_path, data_file, *extra):
    atlas_dir = tmp_path / "atlas"
    assert main(["atlas", "init", str(atlas_dir), "--name", "t"]) == 0
    return atlas_dir, main(["atlas", "build", str(atlas_dir), "--data", str(data_file), "--condition-key", "study",
                            "--epochs", "3", "--n-genes", "0", "--threads", "1", "--quiet", *extra])


def test_build_takes_reference_studies_and_prints_a_summary(tmp_path, data_file, capsys):
    atlas_dir, rc = _build(tmp_path, data_file, "--label-key", "cell_type", "--reference-studies", "study_0, study_2")
    assert rc == 0
    out = capsys.readouterr().out
    assert "from 2 studies: study_0 (" in out and "study_2 (" in out and "study_1" not in out
    assert "genes: 120" in out
    assert "labels ('cell_type', 3)" in out
    assert "training: 3 epochs" in out
    assert "reference integration: ebm " in out and "knn_purity " in out
    head = Atlas(atlas_dir).head()
    assert [c.name for c in head.conditions] == ["study_0", "study_2"]
    metrics = Atlas(atlas_dir).version(1).conditions[0].metrics
    assert metrics["epochs"] == 3 and "reference.knn_purity" in metrics


def test_build_without_labels_warns_and_single_study_warning_is_one_line(tmp_path, data_file, capsys):
    _, rc = _build(tmp_path, data_file, "--reference-studies", "study_1")
    assert rc == 0
    out, err = capsys.readouterr()
    assert "warning: no --label-key" in out
    assert "UserWarning" not in out + err
    _, rc = _build(tmp_path / "labelled", data_file, "--reference-studies", "study_1", "--label-key", "cell_type")
    assert rc == 0
    out, err = capsys.readouterr()
    assert "warning: the reference has a single study" in out
    assert "UserWarning" not in out + err and ".py:" not in out + err


def test_unknown_reference_study_is_refused_before_training(tmp_path, data_file, capsys):
    atlas_dir, rc = _build(tmp_path, data_file, "--reference-studies", "study_0,nope")
    assert rc == 2
    err = capsys.readouterr().err
    assert "setting check failed" in err and "'nope'" in err
    assert Atlas(atlas_dir).head() is None
    with pytest.raises(SettingError):
        Atlas(atlas_dir).build(data_file, "study", reference_studies=["nope"], epochs=1, n_genes=0, threads=1)


def test_log_shows_what_each_version_added_with_its_figures(tmp_path, data_file, capsys):
    atlas_dir, rc = _build(tmp_path, data_file, "--label-key", "cell_type", "--reference-studies", "study_0,study_1")
    assert rc == 0
    capsys.readouterr()
    assert main(["atlas", "log", str(atlas_dir)]) == 0
    out = capsys.readouterr().out
    assert "added 2 of 2 conditions" in out
    assert "study_0@coordinator  (kNN purity " in out and "epochs 3" in out
