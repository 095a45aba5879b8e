"""Issue 2, done-when 3: on the CellBench hold-out split, label transfer >= 0.95 on
known types (a known cell called unknown counts as wrong) and >= 80% of the unseen
A549 cells called unknown, for both models with default settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import shared_data

spec = importlib.util.spec_from_file_location(
    "cellbench_holdout", Path(__file__).resolve().parents[1] / "examples" / "cellbench_holdout.py"
)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["trvae", "nb"])
def test_cellbench_holdout(kind):
    path = shared_data("cellbench_lung_celllines.h5ad")
    figures = example.run(path, kind, seed=0, threads=1, progress=False)
    print(figures)
    assert figures["accuracy_known"] >= 0.95, figures
    assert figures["a549_called_unknown"] >= 0.80, figures
