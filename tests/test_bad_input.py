"""Every bad input gets a one-line message naming the problem, a non-zero exit,
and leaves nothing written (invariant 7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from fedarches.cli import main
from fedarches.errors import NothingToMapError, OutputPathError, SettingError, UnknownConditionError
from fedarches.mapping import check_out_dir


def _write(adata: ad.AnnData, path: Path) -> str:
    adata.write_h5ad(path)
    return str(path)


@pytest.fixture(scope="module")
def files(tiny_data, trvae_model, nb_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    ref, query = tiny_data
    trvae_model.save(d / "trvae")
    nb_model.save(d / "nb")
    return d, ref, query


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _modified(adata: ad.AnnData, fn) -> ad.AnnData:
    a = adata.copy()
    x = a.X.toarray()
    fn(x)
    a.X = sp.csr_matrix(x)
    return a


CASES = {
    "nan": (lambda a: _modified(a, lambda x: x.__setitem__((0, 0), np.nan)), "NaN or infinite"),
    "inf": (lambda a: _modified(a, lambda x: x.__setitem__((1, 1), np.inf)), "NaN or infinite"),
    "negative": (lambda a: _modified(a, lambda x: x.__setitem__((0, 0), -3.0)), "negative values"),
    "zero_cells": (lambda a: a[:0].copy(), "zero cells"),
    "zero_genes": (lambda a: a[:, :0].copy(), "zero genes"),
    "duplicate_genes": (lambda a: _dup_genes(a), "duplicate gene names"),
    "missing_condition": (lambda a: _drop_obs(a, "study"), "condition key 'study' is not a column"),
}


def _dup_genes(a: ad.AnnData) -> ad.AnnData:
    a = a.copy()
    names = a.var_names.tolist()
    names[1] = names[0]
    a.var_names = pd.Index(names)
    return a


def _drop_obs(a: ad.AnnData, col: str) -> ad.AnnData:
    a = a.copy()
    del a.obs[col]
    return a


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_reference_refuses(case, files, capsys):
    d, ref, _ = files
    make, message = CASES[case]
    data = _write(make(ref), d / f"ref_{case}.h5ad")
    out = d / f"out_{case}"
    code, err = _run(capsys, ["train-reference", "--data", data, "--condition-key", "study", "--out", str(out),
                              "--epochs", "1", "--quiet"])
    assert code == 2
    assert message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_map_refuses(case, files, capsys):
    d, _, query = files
    make, message = CASES[case]
    data = _write(make(query), d / f"q_{case}.h5ad")
    out = d / f"map_{case}"
    before = _tree(d / "trvae")
    code, err = _run(capsys, ["map", "--model", str(d / "trvae"), "--data", data, "--condition-key", "study",
                              "--out", str(out), "--epochs", "1", "--quiet"])
    assert code == 2 and message in err
    assert not out.exists()
    assert _tree(d / "trvae") == before


def test_non_integer_counts_refused_for_nb_only(files, capsys):
    d, ref, query = files
    frac = _modified(ref, lambda x: x.__setitem__(x > 0, x[x > 0] + 0.5))
    data = _write(frac, d / "frac.h5ad")
    code, err = _run(capsys, ["train-reference", "--data", data, "--condition-key", "study", "--model", "nb",
                              "--out", str(d / "nb_frac"), "--epochs", "1", "--quiet"])
    assert code == 2 and "non-integer values" in err and "--model trvae" in err
    assert not (d / "nb_frac").exists()
    qfrac = _write(_modified(query, lambda x: x.__setitem__(x > 0, x[x > 0] + 0.25)), d / "qfrac.h5ad")
    code, err = _run(capsys, ["map", "--model", str(d / "nb"), "--data", qfrac, "--condition-key", "study",
                              "--out", str(d / "nb_qfrac"), "--quiet"])
    assert code == 2 and "non-integer values" in err
    # trVAE takes non-integer expression (e.g. RSEM)
    code, _ = _run(capsys, ["train-reference", "--data", data, "--condition-key", "study", "--n-genes", "0",
                            "--out", str(d / "trvae_frac"), "--epochs", "1", "--quiet"])
    assert code == 0


def test_missing_label_column(files, capsys):
    d, ref, _ = files
    data = _write(ref, d / "ref_ok.h5ad")
    code, err = _run(capsys, ["train-reference", "--data", data, "--condition-key", "study", "--label-key",
                              "celltype", "--out", str(d / "nolabel"), "--epochs", "1", "--quiet"])
    assert code == 2 and "label key 'celltype' is not a column" in err
    assert not (d / "nolabel").exists()


def test_query_with_only_known_conditions_points_to_embed(files, capsys):
    d, ref, _ = files
    data = _write(ref, d / "ref_known.h5ad")
    code, err = _run(capsys, ["map", "--model", str(d / "trvae"), "--data", data, "--condition-key", "study",
                              "--out", str(d / "known"), "--quiet"])
    assert code == 2 and "already in the model" in err and "embed" in err
    assert not (d / "known").exists()
    with pytest.raises(NothingToMapError):
        trvae_model_of(files).map_query(ref, "study", epochs=1, progress=False)


def test_embed_refuses_unknown_conditions(files, capsys):
    d, _, query = files
    data = _write(query, d / "q_ok.h5ad")
    out = d / "emb.h5ad"
    code, err = _run(capsys, ["embed", "--model", str(d / "trvae"), "--data", data, "--condition-key", "study",
                              "--out", str(out)])
    assert code == 2 and "not in the model" in err and "study_2" in err
    assert "`fedarches map` on a single machine, `fedarches site map` at a site" in err
    assert not out.exists()
    with pytest.raises(UnknownConditionError):
        trvae_model_of(files).embed(query, "study")


def test_bad_strategy_and_out_path_have_their_own_classes(files, tmp_path):
    d, _, query = files
    with pytest.raises(SettingError):
        trvae_model_of(files).map_query(query, "study", strategy="everything", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code = main(["map", "--model", str(d / "trvae"), "--data", _write(query, tmp_path / "q.h5ad"),
                 "--condition-key", "study", "--out", str(tmp_path / "busy"), "--quiet"])
    assert code == 2 and (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputPathError):
        check_out_dir(tmp_path / "busy")


def trvae_model_of(files):
    from fedarches.model import FedArchesModel

    return FedArchesModel.load(files[0] / "trvae")


def test_gene_overlap_floor_and_warning(files, capsys):
    d, _, query = files
    renamed = query.copy()
    renamed.var_names = [f"ENSG{i:06d}" for i in range(renamed.n_vars)]
    data = _write(renamed, d / "q_ensembl.h5ad")
    code, err = _run(capsys, ["map", "--model", str(d / "trvae"), "--data", data, "--condition-key", "study",
                              "--out", str(d / "ens"), "--quiet"])
    assert code == 2 and "floor" in err and "genes" in err
    assert not (d / "ens").exists()
    # 30% of genes missing: mapped, with a warning, zero-filled
    from fedarches.model import FedArchesModel

    model = FedArchesModel.load(d / "trvae")
    partial = query[:, : int(query.n_vars * 0.7)].copy()
    with pytest.warns(UserWarning, match="filled with zeros"):
        res = model.map_query(partial, "study", epochs=1, progress=False)
    assert res.report.gene_overlap == pytest.approx(partial.n_vars / query.n_vars, abs=0.01)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_corrupt_or_foreign_model_directory(files, capsys, tmp_path):
    d, _, query = files
    data = _write(query, tmp_path / "q.h5ad")
    # a tampered tensor file fails its hash check
    bad = tmp_path / "tampered"
    shutil.copytree(d / "trvae", bad)
    blob = bytearray((bad / "weights.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(blob))
    code, err = _run(capsys, ["map", "--model", str(bad), "--data", data, "--condition-key", "study",
                              "--out", str(tmp_path / "o1"), "--quiet"])
    assert code == 2 and "weights.safetensors fails its sha256 check" in err
    assert not (tmp_path / "o1").exists()
    # a foreign directory
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.pt").write_bytes(b"not ours")
    code, err = _run(capsys, ["embed", "--model", str(foreign), "--data", data, "--condition-key", "study",
                              "--out", str(tmp_path / "o2.h5ad")])
    assert code == 2 and "not a fedarches model directory" in err
    # a manifest of another format
    other = tmp_path / "other"
    shutil.copytree(d / "trvae", other)
    m = json.loads((other / "manifest.json").read_text())
    m["format"] = "someone-else/3"
    (other / "manifest.json").write_text(json.dumps(m))
    code, err = _run(capsys, ["embed", "--model", str(other), "--data", data, "--condition-key", "study",
                              "--out", str(tmp_path / "o3.h5ad")])
    assert code == 2 and "expected 'fedarches.model/1'" in err
    # a missing blob
    missing = tmp_path / "missing"
    shutil.copytree(d / "trvae", missing)
    (missing / "conditions.safetensors").unlink()
    code, err = _run(capsys, ["embed", "--model", str(missing), "--data", data, "--condition-key", "study",
                              "--out", str(tmp_path / "o4.h5ad")])
    assert code == 2 and "conditions.safetensors is missing" in err
    assert not any((tmp_path / f"o{i}.h5ad").exists() for i in (2, 3, 4))


def test_data_file_that_is_not_h5ad(files, capsys, tmp_path):
    d, _, _ = files
    junk = tmp_path / "junk.h5ad"
    junk.write_text("hello")
    code, err = _run(capsys, ["map", "--model", str(d / "trvae"), "--data", str(junk), "--condition-key", "study",
                              "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2 and "not a readable .h5ad" in err
