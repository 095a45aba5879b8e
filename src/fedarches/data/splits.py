"""Reference/query splits used by tests, examples and benchmarks, defined once so
every tool is measured on exactly the same cells: splits of the shared real data
sets (``Split``) and simulated ones whose query is in another biological state
(``SimulatedSplit``, drawn anew for each seed)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import anndata as ad
import pandas as pd

from fedarches.data.simulate import cell_type_names, simulate, study_names
from fedarches.errors import SettingError


@dataclass(frozen=True)
class Split:
    """Which studies build the reference, which are the query, and which cell
    types are removed from the reference (so the query holds types it never saw)."""

    name: str
    file: str
    reference_studies: tuple[str, ...]
    query_studies: tuple[str, ...]
    held_out_types: tuple[str, ...] = ()
    description: str = ""
    study_key: str = "study"
    label_key: str = "cell_type"

    def apply(self, adata: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
        study = adata.obs[self.study_key].astype(str)
        ctype = adata.obs[self.label_key].astype(str)
        ref = study.isin(self.reference_studies) & ~ctype.isin(self.held_out_types)
        query = study.isin(self.query_studies)
        return adata[ref.to_numpy()].copy(), adata[query.to_numpy()].copy()

    def load(self, path: str | Path) -> tuple[ad.AnnData, ad.AnnData]:
        return self.apply(ad.read_h5ad(path))


CELLBENCH = Split(
    name="cellbench",
    file="cellbench_lung_celllines.h5ad",
    reference_studies=("CELseq2_3cl", "Dropseq_3cl", "CELseq2_5cl_p1"),
    query_studies=("CELseq2_5cl_p2", "CELseq2_5cl_p3"),
    held_out_types=("A549",),
    description="CellBench lung cell lines: reference CELseq2_3cl + Dropseq_3cl + CELseq2_5cl_p1 "
    "without A549; query CELseq2_5cl_p2 + CELseq2_5cl_p3; A549 never seen by the reference",
)
PBMC_CHEMISTRY = Split(
    name="pbmc-chemistry",
    file="symphony_pbmc_3chem.h5ad",
    reference_studies=("3pv1", "3pv2"),
    query_studies=("5p",),
    description="Symphony PBMC, by 10x chemistry: reference 3' v1 + 3' v2; query 5'",
)
PBMC_HOLDOUT = Split(
    name="pbmc",
    file=PBMC_CHEMISTRY.file,
    reference_studies=PBMC_CHEMISTRY.reference_studies,
    query_studies=PBMC_CHEMISTRY.query_studies,
    held_out_types=("B",),
    description="Symphony PBMC, by 10x chemistry: reference 3' v1 + 3' v2 without B cells; "
    "query 5' (all types); B cells never seen by the reference",
)
PBMC_CD16_HOLDOUT = replace(
    PBMC_HOLDOUT,
    name="pbmc-cd16",
    held_out_types=("Mono_CD16",),
    description="Symphony PBMC, by 10x chemistry: reference 3' v1 + 3' v2 without CD16 monocytes; "
    "query 5' (all types); a sibling type (CD16 vs CD14 monocytes) never seen by the reference",
)
#: The splits the benchmarks run, by name.
BENCHMARK_SPLITS = {s.name: s for s in (CELLBENCH, PBMC_HOLDOUT)}


@dataclass(frozen=True)
class SimulatedSplit:
    """A simulated reference/query pair whose query is in a biological state the
    reference never saw, with held-out types at known distances from known ones.

    Why simulated: the real splits differ only technically between reference and
    query; here every known type is shifted by the state (``state_strength``, see
    ``fedarches.data.simulate``) while the held-out types are truly new, so a
    novelty rule can be scored on telling the two apart, and each seed is a new
    data draw. The reference studies are controls with the held-out types absent;
    the query studies are stimulated and hold every type. ``siblings`` are
    ``(name, parent, distance)`` triples (distance 1: an unrelated type).
    """

    name: str
    description: str
    reference_studies: tuple[str, ...] = ("study_0", "study_1")
    query_studies: tuple[str, ...] = ("study_2",)
    held_out_types: tuple[str, ...] = ()
    study_key: str = "study"
    label_key: str = "cell_type"
    state_strength: float = 1.0
    siblings: tuple[tuple[str, str, float], ...] = ()
    n_cells: int = 4500
    n_genes: int = 1000
    n_known_types: int = 6
    type_balance: float = 50.0

    def __post_init__(self) -> None:
        studies = study_names(len(self.reference_studies) + len(self.query_studies))
        if list(self.reference_studies) + list(self.query_studies) != studies:
            raise SettingError(f"setting check failed: split {self.name!r} must name the simulated studies in "
                               f"order, reference first: {studies}")
        unknown = set(self.held_out_types) - set(self.cell_types)
        if unknown:
            raise SettingError(f"setting check failed: split {self.name!r} holds out {sorted(unknown)}, which "
                               f"are not among its types {self.cell_types}")

    @property
    def cell_types(self) -> tuple[str, ...]:
        """Every type the query holds: the known types, then the siblings."""
        return tuple(cell_type_names(self.n_known_types)) + tuple(name for name, _, _ in self.siblings)

    @property
    def known_types(self) -> tuple[str, ...]:
        """The types the reference holds."""
        return tuple(t for t in self.cell_types if t not in self.held_out_types)

    def make(self, seed: int) -> tuple[ad.AnnData, ad.AnnData]:
        """(reference, query) for data seed ``seed``: integer counts as float32 CSR
        in ``.X``, ``obs[study_key]``, ``obs[label_key]`` and ``obs["state"]``, gene
        names in ``var_names``. The same seed gives the same data."""
        adata = simulate(
            n_cells=self.n_cells, n_genes=self.n_genes, n_cell_types=self.n_known_types,
            n_studies=len(self.reference_studies) + len(self.query_studies),
            held_out={s: list(self.held_out_types) for s in self.reference_studies} if self.held_out_types else None,
            seed=seed, type_balance=self.type_balance,
            state_strength={s: float(self.state_strength) for s in self.query_studies},
            siblings={name: (parent, float(d)) for name, parent, d in self.siblings} or None,
            n_jobs=1,
        )
        adata.obs = adata.obs.rename(columns={"study": self.study_key, "cell_type": self.label_key})
        adata.uns["split"] = self.name
        return self._part(adata, self.reference_studies, drop=self.held_out_types), \
            self._part(adata, self.query_studies, drop=())

    def _part(self, adata: ad.AnnData, studies: tuple[str, ...], drop: tuple[str, ...]) -> ad.AnnData:
        keep = adata.obs[self.study_key].isin(studies) & ~adata.obs[self.label_key].isin(drop)
        part = adata[keep.to_numpy()].copy()
        for key in (self.study_key, self.label_key):  # no categories for cells the part lacks
            part.obs[key] = pd.Categorical(part.obs[key]).remove_unused_categories()
        return part


_SIM_SIBLINGS = (("sibling-of-type_A", "type_A", 0.3), ("distant", "type_B", 1.0))
_SIM_HELD_OUT = ("sibling-of-type_A", "distant")
SIM_STATE = SimulatedSplit(
    name="sim-state",
    description="simulated: reference 2 control studies without two types; query 1 study in a state that "
    "shifts every type (strength 1, about a cell-type difference); held out a close sibling of type_A "
    "(distance 0.3) and an unrelated type",
    held_out_types=_SIM_HELD_OUT, state_strength=1.0, siblings=_SIM_SIBLINGS,
)
SIM_STATE_STRONG = SimulatedSplit(
    name="sim-state-strong",
    description="as sim-state with the state at strength 2 (larger than a cell-type difference)",
    held_out_types=_SIM_HELD_OUT, state_strength=2.0, siblings=_SIM_SIBLINGS,
)
SIM_TECHNICAL = SimulatedSplit(
    name="sim-technical",
    description="as sim-state with no state (strength 0): reference and query differ only technically; "
    "the control for the state splits",
    held_out_types=_SIM_HELD_OUT, state_strength=0.0, siblings=_SIM_SIBLINGS,
)
#: The splits the quality suite runs (issue 14), by name: real ones, then simulated ones.
QUALITY_SPLITS: dict[str, Split | SimulatedSplit] = {
    s.name: s for s in (CELLBENCH, PBMC_HOLDOUT, PBMC_CD16_HOLDOUT, SIM_STATE, SIM_STATE_STRONG, SIM_TECHNICAL)
}

CELLBENCH_REFERENCE = CELLBENCH.reference_studies
CELLBENCH_QUERY = CELLBENCH.query_studies
CELLBENCH_HELD_OUT = CELLBENCH.held_out_types[0]
PBMC_REFERENCE = PBMC_CHEMISTRY.reference_studies
PBMC_QUERY = PBMC_CHEMISTRY.query_studies


def cellbench_holdout(path: str | Path) -> tuple[ad.AnnData, ad.AnnData]:
    """The scArches paper's hold-out design on CellBench: reference = two 3-cell-line
    plates and one 5-cell-line plate with every A549 cell removed; query = the other
    two 5-cell-line plates, so A549 is a cell type the reference never saw."""
    return CELLBENCH.load(path)


def pbmc_chemistry(path: str | Path) -> tuple[ad.AnnData, ad.AnnData]:
    """PBMC from three 10x chemistries: reference = 3' v1 + v2, query = 5'."""
    return PBMC_CHEMISTRY.load(path)
