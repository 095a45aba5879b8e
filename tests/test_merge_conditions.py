"""The one merge by condition name (``format.conditions.merge_conditions``)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedarches.errors import BundleContentError, ConditionCollisionError, TensorShapeError, TensorValueError
from fedarches.format.conditions import merge_conditions

BASE = {"encoder/s0": torch.zeros(4), "decoder/s0": torch.zeros(3)}


def _addition(*names: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        out[f"encoder/{n}"] = torch.randn(4, generator=g)
        out[f"decoder/{n}"] = torch.randn(3, generator=g)
    return out


def test_order_of_additions_never_changes_the_result():
    adds = [_addition("qb", "qa", seed=1), _addition("z", seed=2), _addition("m", seed=3)]
    results = [merge_conditions(["s0"], BASE, list(p)) for p in itertools.permutations(adds)]
    names, tensors = results[0]
    assert names == ["s0", "m", "qa", "qb", "z"]
    for other_names, other in results[1:]:
        assert other_names == names
        assert set(other) == set(tensors)
        assert all(torch.equal(other[k], tensors[k]) for k in tensors)


def test_refusals_name_their_check():
    with pytest.raises(ConditionCollisionError):
        merge_conditions(["s0"], BASE, [_addition("s0")])
    with pytest.raises(ConditionCollisionError, match="claimed by additions 0 and 1"):
        merge_conditions(["s0"], BASE, [_addition("q"), _addition("q", seed=5)])
    with pytest.raises(TensorShapeError, match="lacks its vectors"):
        merge_conditions(["s0"], BASE, [{"encoder/q": torch.zeros(4)}])
    with pytest.raises(TensorShapeError, match="encoder/q is"):
        merge_conditions(["s0"], BASE, [{**_addition("q"), "encoder/q": torch.zeros(5)}])
    with pytest.raises(TensorShapeError, match="encoder/q is"):
        merge_conditions(["s0"], BASE, [{**_addition("q"), "encoder/q": torch.zeros(4, dtype=torch.float64)}])
    with pytest.raises(TensorShapeError, match="names table 'other'"):
        merge_conditions(["s0"], BASE, [{**_addition("q"), "other/q": torch.zeros(4)}])
    with pytest.raises(TensorValueError):
        merge_conditions(["s0"], BASE, [{**_addition("q"), "decoder/q": torch.full((3,), float("nan"))}])
    with pytest.raises(BundleContentError):
        merge_conditions(["s0"], BASE, [{"encoder": torch.zeros(4)}])
