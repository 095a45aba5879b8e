"""The single-machine path a newcomer types: studies chosen by name, a summary of what was
built, pictures on request, and one trust cache per site."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedarches.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from fedarches.data.simulate import simulate

    d = tmp_path_factory.mktemp("newcomer")
    adata = simulate(n_cells=600, n_genes=120, n_cell_types=3, n_studies=3, seed=2)
    adata.write_h5ad(d / "all.h5ad")
    adata[adata.obs["study"] == "study_2"].copy().write_h5ad(d / "query.h5ad")
    return d


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_map_embed_with_plots(files, capsys):
    model = files / "model"
    assert main(["train-reference", "--data", str(files / "all.h5ad"), "--condition-key", "study",
                 "--label-key", "cell_type", "--reference-studies", "study_0,study_1", "--n-genes", "0",
                 "--epochs", "3", "--threads", "1", "--quiet", "--out", str(model)]) == 0
    out = capsys.readouterr().out
    assert "from 2 studies" in out and "labels ('cell_type', 3)" in out and "written to" in out
    assert main(["map", "--model", str(model), "--data", str(files / "query.h5ad"), "--condition-key", "study",
                 "--epochs", "2", "--threads", "1", "--quiet", "--out", str(files / "mapped"),
                 "--plot", str(files / "map.png")]) == 0
    assert _is_png(files / "map.png")
    assert f"UMAP: {files / 'map.png'}" in capsys.readouterr().out
    assert main(["embed", "--model", str(files / "mapped" / "model"), "--data", str(files / "query.h5ad"),
                 "--condition-key", "study", "--out", str(files / "embedded.h5ad"),
                 "--plot", str(files / "embed.png")]) == 0
    assert _is_png(files / "embed.png")


def test_each_site_has_its_own_trust_cache(tmp_path, monkeypatch):
    from fedarches.client.fetch import site_cache_dir

    monkeypatch.setenv("FEDARCHES_CACHE", str(tmp_path))
    root = b'{"signed": {}}'
    a, b, none = site_cache_dir(root, "site-a"), site_cache_dir(root, "site-b"), site_cache_dir(root)
    assert len({a, b, none}) == 3
    assert all(p.is_relative_to(tmp_path) for p in (a, b, none))
    assert site_cache_dir(root, "site-a") == a  # stable across runs
    assert site_cache_dir(root, "../x").is_relative_to(tmp_path / "sites")  # a name never escapes
