"""The one new-condition detection (client/plan.py) and the order it lists conditions in."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from fedarches.client.plan import ordered_conditions, plan_contribution
from fedarches.errors import ColumnError


def _adata(studies, categorical=True):
    obs = pd.DataFrame({"study": studies}, index=[f"c{i}" for i in range(len(studies))])
    if categorical:
        obs["study"] = pd.Categorical(studies, categories=["z", "b", "a", "unused"])
    return ad.AnnData(X=np.zeros((len(studies), 2), dtype=np.float32), obs=obs)


def test_category_order_else_sorted():
    assert ordered_conditions(_adata(["a", "z", "b", "a"]).obs["study"]) == ["z", "b", "a"]
    assert ordered_conditions(_adata(["a", "z", "b"], categorical=False).obs["study"]) == ["a", "b", "z"]


def test_plan_splits_held_and_new_and_caps_per_round():
    a = _adata(["a", "z", "b", "a"])
    plan = plan_contribution(a, "study", ["b"])
    assert (plan.present, plan.held, plan.new) == (["z", "b", "a"], ["b"], ["z", "a"])
    assert not plan.nothing_new
    assert plan_contribution(a, "study", ["b"], conditions_per_round=1).new == ["z"]
    done = plan_contribution(a, "study", ["a", "b", "z", "other"])
    assert done.nothing_new and done.held == ["z", "b", "a"] and done.new == []
    assert done.to_dict() == {"present": ["z", "b", "a"], "held": ["z", "b", "a"], "new": []}


def test_missing_column_is_a_column_error():
    with pytest.raises(ColumnError, match="obs column check failed: condition key 'batch' is not a column"):
        plan_contribution(_adata(["a"]), "batch", [])
