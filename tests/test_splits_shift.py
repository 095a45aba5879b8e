"""The quality suite's splits: the real ones unchanged, the simulated state-shift ones drawn per seed."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from fedarches.data.splits import (BENCHMARK_SPLITS, PBMC_CD16_HOLDOUT, QUALITY_SPLITS, SIM_STATE,
                                   SIM_TECHNICAL, Split, SimulatedSplit)
from fedarches.errors import InputDataError


def test_quality_splits_are_the_real_then_the_simulated_ones():
    assert list(QUALITY_SPLITS) == ["cellbench", "pbmc", "pbmc-cd16", "sim-state", "sim-state-strong",
                                    "sim-technical"]
    assert list(BENCHMARK_SPLITS) == ["cellbench", "pbmc"]
    assert all(isinstance(s, Split) for s in list(QUALITY_SPLITS.values())[:3])
    sims = [s for s in QUALITY_SPLITS.values() if isinstance(s, SimulatedSplit)]
    assert [s.state_strength for s in sims] == [1.0, 2.0, 0.0]
    assert all(s.held_out_types == ("sibling-of-type_A", "distant") for s in sims)


def test_make_is_deterministic_per_seed():
    a_ref, a_query = SIM_STATE.make(0)
    b_ref, b_query = SIM_STATE.make(0)
    c_ref, _ = SIM_STATE.make(1)
    for a, b in ((a_ref, b_ref), (a_query, b_query)):
        assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs) and list(a.var_names) == list(b.var_names)
    assert a_ref.shape != c_ref.shape or (a_ref.X != c_ref.X).nnz > 0


@pytest.mark.parametrize("seed", range(5))
def test_reference_lacks_the_held_out_types_and_the_query_holds_them(seed):
    ref, query = SIM_STATE.make(seed)
    assert set(ref.obs["cell_type"]) == set(SIM_STATE.known_types) == {f"type_{c}" for c in "ABCDEF"}
    assert list(ref.obs["cell_type"].cat.categories) == sorted(SIM_STATE.known_types)
    held = query.obs["cell_type"].value_counts()
    assert set(held.index) == set(SIM_STATE.cell_types)
    for t in SIM_STATE.held_out_types:
        assert held[t] >= 100, (seed, t, held[t])
    assert set(ref.obs["study"]) == {"study_0", "study_1"} and set(query.obs["study"]) == {"study_2"}
    assert 2000 <= ref.n_obs <= 3000 and 1200 <= query.n_obs <= 1600
    assert (ref.obs["state"] == "control").all() and (query.obs["state"] == "stimulated").all()


def test_simulated_parts_are_raw_integer_counts_on_the_same_genes():
    ref, query = SIM_TECHNICAL.make(3)
    for part in (ref, query):
        assert sp.isspmatrix_csr(part.X) and part.X.dtype == np.float32
        assert np.array_equal(part.X.data, np.round(part.X.data)) and (part.X.data > 0).all()
        assert part.var_names.is_unique
    assert list(ref.var_names) == list(query.var_names) and ref.n_vars == SIM_TECHNICAL.n_genes
    assert (query.obs["state"] == "control").all()  # the technical control has no state


def test_a_simulated_split_with_other_keys_and_a_bad_definition():
    split = SimulatedSplit(name="t", description="", study_key="batch", label_key="label", n_cells=600,
                           n_genes=80, n_known_types=2, siblings=(("near", "type_A", 0.5),),
                           held_out_types=("near",))
    ref, query = split.make(0)
    assert "batch" in ref.obs and "label" in query.obs and "near" in set(query.obs["label"])
    assert "near" not in set(ref.obs["label"])
    with pytest.raises(InputDataError, match="not among its types"):
        SimulatedSplit(name="bad", description="", held_out_types=("type_Z",))
    with pytest.raises(InputDataError, match="in order"):
        SimulatedSplit(name="bad", description="", query_studies=("study_7",))


def test_pbmc_cd16_split_holds_cd16_monocytes_out_of_the_reference():
    from conftest import shared_data

    ref, query = PBMC_CD16_HOLDOUT.load(shared_data(PBMC_CD16_HOLDOUT.file))
    assert "Mono_CD16" not in set(ref.obs["cell_type"].astype(str))
    assert (query.obs["cell_type"].astype(str) == "Mono_CD16").sum() > 0
    assert set(ref.obs["study"].astype(str)) == {"3pv1", "3pv2"}
