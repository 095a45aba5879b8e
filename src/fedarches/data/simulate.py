"""Seeded simulator of UMI count data: cell-type programs, study effects, library sizes.

Why a simulator: the real data sets shipped with the project have about a thousand
cells, too few for speed and scale work, and they cannot be re-drawn with a cell
type held out of one study at will. The generative model is deliberately simple and
explicit, so tests can state what they expect:

* gene base log-means ``b_g ~ N(0, gene_log_sd^2)`` (log-normal gene means);
* cell-type programs: ``log m_tg = b_g + N(0, type_log_sd^2)`` plus, for each type,
  ``n_markers`` marker genes (distinct between types while genes last) up-regulated
  by a log fold ``~ U(marker_log_fold_range)``;
* study effects: a multiplicative gene effect ``exp(N(0, study_gene_sd^2))`` per
  (study, gene), and a library-size factor ``exp(N(0, study_library_sd^2))`` per study;
* per cell: library size ``library_size * study factor * exp(N(0, library_sd^2))``;
  expected counts ``mu_cg = L_c * q_{type, study, g}`` where ``q`` is the type program
  times the study gene effect, normalised to sum to 1 over genes;
* counts ``~ NB(mu_cg, theta_g)`` (gamma-Poisson; inverse dispersion per gene
  ``theta_g = theta * exp(N(0, 0.5^2))``).

Two optional parts make a query differ from a reference biologically, not only
technically (the scArches paper's disease-to-healthy use, issue 14):

* a biological *state* (stimulation, disease) in chosen studies, with a strength
  per study: ``log m_tg += strength * r_tg``. The response ``r_t`` is a shared
  program (``n_state_genes`` genes, mostly up, log folds from
  ``marker_log_fold_range``) scaled per type and gene by
  ``exp(N(0, state_type_sd^2))``, plus a few response genes of each type's own.
  Because the response differs by type, no per-study offset (what architecture
  surgery fits for a new study) removes it exactly: a known type in the new state
  stays shifted, as in real stimulated or diseased samples.
* *siblings*: extra types made from a parent type, sharing all but a fraction
  ``distance`` of its program, so held-out types can sit at a chosen distance
  from a known one (a close subtype, or with distance 1 an unrelated type).

Sampling is exact and sparse-aware: for each entry ``P(0) = (1 + mu/theta)^-theta``
is compared with one uniform draw ``u = exp(-E)``, ``E ~ Exp(1)``, written as
``mu > theta * expm1(E / theta)`` (one transcendental per entry), and only the
nonzero entries (about a sixth) are drawn further, from the zero-truncated NB: by
inverse CDF with the same uniform for means up to 5, by gamma-Poisson rejection
above (where it rarely rejects). That makes the cost per matrix entry a few float
operations instead of a gamma and a Poisson draw (numpy's Poisson alone is ~50-140
ns per entry here). Blocks of 4,096 cells have their own random stream
(``SeedSequence(seed, spawn_key=(block,))``), run in a thread pool, and go straight
to CSR, so the output depends only on the arguments, never on ``n_jobs``.

Measured on the project machine (2 cores, shared with other jobs at load 3-5, so
upper bounds), defaults (2,000 genes, 6 types, 4 studies), ``n_jobs=-1``:

* 1,000,000 cells x 2,000 genes: 96 s wall (160-170 s when the machine was busier),
  84% zeros, ~980 UMIs per cell, CSR 2.36 GiB (float32 data + int32 indices), peak
  RSS 5.2 GiB (the per-block pieces and the assembled matrix briefly coexist, and
  glibc keeps freed block memory). Command:
  ``python -m fedarches.data.simulate --cells 1000000`` (prints these figures).
* one block of 4,096 cells x 2,000 genes: ~14-40 ns per matrix entry single-threaded,
  depending on load; 5,000 cells (the default) in well under a second.
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from fedarches.errors import SettingError

__all__ = ["cell_type_names", "simulate", "study_names"]

BLOCK_CELLS = 4096  # cells per random stream; fixed so results never depend on n_jobs
_MU_REJECTION = 5.0  # above this mean, zero-truncated draws use gamma-Poisson rejection (measured faster)
_MAX_INVERSE_STEPS = 2000
_CELL_CHUNK_STREAM = 3  # design-stream key of the cells of one chunk (simulate(cell_seed=))
_DESIGN_STREAM = 2**32 - 1  # spawn-key prefix of the optional design streams (blocks use (block,))



def cell_type_names(n: int) -> list[str]:
    """``type_A`` .. ``type_Z``, ``type_AA``, ``type_AB`` ... (spreadsheet-column style)."""
    names = []
    for i in range(n):
        s, j = "", i
        while True:
            s = string.ascii_uppercase[j % 26] + s
            j = j // 26 - 1
            if j < 0:
                break
        names.append(f"type_{s}")
    return names


def study_names(n: int) -> list[str]:
    """``study_0`` .. ``study_{n-1}``."""
    return [f"study_{i}" for i in range(n)]


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SettingError(f"setting check failed: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _allowed_types(held_out: Mapping[str, Sequence[str]] | None, studies: list[str],
                   types: list[str]) -> np.ndarray:
    """Boolean [n_studies, n_types]: which cell types each study contains."""
    allowed = np.ones((len(studies), len(types)), dtype=bool)
    if not held_out:
        return allowed
    if not isinstance(held_out, Mapping):
        raise SettingError("setting check failed: held_out must map a study name to a list of cell-type names, "
                             f"e.g. {{'study_0': ['type_A']}}; got {type(held_out).__name__}")
    s_index = {s: i for i, s in enumerate(studies)}
    t_index = {t: i for i, t in enumerate(types)}
    for study, gone in held_out.items():
        if study not in s_index:
            raise SettingError(f"setting check failed: held_out names study {study!r}, but the simulated studies are "
                                 f"{studies[0]}..{studies[-1]}")
        if isinstance(gone, str):
            gone = [gone]
        for t in gone:
            if t not in t_index:
                raise SettingError(f"setting check failed: held_out[{study!r}] names cell type {t!r}, but the simulated types "
                                     f"are {types[0]}..{types[-1]}")
            allowed[s_index[study], t_index[t]] = False
        if not allowed[s_index[study]].any():
            raise SettingError(f"setting check failed: held_out removes every cell type from {study!r}; leave at least one")
    return allowed


def _marker_genes(perm: np.ndarray, t: int, n_markers: int) -> np.ndarray:
    """The marker genes of type ``t``: its own stretch of ``perm``, distinct between types while genes last."""
    start = (t * n_markers) % perm.size
    return np.take(perm, np.arange(start, start + n_markers), mode="wrap")


def _design_rng(seed: int, *key: int) -> np.random.Generator:
    """A random stream for an optional part of the design, apart from the main one and the blocks'."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(_DESIGN_STREAM, *key)))


def _sibling_specs(siblings: Mapping[str, tuple[str, float]] | None,
                   base_types: list[str]) -> list[tuple[str, int, float]]:
    """``siblings`` checked -> [(name, parent index, distance)], in the mapping's order."""
    if not siblings:
        return []
    if not isinstance(siblings, Mapping):
        raise SettingError("setting check failed: siblings must map a new type name to (parent type, distance), "
                           f"e.g. {{'sibling-of-type_A': ('type_A', 0.3)}}; got {type(siblings).__name__}")
    specs = []
    for name, spec in siblings.items():
        if not isinstance(name, str) or not name or name in base_types:
            raise SettingError(f"setting check failed: sibling name {name!r} must be a new, non-empty type name "
                               f"(not one of {base_types[0]}..{base_types[-1]})")
        try:
            parent, distance = spec
            distance = float(distance)
        except (TypeError, ValueError):
            raise SettingError(f"setting check failed: siblings[{name!r}] must be (parent type, distance), "
                               f"got {spec!r}") from None
        if parent not in base_types:
            raise SettingError(f"setting check failed: siblings[{name!r}] names parent {parent!r}, but the parent "
                               f"must be one of the simulated types {base_types[0]}..{base_types[-1]}")
        if not (np.isfinite(distance) and 0.0 < distance <= 1.0):
            raise SettingError(f"setting check failed: siblings[{name!r}] distance must be in (0, 1], got {distance!r}")
        specs.append((name, base_types.index(parent), distance))
    return specs


def _state_strengths(state_strength: Mapping[str, float] | None, studies: list[str]) -> np.ndarray | None:
    """``state_strength`` checked -> strength per study (0 = control), or None when no state is asked for."""
    if state_strength is None:
        return None
    if not isinstance(state_strength, Mapping):
        raise SettingError("setting check failed: state_strength must map a study name to a strength >= 0, "
                           f"e.g. {{'study_2': 1.0}}; got {type(state_strength).__name__}")
    out = np.zeros(len(studies))
    for study, value in state_strength.items():
        if study not in studies:
            raise SettingError(f"setting check failed: state_strength names study {study!r}, but the simulated "
                               f"studies are {studies[0]}..{studies[-1]}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not (np.isfinite(value) and value >= 0):
            raise SettingError(f"setting check failed: state_strength[{study!r}] must be a finite number >= 0, "
                               f"got {value!r}")
        out[studies.index(study)] = float(value)
    return out


def _state_gene_count(n_state_genes: int | None, n_markers: int, n_genes: int) -> int:
    if n_state_genes is None:
        return min(n_genes, max(2, (3 * n_markers) // 2))
    n_state_genes = _check_positive_int("n_state_genes", n_state_genes)
    if n_state_genes > n_genes:
        raise SettingError(f"setting check failed: n_state_genes ({n_state_genes}) cannot exceed n_genes ({n_genes})")
    return n_state_genes


def _replace_mask(rng: np.random.Generator, distance: float, groups: list[np.ndarray], n_genes: int) -> np.ndarray:
    """Genes a sibling takes from its own program: exactly ``round(distance * size)`` of each group."""
    mask = np.zeros(n_genes, dtype=bool)
    for g in groups:
        mask[rng.permutation(g)[: int(round(distance * g.size))]] = True
    return mask


def _sibling_programs(seed: int, sibs: list[tuple[str, int, float]], base: np.ndarray, noise: np.ndarray,
                      markers: np.ndarray, perm: np.ndarray, n_markers: int, fold_range: tuple[float, float],
                      type_log_sd: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Log programs [n_siblings, genes] and each sibling's mask of genes taken from its own program.

    A sibling is drawn as a fresh type would be (own type-level noise, own markers
    on the next stretch of ``perm``), then keeps its parent's values except on a
    fraction ``distance`` of the parent's markers, of its own markers and of the
    other genes: it loses as many parent markers as it gains own ones.
    """
    n_types, n_genes = noise.shape
    rows, masks = [], []
    for i, (_, parent, distance) in enumerate(sibs):
        rng = _design_rng(seed, 1, i)
        own_markers = np.zeros(n_genes)
        genes = _marker_genes(perm, n_types + i, n_markers)
        own_markers[genes] = rng.uniform(*fold_range, n_markers)
        own = rng.normal(0.0, type_log_sd, n_genes) + own_markers
        parent_genes = np.flatnonzero(markers[parent])
        new_genes = np.setdiff1d(genes, parent_genes)
        rest = np.setdiff1d(np.arange(n_genes), np.concatenate([parent_genes, new_genes]))
        mask = _replace_mask(rng, distance, [parent_genes, new_genes, rest], n_genes)
        rows.append(base + np.where(mask, own, noise[parent] + markers[parent]))
        masks.append(mask)
    return np.array(rows).reshape(len(sibs), n_genes), masks


def _state_response(seed: int, n_base: int, sibs: list[tuple[str, int, float]], sib_masks: list[np.ndarray],
                    n_genes: int, n_state_genes: int, fold_range: tuple[float, float],
                    state_type_sd: float) -> np.ndarray:
    """Log-fold response of each type [types, genes] to the state at strength 1.

    Shared program: ``n_state_genes`` genes, 70% up and 30% down, log folds from
    ``fold_range``. Each type scales it per gene by ``exp(N(0, state_type_sd^2))``
    and adds ``max(1, n_state_genes // 6)`` response genes of its own. A sibling
    inherits its parent's response except on the genes it took from its own program.
    """
    rng = _design_rng(seed, 0)
    shared = np.zeros(n_genes)
    genes = rng.choice(n_genes, n_state_genes, replace=False)
    sign = np.where(rng.random(n_state_genes) < 0.7, 1.0, -1.0)
    shared[genes] = sign * rng.uniform(*fold_range, n_state_genes)
    n_specific = min(n_genes, max(1, n_state_genes // 6))

    def one_type(r: np.random.Generator) -> np.ndarray:
        own = shared * np.exp(r.normal(0.0, state_type_sd, n_genes))
        own[r.choice(n_genes, n_specific, replace=False)] += r.uniform(*fold_range, n_specific)
        return own

    response = [one_type(rng) for _ in range(n_base)]
    for i, ((_, parent, _), mask) in enumerate(zip(sibs, sib_masks)):
        response.append(np.where(mask, one_type(_design_rng(seed, 2, i)), response[parent]))
    return np.array(response)


def simulate(
    n_cells: int = 5000,
    n_genes: int = 2000,
    n_cell_types: int = 6,
    n_studies: int = 4,
    held_out: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
    *,
    n_markers: int | None = None,
    marker_log_fold_range: tuple[float, float] = (1.5, 3.0),
    gene_log_sd: float = 2.0,
    type_log_sd: float = 0.3,
    study_gene_sd: float = 0.3,
    study_library_sd: float = 0.3,
    library_size: float = 1000.0,
    library_sd: float = 0.4,
    theta: float = 2.0,
    type_balance: float = 5.0,
    state_strength: Mapping[str, float] | None = None,
    n_state_genes: int | None = None,
    state_type_sd: float = 0.5,
    siblings: Mapping[str, tuple[str, float]] | None = None,
    n_jobs: int = -1,
    cell_seed: int | None = None,
) -> ad.AnnData:
    """Simulate a multi-study UMI count matrix.

    Returns an AnnData with ``.X`` a float32 CSR matrix of integer counts,
    ``obs["study"]`` (``study_0``...) and ``obs["cell_type"]`` (``type_A``...) as
    categoricals (cells ordered by study), unique ``var_names`` (``gene_0000``...),
    and the ground truth: ``varm["type_log_program"]`` [genes x types],
    ``varm["study_log_effect"]`` [genes x studies], ``var["theta"]``,
    ``obs["library_factor"]`` and ``uns["simulate"]`` (the arguments).

    ``held_out`` maps a study name to the cell types absent from that study, e.g.
    ``{"study_0": ["type_F"], "study_1": ["type_F"]}`` to keep ``type_F`` out of a
    reference made of studies 0 and 1. Study sizes are equal (the first
    ``n_cells % n_studies`` studies get one more cell); within a study, cell-type
    proportions are drawn from a symmetric Dirichlet(``type_balance``) over the
    types the study contains. ``n_markers`` defaults to ``max(2, n_genes // 50)``.
    ``n_jobs`` (-1 = all cores) only changes speed.

    ``state_strength`` maps a study name to the strength (>= 0) of the biological
    state its cells are in; studies left out are controls. The state's log folds
    come from ``marker_log_fold_range`` on ``n_state_genes`` genes (default
    ``1.5 * n_markers``), so at strength 1 a type moves by about as much, in
    log-expression, as two types differ by their markers: a shift of the size of a
    cell-type difference, where a threshold calibrated on reference cells no longer
    tells "known type, new state" from "new type". Strength 2 is larger than a type
    difference; 0 gives exactly the counts of no state. When given, the output
    also holds ``obs["state"]`` (``control``/``stimulated``),
    ``obs["state_strength"]`` and ``varm["state_log_response"]`` [genes x types],
    the response at strength 1.

    ``siblings`` maps a new type name to ``(parent type, distance)``, distance in
    (0, 1]: the sibling takes its own values on exactly that fraction of its
    parent's markers, of its own markers and of the other genes, and keeps the
    parent's elsewhere, so its squared distance to the parent grows about linearly
    with ``distance`` (0.2: a subtype sharing most of the program; 1: nothing of
    the parent left). It responds to the state like its parent on the genes it
    shares. Siblings follow the ``n_cell_types`` types in ``obs["cell_type"]``'s
    categories and may be named in ``held_out``. Neither option changes the
    programs, study effects or response of the other types.

    ``cell_seed``: chunks of one larger data set. The gene-level design (programs,
    study effects, dispersions) comes from ``seed`` alone and the cells (study type
    mixes, types, library sizes, counts) from their own stream keyed by ``cell_seed``,
    so calls with one ``seed`` and different ``cell_seed`` give cells of the same
    types and studies that can be appended to one file (obs names repeat per chunk:
    rename them). None (the default) keeps every output as it was.
    """
    n_cells = _check_positive_int("n_cells", n_cells)
    n_genes = _check_positive_int("n_genes", n_genes)
    n_cell_types = _check_positive_int("n_cell_types", n_cell_types)
    n_studies = _check_positive_int("n_studies", n_studies)
    if n_cells < n_studies:
        raise SettingError(f"setting check failed: n_cells ({n_cells}) must be at least n_studies ({n_studies})")
    n_markers = max(2, n_genes // 50) if n_markers is None else _check_positive_int("n_markers", n_markers, 0)
    if n_markers > n_genes:
        raise SettingError(f"setting check failed: n_markers ({n_markers}) cannot exceed n_genes ({n_genes})")
    lo, hi = (float(v) for v in marker_log_fold_range)
    if not 0.0 <= lo <= hi:
        raise SettingError(f"setting check failed: marker_log_fold_range must be (low, high) with 0 <= low <= high, got {(lo, hi)}")
    for name, val in (("gene_log_sd", gene_log_sd), ("type_log_sd", type_log_sd),
                      ("study_gene_sd", study_gene_sd), ("study_library_sd", study_library_sd),
                      ("library_sd", library_sd)):
        if not (np.isfinite(val) and val >= 0):
            raise SettingError(f"setting check failed: {name} must be a finite number >= 0, got {val!r}")
    for name, val in (("library_size", library_size), ("theta", theta), ("type_balance", type_balance)):
        if not (np.isfinite(val) and val > 0):
            raise SettingError(f"setting check failed: {name} must be a finite number > 0, got {val!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SettingError(f"setting check failed: seed must be a non-negative integer, got {seed!r}")
    if n_jobs == 0 or n_jobs < -1:
        raise SettingError(f"setting check failed: n_jobs must be -1 (all cores) or a positive integer, got {n_jobs}")
    workers = n_jobs if n_jobs > 0 else (os.cpu_count() or 1)

    studies = study_names(n_studies)
    sibs = _sibling_specs(siblings, cell_type_names(n_cell_types))
    types = cell_type_names(n_cell_types) + [name for name, _, _ in sibs]
    strengths = _state_strengths(state_strength, studies)
    n_state_genes = _state_gene_count(n_state_genes, n_markers, n_genes)
    if not (np.isfinite(state_type_sd) and state_type_sd >= 0):
        raise SettingError(f"setting check failed: state_type_sd must be a finite number >= 0, got {state_type_sd!r}")
    n_types = len(types)
    allowed = _allowed_types(held_out, studies, types)
    master = np.random.default_rng(np.random.SeedSequence(int(seed)))
    if cell_seed is not None and (isinstance(cell_seed, bool) or not isinstance(cell_seed, (int, np.integer))
                                  or cell_seed < 0):
        raise SettingError(f"setting check failed: cell_seed must be a non-negative integer or None, got {cell_seed!r}")

    # ---- gene-level design
    base = master.normal(0.0, gene_log_sd, n_genes)
    noise = master.normal(0.0, type_log_sd, (n_cell_types, n_genes))
    programs = base[None, :] + noise
    perm = master.permutation(n_genes)
    markers = np.zeros((n_cell_types, n_genes))
    for t in range(n_cell_types):
        genes = _marker_genes(perm, t, n_markers)
        fold = master.uniform(lo, hi, n_markers)
        programs[t, genes] += fold
        markers[t, genes] = fold
    study_gene = master.normal(0.0, study_gene_sd, (n_studies, n_genes))
    study_lib = master.normal(0.0, study_library_sd, n_studies)
    theta_g = (theta * np.exp(master.normal(0.0, 0.5, n_genes))).astype(np.float32)
    # siblings and the state come from their own streams, so the draws above (and
    # every output without them) are the same whether or not they are asked for
    sib_programs, sib_masks = _sibling_programs(seed, sibs, base, noise, markers, perm, n_markers, (lo, hi),
                                                type_log_sd)
    programs = np.vstack([programs, sib_programs])

    # q[t * n_studies + s] = normalised expression proportions of type t in study s
    logq = programs[:, None, :] + study_gene[None, :, :]
    response = None
    if strengths is not None:
        response = _state_response(seed, n_cell_types, sibs, sib_masks, n_genes, n_state_genes, (lo, hi),
                                   state_type_sd)
        logq += strengths[None, :, None] * response[:, None, :]
    logq -= logq.max(axis=2, keepdims=True)
    q = np.exp(logq)
    q /= q.sum(axis=2, keepdims=True)
    q = q.reshape(n_types * n_studies, n_genes).astype(np.float32)

    # ---- cells: study blocks, type proportions per study, library sizes
    cells_rng = master if cell_seed is None else _design_rng(seed, _CELL_CHUNK_STREAM, int(cell_seed))
    chunk_key: tuple[int, ...] = () if cell_seed is None else (_DESIGN_STREAM, _CELL_CHUNK_STREAM, int(cell_seed))
    sizes = np.full(n_studies, n_cells // n_studies)
    sizes[: n_cells % n_studies] += 1
    study_code = np.repeat(np.arange(n_studies), sizes)
    type_code = np.empty(n_cells, dtype=np.int64)
    offset = 0
    for s in range(n_studies):
        ok = np.flatnonzero(allowed[s])
        p = cells_rng.dirichlet(np.full(ok.size, type_balance))
        type_code[offset: offset + sizes[s]] = ok[cells_rng.choice(ok.size, size=sizes[s], p=p)]
        offset += sizes[s]
    library_factor = np.exp(study_lib[study_code] + cells_rng.normal(0.0, library_sd, n_cells))
    library = (library_size * library_factor).astype(np.float32)
    group = type_code * n_studies + study_code

    # ---- counts, block by block straight into CSR pieces
    n_blocks = (n_cells + BLOCK_CELLS - 1) // BLOCK_CELLS

    def block(b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = slice(b * BLOCK_CELLS, min((b + 1) * BLOCK_CELLS, n_cells))
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(*chunk_key, b)))
        return _nb_block(rng, library[rows], q, group[rows], theta_g)

    if workers == 1 or n_blocks == 1:
        pieces = [block(b) for b in range(n_blocks)]
    else:
        with ThreadPoolExecutor(max_workers=min(workers, n_blocks)) as ex:
            pieces = list(ex.map(block, range(n_blocks)))

    nnz_per_row = np.concatenate([p[0] for p in pieces])
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(nnz_per_row, out=indptr[1:])
    nnz = int(indptr[-1])
    index_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    indices = np.empty(nnz, dtype=index_dtype)
    data = np.empty(nnz, dtype=np.float32)
    pos = 0
    pieces.reverse()
    while pieces:  # pop each block once copied (a view such as cols[:0] would keep it alive)
        _, cols, vals = pieces.pop()
        indices[pos: pos + cols.size] = cols
        data[pos: pos + vals.size] = vals
        pos += cols.size
    del cols, vals
    x = sp.csr_matrix((data, indices, indptr.astype(index_dtype)), shape=(n_cells, n_genes))

    width = len(str(n_genes - 1))
    var = pd.DataFrame(index=pd.Index([f"gene_{i:0{width}d}" for i in range(n_genes)], name=None))
    var["theta"] = theta_g
    obs = pd.DataFrame(
        {
            "study": pd.Categorical.from_codes(study_code, categories=studies),
            "cell_type": pd.Categorical.from_codes(type_code, categories=types),
            "library_factor": library_factor.astype(np.float32),
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.varm["type_log_program"] = programs.T.astype(np.float32)
    adata.varm["study_log_effect"] = study_gene.T.astype(np.float32)
    if response is not None:
        adata.obs["state"] = pd.Categorical.from_codes((strengths[study_code] > 0).astype(np.int8),
                                                       categories=["control", "stimulated"])
        adata.obs["state_strength"] = strengths[study_code].astype(np.float32)
        adata.varm["state_log_response"] = response.T.astype(np.float32)
    adata.uns["simulate"] = {
        "n_cells": n_cells, "n_genes": n_genes, "n_cell_types": n_cell_types, "n_studies": n_studies,
        "held_out": {str(k): [str(t) for t in ([v] if isinstance(v, str) else v)]
                     for k, v in (held_out or {}).items()},
        "seed": int(seed), "n_markers": n_markers, "marker_log_fold_range": [lo, hi],
        "gene_log_sd": float(gene_log_sd), "type_log_sd": float(type_log_sd),
        "study_gene_sd": float(study_gene_sd), "study_library_sd": float(study_library_sd),
        "library_size": float(library_size), "library_sd": float(library_sd), "theta": float(theta),
        "type_balance": float(type_balance),
    }
    if response is not None:  # only when asked for, so default outputs stay as they were
        adata.uns["simulate"].update({"state_strength": dict(zip(studies, strengths.tolist())),
                                      "n_state_genes": n_state_genes, "state_type_sd": float(state_type_sd)})
    if sibs:
        adata.uns["simulate"]["siblings"] = {name: [types[p], d] for name, p, d in sibs}
    return adata


def _nb_block(rng: np.random.Generator, library: np.ndarray, q: np.ndarray, group: np.ndarray,
              theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NB counts for one block of cells -> (nnz per row, column indices, values), row-major.

    Step 1 decides zero vs nonzero for every entry with one uniform ``u`` (zero iff
    ``u <= P(0)``, i.e. the inverse CDF at 0). Step 2 draws the nonzero values from
    the zero-truncated NB: by continuing the inverse-CDF search with the same ``u``
    for small means, by gamma-Poisson rejection for large ones. Both are exact.
    """
    n_genes = q.shape[1]
    mu = q[group]  # (m, G) float32, a fresh array
    mu *= library[:, None]
    # Zero iff u <= P(0) = exp(-theta * log1p(mu / theta)). With u = exp(-E), E ~ Exp(1),
    # that is mu <= theta * expm1(E / theta): one transcendental per entry, not two.
    bound = rng.standard_exponential(mu.shape, dtype=np.float32)
    bound *= (1.0 / theta)[None, :]
    np.expm1(bound, out=bound)
    bound *= theta[None, :]
    nonzero = mu > bound
    nnz_per_row = np.count_nonzero(nonzero, axis=1).astype(np.int64)
    flat = np.flatnonzero(nonzero)  # row-major = CSR order
    del nonzero
    cols = (flat % n_genes).astype(np.int32)
    m = mu.ravel()[flat].astype(np.float64)
    # the same uniform, back from the bound: u = exp(-E), E = theta * log1p(bound / theta)
    th_f = theta[cols].astype(np.float64)
    ue = np.exp(-th_f * np.log1p(bound.ravel()[flat].astype(np.float64) / th_f))
    del mu, bound, flat
    th = th_f
    counts = np.ones(m.size, dtype=np.int64)
    big = m > _MU_REJECTION
    small = np.flatnonzero(~big)
    if small.size:
        counts[small] = _truncated_nb_inverse(m[small], th[small], ue[small], rng)
    bigi = np.flatnonzero(big)
    if bigi.size:
        counts[bigi] = _truncated_nb_rejection(m[bigi], th[bigi], rng)
    return nnz_per_row, cols, counts.astype(np.float32)


def _truncated_nb_inverse(m: np.ndarray, th: np.ndarray, u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smallest k >= 1 with NB-CDF(k) >= u (u > P(0) already), vectorised over entries.

    pmf(k) = pmf(k-1) * (k - 1 + theta) / k * mu / (mu + theta). The working arrays are
    compacted every step, so the cost is proportional to the sum of the counts, not
    to (entries x largest count). Entries still short of ``u`` after
    ``_MAX_INVERSE_STEPS`` (only when rounding keeps the CDF below u) are redrawn by
    rejection, which samples the same distribution.
    """
    out = np.ones(m.size, dtype=np.int64)
    r = m / (m + th)
    p0 = np.exp(-th * np.log1p(m / th))
    pmf = p0 * th * r
    cdf = p0 + pmf
    go = cdf < u
    idx = np.flatnonzero(go)
    r, pmf, cdf, th_a, u_a = r[go], pmf[go], cdf[go], th[go], u[go]
    k = 1
    while idx.size and k <= _MAX_INVERSE_STEPS:
        k += 1
        pmf *= (k - 1 + th_a) / k
        pmf *= r
        cdf += pmf
        done = cdf >= u_a
        if done.any():
            out[idx[done]] = k
            keep = ~done
            idx, r, pmf, cdf, th_a, u_a = idx[keep], r[keep], pmf[keep], cdf[keep], th_a[keep], u_a[keep]
    if idx.size:
        out[idx] = _truncated_nb_rejection(m[idx], th[idx], rng)
    return out


def _truncated_nb_rejection(m: np.ndarray, th: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zero-truncated NB by drawing gamma-Poisson until nonzero (means are large here)."""
    out = np.zeros(m.size, dtype=np.int64)
    todo = np.arange(m.size)
    while todo.size:
        lam = rng.standard_gamma(th[todo]) * (m[todo] / th[todo])
        draw = rng.poisson(lam)
        ok = draw > 0
        out[todo[ok]] = draw[ok]
        todo = todo[~ok]
    return out


def _main() -> None:
    """``python -m fedarches.data.simulate --cells N``: time and size one simulation."""
    import argparse
    import resource
    import time

    p = argparse.ArgumentParser(description="time the simulator")
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=-1)
    a = p.parse_args()
    t0 = time.perf_counter()
    adata = simulate(n_cells=a.cells, n_genes=a.genes, n_jobs=a.jobs)
    secs = time.perf_counter() - t0
    x = adata.X
    zeros = 1.0 - x.nnz / (x.shape[0] * x.shape[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    size = (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 1024**3
    print(f"{a.cells} cells x {a.genes} genes: {secs:.1f} s, zeros {zeros:.3f}, "
          f"mean UMIs/cell {x.sum() / x.shape[0]:.0f}, CSR {size:.2f} GiB, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    _main()
